"""ONNX export: one graph does the whole deployment path, checked against torch in onnxruntime.

``obs`` (float32, dynamic batch) → ``(obs - mean) / sqrt(var + eps)`` → clip → MLP (effective
weights ``W ⊙ M``, dead neurons physically removed) → deterministic action (mean / argmax /
tanh-rescale) → clip to the action bounds → ``action``. The graph is built with ``onnx.helper``
(not ``torch.onnx.export``) so it is a single file with an explicit opset and nothing else.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from compressor import atomic
from compressor.errors import CompressorError
from compressor.policy import Policy

PARITY_ATOL = 1e-5
PARITY_BATCHES = (1, 2, 7)
_ACT_OPS = {"tanh": "Tanh", "relu": "Relu", "elu": "Elu"}


@dataclass
class ExportResult:
    """:param path: the ONNX file. :param opset: its opset. :param ir_version: its IR version.
    :param file_bytes: size. :param sha256: digest. :param params_dense: parameters of the
    policy's layers. :param params_exported: parameters in the graph after compaction.
    :param removed_neurons: hidden neurons removed. :param parity_max_abs_err: largest
    |onnx - torch| action difference. :param parity_batches: batch sizes checked."""

    path: Path
    opset: int
    ir_version: int
    file_bytes: int
    sha256: str
    params_dense: int
    params_exported: int
    removed_neurons: int
    parity_max_abs_err: float
    parity_batches: list[int] = field(default_factory=lambda: list(PARITY_BATCHES))


def compact_layers(policy: Policy) -> tuple[list[tuple[np.ndarray, np.ndarray]], int]:
    """Effective (W, b) per layer with dead hidden neurons removed; and how many were removed.

    A hidden neuron is dead when its outgoing column is all zero (it influences nothing), or
    when its incoming row is all zero (it outputs the constant ``act(b_j)``, which is folded
    into the next layer's bias, exactly). Repeated until nothing changes.
    """
    ws = [w.detach().double().numpy().copy() for w in policy.effective_weights()]
    bs = [layer.bias.detach().double().numpy().copy() for layer in policy.layers]
    act = {"tanh": np.tanh, "relu": lambda x: np.maximum(x, 0.0),
           "elu": lambda x: np.where(x > 0, x, np.expm1(np.minimum(x, 0.0)))}
    f = act[policy.spec.activation]
    removed = 0
    changed = True
    while changed:
        changed = False
        for i in range(len(ws) - 1):
            no_out = ~ws[i + 1].any(axis=0)
            no_in = ~ws[i].any(axis=1)
            dead = no_out | no_in
            if not dead.any() or dead.all() and len(dead) == 1:
                continue
            if dead.all():  # keep one neuron so the graph stays well-formed
                dead[0] = False
            const = np.where(no_in & dead, f(bs[i]), 0.0)
            bs[i + 1] = bs[i + 1] + ws[i + 1] @ const
            keep = ~dead
            ws[i], bs[i] = ws[i][keep], bs[i][keep]
            ws[i + 1] = ws[i + 1][:, keep]
            removed += int(dead.sum())
            changed = True
    return [(w.astype(np.float32), b.astype(np.float32)) for w, b in zip(ws, bs)], removed


def build_model(
    policy: Policy, metadata: dict[str, str] | None = None, opset: int = 17, compact: bool = True
) -> tuple[onnx.ModelProto, int, int]:
    """The ONNX model of ``policy``'s deterministic action; also (params, removed neurons)."""
    spec = policy.spec
    if opset < 13:
        raise CompressorError(f"opset {opset} is too old: the export needs opset 13 or newer")
    if compact:
        layers, removed = compact_layers(policy)
    else:
        layers = [
            (w.detach().float().numpy(), layer.bias.detach().float().numpy())
            for w, layer in zip(policy.effective_weights(), policy.layers)
        ]
        removed = 0
    inits: list[TensorProto] = []
    nodes: list[onnx.NodeProto] = []

    def const(name: str, arr: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(np.asarray(arr, dtype=np.float32), name))
        return name

    x = "obs"
    if spec.obs_norm:
        mean = policy.obs_mean.detach().numpy()
        std = policy.obs_scale().detach().numpy()
        nodes.append(helper.make_node("Sub", [x, const("obs_mean", mean)], ["obs_centred"]))
        nodes.append(helper.make_node("Div", ["obs_centred", const("obs_std", std)], ["obs_norm"]))
        x = "obs_norm"
    if spec.obs_clip is not None:
        c = float(spec.obs_clip)
        nodes.append(helper.make_node(
            "Clip", [x, const("obs_clip_lo", np.array(-c)), const("obs_clip_hi", np.array(c))],
            ["obs_clipped"],
        ))
        x = "obs_clipped"
    for i, (w, b) in enumerate(layers):
        # MatMul with W^T then Add (Gemm would need a 2-D input; MatMul keeps batch dynamic)
        nodes.append(helper.make_node("MatMul", [x, const(f"W{i}", w.T)], [f"h{i}_mm"]))
        nodes.append(helper.make_node("Add", [f"h{i}_mm", const(f"b{i}", b)], [f"h{i}_lin"]))
        x = f"h{i}_lin"
        if i < len(layers) - 1:
            nodes.append(helper.make_node(_ACT_OPS[spec.activation], [x], [f"h{i}"]))
            x = f"h{i}"
    out_type = TensorProto.FLOAT
    if spec.head == "categorical":
        nodes.append(helper.make_node("ArgMax", [x], ["action"], axis=1, keepdims=0))
        out_type = TensorProto.INT64
        out_shape: list[Any] = ["batch"]
    else:
        low = policy.action_low.detach().numpy().astype(np.float64)
        high = policy.action_high.detach().numpy().astype(np.float64)
        if spec.head == "squashed_gaussian":
            nodes.append(helper.make_node("Tanh", [x], ["squashed"]))
            nodes.append(helper.make_node("Mul", ["squashed", const("half_range", (high - low) / 2)],
                                          ["scaled"]))
            nodes.append(helper.make_node("Add", ["scaled", const("mid", (high + low) / 2)], [
                "action"]))
        else:
            fmax = float(np.finfo(np.float32).max)
            lo = np.where(np.isfinite(low), low, -fmax)
            hi = np.where(np.isfinite(high), high, fmax)
            nodes.append(helper.make_node("Max", [x, const("action_low", lo)], ["act_lo"]))
            nodes.append(helper.make_node("Min", ["act_lo", const("action_high", hi)], ["action"]))
        out_shape = ["batch", spec.act_dim]
    graph = helper.make_graph(
        nodes,
        "policy",
        [helper.make_tensor_value_info("obs", TensorProto.FLOAT, ["batch", spec.obs_dim])],
        [helper.make_tensor_value_info("action", out_type, out_shape)],
        initializer=inits,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="edge-policy-compressor"
    )
    model.ir_version = 8 if opset <= 17 else 9  # readable by older onnxruntime builds
    props = {"spec": json.dumps(_spec_dict(policy)), **(metadata or {})}
    if spec.source.get("sha256"):
        props.setdefault("source_sha256", str(spec.source["sha256"]))
    props["compressor_version"] = _version()
    helper.set_model_props(model, props)
    onnx.checker.check_model(model)
    params = sum(w.size + b.size for w, b in layers)
    return model, params, removed


def export_onnx(
    policy: Policy,
    path: str | Path,
    *,
    metadata: dict[str, str] | None = None,
    opset: int = 17,
    compact: bool = True,
    check_parity: bool = True,
) -> ExportResult:
    """Write ``policy`` as one ONNX file (atomically) and check it against torch.

    :param policy: the policy to export.
    :param path: destination ``.onnx``.
    :param metadata: extra metadata props (ε, budget, certificate…), string values.
    :param opset: ONNX opset (13 or newer).
    :param compact: physically remove dead neurons.
    :param check_parity: compare onnxruntime's actions with torch's at batch 1, 2 and 7;
        on failure the file is not left behind and a :class:`CompressorError` is raised.
    """
    final = Path(path)
    model, params, removed = build_model(policy, metadata, opset, compact)
    data = model.SerializeToString()
    err = 0.0
    if check_parity:
        err = parity_error(policy, data)
        if not err <= PARITY_ATOL:
            raise CompressorError(
                f"exported model disagrees with torch (max |Δ| = {err:.3g} > {PARITY_ATOL}); "
                "nothing was written"
            )
    atomic.write_bytes(final, data)
    return ExportResult(
        path=final,
        opset=opset,
        ir_version=int(model.ir_version),
        file_bytes=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
        params_dense=policy.num_parameters(),
        params_exported=params,
        removed_neurons=removed,
        parity_max_abs_err=err,
    )


def load_session(model: str | Path | bytes, providers: list[str] | None = None) -> Any:
    """An onnxruntime session (CPU provider unless others are asked for)."""
    import onnxruntime as ort

    src = model if isinstance(model, bytes) else str(model)
    try:
        return ort.InferenceSession(src, providers=providers or ["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types
        raise CompressorError(f"onnxruntime cannot load the model: {str(exc)[:200]}") from None


def onnx_act(session: Any, obs: np.ndarray) -> np.ndarray:
    """Actions from an exported model; float64 observations are cast to float32.

    :param session: from :func:`load_session`.
    :param obs: raw observations, shape (batch, obs_dim) or (obs_dim,).
    """
    x = np.asarray(obs)
    if x.ndim == 1:
        x = x[None, :]
    want = session.get_inputs()[0].shape[1]
    if x.ndim != 2 or (isinstance(want, int) and x.shape[1] != want):
        raise CompressorError(f"observations must have shape (batch, {want}), got {x.shape}")
    out: np.ndarray = session.run(["action"], {"obs": x.astype(np.float32)})[0]
    return out


def parity_error(policy: Policy, model: bytes | str | Path, seed: int = 0) -> float:
    """Largest |onnx - torch| over batches of 1, 2 and 7 typical and out-of-range observations."""
    sess = load_session(model)
    g = np.random.default_rng(seed)
    mean = policy.obs_mean.detach().numpy()
    std = policy.obs_scale().detach().numpy()
    worst = 0.0
    for n in PARITY_BATCHES:
        for spread in (1.0, 30.0):  # 30σ exercises the observation clip
            obs = (mean + std * spread * g.standard_normal((n, policy.spec.obs_dim))).astype(
                np.float32
            )
            with torch.no_grad():
                ref = policy.act(torch.as_tensor(obs)).numpy()
            got = onnx_act(sess, obs)
            if policy.spec.head == "categorical":
                if not np.array_equal(ref, got):
                    return math.inf
            else:
                worst = max(worst, float(np.abs(ref - got).max()))
    return worst


def read_metadata(path: str | Path) -> dict[str, str]:
    """The metadata props of an ONNX file."""
    model = onnx.load(str(path), load_external_data=False)
    return {p.key: p.value for p in model.metadata_props}


def _spec_dict(policy: Policy) -> dict[str, Any]:
    import dataclasses

    return dataclasses.asdict(policy.spec)


def _version() -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version("edge-policy-compressor")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"
