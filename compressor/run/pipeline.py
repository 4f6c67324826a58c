"""``compress run``: set-up → dense measurement → search (prune, fine-tune, evaluate, certify,
budget decision per candidate) → final check (the passing levels as ONNX models on the final
suite, the sparsest first; certificates, export) → report.

Each stage (compressor/run/stages.py) passes a frozen value to the next; the run directory
receives the resolved config, a journal of finished candidates, the chosen ``policy.pt`` and
``policy.onnx``, and the report. Every file is written atomically.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from compressor.core.config import Target
from compressor.core.executor import Executor, SerialExecutor
from compressor.core.progress import Reporter
from compressor.evaluate import SuiteResult
from compressor.report.build import build_report, write_report
from compressor.report.performance import performance_block, suite_steps, training_steps
from compressor.run.results import DenseMeasurement, FinalCheck
from compressor.run.stages import finish_chosen, measure_dense, search, set_up


@dataclass(frozen=True)
class RunResult:
    """What ``compress run`` produced.

    :param run_dir: the run directory. :param report: the report dict (``report.json``).
    :param passed: whether a sparsity met the budget.
    """

    run_dir: Path
    report: dict[str, Any]
    passed: bool


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
) -> RunResult:
    """Compress ``src`` within ``budget`` and write the run directory.

    :param src: a policy file (native, SB3 zip, CleanRL…).
    :param budget: fraction of the return scale a candidate may lose, in (0, 1).
    :param profile: profile name or TOML path (default: the shipped one for the policy's env).
    :param target: deployment target (opset, providers); default ``cpu-x86`` settings.
    :param out_root: folder that receives ``<name>/``.
    :param name: run name (default: the policy file's stem).
    :param command: the command line, recorded in the report.
    :param reporter: progress display and stage timer.
    :param prune_method: overrides the profile's ``[prune] method``.
    :param executor: where the attack-suite evaluations and the search's candidates run
        (default: in this process); the numbers do not depend on it. The caller closes it.
    :param choose: which passing level to deploy, ``max-sparsity`` or ``sweet-spot``
        (default: the profile's ``[search] choose``).
    """
    rep = reporter or Reporter(enabled=False)
    ex = executor or SerialExecutor()
    t_start = time.perf_counter()
    torch.set_num_threads(1)  # tiny MLPs: threads only add overhead and oversubscribe cores
    setup = set_up(
        src,
        budget=budget,
        profile=profile,
        target=target,
        out_root=Path(out_root),
        name=name,
        command=command or [],
        prune_method=prune_method,
        reporter=rep,
    )
    dense = measure_dense(setup, ex, rep)
    result, search_suites = search(setup, dense, ex, rep)
    final = finish_chosen(setup, dense, result, ex, rep, choose=choose)
    rep.timings["total"] = time.perf_counter() - t_start
    report = build_report(setup, dense, result, final, rep.timings)
    report["performance"] = _performance(rep, ex, dense, search_suites, final)
    with rep.stage("report"):
        write_report(report, setup.run_dir)
    return RunResult(setup.run_dir, report, final.passed)


def _performance(
    rep: Reporter,
    ex: Executor,
    dense: DenseMeasurement,
    search_suites: list[SuiteResult],
    final_check: FinalCheck,
) -> dict[str, Any]:
    """The report's ``performance`` block: stage times, env steps, memory."""
    final = final_check.suites
    steps = {
        "evaluate dense": suite_steps([dense.suite]),
        "collect states": dense.state_steps,
        "search": suite_steps(search_suites),
        "final check": suite_steps(final),
    }
    trained = training_steps([dense.suite, *search_suites, *final])
    return performance_block(rep.timings, steps, ex, {"attack_training_env_steps": trained})
