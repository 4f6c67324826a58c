"""Where independent jobs run: in this process, in a local process pool, or on a Ray cluster.

Every parallel stage (the evaluations of an attack suite, the grid levels of the sparsity
search) hands its jobs to one :class:`Executor`. A job is a top-level function and its
arguments; it owns its seeds, so its result does not depend on which worker ran it, in what
order, or next to what: the same command gives the same numbers with ``local`` at any worker
count and with ``ray``.

Workers run single-threaded torch (and ``OMP_NUM_THREADS=1``): ``W`` workers use ``W`` cores,
so two workers on a two-core machine do not oversubscribe it. A worker process that dies (out
of memory, killed) fails only its own job, which is submitted again, up to ``retries`` times.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from compressor.core.errors import CompressorError

R = TypeVar("R")

EXECUTORS = ("local", "ray")


class Executor(Protocol):
    """Runs ``fn(*args)`` for each argument tuple and returns the results in the same order."""

    name: str
    workers: int
    #: highest peak memory (MiB) any worker process reported (0: jobs run in this process)
    peak_worker_rss_mb: float

    def map(self, fn: Callable[..., R], jobs: Sequence[tuple[Any, ...]]) -> list[R]: ...

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


def _call(fn: Callable[..., R], args: tuple[Any, ...]) -> tuple[R, float]:
    """Runs a job in a worker; returns its result and the worker's peak memory (MiB)."""
    return fn(*args), peak_rss_mb()


@dataclass
class SerialExecutor:
    """Runs every job in this process, one after another (``local`` with one worker)."""

    name: str = "local"
    workers: int = 1
    peak_worker_rss_mb: float = 0.0

    def map(self, fn: Callable[..., R], jobs: Sequence[tuple[Any, ...]]) -> list[R]:
        return [fn(*args) for args in jobs]

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

    def _fresh_pool(self) -> ProcessPoolExecutor:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        # spawn, not fork: a forked child inherits torch's thread pools and MuJoCo state
        ctx = multiprocessing.get_context("spawn")
        self._pool = ProcessPoolExecutor(self.workers, mp_context=ctx, initializer=limit_threads)
        return self._pool

    def map(self, fn: Callable[..., R], jobs: Sequence[tuple[Any, ...]]) -> list[R]:
        results: dict[int, R] = {}
        died = self._round(fn, jobs, range(len(jobs)), results)
        # a dead worker breaks the whole pool, so the jobs beside it die too: rerun each alone,
        # so that a job that dies again is the one that kills its worker
        for i in died:
            for attempt in range(1, self.retries + 2):
                if not self._round(fn, jobs, [i], results):
                    break
                if attempt > self.retries:
                    raise CompressorError(
                        f"a worker died {attempt + 1} times running job {i} of {len(jobs)}; "
                        "giving up (out of memory?)"
                    )
        return [results[i] for i in range(len(jobs))]

    def _round(
        self,
        fn: Callable[..., R],
        jobs: Sequence[tuple[Any, ...]],
        which: Sequence[int],
        results: dict[int, R],
    ) -> list[int]:
        """Runs jobs ``which`` side by side into ``results``; returns those whose worker died."""
        pool = self._pool or self._fresh_pool()
        futures: dict[int, Future[tuple[R, float]]] = {
            i: pool.submit(_call, fn, jobs[i]) for i in which
        }
        died: list[int] = []
        for i, fut in futures.items():
            try:
                results[i], rss = fut.result()
                self.peak_worker_rss_mb = max(self.peak_worker_rss_mb, rss)
            except BrokenProcessPool:
                died.append(i)
        if died:
            self._fresh_pool()
        return died

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

    def map(self, fn: Callable[..., R], jobs: Sequence[tuple[Any, ...]]) -> list[R]:
        ray = self._ray()
        task = ray.remote(num_cpus=1, max_retries=self.retries)(_ray_job)
        out = ray.get([task.remote(fn, args) for args in jobs])
        self.peak_worker_rss_mb = max([self.peak_worker_rss_mb, *(rss for _, rss in out)])
        return [r for r, _ in out]

    def close(self) -> None:
        if self._started:
            import ray

            ray.shutdown()
            self._started = False


def _ray_job(fn: Callable[..., R], args: tuple[Any, ...]) -> tuple[R, float]:
    limit_threads()
    return _call(fn, args)


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
