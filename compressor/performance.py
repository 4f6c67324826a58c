"""Where a run's time and memory went: per-stage wall time, its share of the run, the env steps
each stage simulated and their throughput, the executor, and peak memory (``report.json``'s
``performance`` block, also what ``benchmarks/suite.py`` prints)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from compressor.evaluate import EvalResult, SuiteResult
from compressor.executor import Executor, peak_rss_mb


def suite_steps(suites: Iterable[SuiteResult], include_clean: bool = True) -> int:
    """Env steps simulated by the evaluations of ``suites`` (clean and every attack)."""
    total = 0
    for s in suites:
        runs: list[EvalResult] = list(s.attacks.values())
        if include_clean:
            runs.append(s.clean)
        total += sum(r.steps for r in runs)
    return total


def training_steps(suites: Iterable[SuiteResult]) -> int:
    """Env steps spent training attacks (learned adversaries' PPO, Robust Sarsa's data)."""
    total = 0
    for s in suites:
        for r in s.attacks.values():
            info = r.training or {}
            total += int(info.get("env_steps", 0) or 0) + int(info.get("transitions", 0) or 0)
    return total


def performance_block(
    timings: Mapping[str, float],
    env_steps: Mapping[str, int],
    executor: Executor,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The ``performance`` block of a report.

    :param timings: seconds per stage, with ``total`` for the whole run.
    :param env_steps: evaluation env steps per stage (stages that simulate).
    :param executor: the run's executor (name, workers, worker memory).
    :param extra: further fields (e.g. attack-training steps).
    """
    total = float(timings.get("total", sum(v for k, v in timings.items() if k != "total")))
    stages = []
    for name, secs in timings.items():
        if name == "total":
            continue
        row: dict[str, Any] = {
            "stage": name,
            "wall_s": round(secs, 3),
            "share": round(secs / total, 4) if total > 0 else None,
        }
        if env_steps.get(name):
            row["env_steps"] = int(env_steps[name])
            row["env_steps_per_s"] = round(env_steps[name] / secs, 1) if secs > 0 else None
        stages.append(row)
    main = peak_rss_mb()
    worker = executor.peak_worker_rss_mb
    return {
        "total_wall_s": round(total, 3),
        "stages": stages,
        "executor": {"name": executor.name, "workers": executor.workers},
        "peak_memory_mib": {
            "main": round(main, 1),
            "worker": round(worker, 1) if worker else None,
            # every worker at its own peak at the same moment: an upper bound on the run's total
            "bound": round(main + (executor.workers * worker if worker else 0.0), 1),
        },
        **(dict(extra) if extra else {}),
    }
