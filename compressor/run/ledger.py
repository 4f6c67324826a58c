"""The search's candidates for one run directory: the journal's finished ones are reused, the
others are built (on the executor's workers when a round asks for several) and decided against
the dense policy here (where the dense policy's episodes are shared), and each is recorded in
the journal as soon as it is finished, so a killed or interrupted run resumes where it stopped.
While a round runs, the progress bar says what each candidate is doing (its workers report back
through the executor).
"""

from __future__ import annotations

import time
from collections.abc import Iterator

from rich.markup import escape

from compressor.core.executor import Executor
from compressor.core.naming import CERT_NAME, cert_unit, sparsity_text
from compressor.core.progress import Progress, Reporter
from compressor.evaluate import SuiteResult
from compressor.report.performance import suite_steps
from compressor.run.journal import Journal
from compressor.run.timings import record_invocation
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
        self._t0 = time.perf_counter()  # the search starts with its ledger

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
            self._finish(self._decide(built))
        return [self.finished[Journal.key(s)] for s in levels]

    def _finish(self, c: Candidate) -> None:
        """Journal a candidate the moment it is finished, and keep this invocation's search
        time so far beside it (a killed run's report still counts it)."""
        self.suites.append(c.suite)
        self.journal.record(c)
        self.finished[Journal.key(c.target_sparsity)] = c
        record_invocation(
            self.journal.path.parent,
            {"search": time.perf_counter() - self._t0},
            {"search": suite_steps(self.suites)},
        )
        self.reporter.info(f"  sparsity {sparsity_text(c.sparsity)}: {_line(c)}")

    def _decide(self, built: Candidate) -> Candidate:
        """Decide a built candidate against the dense reference (extending both as needed)."""
        where = f"  sparsity {sparsity_text(built.sparsity)}"

        def look(done: int, total: int | None = None, detail: str = "") -> None:
            self.reporter.info(f"{where}: too close to call, look {done + 1} of {total}: {detail}")

        return decide_candidate(self.job, built, self.reference, self.executor, look)

    def _build(self, levels: list[float]) -> Iterator[Candidate]:
        """Build ``levels``: a parallel round all at once, otherwise one at a time (each is
        decided and journalled before the next is built)."""
        ex, rep = self.executor, self.reporter
        steps = len(self.job.prof.attacks.screen) + 2  # build_candidate's units of progress
        if ex.workers > 1 and len(levels) > 1:
            names = ", ".join(sparsity_text(s) for s in levels)
            stage = f"search: sparsity {names} on {ex.workers} {ex.name} workers"
            with rep.stage(stage, total=steps * len(levels)) as progress:
                board = _Board(levels, steps, progress)
                jobs = [(self.job, s) for s in levels]
                built = ex.map(
                    build_candidate,
                    jobs,
                    on_result=lambda i, _c: board.finished(i),
                    on_progress=board.update,
                )
            yield from built
            return
        for s in levels:
            with rep.stage(f"search: sparsity {sparsity_text(s)}", total=steps) as progress:
                one = build_candidate(self.job, s, progress)
            yield one


class _Board:
    """One progress bar for a round of candidates built side by side: the units done by all,
    and what each candidate is doing now ("50% mad episode 2/16 · 70% fine-tuning")."""

    def __init__(self, levels: list[float], steps: int, progress: Progress) -> None:
        self.levels, self.progress = levels, progress
        self.state: list[tuple[int, int, str]] = [(0, steps, "waiting") for _ in levels]

    def update(self, i: int, done: int, total: int | None, detail: str) -> None:
        """Job ``i`` reported ``done`` of ``total`` units, doing ``detail``."""
        self.state[i] = (done, total or self.state[i][1], detail)
        self._show()

    def finished(self, i: int) -> None:
        """Job ``i`` is finished."""
        total = self.state[i][1]
        self.state[i] = (total, total, "built")
        self._show()

    def _show(self) -> None:
        now = " · ".join(f"{sparsity_text(s)} {d}" for s, (_, _, d) in zip(self.levels, self.state))
        done = sum(d for d, _, _ in self.state)
        self.progress(done, sum(t for _, t, _ in self.state), now)


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
