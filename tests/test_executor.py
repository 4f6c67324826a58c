"""Executors: the same numbers whichever runs the jobs; dead workers are retried; workers die with
their parent and stop on Ctrl-C; results and progress come back as jobs finish."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from compressor.core.errors import CompressorError
from compressor.core.executor import LocalExecutor, SerialExecutor, make_executor
from compressor.core.threat import ThreatModel
from compressor.evaluate import evaluate_suite
from compressor.policy.loading import load_policy
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


# ---- whole runs: the search's candidates on workers ----------------------------------------
RUN_PROFILE = """
name = "tiny"
[env]
id = "CartPole-v1"
kwargs = {max_episode_steps = 80}
[threat]
eps = 0.1
[evaluation]
episodes = 3
num_envs = 3
[attacks]
screen = ["random", "mad"]
final = ["random", "mad"]
[certificate]
states = 100
empirical_states = 10
[finetune]
steps = 60
state_episodes = 2
dagger_rounds = 1
dagger_episodes = 2
[search]
grid = [0.3, 0.6, 0.9]
refine = 1
"""


def _report_numbers(report: dict[str, Any]) -> dict[str, Any]:
    """What a run measured, without times, paths or the executor's own description."""

    def strip(x: Any) -> Any:
        if isinstance(x, dict):
            return {
                k: strip(v)
                for k, v in x.items()
                if not k.startswith("wall") and k not in ("training", "path", "run_dir", "seconds")
            }
        if isinstance(x, list):
            return [strip(v) for v in x]
        return x

    return strip({k: report[k] for k in ("verdict", "budget", "dense", "chosen", "frontier")})


@pytest.fixture(scope="module")
def serial_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    from compressor.run.pipeline import run_pipeline

    tmp = tmp_path_factory.mktemp("serial")
    prof = tmp / "tiny.toml"
    prof.write_text(RUN_PROFILE)
    res = run_pipeline(
        REPO / "profiles" / "cartpole.pt", profile=str(prof), out_root=tmp, name="serial"
    )
    return prof, res.report


def _parallel_run(prof: Path, tmp: Path, ex: Any) -> dict[str, Any]:
    from compressor.run.pipeline import run_pipeline

    try:
        res = run_pipeline(
            REPO / "profiles" / "cartpole.pt", profile=str(prof), out_root=tmp, executor=ex
        )
    finally:
        ex.close()
    return res.report


def test_run_on_two_local_workers_gives_the_serial_report(
    serial_run: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    prof, serial = serial_run
    par = _parallel_run(prof, tmp_path, LocalExecutor(2))
    assert _report_numbers(par) == _report_numbers(serial)
    assert len(serial["frontier"]) >= 3  # the grid and a refinement step were searched
    perf = par["performance"]
    assert perf["executor"] == {"name": "local", "workers": 2}
    assert perf["peak_memory_mib"]["worker"] > 0
    stages = {s["stage"]: s for s in perf["stages"]}
    assert stages["search"]["env_steps"] > 0 and stages["search"]["env_steps_per_s"] > 0
    assert abs(sum(s["share"] for s in perf["stages"]) - 1) < 0.05
    from compressor.report.build import validate

    assert validate(par) == []
    md = (tmp_path / "cartpole" / "report.md").read_text()
    assert "Executor: local, 2 workers" in md and "env steps/s" in md


def test_run_on_ray_gives_the_serial_report(
    serial_run: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    pytest.importorskip("ray", reason="Ray is an optional extra: pip install '.[ray]'")
    prof, serial = serial_run
    par = _parallel_run(prof, tmp_path, make_executor("ray", workers=2, address="local"))
    assert _report_numbers(par) == _report_numbers(serial)
    assert par["performance"]["executor"] == {"name": "ray", "workers": 2}


# ---- faults: workers die with their parent, stop on Ctrl-C, report as they go -----------------
def _children(pid: int) -> list[int]:
    """Live processes whose parent is ``pid`` (from /proc)."""
    kids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and _alive(int(d.name)):
            try:
                if int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    kids.append(int(d.name))
            except (OSError, IndexError, ValueError):
                continue
    return kids


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, dead but not yet reaped, does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _survivors(pids: list[int], patience_s: float = 60.0) -> list[int]:
    """Those of ``pids`` still alive once they had ``patience_s`` to exit (a liveness wait,
    not a timing assertion: a passing run returns as soon as they are gone)."""
    deadline = time.monotonic() + patience_s
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.1)
    return [p for p in pids if _alive(p)]


needs_proc = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")

_POOL_THEN_WAIT = """
import os, sys, time
sys.path[:0] = {path!r}
from compressor.core.executor import LocalExecutor
ex = LocalExecutor(2)
ex.map(os.getpid, [(), (), (), ()])  # start both workers (and the resource tracker)
print("ready", flush=True)
time.sleep(600)
"""


@needs_proc
def test_workers_die_with_their_parent() -> None:
    # the OOM killer's SIGKILL gives the parent no chance to clean up: before, both idle
    # workers and multiprocessing's resource tracker were re-parented to PID 1 and slept on
    code = _POOL_THEN_WAIT.format(path=sys.path)
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout is not None and parent.stdout.readline().strip() == "ready"
        kids = _children(parent.pid)
        assert len(kids) >= 2  # two workers (and the resource tracker)
    finally:
        parent.kill()
        parent.wait()
    assert _survivors(kids) == [], "processes outlived their SIGKILLed parent"


def _mark_and_sleep(marker: str, seconds: float) -> int:
    """A job that says it started (its worker's pid in ``marker``), then runs ``seconds``."""
    Path(marker).write_text(str(os.getpid()))
    time.sleep(seconds)
    return os.getpid()


_INTERRUPTED_MAP = """
import sys
sys.path[:0] = {path!r}
from compressor.core.executor import LocalExecutor
from test_executor import _mark_and_sleep
ex = LocalExecutor(2)
try:
    ex.map(_mark_and_sleep, [({a!r}, 600), ({b!r}, 600)])
except KeyboardInterrupt:
    print("interrupted", flush=True)
    sys.exit(130)
"""


@needs_proc
def test_ctrl_c_stops_the_running_jobs(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    code = _INTERRUPTED_MAP.format(path=sys.path, a=str(a), b=str(b))
    parent = subprocess.Popen(
        [sys.executable, "-c", code],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # even under nohup
    )
    deadline = time.monotonic() + 120
    while not (a.is_file() and b.is_file()) and time.monotonic() < deadline:
        time.sleep(0.05)
    workers = [int(a.read_text()), int(b.read_text())]
    os.kill(parent.pid, signal.SIGINT)  # the main process only: it must stop the workers
    out, err = parent.communicate(timeout=120)
    assert parent.returncode == 130 and out.strip() == "interrupted", err
    assert _survivors(workers) == [], "a job kept running after Ctrl-C"


def _count_up(n: int, progress: Any) -> int:
    """A job that reports each of its ``n`` steps."""
    for k in range(n):
        progress(k, n, f"step {k + 1}/{n}")
    return 10 * n


@pytest.mark.parametrize(
    "make", [lambda: LocalExecutor(2), SerialExecutor], ids=["local", "serial"]
)
def test_results_and_progress_come_back_as_jobs_finish(make: Any) -> None:
    ex = make()
    results: dict[int, int] = {}
    seen: dict[int, list[tuple[int, int | None, str]]] = {0: [], 1: []}
    try:
        out = ex.map(
            _count_up,
            [(3,), (2,)],
            on_result=results.__setitem__,
            on_progress=lambda i, done, total, detail: seen[i].append((done, total, detail)),
        )
    finally:
        ex.close()
    assert out == [30, 20] and results == {0: 30, 1: 20}
    assert seen[0] == [(0, 3, "step 1/3"), (1, 3, "step 2/3"), (2, 3, "step 3/3")]
    assert seen[1] == [(0, 2, "step 1/2"), (1, 2, "step 2/2")]
