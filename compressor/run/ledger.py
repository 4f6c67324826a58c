"""The search's candidates for one run directory: the journal's finished ones are reused, the
others are built (on the executor's workers when a round asks for several) and decided against
the dense policy here (where the dense policy's episodes are shared), and each is recorded in
the journal as soon as it is finished, so a killed run resumes where it stopped.
"""

from __future__ import annotations

from rich.markup import escape

from compressor.core.executor import Executor
from compressor.core.naming import CERT_NAME, cert_unit, sparsity_text
from compressor.core.progress import Reporter
from compressor.evaluate import SuiteResult
from compressor.run.journal import Journal
from compressor.search.candidate import Candidate, CandidateJob, build_candidate, decide_candidate
from compressor.search.sequential import ReferenceSeries


class CandidateLedger:
    """Evaluates sparsity levels for :func:`~compressor.search.sparsity.search_sparsity`.

    :param journal: the run directory's journal. :param job: what building a candidate needs.
    :param executor: where candidates are built. :param reporter: progress and notes.
    :param reference: the dense policy's evaluations on the decision seeds (extended on
        demand, shared by every candidate).
    """

    def __init__(
        self,
        journal: Journal,
        job: CandidateJob,
        executor: Executor,
        reporter: Reporter,
        reference: ReferenceSeries,
    ) -> None:
        self.journal, self.job, self.executor, self.reporter = journal, job, executor, reporter
        self.reference = reference
        self.finished: dict[str, Candidate] = journal.load()
        #: suites evaluated in this invocation (not those read back from the journal)
        self.suites: list[SuiteResult] = []

    def evaluate(self, levels: list[float]) -> list[Candidate]:
        """The candidates of ``levels``, in the same order (journalled, or built now)."""
        todo = [s for s in levels if Journal.key(s) not in self.finished]
        for s in levels:
            if s not in todo:
                c = self.finished[Journal.key(s)]
                self.reporter.info(
                    f"  sparsity {sparsity_text(c.sparsity)}: from the journal "
                    f"({_verdict(c, plain=True)})"
                )
        for built in self._build(todo):
            where = f"  sparsity {sparsity_text(built.sparsity)}"

            def look(
                done: int, total: int | None = None, detail: str = "", where: str = where
            ) -> None:
                self.reporter.info(
                    f"{where}: too close to call, look {done + 1} of {total}: {detail}"
                )

            c = decide_candidate(self.job, built, self.reference, self.executor, look)
            self.suites.append(c.suite)
            self.journal.record(c)
            self.finished[Journal.key(c.target_sparsity)] = c
            self.reporter.info(f"  sparsity {sparsity_text(c.sparsity)}: {_line(c)}")
        return [self.finished[Journal.key(s)] for s in levels]

    def _build(self, levels: list[float]) -> list[Candidate]:
        ex, rep = self.executor, self.reporter
        if ex.workers > 1 and len(levels) > 1:
            names = ", ".join(sparsity_text(s) for s in levels)
            with rep.stage(f"search: sparsity {names} on {ex.workers} {ex.name} workers"):
                return ex.map(build_candidate, [(self.job, s) for s in levels])
        built = []
        for s in levels:
            steps = len(self.job.prof.attacks.screen) + 2
            with rep.stage(f"search: sparsity {sparsity_text(s)}", total=steps) as progress:
                built.append(build_candidate(self.job, s, progress))
        return built


def _line(c: Candidate) -> str:
    """One progress line: returns, episodes, certificate (name and unit), verdict."""
    n = c.decision.episodes if c.decision else None
    spent = f", {n} episodes" if n else ""
    return (
        f"clean {c.suite.clean.stats.mean:.1f}, robust {c.suite.robust_return:.1f}{spent}, "
        f"{CERT_NAME} {c.certificate.lipschitz:.4g} {cert_unit(c.certificate.shift_name)} → "
        f"{_verdict(c)}"
    )


def _verdict(c: Candidate, plain: bool = False) -> str:
    status = c.status
    if plain:
        return status
    if status == "pass":
        return "[green]pass[/green]"
    colour = "yellow" if status == "undecided" else "red"
    return f"[{colour}]{status}[/{colour}]: {escape('; '.join(c.reasons))}"
