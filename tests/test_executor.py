"""Executors: the same numbers whichever runs the jobs; dead workers are retried."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from compressor.errors import CompressorError
from compressor.evaluate import evaluate_suite
from compressor.executor import LocalExecutor, SerialExecutor, make_executor
from compressor.loading import load_policy
from compressor.threat import ThreatModel
from conftest import REPO


def _numbers(suite: Any) -> dict[str, Any]:
    """The suite's results without wall-clock times."""
    out = {}
    for name, res in [("clean", suite.clean), *suite.attacks.items()]:
        d = res.to_dict()
        d.pop("wall_s", None)
        out[name] = d
    return out


def _suite(executor: Any) -> dict[str, Any]:
    policy = load_policy(REPO / "profiles" / "cartpole.pt").policy.eval()
    suite = evaluate_suite(
        policy,
        "CartPole-v1",
        {"max_episode_steps": 60},
        [0, 1, 2],
        ["random", "mad"],
        ThreatModel(0.1, "inf", "normalized"),
        num_envs=3,
        executor=executor,
    )
    return _numbers(suite)


@pytest.fixture(scope="module")
def serial() -> dict[str, Any]:
    return _suite(SerialExecutor())


def test_local_pool_gives_the_serial_numbers(serial: dict[str, Any]) -> None:
    ex = LocalExecutor(2)
    try:
        assert _suite(ex) == serial
    finally:
        ex.close()
    assert set(serial) == {"clean", "random", "mad"}
    assert serial["clean"]["return"]["mean"] == 60.0  # the trained policy balances to the limit


def test_ray_gives_the_serial_numbers(serial: dict[str, Any]) -> None:
    pytest.importorskip("ray", reason="Ray is an optional extra: pip install '.[ray]'")
    ex = make_executor("ray", workers=2, address="local")
    try:
        assert _suite(ex) == serial
    finally:
        ex.close()


def _die_once(marker: str, value: int) -> int:
    """Kill this worker process the first time it is called for ``marker``."""
    path = Path(marker)
    if not path.exists():
        path.write_text("died")
        os._exit(1)
    return value * 10


def _always_die(value: int) -> int:
    os._exit(1)


def test_a_dead_worker_is_retried(tmp_path: Path) -> None:
    ex = LocalExecutor(2)
    try:
        jobs = [(str(tmp_path / f"m{i}"), i) for i in range(3)]
        assert ex.map(_die_once, jobs) == [0, 10, 20]
        assert all((tmp_path / f"m{i}").exists() for i in range(3))
    finally:
        ex.close()


def test_a_job_that_always_kills_its_worker_is_given_up(tmp_path: Path) -> None:
    ex = LocalExecutor(2, retries=1)
    try:
        with pytest.raises(CompressorError, match="worker died"):
            ex.map(_always_die, [(1,)])
    finally:
        ex.close()


def test_bad_executor_settings() -> None:
    with pytest.raises(CompressorError, match="unknown executor"):
        make_executor("dask")
    with pytest.raises(CompressorError, match="workers"):
        make_executor("local", workers=0)
    assert isinstance(make_executor("local", workers=1), SerialExecutor)
