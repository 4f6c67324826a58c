"""Where independent jobs run: in this process, in a local process pool, or on a Ray cluster.

Every parallel stage (the evaluations of an attack suite, the grid levels of the sparsity
search) hands its jobs to one :class:`Executor`. A job is a top-level function and its
arguments; it owns its seeds, so its result does not depend on which worker ran it, in what
order, or next to what: the same command gives the same numbers with ``local`` at any worker
count and with ``ray``.

Workers run single-threaded torch (and ``OMP_NUM_THREADS=1``): ``W`` workers use ``W`` cores,
so two workers on a two-core machine do not oversubscribe it. A worker process that dies (out
of memory, killed) fails only its own job, which is submitted again, up to ``retries`` times.

Workers never outlive the process that started them: each watches its parent's pid and exits
when the parent is gone (SIGKILL, the OOM killer), so nothing is left sleeping, re-parented to
PID 1 (multiprocessing's resource tracker then exits too: its last client is gone). Workers
ignore SIGINT: Ctrl-C reaches the main process, which stops them (``map`` terminates the pool
when it is interrupted). A job may report progress back to the main process
(``map(..., on_progress=...)``) through a queue the pool owns.
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import signal
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from compressor.core.errors import CompressorError
from compressor.core.progress import Progress

R = TypeVar("R")

EXECUTORS = ("local", "ray")

#: ``on_result(i, result)``: job ``i`` finished (called in the main process, in completion order)
OnResult = Callable[[int, Any], None]
#: ``on_progress(i, done, total, detail)``: job ``i`` reported progress (main process)
OnProgress = Callable[[int, int, "int | None", str], None]

#: seconds between a worker's looks at its parent, and between the main process's looks at
#: the progress queue while it waits for jobs
WATCH_INTERVAL_S = 0.5
POLL_INTERVAL_S = 0.2
#: a worker sends at most one progress message per this many seconds (plus every change of
#: ``done``), so the queue's pipe never fills
PROGRESS_INTERVAL_S = 0.25


class Executor(Protocol):
    """Runs ``fn(*args)`` for each argument tuple and returns the results in the same order.

    ``on_result`` is told each result as soon as its job finishes (so a caller can keep it even
    if a later job fails or the run is interrupted). With ``on_progress``, each job is called as
    ``fn(*args, progress)`` where ``progress`` is a :class:`~compressor.core.progress.Progress`
    whose reports reach ``on_progress`` with the job's index.
    """

    name: str
    workers: int
    #: highest peak memory (MiB) any worker process reported (0: jobs run in this process)
    peak_worker_rss_mb: float

    def map(
        self,
        fn: Callable[..., R],
        jobs: Sequence[tuple[Any, ...]],
        on_result: OnResult | None = None,
        on_progress: OnProgress | None = None,
    ) -> list[R]: ...

    def close(self) -> None: ...


def limit_threads() -> None:
    """One compute thread per worker (torch intra-op and OpenMP/BLAS pools)."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = "1"
    import torch

    torch.set_num_threads(1)


def peak_rss_mb() -> float:
    """This process's peak resident memory so far, in MiB."""
    import resource
    import sys

    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024 / (1024 if sys.platform == "darwin" else 1)  # macOS reports bytes


#: the pool's progress queue, in a worker process (set by :func:`_init_worker`); process-local
_progress_queue: Any = None


def _watch_parent(parent_pid: int) -> None:
    """Exit this worker as soon as its parent is gone (re-parented: ``getppid`` changes)."""
    while os.getppid() == parent_pid:
        time.sleep(WATCH_INTERVAL_S)
    os._exit(1)  # no cleanup to run: the parent that wanted the results is dead


def _init_worker(parent_pid: int, progress_queue: Any) -> None:
    """Worker start-up: single-threaded compute, Ctrl-C left to the parent, a watchdog on the
    parent's pid, and the queue that carries progress back."""
    global _progress_queue
    limit_threads()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_watch_parent, args=(parent_pid,), daemon=True).start()
    _progress_queue = progress_queue


def _queue_progress(index: int) -> Progress:
    """A :class:`Progress` for job ``index`` in a worker: throttled messages on the queue."""
    last = {"t": 0.0, "done": -1}

    def report(done: int, total: int | None = None, detail: str = "") -> None:
        now = time.monotonic()
        if _progress_queue is None or (
            done == last["done"] and now - last["t"] < PROGRESS_INTERVAL_S
        ):
            return
        last.update(t=now, done=done)
        _progress_queue.put((index, done, total, detail[:200]))

    return report


def _call(fn: Callable[..., R], args: tuple[Any, ...], index: int | None) -> tuple[R, float]:
    """Runs a job in a worker; returns its result and the worker's peak memory (MiB).

    :param index: the job's index when the caller wants its progress (passed as last argument).
    """
    if index is None:
        return fn(*args), peak_rss_mb()
    return fn(*args, _queue_progress(index)), peak_rss_mb()


def _job_progress(on_progress: OnProgress, index: int) -> Progress:
    """A :class:`Progress` for job ``index`` run in this process."""

    def report(done: int, total: int | None = None, detail: str = "") -> None:
        on_progress(index, done, total, detail)

    return report


@dataclass
class SerialExecutor:
    """Runs every job in this process, one after another (``local`` with one worker)."""

    name: str = "local"
    workers: int = 1
    peak_worker_rss_mb: float = 0.0

    def map(
        self,
        fn: Callable[..., R],
        jobs: Sequence[tuple[Any, ...]],
        on_result: OnResult | None = None,
        on_progress: OnProgress | None = None,
    ) -> list[R]:
        out = []
        for i, args in enumerate(jobs):
            r = fn(*args, _job_progress(on_progress, i)) if on_progress else fn(*args)
            if on_result is not None:
                on_result(i, r)
            out.append(r)
        return out

    def close(self) -> None:
        return None


@dataclass
class LocalExecutor:
    """A pool of ``workers`` spawned processes on this machine, kept for the executor's life.

    :param workers: processes (each single-threaded).
    :param retries: times a job whose worker died is submitted again to a fresh pool.
    """

    workers: int
    retries: int = 2
    name: str = "local"
    peak_worker_rss_mb: float = 0.0
    _pool: ProcessPoolExecutor | None = field(default=None, repr=False)
    _queue: Any = field(default=None, repr=False)

    def _fresh_pool(self) -> ProcessPoolExecutor:
        if self._pool is not None:
            self._kill_pool()
        # spawn, not fork: a forked child inherits torch's thread pools and MuJoCo state
        ctx = multiprocessing.get_context("spawn")
        self._queue = ctx.SimpleQueue()  # one per pool: a dead worker may have held its lock
        self._pool = ProcessPoolExecutor(
            self.workers,
            mp_context=ctx,
            initializer=_init_worker,
            initargs=(os.getpid(), self._queue),
        )
        return self._pool

    def _kill_pool(self) -> None:
        """Stop the pool now: cancel what has not started, terminate the running workers."""
        pool, self._pool = self._pool, None
        if pool is None:
            return
        # ProcessPoolExecutor has no public way to stop a running job; its processes are
        # in the (long-stable) _processes dict
        procs = list((getattr(pool, "_processes", None) or {}).values())
        for proc in procs:
            proc.terminate()
        pool.shutdown(wait=False, cancel_futures=True)
        for proc in procs:
            proc.join(timeout=5)

    def map(
        self,
        fn: Callable[..., R],
        jobs: Sequence[tuple[Any, ...]],
        on_result: OnResult | None = None,
        on_progress: OnProgress | None = None,
    ) -> list[R]:
        results: dict[int, R] = {}
        try:
            died = self._round(fn, jobs, range(len(jobs)), results, on_result, on_progress)
            # a dead worker breaks the whole pool, so the jobs beside it die too: rerun each
            # alone, so that a job that dies again is the one that kills its worker
            for i in died:
                for attempt in range(1, self.retries + 2):
                    if not self._round(fn, jobs, [i], results, on_result, on_progress):
                        break
                    if attempt > self.retries:
                        raise CompressorError(
                            f"a worker died {attempt + 1} times running job {i} of {len(jobs)}; "
                            "giving up (out of memory?)"
                        )
        except BaseException:  # Ctrl-C, a failed job, a failed on_result: stop the others now
            self._kill_pool()
            raise
        return [results[i] for i in range(len(jobs))]

    def _round(
        self,
        fn: Callable[..., R],
        jobs: Sequence[tuple[Any, ...]],
        which: Sequence[int],
        results: dict[int, R],
        on_result: OnResult | None,
        on_progress: OnProgress | None,
    ) -> list[int]:
        """Runs jobs ``which`` side by side into ``results``; returns those whose worker died."""
        pool = self._pool or self._fresh_pool()
        futures: dict[Future[tuple[R, float]], int] = {
            pool.submit(_call, fn, jobs[i], i if on_progress else None): i for i in which
        }
        died: list[int] = []
        pending = set(futures)
        while pending:
            timeout = POLL_INTERVAL_S if on_progress else None
            done, pending = wait(pending, timeout=timeout, return_when=FIRST_COMPLETED)
            if on_progress is not None:
                self._drain(on_progress)
            for fut in sorted(done, key=futures.__getitem__):
                i = futures[fut]
                try:
                    results[i], rss = fut.result()
                except BrokenProcessPool:
                    died.append(i)
                    continue
                self.peak_worker_rss_mb = max(self.peak_worker_rss_mb, rss)
                if on_result is not None:
                    on_result(i, results[i])
        if on_progress is not None:  # a job's last reports are in the pipe before its result
            self._drain(on_progress)
        if died:
            self._fresh_pool()
        return died

    def _drain(self, on_progress: OnProgress) -> None:
        """Hand every progress message waiting in the queue to ``on_progress``."""
        q = self._queue
        try:
            while q is not None and not q.empty():
                on_progress(*q.get())
        except (OSError, EOFError, queue.Empty):  # the pool broke mid-message: progress only
            pass

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None


@dataclass
class RayExecutor:
    """Jobs as Ray tasks (one CPU each, retried by Ray when their worker dies).

    :param address: ``auto`` (a running cluster), ``HOST:PORT``, or ``local`` to start a
        private instance on this machine with ``workers`` CPUs.
    :param workers: CPUs of a private local instance (ignored when joining a cluster).
    :param retries: Ray's ``max_retries`` for a task whose worker died.
    """

    address: str = "local"
    workers: int = 2
    retries: int = 2
    name: str = "ray"
    peak_worker_rss_mb: float = 0.0
    _started: bool = field(default=False, repr=False)

    def _ray(self) -> Any:
        try:
            import ray
        except ImportError:
            raise CompressorError(
                "the ray executor needs Ray: pip install '.[ray]' (or pip install ray)"
            ) from None
        if not ray.is_initialized():
            kwargs: dict[str, Any] = {
                "include_dashboard": False,
                "log_to_driver": False,
                "runtime_env": {"env_vars": {"OMP_NUM_THREADS": "1"}},
            }
            try:
                if self.address == "local":
                    ray.init(num_cpus=self.workers, **kwargs)
                else:
                    ray.init(address=self.address, **kwargs)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                raise CompressorError(
                    f"cannot reach Ray at {self.address!r}: {str(exc).splitlines()[0]}"
                ) from None
            self._started = True
        return ray

    def map(
        self,
        fn: Callable[..., R],
        jobs: Sequence[tuple[Any, ...]],
        on_result: OnResult | None = None,
        on_progress: OnProgress | None = None,
    ) -> list[R]:
        """As :class:`Executor`; ``on_progress`` is not supported here (jobs report nothing)."""
        ray = self._ray()
        task = ray.remote(num_cpus=1, max_retries=self.retries)(_ray_job)
        refs = [task.remote(fn, args) for args in jobs]
        index = {ref: i for i, ref in enumerate(refs)}
        out: dict[int, tuple[R, float]] = {}
        pending = list(refs)
        try:
            while pending:
                ready, pending = ray.wait(pending, num_returns=1)
                for ref in ready:
                    i = index[ref]
                    out[i] = ray.get(ref)
                    if on_result is not None:
                        on_result(i, out[i][0])
        except BaseException:
            for ref in pending:
                ray.cancel(ref, force=True)
            raise
        self.peak_worker_rss_mb = max([self.peak_worker_rss_mb, *(rss for _, rss in out.values())])
        return [out[i][0] for i in range(len(jobs))]

    def close(self) -> None:
        if self._started:
            import ray

            ray.shutdown()
            self._started = False


def _ray_job(fn: Callable[..., R], args: tuple[Any, ...]) -> tuple[R, float]:
    limit_threads()
    return _call(fn, args, None)


def make_executor(kind: str = "local", workers: int = 1, address: str = "local") -> Executor:
    """The executor called ``kind`` with ``workers`` workers.

    :param kind: ``local`` or ``ray``.
    :param workers: parallel workers (``local``: processes, 1 runs in this process; ``ray``:
        CPUs of a private local instance).
    :param address: Ray address: ``local``, ``auto`` or ``HOST:PORT``.
    """
    if kind not in EXECUTORS:
        raise CompressorError(f"unknown executor {kind!r}; available: {', '.join(EXECUTORS)}")
    if workers < 1:
        raise CompressorError(f"--workers must be 1 or more, got {workers}")
    if kind == "ray":
        return RayExecutor(address=address, workers=workers)
    return SerialExecutor() if workers == 1 else LocalExecutor(workers)


def default_workers() -> int:
    """The cores this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)
