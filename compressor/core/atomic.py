"""Atomic file writes: write to a temporary name in the same folder, fsync, then rename.

A crash or Ctrl-C mid-write never leaves a file at the final path that looks whole. A write the
storage refuses (full disk, read-only or forbidden folder) raises :class:`WriteError`, one line
naming the file, with the temporary file removed.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from compressor.core.errors import CompressorError

#: errno values that mean "the storage refused the write", not "the program is wrong"
STORAGE_ERRNOS = frozenset(
    {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG, errno.EIO}
)
#: below this much free space, a library writer's failure is taken for a full disk
FULL_DISK_BYTES = 1 << 20


class WriteError(CompressorError):
    """A file could not be written: the disk is full, or the folder is read-only or forbidden.

    :param path: the file. :param reason: what the storage said (``strerror``).
    """

    def __init__(self, path: str | Path, reason: str) -> None:
        super().__init__(f"cannot write {path}: {reason}")
        self.path = Path(path)
        self.reason = reason


def storage_error(path: str | Path, exc: BaseException) -> WriteError | None:
    """The :class:`WriteError` for ``exc`` raised while writing ``path``, or None when ``exc``
    is not the storage refusing the write.

    :param path: the file being written. :param exc: what the write raised.
    """
    if isinstance(exc, OSError) and exc.errno in STORAGE_ERRNOS:
        return WriteError(path, (exc.strerror or os.strerror(exc.errno)).lower())
    if isinstance(exc, OSError) or not isinstance(exc, Exception):
        return None
    # a library that writes the file itself (torch.save, onnx) reports a full disk in its own
    # words ("file write failed"): ask the file system
    try:
        st = os.statvfs(Path(path).parent)
    except (OSError, AttributeError):  # no statvfs (Windows)
        return None
    if st.f_flag & getattr(os, "ST_RDONLY", 1):
        return WriteError(path, "read-only file system")
    if st.f_bavail * st.f_frsize < FULL_DISK_BYTES:
        return WriteError(path, "no space left on device")
    return None


def remove_stale_temporaries(folder: Path) -> int:
    """Delete the temporary files :func:`atomic_path` left under ``folder`` when its process was
    killed mid-write (SIGKILL, power loss: nothing can clean up then). Call it only while no
    other process writes there (under the run lock).

    :returns: how many were removed.
    """
    n = 0
    for tmp in folder.rglob(".*.tmp"):
        with contextlib.suppress(OSError):
            tmp.unlink()
            n += 1
    return n


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed onto ``path``.

    :param path: the final destination.
    :raises WriteError: the storage refused the write (the temporary file is removed).
    """
    final = Path(path)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    except OSError as exc:
        raise storage_error(final, exc) or exc from None
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        # mkstemp creates 0600; give the file the permissions a plain open() would (umask)
        umask = os.umask(0)
        os.umask(umask)
        tmp_path.chmod(0o666 & ~umask)
        yield tmp_path
        with open(tmp_path, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, final)
    except Exception as exc:
        # judged before the temporary file goes: on a full disk it holds the missing space
        refused = storage_error(final, exc)
        if refused is None:
            raise
        raise refused from None
    finally:
        with contextlib.suppress(OSError):
            tmp_path.unlink(missing_ok=True)


def write_bytes(path: str | Path, data: bytes) -> None:
    """Atomically write ``data`` to ``path``."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | Path, text: str) -> None:
    """Atomically write UTF-8 ``text`` to ``path``."""
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | Path, obj: Any) -> None:
    """Atomically write ``obj`` as indented JSON."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def write_with(path: str | Path, writer: Callable[[Path], None]) -> None:
    """Atomically produce ``path`` with ``writer(tmp_path)`` (for libraries that write files)."""
    with atomic_path(path) as tmp:
        writer(tmp)


def append_line(path: str | Path, line: str) -> None:
    """Append one line to ``path`` and fsync it, all or nothing: a write the storage refuses
    is cut back off, so the file never ends in half a line (a line a kill cut short stays, as
    its own line, for the reader to skip).

    :param path: the file (created if absent). :param line: the text, without its newline.
    :raises WriteError: the storage refused the write.
    """
    data = (line + "\n").encode("utf-8")
    p = Path(path)
    try:
        fd = os.open(p, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o666)
    except OSError as exc:
        raise storage_error(p, exc) or exc from None
    try:
        start = os.lseek(fd, 0, os.SEEK_END)
        if start > 0:
            os.lseek(fd, start - 1, os.SEEK_SET)
            if os.read(fd, 1) != b"\n":  # a line a kill cut short: end it, so ours stays whole
                data = b"\n" + data
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, start)
            raise storage_error(p, exc) or exc from None
    finally:
        os.close(fd)
