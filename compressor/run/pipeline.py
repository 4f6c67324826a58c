"""``compress run``: set-up → dense measurement → search (prune, fine-tune, evaluate, certify,
budget decision per candidate) → final check (the passing levels as ONNX models on the final
suite, the sparsest first; certificates, export) → report.

Each stage (compressor/run/stages.py) passes a frozen value to the next; the run directory
receives the resolved config, a journal of finished candidates, each invocation's stage times,
the chosen ``policy.pt`` and ``policy.onnx``, and the report. Every file is written atomically.
"""

from __future__ import annotations

import shlex
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from compressor.core.atomic import WriteError
from compressor.core.config import Target
from compressor.core.executor import Executor, SerialExecutor
from compressor.core.progress import Reporter
from compressor.report.build import build_report, write_report
from compressor.report.performance import performance_block, suite_steps, training_steps
from compressor.run.journal import JOURNAL_FILE, Journal
from compressor.run.lock import run_lock
from compressor.run.results import FinalCheck
from compressor.run.stages import finish_chosen, measure_dense, search, set_up
from compressor.run.timings import begin_invocation, merged_times, record_invocation


@dataclass(frozen=True)
class RunResult:
    """What ``compress run`` produced.

    :param run_dir: the run directory. :param report: the report dict (``report.json``).
    :param passed: whether a sparsity met the budget.
    """

    run_dir: Path
    report: dict[str, Any]
    passed: bool


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped a run; the message says what was kept and the command that resumes it.

    A :class:`KeyboardInterrupt`, so that nothing that handles user errors (a batch's
    :class:`~compressor.core.errors.CompressorError` rows) carries on past it.
    """


def run_pipeline(
    src: str | Path,
    *,
    budget: float = 0.05,
    profile: str | None = None,
    target: Target | None = None,
    out_root: str | Path = "runs",
    name: str | None = None,
    command: list[str] | None = None,
    reporter: Reporter | None = None,
    prune_method: str | None = None,
    executor: Executor | None = None,
    choose: str | None = None,
    env: str | None = None,
) -> RunResult:
    """Compress ``src`` within ``budget`` and write the run directory.

    One process at a time works in a run directory (a second is refused). A write the storage
    refuses (full disk, read-only folder) and Ctrl-C stop the run with every finished
    candidate kept in the journal, and say which command resumes it.

    :param src: a policy file (native, SB3 zip, CleanRL…).
    :param budget: fraction of the return scale a candidate may lose, in (0, 1).
    :param profile: profile name or TOML path (default: the shipped one for the policy's env).
    :param target: deployment target (opset, providers); default ``cpu-x86`` settings.
    :param out_root: folder that receives ``<name>/``.
    :param name: run name (default: the policy file's stem).
    :param command: the command line, recorded in the report (and shown to resume).
    :param reporter: progress display and stage timer.
    :param prune_method: overrides the profile's ``[prune] method``.
    :param executor: where the attack-suite evaluations and the search's candidates run
        (default: in this process); the numbers do not depend on it. The caller closes it.
    :param choose: which passing level to deploy, ``max-sparsity`` or ``sweet-spot``
        (default: the profile's ``[search] choose``).
    :param env: the environment, over the one the file records (an SB3 zip records none).
    :raises CompressorError: bad input; another run holds the directory.
    :raises WriteError: the storage refused a write (the message says how to resume).
    :raises RunInterrupted: Ctrl-C (the message says how to resume).
    """
    rep = reporter or Reporter(enabled=False)
    ex = executor or SerialExecutor()
    run_dir = Path(out_root) / (name or Path(src).stem)  # the folder set_up opens
    options: dict[str, Any] = {
        "budget": budget,
        "profile": profile,
        "target": target,
        "out_root": Path(out_root),
        "name": name,
        "command": command or [],
        "prune_method": prune_method,
        "env": env,
        "reporter": rep,
    }
    try:
        with run_lock(run_dir):
            return _run(src, options, ex, rep, choose)
    except WriteError as exc:
        hint = "free some space" if "space" in exc.reason else f"make {run_dir} writable"
        raise WriteError(exc.path, f"{exc.reason}; {hint}, then {_resume(command)}") from None
    except KeyboardInterrupt:
        kept = Journal(run_dir).count() if run_dir.is_dir() else 0
        raise RunInterrupted(
            f"interrupted: {kept} finished candidate(s) kept in {run_dir / JOURNAL_FILE}; "
            f"{_resume(command)}"
        ) from None


def _resume(command: list[str] | None) -> str:
    """How to resume: the same command (run again, it reuses the journal)."""
    if not command:
        return "run the same command again to resume"
    return f"resume with: {shlex.join(command)}"


def _run(
    src: str | Path, options: dict[str, Any], ex: Executor, rep: Reporter, choose: str | None
) -> RunResult:
    """The five stages, each invocation's stage times kept in the run directory."""
    t_start = time.perf_counter()
    torch.set_num_threads(1)  # tiny MLPs: threads only add overhead and oversubscribe cores
    setup = set_up(src, **options)
    run_dir = setup.run_dir
    begin_invocation(run_dir)
    dense = measure_dense(setup, ex, rep)
    dense_steps = {
        "evaluate dense": suite_steps([dense.suite]),
        "collect states": dense.state_steps,
    }
    record_invocation(run_dir, rep.timings, dense_steps)
    result, search_suites = search(setup, dense, ex, rep)
    record_invocation(run_dir, rep.timings, {"search": suite_steps(search_suites)})
    final_check: FinalCheck = finish_chosen(setup, dense, result, ex, rep, choose=choose)
    rep.timings["total"] = time.perf_counter() - t_start
    final = final_check.suites
    steps = {
        **dense_steps,
        "search": suite_steps(search_suites),
        "final check": suite_steps(final),
    }
    # a resumed run reports what each stage cost in the invocation that did it
    times = merged_times(run_dir, rep.timings, steps)
    report = build_report(setup, dense, result, final_check, times.timings)
    trained = training_steps([dense.suite, *search_suites, *final])
    extra = {"attack_training_env_steps": trained, "invocations": times.invocations}
    report["performance"] = performance_block(
        times.timings, times.env_steps, ex, extra, times.sources
    )
    with rep.stage("report"):
        write_report(report, run_dir)
    record_invocation(run_dir, rep.timings, steps, finished=True)
    return RunResult(run_dir, report, final_check.passed)
