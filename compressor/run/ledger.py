"""The search's candidates for one run directory: the journal's finished ones are reused, the
others are built (on the executor's workers when a round asks for several), and each is
recorded in the journal as soon as it is finished, so a killed run resumes where it stopped.
"""

from __future__ import annotations

from rich.markup import escape

from compressor.core.executor import Executor
from compressor.core.progress import Reporter
from compressor.evaluate import SuiteResult
from compressor.run.journal import Journal
from compressor.search.candidate import Candidate, CandidateJob, build_candidate


class CandidateLedger:
    """Evaluates sparsity levels for :func:`~compressor.search.sparsity.search_sparsity`.

    :param journal: the run directory's journal. :param job: what building a candidate needs.
    :param executor: where candidates are built. :param reporter: progress and notes.
    """

    def __init__(
        self, journal: Journal, job: CandidateJob, executor: Executor, reporter: Reporter
    ) -> None:
        self.journal, self.job, self.executor, self.reporter = journal, job, executor, reporter
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
                    f"  sparsity {c.sparsity:.3f}: from the journal ({_verdict(c, plain=True)})"
                )
        for c in self._build(todo):
            self.suites.append(c.suite)
            self.journal.record(c)
            self.finished[Journal.key(c.target_sparsity)] = c
            self.reporter.info(
                f"  sparsity {c.sparsity:.3f}: clean {c.suite.clean.stats.mean:.1f}, robust "
                f"{c.suite.robust_return:.1f}, Lipschitz {c.certificate.lipschitz:.4g} → "
                f"{_verdict(c)}"
            )
        return [self.finished[Journal.key(s)] for s in levels]

    def _build(self, levels: list[float]) -> list[Candidate]:
        ex, rep = self.executor, self.reporter
        if ex.workers > 1 and len(levels) > 1:
            names = ", ".join(f"{s:.3f}" for s in levels)
            with rep.stage(f"search: sparsity {names} on {ex.workers} {ex.name} workers"):
                return ex.map(build_candidate, [(self.job, s) for s in levels])
        built = []
        for s in levels:
            steps = len(self.job.prof.attacks.screen) + 2
            with rep.stage(f"search: sparsity {s:.3f}", total=steps) as progress:
                built.append(build_candidate(self.job, s, progress))
        return built


def _verdict(c: Candidate, plain: bool = False) -> str:
    if c.passed:
        return "pass" if plain else "[green]pass[/green]"
    return "fail" if plain else f"[red]fail[/red]: {escape('; '.join(c.reasons))}"
