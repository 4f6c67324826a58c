"""Where a run's time and memory went: per-stage wall time, its share of the run, the env steps
each stage simulated and their throughput, the executor, and peak memory (``report.json``'s
``performance`` block, also what ``benchmarks/suite.py`` prints)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from compressor.core.executor import Executor, peak_rss_mb
from compressor.evaluate import EvalResult, SuiteResult


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
    sources: Mapping[str, list[int]] | None = None,
) -> dict[str, Any]:
    """The ``performance`` block of a report.

    :param timings: seconds per stage, with ``total`` for the whole run.
    :param env_steps: evaluation env steps per stage (stages that simulate).
    :param executor: the run's executor (name, workers, worker memory).
    :param extra: further fields (e.g. attack-training steps, a resumed run's invocations).
    :param sources: for a resumed run, the invocations (1, 2, ...) each stage's time comes
        from (see :mod:`compressor.run.timings`); shown per stage when there were several.
    """
    several = sources is not None and any(n != 1 for ns in sources.values() for n in ns)
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
        if several and sources is not None:
            row["invocations"] = list(sources.get(name, []))
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


def raw_steps_per_s(
    env_id: str, num_envs: int, steps: int, seed: int = 0, env_kwargs: dict[str, Any] | None = None
) -> float:
    """The simulator's own throughput: env steps per second of the vector env the rollout
    engine uses, stepped with uniform random actions (no policy), episodes reset as they end.
    The baseline that evaluation throughputs are divided by."""
    import time

    from compressor.rl.envs import make_vector_env

    envs = make_vector_env(env_id, env_kwargs or {}, num_envs)
    envs.action_space.seed(seed)
    envs.reset(seed=seed)
    t0, done = time.perf_counter(), 0
    try:
        while done < steps:
            _, _, term, trunc, _ = envs.step(envs.action_space.sample())
            done += num_envs
            ended = term | trunc
            if ended.any():
                envs.reset(options={"reset_mask": ended})
    finally:
        envs.close()
    return done / (time.perf_counter() - t0)
