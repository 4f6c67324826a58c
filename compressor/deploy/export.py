"""ONNX export: one graph does the whole deployment path, checked against torch in onnxruntime.

``obs`` (float32 raw observations, dynamic batch) → ``(obs - mean) / sqrt(var + eps)`` → clip →
MLP (effective weights ``W ⊙ M``, dead neurons physically removed) → deterministic action
(``Policy.action_map``: clip to the action bounds, tanh-rescale into them, or argmax over logits
or Q-values) → ``action``. A state-dependent σ layer is not exported: the deployed action never
uses it. ``obs`` is what the robot must feed: when the policy was trained behind observation
wrappers (``spec.env_wrappers``, e.g. the RL Zoo's time feature) their entries are part of it,
and the ``interface`` metadata says so.

The graph is built node by node with ``onnx.helper`` rather than ``torch.onnx.export``: torch
2.13's dynamo exporter may put the weights in an external ``.data`` sidecar and picks its own
opset, while a deployment artefact must be one self-contained file with an opset we chose.
Each export is written atomically and parity-checked, from the written file, in onnxruntime.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import importlib.metadata
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from compressor.core import atomic
from compressor.core.errors import CompressorError
from compressor.deploy.compact import compact_layers, effective_layers
from compressor.policy.model import DISCRETE_HEADS, Policy
from compressor.rl.wrappers import describe_wrappers

__all__ = [
    "ExportResult",
    "build_model",
    "compact_layers",
    "export_onnx",
    "load_onnx_session",
    "onnx_act",
    "parity_error",
    "read_metadata",
]

MIN_OPSET = 13  # Clip with tensor bounds, ArgMax keepdims=0 and Gemm as used here all exist in 13
PARITY_ATOL = 1e-5
# Relative slack on top of the absolute one: an unclipped, unbounded policy fed far-out
# observations produces large outputs whose float32 rounding alone exceeds 1e-5.
PARITY_RTOL = 1e-5
PARITY_BATCHES = (1, 2, 7)
# onnxruntime may round up to this many times torch's own float32 rounding (see
# :func:`float32_rounding`) beyond the fixed tolerances
PARITY_ROUNDING = 4.0
INPUT_NAME = "obs"
OUTPUT_NAME = "action"
RESERVED_KEYS = ("spec", "compressor_version", "interface", "action_std")
_ACT_OPS = {"tanh": "Tanh", "relu": "Relu", "elu": "Elu"}
_PROTOBUF_LIMIT = 2**31 - 1


@dataclass
class ExportResult:
    """What an export wrote.

    :param path: the ONNX file.
    :param opset: its default-domain opset.
    :param ir_version: its ONNX IR version.
    :param file_bytes: its size in bytes.
    :param sha256: SHA-256 of its bytes.
    :param params_dense: weights and biases of the policy's layers (dense count).
    :param params_exported: weights and biases in the graph after compaction.
    :param removed_neurons: hidden neurons physically removed by compaction.
    :param parity_max_abs_err: largest ``|onnx - torch|`` action difference (continuous heads;
        for categorical heads the largest gap between the torch logits of torch's action and of
        onnxruntime's, 0 when every action agrees); NaN when parity was not checked.
    :param parity_batches: batch sizes checked (empty when parity was not checked).
    :param weight_storage: ``dense`` or ``bitmask`` (sparse storage, decoded in the graph).
    """

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
    weight_storage: str = "dense"

    @property
    def weight_storage_note(self) -> str:
        """What the runtime does with the weights as stored."""
        if self.weight_storage == "bitmask":
            return SPARSE_STORAGE_NOTE
        return "dense float32 initialisers: zeros are stored and multiplied like any weight"


# ---- graph --------------------------------------------------------------------------------------
def build_model(
    policy: Policy,
    *,
    metadata: Mapping[str, Any] | None = None,
    opset: int = 17,
    compact: bool = True,
    sparse_storage: bool = False,
) -> tuple[onnx.ModelProto, int, int]:
    """The checked ONNX model of ``policy``'s deterministic action (nothing is written).

    :param policy: the policy to export.
    :param metadata: extra metadata props; non-string values are stored as JSON.
    :param opset: default-domain opset, 13 up to what the installed ``onnx`` knows.
    :param compact: physically remove dead hidden neurons (see :mod:`compressor.deploy.compact`).
    :param sparse_storage: store each weight matrix that is sparse enough for it to pay as a
        bitmask plus its non-zero values, decoded by the graph itself (see
        :func:`_sparse_weight`); the file shrinks, the computed actions are identical.
    :returns: ``(model, params_exported, removed_neurons)``.
    """
    spec = policy.spec
    spec.validate()
    max_opset = onnx.defs.onnx_opset_version()
    if not MIN_OPSET <= opset <= max_opset:
        raise CompressorError(
            f"opset {opset} is not supported: the export needs an opset in {MIN_OPSET}..{max_opset}"
        )
    _check_finite(policy)
    layers, removed = compact_layers(policy) if compact else (effective_layers(policy), 0)

    inits: list[TensorProto] = []
    nodes: list[onnx.NodeProto] = []

    def const(name: str, arr: Any) -> str:
        inits.append(numpy_helper.from_array(np.asarray(arr, dtype=np.float32), name))
        return name

    def node(op: str, inputs: list[str], output: str, **attrs: Any) -> str:
        nodes.append(helper.make_node(op, inputs, [output], name=output, **attrs))
        return output

    x = INPUT_NAME
    if spec.obs_norm:
        # Sub then Div by the float32 sqrt(var + eps) torch itself computes: bit-identical to
        # Policy.normalize, where a precomputed reciprocal would round differently.
        with torch.no_grad():
            mean = policy.obs_mean.detach().cpu().float().numpy()
            std = policy.obs_scale().detach().cpu().float().numpy()
        x = node("Sub", [x, const("obs_mean", mean)], "obs_centred")
        x = node("Div", [x, const("obs_std", std)], "obs_normalised")
    if spec.obs_clip is not None:
        c = float(spec.obs_clip)
        x = node("Clip", [x, const("obs_clip_min", -c), const("obs_clip_max", c)], "obs_clipped")
    last = len(layers) - 1
    for i, (w, b) in enumerate(layers):
        if sparse_storage and sparse_saves_bytes(w):
            w_name = _sparse_weight(f"W{i}", np.asarray(w, dtype=np.float32), inits, node)
        else:
            w_name = const(f"W{i}", w)
        # Gemm with transB keeps nn.Linear's (out, in) layout and is one kernel per layer.
        x = node("Gemm", [x, w_name, const(f"b{i}", b)], f"linear{i}", transB=1)
        if i < last:
            x = node(_ACT_OPS[spec.activation], [x], f"{spec.activation}{i}")
    out_type, out_shape = _head(policy, x, node, const)

    graph = helper.make_graph(
        nodes,
        "policy",
        [
            helper.make_tensor_value_info(
                INPUT_NAME,
                TensorProto.FLOAT,
                ["batch", spec.obs_dim],
                doc_string=" ".join(
                    [
                        "raw observations (normalisation and clip are in the graph)",
                        *describe_wrappers(spec.env_wrappers),
                    ]
                ),
            )
        ],
        [helper.make_tensor_value_info(OUTPUT_NAME, out_type, out_shape)],
        initializer=inits,
        doc_string=f"deterministic action of a {spec.head} policy",
    )
    version = _version()
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", opset)],
        producer_name="edge-policy-compressor",
        producer_version=version,
    )
    # The lowest IR version that can carry this opset: older onnxruntime builds refuse newer IR
    # versions even when they know every operator in the graph.
    model.ir_version = helper.find_min_ir_version_for(list(model.opset_import))
    helper.set_model_props(model, _props(policy, metadata, version))
    if model.ByteSize() > _PROTOBUF_LIMIT:
        raise CompressorError("the policy is too large for a single-file ONNX model (> 2 GiB)")
    try:
        onnx.checker.check_model(model, full_check=True)
    except onnx.checker.ValidationError as exc:  # a bug here, but say it in one line
        raise CompressorError(f"built an invalid ONNX model: {str(exc).splitlines()[0]}") from None
    params = sum(w.size + b.size for w, b in layers)
    return model, int(params), removed


# ---- sparse weight storage ----------------------------------------------------------------------
SPARSE_STORAGE_NOTE = (
    "sparse weights are stored as a bitmask plus the non-zero values and decoded to dense "
    "matrices by the graph itself (BitShift, Mod, CumSum, Gather); onnxruntime folds that "
    "constant subgraph into dense initialisers when the session starts, so only the file "
    "shrinks: memory and latency at run time are those of the dense (compacted) model"
)


def sparse_storage_bytes(w: np.ndarray) -> int:
    """Bytes of ``w`` stored as a bitmask and its non-zero values (plus one padding zero)."""
    return (int(w.size) + 7) // 8 + 4 * (int(np.count_nonzero(w)) + 1)


def sparse_saves_bytes(w: Any) -> bool:
    """Whether bitmask storage of ``w`` is smaller than its dense float32 bytes."""
    arr = np.asarray(w)
    return sparse_storage_bytes(arr) < 4 * arr.size


def decode_sparse_weight(mask: np.ndarray, values: np.ndarray, shape: Any) -> np.ndarray:
    """The dense matrix that :func:`_sparse_weight`'s nodes rebuild (numpy, for readers)."""
    size = int(np.prod(shape))
    bits = np.unpackbits(np.asarray(mask, np.uint8), bitorder="little")[:size].astype(bool)
    out = np.zeros(size, dtype=np.asarray(values).dtype)
    out[bits] = np.asarray(values)[: int(bits.sum())]
    return out.reshape(tuple(int(d) for d in shape))


def _sparse_weight(name: str, w: np.ndarray, inits: list[TensorProto], node: Any) -> str:
    """Add ``w`` as bitmask + values initialisers and the nodes that rebuild it; its name.

    ``mask`` bit ``k`` of byte ``j`` (little-endian bit order) says whether flat entry
    ``8j + k`` is non-zero; ``values`` holds the non-zero entries in row-major order followed by
    one zero. The dense matrix is ``values[cumsum(m) * m - 1]``: a non-zero entry maps to its
    rank among non-zeros, a zero entry to index ``-1``, the padding zero. Every op is in the
    default domain since opset 13, so older runtimes read it too.
    """
    flat = w.reshape(-1)
    bits = flat != 0
    values = np.concatenate([flat[bits], np.zeros(1, np.float32)]).astype(np.float32)
    inits.append(numpy_helper.from_array(np.packbits(bits, bitorder="little"), f"{name}_mask"))
    inits.append(numpy_helper.from_array(values, f"{name}_values"))
    inits.append(numpy_helper.from_array(np.arange(8, dtype=np.uint8), f"{name}_shifts"))
    inits.append(numpy_helper.from_array(np.array([2], np.uint8), f"{name}_two"))
    inits.append(numpy_helper.from_array(np.array([w.size], np.int64), f"{name}_size"))
    inits.append(numpy_helper.from_array(np.array([0], np.int64), f"{name}_axis0"))
    inits.append(numpy_helper.from_array(np.array([1], np.int64), f"{name}_axis1"))
    inits.append(numpy_helper.from_array(np.array([-1], np.int64), f"{name}_flat"))
    inits.append(numpy_helper.from_array(np.array(w.shape, np.int64), f"{name}_shape"))
    x = node("Unsqueeze", [f"{name}_mask", f"{name}_axis1"], f"{name}_mask_col")
    x = node("BitShift", [x, f"{name}_shifts"], f"{name}_shifted", direction="RIGHT")
    x = node("Mod", [x, f"{name}_two"], f"{name}_bits")
    x = node("Reshape", [x, f"{name}_flat"], f"{name}_bits_flat")
    x = node("Slice", [x, f"{name}_axis0", f"{name}_size", f"{name}_axis0"], f"{name}_bits_used")
    m = node("Cast", [x], f"{name}_m", to=TensorProto.INT64)
    c = node("CumSum", [m, f"{name}_axis0"], f"{name}_rank1")
    c = node("Mul", [c, m], f"{name}_rank_masked")
    c = node("Sub", [c, f"{name}_axis1"], f"{name}_index")
    x = node("Gather", [f"{name}_values", c], f"{name}_flat_dense", axis=0)
    return str(node("Reshape", [x, f"{name}_shape"], name))


def _head(policy: Policy, x: str, node: Any, const: Any) -> tuple[int, list[Any]]:
    """Append the action head after ``x``; return the output's element type and shape."""
    spec = policy.spec
    if policy.action_map == "argmax":  # categorical logits or q_greedy Q-values
        node("ArgMax", [x], OUTPUT_NAME, axis=1, keepdims=0)  # first maximum, as torch.argmax
        return TensorProto.INT64, ["batch"]
    low = policy.action_low.detach().cpu().float().numpy()
    high = policy.action_high.detach().cpu().float().numpy()
    if policy.action_map == "tanh_rescale":  # squashed_gaussian, squashed deterministic
        if not (np.isfinite(low).all() and np.isfinite(high).all()):
            raise CompressorError(
                f"a {spec.head} policy that squashes needs finite action bounds to rescale tanh "
                "into; set action_low/action_high in its spec"
            )
        # low + (tanh(out) + 1) * ((high - low) / 2): the same float32 operations, in the same
        # order, as Policy.postprocess (halving is exact), so the rounding matches too.
        t = node("Tanh", [x], "squashed")
        t = node("Add", [t, const("one", 1.0)], "squashed_plus_one")
        t = node("Mul", [t, const("half_range", (high - low) * np.float32(0.5))], "rescaled")
        node("Add", [t, const("action_low", low)], OUTPUT_NAME)
        return TensorProto.FLOAT, ["batch", spec.act_dim]
    # gaussian / deterministic: min(out, high) then max(·, low), as torch does. An infinite
    # bound becomes float32 max (a no-op for every finite output) so one Min/Max covers mixed
    # bounds; a side that is unbounded in every dimension gets no node at all.
    fmax = float(np.finfo(np.float32).max)
    has_high, has_low = bool(np.isfinite(high).any()), bool(np.isfinite(low).any())
    if not (has_high or has_low):
        node("Identity", [x], OUTPUT_NAME)
        return TensorProto.FLOAT, ["batch", spec.act_dim]
    if has_high:
        hi = np.where(np.isfinite(high), high, fmax)
        x = node("Min", [x, const("action_high", hi)], OUTPUT_NAME if not has_low else "act_hi")
    if has_low:
        lo = np.where(np.isfinite(low), low, -fmax)
        node("Max", [x, const("action_low", lo)], OUTPUT_NAME)
    return TensorProto.FLOAT, ["batch", spec.act_dim]


def _props(policy: Policy, metadata: Mapping[str, Any] | None, version: str) -> dict[str, str]:
    """Metadata props: the spec, the graph's interface, the caller's keys, version and hash."""
    extra = dict(metadata or {})
    clash = sorted(k for k in extra if k in RESERVED_KEYS)
    if clash:
        raise CompressorError(f"metadata keys {clash} are reserved by the exporter")
    discrete = policy.spec.head in DISCRETE_HEADS
    props: dict[str, str] = {
        "spec": _json(dataclasses.asdict(policy.spec)),
        "interface": _json(
            {
                "input": INPUT_NAME,
                "input_dtype": "float32",
                "input_shape": ["batch", policy.spec.obs_dim],
                "input_space": "raw",
                # what the robot must feed beyond the env's own observation (time feature...)
                "input_wrappers": list(policy.spec.env_wrappers),
                "input_notes": describe_wrappers(policy.spec.env_wrappers),
                "output": OUTPUT_NAME,
                "output_dtype": "int64" if discrete else "float32",
                "output_shape": ["batch"] if discrete else ["batch", policy.spec.act_dim],
                "action_map": policy.action_map,
            }
        ),
    }
    if policy.std_kind == "parameter":  # not in the graph; lets an import restore the head
        log_std = [float(v) for v in policy.log_std.detach().cpu().double()]
        props["action_std"] = _json({"log_std": log_std})
    for key, value in extra.items():
        props[str(key)] = value if isinstance(value, str) else _json(value)
    source_sha = policy.spec.source.get("sha256")
    if source_sha and not props.get("source_sha256"):  # an empty value says nothing
        props["source_sha256"] = str(source_sha)
    props["compressor_version"] = version
    return props


def _json(obj: Any) -> str:
    """Strict JSON (infinite bounds become the strings "inf"/"-inf", not bare Infinity)."""
    return json.dumps(_finite(obj), sort_keys=True, allow_nan=False, default=str)


def _finite(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)  # "inf", "-inf", "nan": readable by any JSON parser, unlike Infinity
    if isinstance(obj, dict):
        return {str(k): _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def _check_finite(policy: Policy) -> None:
    for i, (w, layer) in enumerate(zip(policy.effective_weights(), policy.layers)):
        if not (torch.isfinite(w).all() and torch.isfinite(layer.bias).all()):
            raise CompressorError(f"layer {i} has NaN or infinite weights; nothing to export")
    if policy.spec.obs_norm and not torch.isfinite(policy.obs_scale()).all():
        raise CompressorError("the observation normalisation statistics are not finite")


def _version() -> str:
    try:
        return importlib.metadata.version("edge-policy-compressor")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


# ---- writing ------------------------------------------------------------------------------------
def _write_model(tmp: Path, data: bytes) -> None:
    """Write the serialised model to the temporary file (a seam for failure tests)."""
    tmp.write_bytes(data)


def export_onnx(
    policy: Policy,
    path: str | Path,
    *,
    metadata: dict[str, str] | None = None,
    opset: int = 17,
    compact: bool = True,
    check_parity: bool = True,
    sparse_storage: bool = False,
) -> ExportResult:
    """Write ``policy`` as one self-contained ONNX file, atomically, checked against torch.

    The model is written to a temporary file beside ``path``; parity is checked by loading that
    very file in onnxruntime; only then is it renamed onto ``path``. An interrupted or failed
    export therefore never leaves a file at ``path`` (an older file there is left untouched).

    :param policy: the policy to export (not modified).
    :param path: destination ``.onnx`` file; parent folders are created.
    :param metadata: extra metadata props (ε and its space, budget, certificate, sparsity…);
        string values are stored as-is, others as JSON. ``spec``, ``interface`` and
        ``compressor_version`` are always added by the exporter, ``source_sha256`` from
        ``policy.spec.source["sha256"]`` unless given here.
    :param opset: default-domain opset (13 or newer; 17 suits onnxruntime ≥ 1.14).
    :param compact: physically remove dead hidden neurons, so structured pruning shrinks the
        matmuls (onnxruntime gains nothing from unstructured zeros).
    :param check_parity: compare onnxruntime's actions with ``policy.act`` at batch 1, 2 and 7,
        on typical and far-out observations; a mismatch raises :class:`CompressorError`.
    :param sparse_storage: store sparse weight matrices as bitmask + non-zero values, decoded
        in the graph (:data:`SPARSE_STORAGE_NOTE` says what the runtime does with them).
    :returns: what was written, with its size, hash, parameter counts and parity error.
    """
    final = Path(path)
    if final.is_dir():
        raise CompressorError(f"{final} is a folder; give a file name such as policy.onnx")
    model, params, removed = build_model(
        policy, metadata=metadata, opset=opset, compact=compact, sparse_storage=sparse_storage
    )
    data = model.SerializeToString()
    err = math.nan

    def write_and_check(tmp: Path) -> None:
        nonlocal err
        _write_model(tmp, data)
        if check_parity:
            err = parity_error(policy, tmp)

    try:
        atomic.write_with(final, write_and_check)
    except OSError as exc:
        raise CompressorError(f"cannot write {final}: {exc.strerror or exc}") from None
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
        parity_batches=list(PARITY_BATCHES) if check_parity else [],
        weight_storage="bitmask" if sparse_storage else "dense",
    )


# ---- running ------------------------------------------------------------------------------------
def load_onnx_session(
    path: str | Path | bytes,
    providers: list[str] | None = None,
    *,
    threads: int | None = None,
) -> Any:
    """An onnxruntime ``InferenceSession`` for an exported model.

    :param path: the ``.onnx`` file (or its serialised bytes).
    :param providers: execution providers in priority order; default CPU only. A provider this
        onnxruntime build lacks is an error rather than a silent fallback to CPU.
    :param threads: intra-op threads (1 is usually fastest for batch-1 control loops);
        default: onnxruntime's choice.
    :returns: an ``onnxruntime.InferenceSession``.
    """
    import onnxruntime as ort

    wanted = list(providers) if providers else ["CPUExecutionProvider"]
    missing = [p for p in wanted if p not in ort.get_available_providers()]
    if missing:
        raise CompressorError(
            f"onnxruntime provider(s) {missing} are not available in this build "
            f"(available: {ort.get_available_providers()})"
        )
    opts = ort.SessionOptions()
    if threads is not None:
        opts.intra_op_num_threads = int(threads)
        opts.inter_op_num_threads = 1
    if not isinstance(path, bytes) and not Path(path).is_file():
        raise CompressorError(f"{path}: file not found")
    src = path if isinstance(path, bytes) else str(path)
    try:
        return ort.InferenceSession(src, sess_options=opts, providers=wanted)
    except Exception as exc:  # onnxruntime raises its own, unexported exception types
        msg = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise CompressorError(f"onnxruntime cannot load the model: {msg}") from None


def onnx_act(session: Any, obs: np.ndarray) -> np.ndarray:
    """Deterministic actions from an exported model.

    The graph takes float32; any other real dtype (float64 from gymnasium, ints) is cast to
    float32 first, which is what ``Policy.normalize`` does in torch too.

    :param session: from :func:`load_onnx_session`.
    :param obs: raw observations, shape (batch, obs_dim), or (obs_dim,) for a single one.
    :returns: actions, (batch, act_dim) float32 or (batch,) int64 for categorical policies;
        without the batch axis when ``obs`` had none.
    """
    inp = session.get_inputs()[0]
    want = inp.shape[1] if len(inp.shape) == 2 else None
    x = np.asarray(obs)
    if x.dtype.kind not in "fiub":
        raise CompressorError(f"observations must be numeric, got dtype {x.dtype}")
    single = x.ndim == 1
    if single:
        x = x[None, :]
    if x.ndim != 2 or (isinstance(want, int) and x.shape[1] != want):
        shown = want if isinstance(want, int) else "obs_dim"
        raise CompressorError(
            f"observations must have shape (batch, {shown}) or ({shown},), got {np.shape(obs)}"
        )
    x = np.ascontiguousarray(x, dtype=np.float32)
    out: np.ndarray = session.run(None, {inp.name: x})[0]
    return out[0] if single else out


def parity_observations(policy: Policy, n: int, spread: float, seed: int) -> np.ndarray:
    """``n`` random raw observations, ``spread`` standard deviations around the policy's mean.

    :param policy: the policy whose normalisation statistics set the scale.
    :param n: batch size.
    :param spread: width in normalised units (1: typical; ≫ obs_clip: exercises the clip).
    :param seed: random seed.
    """
    g = np.random.default_rng(seed)
    d = policy.spec.obs_dim
    mean, std = np.zeros(d), np.ones(d)
    if policy.spec.obs_norm:
        with torch.no_grad():
            mean = policy.obs_mean.detach().cpu().double().numpy()
            std = policy.obs_scale().detach().cpu().double().numpy()
    return (mean + std * spread * g.standard_normal((n, d))).astype(np.float32)


def float32_rounding(policy: Policy, batches: list[np.ndarray]) -> list[np.ndarray]:
    """How much float32 arithmetic alone moves this network's actions on each observation
    batch: per action dimension, the largest over the batch of torch's own float32 rounding of
    the head output (the same network in float64 on the same normalised input) times the
    deployment map's largest slope.

    A network whose head outputs are large (SAC's, without observation normalisation, reach
    |μ| ≈ 90 on ordinary states) rounds its pre-tanh output by 1e-5 and more; onnxruntime sums
    in another order and rounds as much, so the parity check allows a few times this on top of
    its fixed tolerances. It is measured before the squash because after it a lucky batch (rows
    where tanh is flat) would hide the rounding that other rows show.

    :param policy: the torch policy. :param batches: raw observation batches.
    """
    if policy.action_map == "argmax":
        return [np.zeros(1) for _ in batches]
    exact = copy.deepcopy(policy).double()  # one float64 copy for every batch
    slope = torch.ones(policy.spec.act_dim, dtype=torch.float64, device=policy.obs_mean.device)
    if policy.action_map == "tanh_rescale":
        slope = 0.5 * (exact.action_high - exact.action_low)
    out = []
    with torch.no_grad():
        for obs in batches:
            z = policy.normalize(torch.as_tensor(obs, device=policy.obs_mean.device))
            out32 = policy.trunk_forward(z, rowwise=True).double()
            err = (out32 - exact.trunk_forward(z.double())).abs().amax(dim=0) * slope
            out.append(np.nan_to_num(err.cpu().numpy(), nan=0.0))
    return out


def parity_error(policy: Policy, model: str | Path | bytes, seed: int = 0) -> float:
    """Compare an exported model with ``policy.act``; raise :class:`CompressorError` on mismatch.

    Continuous heads must agree within ``PARITY_ATOL + PARITY_RTOL·|torch|`` plus
    ``PARITY_ROUNDING`` times torch's own float32 rounding (:func:`float32_rounding`) everywhere.
    Categorical heads must pick the same action, except where torch's own logits tie within
    float32 noise (1e-5 relative), where either choice is equally right.

    :param policy: the torch policy.
    :param model: the ``.onnx`` file or its bytes.
    :param seed: seed of the random observations.
    :returns: the largest absolute action difference (categorical: largest gap between the
        torch logits of torch's action and of onnxruntime's; 0 when all agree).
    """
    sess = load_onnx_session(model, threads=1)
    device = policy.obs_mean.device
    discrete = policy.spec.head in DISCRETE_HEADS
    far = max(30.0, 3.0 * float(policy.spec.obs_clip or 0.0))  # beyond the clip
    worst = 0.0
    # torch's own rounding at each spread, on a sample of its own (a batch of one is a lucky
    # or unlucky single row)
    samples = [
        parity_observations(policy, 64, spread, seed * 1000 + 500 + j)
        for j, spread in enumerate((1.0, far))
    ]
    rounding = [PARITY_ROUNDING * r for r in float32_rounding(policy, samples)]
    for k, n in enumerate(PARITY_BATCHES):
        for j, spread in enumerate((1.0, far)):
            obs = parity_observations(policy, n, spread, seed * 1000 + 10 * k + j)
            got = onnx_act(sess, obs)
            with torch.no_grad():
                t_obs = torch.as_tensor(obs, device=device)
                ref = policy.act(t_obs).cpu().numpy()
                if discrete:
                    logits = policy(t_obs).cpu().double().numpy()
            if got.shape != ref.shape:
                raise CompressorError(
                    f"exported model returns shape {got.shape}, torch {ref.shape}; not written"
                )
            if discrete:
                rows = np.arange(n)
                ref_logit = logits[rows, ref.astype(np.int64)]
                gap = np.abs(ref_logit - logits[rows, got.astype(np.int64)])
                worst = max(worst, float(gap.max()))
                if not np.all((got == ref) | (gap <= 1e-5 * (1.0 + np.abs(ref_logit)))):
                    raise CompressorError(
                        "exported model picks different actions than torch "
                        f"(batch {n}, logit gap {gap.max():.3g}); nothing was written"
                    )
                continue
            diff = np.abs(got.astype(np.float64) - ref.astype(np.float64))
            tol = PARITY_ATOL + PARITY_RTOL * np.abs(ref) + rounding[j]
            if not np.all(diff <= tol):  # NaN fails too
                bad = float(np.nanmax(diff)) if np.isfinite(diff).any() else math.nan
                raise CompressorError(
                    f"exported model disagrees with torch (batch {n}, max |Δ| = {bad:.3g} > "
                    f"{PARITY_ATOL:g}); nothing was written"
                )
            worst = max(worst, float(diff.max()))
    return worst


def read_metadata(path: str | Path) -> dict[str, str]:
    """The metadata props of an ONNX file (values are strings; most hold JSON).

    :param path: the ``.onnx`` file.
    """
    p = Path(path)
    if not p.is_file():
        raise CompressorError(f"{p}: file not found")
    try:
        model = onnx.load(str(p), load_external_data=False)
    except Exception as exc:  # protobuf's DecodeError and friends
        raise CompressorError(f"{p}: not a readable ONNX model ({type(exc).__name__})") from None
    return {prop.key: prop.value for prop in model.metadata_props}


def graph_layer_shapes(path: str | Path) -> list[tuple[int, ...]]:
    """Shapes of the layer weights ``W0, W1, …`` in an exported file (for reports and tests).

    :param path: the ``.onnx`` file.
    """
    model = onnx.load(str(path), load_external_data=False)
    shapes = {t.name: tuple(int(d) for d in t.dims) for t in model.graph.initializer}
    for t in model.graph.initializer:  # sparse storage: the dense shape is an initialiser
        if t.name.endswith("_shape") and t.name[:-6] not in shapes:
            shapes[t.name[:-6]] = tuple(int(v) for v in numpy_helper.to_array(t))
    out: list[tuple[int, ...]] = []
    while f"W{len(out)}" in shapes:
        out.append(shapes[f"W{len(out)}"])
    return out


# Older spelling kept for callers written against the first draft of this module.
load_session = load_onnx_session
