"""One ``compress run`` per run directory at a time: a lock file that names its owner.

The lock is an ``flock`` on ``<run dir>/run.lock``, which also records the owner's pid and
host for the message a second run gets. The kernel drops an ``flock`` when its process dies
(even by SIGKILL), so a lock file left behind by a dead run is simply taken over. Systems
without ``fcntl`` (Windows) run unlocked.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator
from pathlib import Path

from compressor.core.atomic import remove_stale_temporaries, storage_error
from compressor.core.errors import CompressorError

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

LOCK_FILE = "run.lock"


def _owner(fd: int) -> str:
    """What the lock file says about its holder ("pid 123 on host")."""
    os.lseek(fd, 0, os.SEEK_SET)
    text = os.read(fd, 256).decode("utf-8", "replace").split()
    return f"pid {text[0]} on {text[1]}" if len(text) >= 2 else "another process"


def _acquire(run_dir: Path) -> int | None:
    """The locked file descriptor of ``run_dir``'s lock file (None without fcntl).

    :raises CompressorError: another live process holds it.
    """
    if fcntl is None:
        return None
    path = run_dir / LOCK_FILE
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise storage_error(path, exc) or exc from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            who = _owner(fd)
            os.close(fd)
            raise CompressorError(
                f"{run_dir} is in use by another compress run ({who}); wait for it to finish, "
                "or pass --name for a separate run"
            ) from None
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # its holder removed the file as we opened it: lock the new one
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
    return fd


@contextlib.contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """Hold ``run_dir``'s lock for the body (creating the folder; removing it again on the way
    out if it was created here and stayed empty).

    :param run_dir: the run directory.
    :raises CompressorError: another process holds the lock, or ``run_dir`` is a file.
    :raises compressor.core.atomic.WriteError: the folder cannot be written.
    """
    created = not run_dir.exists()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise CompressorError(
            f"{run_dir} is a file, not a run directory; pass another --name"
        ) from None
    except OSError as exc:
        raise storage_error(run_dir, exc) or exc from None
    fd = _acquire(run_dir)
    remove_stale_temporaries(run_dir)  # a killed writer's; none can be in use under the lock
    try:
        yield
    finally:
        if fd is not None:
            with contextlib.suppress(OSError):
                (run_dir / LOCK_FILE).unlink()
            os.close(fd)
        if created:
            with contextlib.suppress(OSError):
                run_dir.rmdir()  # only if empty: a run that failed before writing anything
