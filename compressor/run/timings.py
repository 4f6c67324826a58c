"""The stage times of every invocation of one run directory (``timings.json``), so that the
report of a resumed run says what each stage really cost, in the invocation that did it.

Each invocation appends an entry and updates it as its stages end (the search after every
candidate it finishes), so a killed invocation keeps the times of what it finished. The
report's times merge them: the search is summed over invocations (each builds only the
candidates the journal lacks; a killed one counts up to its last finished candidate); every
other stage, which a resumed run redoes deterministically, keeps the time of the first
invocation that finished it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from compressor.core import atomic

TIMINGS_FILE = "timings.json"
#: stages whose work is split between invocations (their times add up)
CUMULATIVE = frozenset({"search"})


def _read(run_dir: Path) -> list[dict[str, Any]]:
    try:
        data = json.loads((run_dir / TIMINGS_FILE).read_text())
    except (OSError, ValueError):  # absent, or unreadable: start a fresh record
        return []
    runs = data.get("invocations") if isinstance(data, dict) else None
    return [r for r in runs if isinstance(r, dict)] if isinstance(runs, list) else []


def _write(run_dir: Path, runs: list[dict[str, Any]]) -> None:
    atomic.write_json(run_dir / TIMINGS_FILE, {"invocations": runs})


def begin_invocation(run_dir: Path) -> int:
    """Append this invocation's (empty) entry; returns its number (1 for a fresh run).

    :param run_dir: the run directory (locked by this process).
    """
    runs = _read(run_dir)
    number = len(runs) + 1
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    runs.append({"invocation": number, "started": started, "finished": False})
    _write(run_dir, runs)
    return number


def record_invocation(
    run_dir: Path,
    timings: Mapping[str, float] | None = None,
    env_steps: Mapping[str, int] | None = None,
    finished: bool = False,
) -> None:
    """Update this (the last) invocation's entry with stage times and env steps so far.

    :param run_dir: the run directory. :param timings: seconds per stage (``total``: the
        invocation's wall time). :param env_steps: evaluation env steps per stage.
    :param finished: the invocation wrote its report.
    """
    runs = _read(run_dir)
    if not runs:
        return
    last = runs[-1]
    last["timings_s"] = {
        **last.get("timings_s", {}),
        **{k: round(v, 3) for k, v in (timings or {}).items()},
    }
    last["env_steps"] = {**last.get("env_steps", {}), **dict(env_steps or {})}
    last["finished"] = bool(finished)
    _write(run_dir, runs)


@dataclass(frozen=True)
class MergedTimes:
    """A run's stage times over all its invocations.

    :param timings: seconds per stage, ``total`` included. :param env_steps: env steps per
        stage, merged the same way. :param sources: the invocations each stage's time comes
        from. :param invocations: every invocation's entry, as recorded.
    """

    timings: dict[str, float]
    env_steps: dict[str, int]
    sources: dict[str, list[int]]
    invocations: list[dict[str, Any]]


def merged_times(
    run_dir: Path, current: Mapping[str, float], steps: Mapping[str, int]
) -> MergedTimes:
    """This invocation's ``current`` times and ``steps`` merged with the earlier invocations'.

    :param run_dir: the run directory. :param current: this invocation's seconds per stage
        (with ``total``). :param steps: this invocation's env steps per stage.
    """
    recorded = _read(run_dir)
    this = {
        "invocation": len(recorded) or 1,
        **(recorded[-1] if recorded else {}),  # begun by begin_invocation: its start time
        "timings_s": {k: round(v, 3) for k, v in current.items()},
        "env_steps": dict(steps),
        "finished": True,
    }
    runs = [*recorded[:-1], this]
    timings: dict[str, float] = {}
    env_steps: dict[str, int] = {}
    sources: dict[str, list[int]] = {}
    for run in runs:
        n = int(run.get("invocation", 0))
        run_steps = run.get("env_steps", {})
        for stage, secs in run.get("timings_s", {}).items():
            if stage == "total" or (stage in timings and stage not in CUMULATIVE):
                continue
            timings[stage] = timings.get(stage, 0.0) + float(secs)
            if stage in run_steps:
                env_steps[stage] = env_steps.get(stage, 0) + int(run_steps[stage])
            sources.setdefault(stage, []).append(n)
    # what no stage timed (loading, imports, building the report) as this invocation spent it
    overhead = max(
        0.0, current.get("total", 0.0) - sum(v for k, v in current.items() if k != "total")
    )
    timings["total"] = sum(timings.values()) + overhead
    return MergedTimes(timings, env_steps, sources, runs)
