"""Latency, size and cost of an ONNX policy on a deployment target, beside torch eager.

Percentiles are taken after warm-up, one ``session.run`` per sample, with the target's providers
and thread count. Torch eager ``policy.act`` is timed in the same process, interleaved with
onnxruntime in short blocks, so that load from other processes on a shared machine hits both
alike and their *ratio* stays meaningful even when absolute times drift.

A provider the target names but this onnxruntime build lacks is never silently replaced: it is
an error unless ``allow_fallback=True``, and then the fallback is recorded in the result. The
same holds when the session accepts a provider but does not use it (onnxruntime drops CUDA
with only a log line when its libraries are missing), so ``providers_used`` is always what
``session.get_providers()`` reports.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from compressor.core.config import Target, load_target
from compressor.core.errors import CompressorError
from compressor.deploy.export import load_onnx_session, read_metadata
from compressor.deploy.quantize.graph import read_quantized
from compressor.policy.model import Policy

__all__ = [
    "BenchResult",
    "LatencyStats",
    "bench_model",
    "model_cost",
]

BLOCKS = 10  # interleaved onnxruntime / torch blocks per batch size


@dataclass
class LatencyStats:
    """Latency of one call at one batch size, in milliseconds.

    :param batch: observations per call.
    :param p50_ms: median. :param p95_ms: 95th percentile. :param p99_ms: 99th percentile.
    :param mean_ms: mean. :param iters: timed calls.
    """

    batch: int
    p50_ms: float
    p95_ms: float
    p99_ms: float
    mean_ms: float
    iters: int

    @classmethod
    def from_ns(cls, batch: int, samples_ns: Sequence[int]) -> LatencyStats:
        """Summarise per-call times in nanoseconds.

        :param batch: observations per call.
        :param samples_ns: one duration per call.
        """
        ms = np.asarray(samples_ns, dtype=np.float64) / 1e6
        p50, p95, p99 = np.percentile(ms, [50, 95, 99])
        return cls(batch, float(p50), float(p95), float(p99), float(ms.mean()), len(ms))


@dataclass
class BenchResult:
    """What :func:`bench_model` measured.

    :param model: the ``.onnx`` file. :param file_bytes: its size.
    :param target: the target's name.
    :param providers_requested: the target's providers, in priority order.
    :param providers_used: what the session reports it uses.
    :param fallback: what was missing and what ran instead (None when nothing was).
    :param threads: intra-op threads (onnxruntime and torch alike).
    :param params: weights and biases of the graph's layers (after compaction).
    :param params_nonzero: those that are non-zero.
    :param flops: ``2·Σ in·out`` over the layers, per observation.
    :param layer_shapes: (out, in) of each layer.
    :param weight_storage: per layer, how its weight is stored (fp32, fp16, int8).
    :param quantization: the file's ``quantization`` metadata, if any.
    :param onnx: latency per batch size.
    :param torch: torch eager ``policy.act`` latency per batch size (when a policy was given).
    :param latency_budget_ms: the target's budget, if any.
    :param within_budget: whether batch-1 p99 meets it (None without a budget).
    :param warmup: untimed calls before timing. :param iters: timed calls per batch size.
    """

    model: str
    file_bytes: int
    target: str
    providers_requested: list[str]
    providers_used: list[str]
    fallback: str | None
    threads: int
    params: int
    params_nonzero: int
    flops: int
    layer_shapes: list[list[int]]
    weight_storage: list[str]
    quantization: dict[str, Any] | None
    onnx: dict[int, LatencyStats]
    torch: dict[int, LatencyStats] = field(default_factory=dict)
    latency_budget_ms: float | None = None
    within_budget: bool | None = None
    warmup: int = 0
    iters: int = 0

    def ratio_to_torch(self, batch: int = 1) -> float | None:
        """onnxruntime p50 ÷ torch eager p50 at ``batch`` (< 1: onnxruntime is faster).

        :param batch: the batch size.
        """
        if batch not in self.torch or batch not in self.onnx:
            return None
        return self.onnx[batch].p50_ms / self.torch[batch].p50_ms

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (batch sizes become string keys)."""
        return {
            "model": self.model,
            "file_bytes": self.file_bytes,
            "target": self.target,
            "providers_requested": self.providers_requested,
            "providers_used": self.providers_used,
            "fallback": self.fallback,
            "threads": self.threads,
            "params": self.params,
            "params_nonzero": self.params_nonzero,
            "flops": self.flops,
            "layer_shapes": self.layer_shapes,
            "weight_storage": self.weight_storage,
            "quantization": self.quantization,
            "onnx": {str(b): vars(s) for b, s in self.onnx.items()},
            "torch": {str(b): vars(s) for b, s in self.torch.items()},
            "onnx_to_torch_p50": {str(b): self.ratio_to_torch(b) for b in self.torch},
            "latency_budget_ms": self.latency_budget_ms,
            "within_budget": self.within_budget,
            "warmup": self.warmup,
            "iters": self.iters,
        }


def model_cost(path: str | Path) -> dict[str, Any]:
    """Parameters, non-zero parameters, FLOPs and layer shapes of an exported graph.

    Works on fp32, fp16 and int8 files alike (weights are read back dequantised).

    :param path: the ``.onnx`` file.
    """
    try:
        graph = read_quantized(onnx.load(str(path), load_external_data=False))
    except CompressorError:
        raise
    except Exception as exc:  # protobuf's DecodeError and friends
        why = (
            "file not found"
            if isinstance(exc, FileNotFoundError)
            else "a folder, not an .onnx file"
            if isinstance(exc, IsADirectoryError)
            else "the file is not an ONNX graph"
        )
        raise CompressorError(f"{path}: not a readable ONNX model ({why})") from None
    return {
        "params": graph.params,
        "params_nonzero": int(
            sum(np.count_nonzero(la.weight) + np.count_nonzero(la.bias) for la in graph.layers)
        ),
        "flops": graph.flops,
        "layer_shapes": [list(la.weight.shape) for la in graph.layers],
        "weight_storage": [la.storage for la in graph.layers],
    }


def _providers(target: Target, allow_fallback: bool) -> tuple[list[str], str | None]:
    """The providers to ask for, and a note on what is missing (raises unless allowed)."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    missing = [p for p in target.providers if p not in available]
    if not missing:
        return list(target.providers), None
    note = (
        f"{', '.join(missing)} not available in this onnxruntime build "
        f"(available: {', '.join(available)})"
    )
    if not allow_fallback:
        raise CompressorError(
            f"target {target.name!r}: {note}; install an onnxruntime build that has it, "
            "or allow the fallback (allow_fallback=True, --allow-fallback)"
        )
    kept = [p for p in target.providers if p in available] or ["CPUExecutionProvider"]
    return kept, f"{note}; ran on {', '.join(kept)}"


def _observations(obs_dim: int, batch: int, policy: Policy | None, seed: int) -> np.ndarray:
    """Raw observations around the policy's normalisation mean (standard normal without one)."""
    g = np.random.default_rng(seed)
    x = g.standard_normal((batch, obs_dim))
    if policy is not None and policy.spec.obs_norm:
        with torch.no_grad():
            x = x * policy.obs_scale().double().numpy() + policy.obs_mean.double().numpy()
    return x.astype(np.float32)


def bench_model(
    onnx_path: str | Path,
    target: Target | str = "cpu-x86",
    policy: Policy | None = None,
    batch_sizes: Sequence[int] | None = None,
    warmup: int = 200,
    iters: int = 2000,
    *,
    allow_fallback: bool = False,
    seed: int = 0,
) -> BenchResult:
    """Time an ONNX policy on a target, and torch eager ``policy.act`` beside it.

    :param onnx_path: the ``.onnx`` file.
    :param target: a :class:`~compressor.core.config.Target`, or a shipped name / TOML file.
    :param policy: torch policy to time in the same run (its ``act``); None: onnxruntime only.
    :param batch_sizes: batch sizes to time (default: 1 and the target's ``batch_size``).
    :param warmup: untimed calls per batch size first (allocations, caches, thread pools).
    :param iters: timed calls per batch size, for each runtime.
    :param allow_fallback: run without a provider the target names but onnxruntime lacks,
        recording it in ``fallback``, instead of raising.
    :param seed: seed of the random observations.
    :raises CompressorError: a missing provider (unless allowed), an unreadable model, or a
        policy whose observation size differs from the model's.
    """
    tgt = load_target(target) if isinstance(target, str) else target
    if iters < 1 or warmup < 0:
        raise CompressorError("iters must be at least 1 and warmup at least 0")
    path = Path(onnx_path)
    cost = model_cost(path)
    session, used, fallback = _session(path, tgt, allow_fallback)
    inp = session.get_inputs()[0]
    obs_dim = int(inp.shape[1])
    if policy is not None and policy.spec.obs_dim != obs_dim:
        raise CompressorError(
            f"the policy takes {policy.spec.obs_dim} observations, the model {obs_dim}"
        )
    sizes = list(dict.fromkeys(batch_sizes or (1, tgt.batch_size)))  # unique, in order
    if any(b < 1 for b in sizes):
        raise CompressorError("batch sizes must be positive")

    onnx_stats: dict[int, LatencyStats] = {}
    torch_stats: dict[int, LatencyStats] = {}
    old_threads = torch.get_num_threads()
    torch.set_num_threads(max(1, tgt.threads))  # same thread budget for both runtimes
    try:
        for b in sizes:
            x = _observations(obs_dim, b, policy, seed)
            ort_ns, torch_ns = _time_interleaved(session, inp.name, x, policy, warmup, iters)
            onnx_stats[b] = LatencyStats.from_ns(b, ort_ns)
            if torch_ns:
                torch_stats[b] = LatencyStats.from_ns(b, torch_ns)
    finally:
        torch.set_num_threads(old_threads)

    meta = read_metadata(path)
    budget = tgt.latency_budget_ms
    return BenchResult(
        model=str(path),
        file_bytes=path.stat().st_size,
        target=tgt.name,
        providers_requested=list(tgt.providers),
        providers_used=used,
        fallback=fallback,
        threads=tgt.threads,
        params=cost["params"],
        params_nonzero=cost["params_nonzero"],
        flops=cost["flops"],
        layer_shapes=cost["layer_shapes"],
        weight_storage=cost["weight_storage"],
        quantization=json.loads(meta["quantization"]) if "quantization" in meta else None,
        onnx=onnx_stats,
        torch=torch_stats,
        latency_budget_ms=budget,
        within_budget=None
        if budget is None or 1 not in onnx_stats
        else onnx_stats[1].p99_ms <= budget,
        warmup=warmup,
        iters=iters,
    )


def _session(path: Path, tgt: Target, allow_fallback: bool) -> tuple[Any, list[str], str | None]:
    """An onnxruntime session on the target's providers, the providers it really uses, and a
    note on any fallback (raises on one unless allowed)."""
    providers, fallback = _providers(tgt, allow_fallback)
    session = load_onnx_session(path, providers, threads=tgt.threads)
    used = list(session.get_providers())
    dropped = [p for p in providers if p not in used]
    if dropped:
        note = f"session did not use {', '.join(dropped)}; it runs on {', '.join(used)}"
        if not allow_fallback:
            raise CompressorError(f"target {tgt.name!r}: {note}")
        fallback = f"{fallback}; {note}" if fallback else note
    return session, used, fallback


def _time_interleaved(
    session: Any, input_name: str, x: np.ndarray, policy: Policy | None, warmup: int, iters: int
) -> tuple[list[int], list[int]]:
    """Per-call nanoseconds of ``session.run`` and of ``policy.act`` (empty without a policy)
    on the batch ``x``, after warm-up, in :data:`BLOCKS` interleaved blocks of each."""
    feed = {input_name: x}
    xt = torch.as_tensor(x)
    for _ in range(warmup):
        session.run(None, feed)
    if policy is not None:
        with torch.no_grad():
            for _ in range(warmup):
                policy.act(xt)
    ort_ns: list[int] = []
    torch_ns: list[int] = []
    block = -(-iters // BLOCKS)
    while len(ort_ns) < iters:
        n = min(block, iters - len(ort_ns))
        for _ in range(n):
            t0 = time.perf_counter_ns()
            session.run(None, feed)
            ort_ns.append(time.perf_counter_ns() - t0)
        if policy is not None:
            with torch.no_grad():
                for _ in range(n):
                    t0 = time.perf_counter_ns()
                    policy.act(xt)
                    torch_ns.append(time.perf_counter_ns() - t0)
    return ort_ns, torch_ns
