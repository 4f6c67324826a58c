"""A run stopped by a fault resumes to the same report: killed (SIGKILL, its workers die with it),
interrupted (Ctrl-C), refused a write (a read-only folder, a full disk); a second run into the
same directory is refused; a changed config is refused; runs are deterministic."""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from test_executor import _children, _survivors, needs_proc

from conftest import REPO, cli

CARTPOLE = str(REPO / "profiles" / "cartpole.pt")
PROFILE = """
name = "tiny-cartpole"
[env]
id = "CartPole-v1"
[threat]
eps = 0.1
[evaluation]
episodes = 3
num_envs = 3
[finetune]
steps = 150
state_episodes = 2
dagger_episodes = 2
[certificate]
states = 200
empirical_states = 20
[search]
grid = [0.5, 0.7, 0.9]
refine = 1
"""
# timings (and hashes of files that record timings, such as the journal) legitimately differ
VOLATILE = {"wall_s", "seconds", "timings_s", "run_dir", "command", "path", "eval_wall_s"}
VOLATILE |= {"training", "outputs_sha256", "performance"}  # measured time and memory


def _cmd(profile: Path, out: Path, budget: str = "0.05", workers: str = "2") -> list[str]:
    return [
        sys.executable,
        "-m",
        "compressor.cli",
        *_args(profile, out, budget, workers),
    ]


def _args(profile: Path, out: Path, budget: str = "0.05", workers: str = "2") -> list[str]:
    """``compress``'s arguments for the tiny run (two workers: the search's first round runs
    two candidates side by side)."""
    return [
        "run",
        CARTPOLE,
        "--budget",
        budget,
        "--profile",
        str(profile),
        "--out",
        str(out),
        "--name",
        "r",
        "--workers",
        workers,
        "--json",
    ]


def _stable(obj: Any) -> Any:
    """The report without timings and paths, which legitimately differ between runs."""
    if isinstance(obj, dict):
        return {k: _stable(v) for k, v in obj.items() if k not in VOLATILE}
    if isinstance(obj, list):
        return [_stable(v) for v in obj]
    return obj


def _wait(until: Callable[[], bool], proc: subprocess.Popen[Any], what: str) -> None:
    """Wait (patiently: a liveness wait, not a timing assertion) until ``until()`` holds."""
    deadline = time.monotonic() + 300
    while not until():
        assert proc.poll() is None, f"the run ended before {what}"
        assert time.monotonic() < deadline, f"no {what} after 300 s"
        time.sleep(0.05)


def _lines(journal: Path) -> int:
    return journal.read_text().count("\n") if journal.is_file() else 0


def _search_timed(run: Path) -> bool:
    """Whether this invocation's entry in timings.json has its search time so far."""
    try:
        last = json.loads((run / "timings.json").read_text())["invocations"][-1]
    except (OSError, ValueError, KeyError, IndexError):
        return False
    return "search" in last.get("timings_s", {})


def _intact(run: Path, stranded: bool = False) -> int:
    """Checks that nothing is half-written: every journal line whole and its policy loadable,
    no temporary file left (unless ``stranded``: a SIGKILL, or a folder turned read-only under
    a write, can leave a hidden one that nothing could remove; never a partial file under a
    final name, and the resumed run removes it); returns the journal's candidates."""
    from compressor.policy.native import load_native

    lines = (run / "journal.jsonl").read_text().splitlines()
    for line in lines:
        key = f"{json.loads(line)['target_sparsity']:.4f}"
        load_native(run / "candidates" / f"sparsity-{key}.pt")
    if not stranded:
        assert not list(run.rglob("*.tmp")), "a temporary file was left behind"
    return len(lines)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    prof = tmp_path_factory.mktemp("profile") / "tiny.toml"
    prof.write_text(PROFILE)
    return prof


@pytest.fixture(scope="module")
def reference(tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The report of the tiny run made in one go."""
    out = tmp_path_factory.mktemp("reference")
    full = subprocess.run(_cmd(tiny, out), capture_output=True, text=True, timeout=600)
    assert full.returncode == 0, full.stderr  # bisection finds a passing level (25%)
    report: dict[str, Any] = json.loads(full.stdout)
    return report


@needs_proc
def test_killed_run_resumes_to_the_same_report(
    tiny: Path, reference: dict[str, Any], tmp_path: Path
) -> None:
    out = tmp_path / "b"
    run = out / "r"
    journal = run / "journal.jsonl"
    proc = subprocess.Popen(_cmd(tiny, out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait(lambda: _lines(journal) >= 1 and _search_timed(run), proc, "finished candidate")
    helpers = _children(proc.pid)  # the pool's two workers and multiprocessing's tracker
    os.kill(proc.pid, signal.SIGKILL)  # what the OOM killer does
    proc.wait()
    assert len(helpers) >= 2
    assert _survivors(helpers) == [], "processes outlived their SIGKILLed parent"
    assert _intact(run, stranded=True) >= 1
    assert not (run / "report.json").exists()  # it really was cut off before the end

    resumed = subprocess.run(_cmd(tiny, out), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stderr
    assert not list(run.rglob("*.tmp")), "the killed writer's temporary file was not cleaned up"
    report = json.loads(resumed.stdout)
    assert _stable(report) == _stable(reference)

    # the killed invocation's stage times are kept: a stage keeps the time of the invocation
    # that did it first, the search adds up the parts each invocation did
    perf = report["performance"]
    first, second = perf["invocations"]
    assert (first["finished"], second["finished"]) == (False, True)
    assert report["timings_s"]["evaluate dense"] == round(first["timings_s"]["evaluate dense"], 2)
    stages = {s["stage"]: s for s in perf["stages"]}
    assert stages["evaluate dense"]["invocations"] == [1]
    assert stages["final check"]["invocations"] == [2]
    assert stages["search"]["invocations"] == [1, 2]
    both = first["timings_s"]["search"] + second["timings_s"]["search"]
    assert stages["search"]["wall_s"] == pytest.approx(both, abs=2e-3)
    assert perf["total_wall_s"] >= sum(s["wall_s"] for s in perf["stages"]) - 1e-2

    # the same command and seeds give bit-identical report numbers (determinism)
    again = subprocess.run(_cmd(tiny, tmp_path / "c"), capture_output=True, text=True, timeout=600)
    assert _stable(json.loads(again.stdout)) == _stable(reference)

    # a changed configuration is refused, not mixed into the old directory
    changed = subprocess.run(_cmd(tiny, out, budget="0.1"), capture_output=True, text=True)
    assert changed.returncode == 3
    assert "another configuration" in changed.stderr and "budget" in changed.stderr


@needs_proc
def test_ctrl_c_keeps_every_finished_candidate_and_says_how_to_resume(
    tiny: Path, reference: dict[str, Any], tmp_path: Path
) -> None:
    out = tmp_path / "i"
    run = out / "r"
    proc = subprocess.Popen(
        _cmd(tiny, out),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # a process group of its own, as a terminal's job
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # even under nohup
    )
    _wait(lambda: _lines(run / "journal.jsonl") >= 1, proc, "finished candidate")
    helpers = _children(proc.pid)
    finished = _lines(run / "journal.jsonl")
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: the terminal signals the whole group
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr  # no worker prints a KeyboardInterrupt of its own
    last = stderr.strip().splitlines()[-1]
    kept = _intact(run)
    assert kept >= finished
    command = shlex.join(["compress", *_args(tiny, out)])
    assert last == (
        f"interrupted: {kept} finished candidate(s) kept in {run / 'journal.jsonl'}; "
        f"resume with: {command}"
    )
    assert _survivors(helpers) == [] and not (run / "run.lock").exists()

    # the printed command resumes the run, reusing what was kept
    argv = [sys.executable, "-m", "compressor.cli", *shlex.split(command)[1:]]
    resumed = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert f"{kept} candidate(s) already finished" in resumed.stderr
    assert _stable(json.loads(resumed.stdout)) == _stable(reference)


class ReadOnly:
    """Takes write permission away from a folder mid-run, and gives it back: ``chmod`` for a
    user; for root, whom permissions do not stop, a read-only bind mount over the folder."""

    def __init__(self) -> None:
        self.root = os.geteuid() == 0
        self.mounts: list[Path] = []

    def apply(self, folder: Path) -> None:
        if self.root:
            subprocess.run(["mount", "--bind", str(folder), str(folder)], check=True)
            self.mounts.append(folder)
            subprocess.run(["mount", "-o", "remount,ro,bind", str(folder)], check=True)
            return
        for p in [folder, *folder.rglob("*")]:
            p.chmod(p.stat().st_mode & ~0o222)

    def undo(self, folder: Path) -> None:
        if folder in self.mounts:
            subprocess.run(["umount", str(folder)], check=True)
            self.mounts.remove(folder)
            return
        for p in [folder, *folder.rglob("*")]:
            p.chmod(p.stat().st_mode | 0o200)


def _can_bind_mount(tmp: Path) -> bool:
    try:
        done = subprocess.run(["mount", "--bind", str(tmp), str(tmp)], capture_output=True)
    except OSError:
        return False
    if done.returncode == 0:
        subprocess.run(["umount", str(tmp)], check=False)
    return done.returncode == 0


@pytest.fixture
def read_only(tmp_path: Path) -> Iterator[ReadOnly]:
    if not hasattr(os, "geteuid"):
        pytest.skip("POSIX permissions")
    if os.geteuid() == 0 and not _can_bind_mount(tmp_path):
        pytest.skip("root, and no mount to make a folder read-only with")
    ro = ReadOnly()
    yield ro
    for folder in list(ro.mounts):
        subprocess.run(["umount", str(folder)], check=False)


@needs_proc
def test_read_only_run_directory_mid_run_is_one_line_and_resumes(
    tiny: Path, reference: dict[str, Any], tmp_path: Path, read_only: ReadOnly
) -> None:
    out = tmp_path / "runs"
    run = out / "r"
    proc = subprocess.Popen(
        _cmd(tiny, out), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    _wait(lambda: _lines(run / "journal.jsonl") >= 1, proc, "finished candidate")
    read_only.apply(run)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 3, stderr
    errors = [line for line in stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and "Traceback" not in stderr, stderr
    line = errors[0]
    assert line.startswith(f"error: cannot write {run}/")
    assert "permission denied" in line or "read-only file system" in line
    assert f"make {run} writable, then resume with: compress run " in line
    kept = _intact(run, stranded=True)

    read_only.undo(run)
    resumed = subprocess.run(_cmd(tiny, out), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert not list(run.rglob("*.tmp"))
    assert f"{kept} candidate(s) already finished" in resumed.stderr
    assert _stable(json.loads(resumed.stdout)) == _stable(reference)


def test_full_disk_mid_run_is_one_line_and_resumes(
    tiny: Path,
    reference: dict[str, Any],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # simulated in this process (--workers 1) as torch meets a full disk: the second candidate's
    # file is cut short with torch's own error, and the file system reports no space left
    import torch

    run = tmp_path / "r"
    real_save, real_statvfs = torch.save, os.statvfs
    saves = []

    def save(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        if "candidates" in str(f):
            saves.append(f)
            if len(saves) == 2:
                Path(f).write_bytes(b"PK\x03\x04 cut short")
                raise RuntimeError(
                    "[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed "
                    "writing file data/0: file write failed"
                )
        real_save(obj, f, *args, **kwargs)

    def statvfs(path: Any) -> Any:
        if str(run) in str(Path(path).resolve()):
            return SimpleNamespace(f_flag=0, f_bavail=0, f_frsize=4096)
        return real_statvfs(path)

    monkeypatch.setattr(torch, "save", save)
    monkeypatch.setattr(os, "statvfs", statvfs)
    code, stdout, stderr = cli(capsys, *_args(tiny, tmp_path, workers="1"))
    assert code == 3 and stdout == ""
    errors = [line for line in stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1, stderr
    assert errors[0].startswith(f"error: cannot write {run}/candidates/sparsity-")
    assert "no space left on device; free some space, then resume with: compress run" in errors[0]
    assert _intact(run) == 1 and not (run / "run.lock").exists()

    monkeypatch.undo()
    code, stdout, stderr = cli(capsys, *_args(tiny, tmp_path, workers="1"))
    assert code == 0, stderr
    assert "1 candidate(s) already finished" in stderr
    assert _stable(json.loads(stdout)) == _stable(reference)


_HOLD_LOCK = """
import sys, time
from pathlib import Path
from compressor.run.lock import run_lock
with run_lock(Path(sys.argv[1])):
    print("locked", flush=True)
    time.sleep(600)
"""


def test_a_second_run_into_the_same_directory_is_refused(tiny: Path, tmp_path: Path) -> None:
    from compressor.run.lock import LOCK_FILE, run_lock

    run = tmp_path / "r"
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD_LOCK, str(run)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        second = subprocess.run(_cmd(tiny, tmp_path), capture_output=True, text=True, timeout=300)
    finally:
        holder.kill()
        holder.wait()
    assert second.returncode == 3
    assert second.stderr.strip() == (
        f"error: {run} is in use by another compress run (pid {holder.pid} on "
        f"{socket.gethostname()}); wait for it to finish, or pass --name for a separate run"
    )
    assert sorted(p.name for p in run.iterdir()) == [LOCK_FILE]  # the second wrote nothing

    # the holder was killed: its lock file stays, naming a dead pid, and is simply taken over
    assert (run / LOCK_FILE).read_text().split()[0] == str(holder.pid)
    with run_lock(run):
        assert (run / LOCK_FILE).read_text().split()[0] == str(os.getpid())
    assert list(run.iterdir()) == []  # and removed when released
