"""Quantised ONNX models, re-evaluated through onnxruntime and re-certified on their own weights.

Three modes, all starting from an exported fp32 file (:func:`compressor.deploy.export.export_onnx`):

- ``dynamic`` (alias ``int8``): int8 weights, activations quantised to uint8 at run time from
  each call's own min/max (``onnxruntime.quantization.quantize_dynamic``). onnxruntime's dynamic
  quantiser only handles ``MatMul``, so each ``Gemm`` is first rewritten as ``MatMul`` + ``Add``;
- ``qdq``: int8 weights, int32 biases and activations quantised with fixed scales calibrated on
  observations (``quantize_static``, QDQ format);
- ``fp16``: weights and biases stored as float16 and cast back to float32 in the graph. The file
  halves; arithmetic stays float32 (onnxruntime's CPU provider has no fp16 ``Gemm``), so every
  provider runs it and the certificate below is exact for it;
- ``int8w``: weight-only int8 (symmetric, one scale per output neuron), cast and scaled back
  to float32 in the graph (folded once at session start); arithmetic stays float32. A quarter
  of the weight bytes and no activation rounding, so, like ``fp16``, its certificate has no
  additive part.

The first layer stays fp32 by default: its input is the normalised, clipped observation (up to
±10 units), where one int8 step (≥ 0.04 units) is as large as the threat ε itself, while the
layer holds a few percent of the parameters.

**The fp32 certificate does not cover a quantised model.** The certificate here is computed from
the file: its int8 (or fp16) initializers and their scales and zero points are read back, a torch
:class:`~compressor.policy.model.Policy` is rebuilt with those dequantised weights, and
:func:`~compressor.certify.global_bound.certify_global` runs on it (the *Lipschitz part*).
Activation rounding is a staircase, not Lipschitz: for ``r(x) = s·(clamp(round(x/s) + z) − z)``,
``|r(x) − r(y)| ≤ |x − y| + s`` per coordinate (clamp is 1-Lipschitz and
``|round a − round b| < |a − b| + 1``). Dynamic rounding picks each call's scale from that
call's range, so nothing saturates and each error is at most half its own step: with scales
``s_x, s_y`` the change is ``≤ |x − y| + (s_x + s_y)/2 ≤ |x − y| + s_max``, where the largest
run-time scale ``s_max`` is bounded by interval propagation from the observation clip.
Each rounding point adds ``|W_L|···|W_k|·slack`` to the output bound, so the certified shift is
``lipschitz·ε + additive``: a radius exists only where the additive part stays below the
shift allowed at τ. The bound assumes exact integer accumulation (int32, as ``MatMulInteger``
and ``QGemm`` specify); on x86 CPUs without VNNI, u8·s8 kernels may saturate int16
intermediates, so use ``reduce_range=True`` there. :attr:`QuantizeResult.simulation_max_abs_err`
checks this model of the arithmetic against what onnxruntime actually returns.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import logging
import math
import tempfile
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from compressor.certify.global_bound import (
    DEFAULT_TAU,
    GAUSSIAN_HEADS,
    certify_global,
    output_scale,
    shift_for_tv,
    tv_from_shift,
)
from compressor.core import atomic
from compressor.core.errors import CompressorError
from compressor.core.stats import summarize_returns
from compressor.core.threat import ThreatModel
from compressor.deploy.export import (
    decode_sparse_weight,
    load_onnx_session,
    onnx_act,
    parity_error,
    parity_observations,
)
from compressor.evaluate import EvalResult, SuiteResult
from compressor.policy.model import Policy
from compressor.rl.rollout import rollout

__all__ = [
    "MODES",
    "OnnxActor",
    "QuantGraph",
    "QuantizeResult",
    "certify_quantized",
    "dequantized_policy",
    "evaluate_onnx",
    "quantize_model",
    "read_quantized",
    "simulate_trunk",
]

MODES = ("dynamic", "qdq", "fp16", "int8w")
ALIASES = {"int8": "dynamic", "static": "qdq"}
PARITY_N = 64  # batch-1 parity observations (the deployment call pattern)
SIMULATION_TOL = 1e-4  # median |onnxruntime - simulation|: float noise is ~1e-7
_QRANGE = {TensorProto.UINT8: (0, 255), TensorProto.INT8: (-128, 127)}
# Every operator the graphs read here may contain; anything else is refused, not guessed at.
_KNOWN_OPS = {
    "Sub", "Div", "Clip", "Gemm", "MatMul", "Add", "Mul", "Cast", "Tanh", "Relu", "Elu",
    "ArgMax", "Min", "Max", "Identity", "DequantizeLinear", "QuantizeLinear",
    "DynamicQuantizeLinear", "MatMulInteger",
}  # fmt: skip


# ---- reading a (possibly quantised) graph back ----------------------------------------------
@dataclass
class Layer:
    """One affine layer of a graph, dequantised to float64.

    :param weight: shape (out, in), ``nn.Linear`` layout.
    :param bias: shape (out,).
    :param node: name of the node that multiplies by the weight.
    :param input: the tensor the layer reads.
    :param output: the tensor holding ``W x + b``.
    :param storage: how the weight is stored: ``fp32``, ``fp16`` or ``int8``.
    """

    weight: np.ndarray
    bias: np.ndarray
    node: str
    input: str
    output: str
    storage: str


@dataclass
class RoundingPoint:
    """Where the graph rounds an activation to 8 bits.

    :param tensor: the rounded tensor's name.
    :param layer: index of the layer concerned.
    :param where: ``input`` (rounds that layer's input) or ``pre_act`` (rounds its output,
        before the activation).
    :param dynamic: scale computed per call from the tensor's min/max (``DynamicQuantizeLinear``)
        rather than fixed by calibration.
    :param scale: the fixed scale (static points only).
    :param zero_point: the fixed zero point (static points only).
    :param qmin: smallest quantised value. :param qmax: largest.
    """

    tensor: str
    layer: int
    where: str
    dynamic: bool
    scale: float = 0.0
    zero_point: int = 0
    qmin: int = 0
    qmax: int = 255

    def apply(self, x: np.ndarray) -> np.ndarray:
        """Quantise then dequantise ``x`` the way the graph does (round half to even)."""
        if self.dynamic:
            # DynamicQuantizeLinear: uint8 over the whole tensor's range, widened to include 0
            lo, hi = min(0.0, float(x.min())), max(0.0, float(x.max()))
            s = np.float32((np.float32(hi) - np.float32(lo)) / np.float32(255.0))
            if s == 0:
                return x
            z = float(np.clip(np.rint(-lo / s), 0, 255))
        else:
            s, z = np.float32(self.scale), float(self.zero_point)
        # times the float32 reciprocal, as onnxruntime's kernels do: fewer boundary mismatches
        q = np.clip(np.rint(x.astype(np.float32) * (np.float32(1.0) / s)) + z, self.qmin, self.qmax)
        return ((q - z) * s).astype(np.float64)


@dataclass
class QuantGraph:
    """The affine layers and activation rounding points of a policy graph.

    :param layers: in order; their weights dequantised.
    :param rounding: activation rounding points (none for fp32 and fp16 graphs).
    """

    layers: list[Layer]
    rounding: list[RoundingPoint] = field(default_factory=list)

    @property
    def params(self) -> int:
        """Weights and biases of the layers."""
        return int(sum(la.weight.size + la.bias.size for la in self.layers))

    @property
    def flops(self) -> int:
        """Multiply-adds ×2 per observation: ``2·Σ in·out``."""
        return int(sum(2 * la.weight.size for la in self.layers))


# what export.py's bitmask storage decodes weights with (constant subgraphs only)
_DECODE_OPS = {"Unsqueeze", "BitShift", "Mod", "Reshape", "Slice", "Cast", "CumSum", "Mul", "Sub"}
_DECODE_OPS.add("Gather")


def _attr(node: onnx.NodeProto, name: str, default: Any) -> Any:
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def read_quantized(model: onnx.ModelProto | str | Path) -> QuantGraph:
    """Read the layers (dequantised) and rounding points of an exported or quantised graph.

    Understands the forms this package writes: fp32 ``Gemm``; ``Gemm`` fed by ``Cast`` (fp16)
    or ``DequantizeLinear`` (QDQ); ``MatMul`` + ``Add``; and onnxruntime's dynamic
    ``MatMulInteger`` → ``Cast`` → ``Mul`` → ``Add`` chain. Anything else that rounds is refused,
    so an unexpected graph can never be certified as if it were exact.

    :param model: the model or its file.
    :raises CompressorError: on a graph it cannot read faithfully.
    """
    m = model if isinstance(model, onnx.ModelProto) else onnx.load(str(model))
    g = m.graph
    inits = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for n in g.node:
        for i in n.input:
            consumers[i].append(n)

    def const(name: str) -> np.ndarray | None:
        """The value of a constant tensor (initializer, or Cast / DequantizeLinear of one)."""
        if name in inits:
            return inits[name]
        n = producer.get(name)
        if n is None:
            return None
        sparse = [f"{name}_{part}" for part in ("mask", "values", "shape")]
        if n.op_type == "Reshape" and all(p in inits for p in sparse):  # bitmask storage
            return decode_sparse_weight(*(inits[p] for p in sparse)).astype(np.float64)
        if n.op_type == "Cast":
            x = const(n.input[0])
            return None if x is None else x.astype(np.float64)
        if n.op_type == "Mul":
            a, b = const(n.input[0]), const(n.input[1])
            return None if a is None or b is None else a.astype(np.float64) * b
        if n.op_type == "DequantizeLinear":
            x, s = const(n.input[0]), const(n.input[1])
            zp = const(n.input[2]) if len(n.input) > 2 and n.input[2] else np.zeros(())
            if x is None or s is None or zp is None:
                return None
            shape = [1] * x.ndim
            if s.ndim == 1 and x.ndim > 0:  # per-axis: broadcast along ``axis``
                shape[int(_attr(n, "axis", 1)) % x.ndim] = -1
                s, zp = s.reshape(shape), zp.reshape(shape)
            return (x.astype(np.float64) - zp.astype(np.float64)) * s.astype(np.float64)
        return None

    def storage(name: str) -> str:
        n = producer.get(name)
        if n is None:
            return {"float16": "fp16", "int8": "int8", "uint8": "int8"}.get(
                str(inits[name].dtype), "fp32"
            )
        if n.op_type == "Reshape" and f"{name}_mask" in inits:
            return "fp32-bitmask"
        return "int8" if n.op_type == "DequantizeLinear" else storage(n.input[0])

    def only_consumer(name: str, op: str) -> onnx.NodeProto:
        found = [c for c in consumers.get(name, []) if c.op_type == op]
        if len(found) != 1:
            raise CompressorError(f"cannot read the graph: {name!r} does not feed one {op} node")
        return found[0]

    def bias_after(name: str) -> tuple[np.ndarray, str]:
        add = only_consumer(name, "Add")
        other = [i for i in add.input if i != name]
        b = const(other[0]) if len(other) == 1 else None
        if b is None:
            raise CompressorError(f"cannot read the graph: no constant bias after {name!r}")
        return b.astype(np.float64), add.output[0]

    # Nodes computed from initialisers alone (the bitmask weight decoding of sparse storage)
    # are exact integer and indexing ops; the weights they produce are read through ``const``.
    constant = set(inits)
    for n in g.node:
        if n.op_type in _DECODE_OPS and all(i in constant for i in n.input if i):
            constant.update(n.output)
    live = [n for n in g.node if not (n.op_type in _DECODE_OPS and set(n.output) <= constant)]
    unknown = sorted({n.op_type for n in live} - _KNOWN_OPS)
    if unknown:  # e.g. fused integer kernels whose rounding this module does not model
        raise CompressorError(f"cannot read the graph: unexpected operators {unknown}")

    layers: list[Layer] = []
    for n in g.node:
        if n.op_type == "Gemm":
            w = const(n.input[1])
            if w is None or _attr(n, "transA", 0) or _attr(n, "alpha", 1.0) != 1.0:
                raise CompressorError(f"cannot read the graph: unexpected Gemm {n.name!r}")
            w = w if _attr(n, "transB", 0) else w.T
            b = const(n.input[2]) if len(n.input) > 2 and n.input[2] else None
            b = np.zeros(w.shape[0]) if b is None else b * float(_attr(n, "beta", 1.0))
            b = b.astype(np.float64)
            layers.append(Layer(w, b, n.name, n.input[0], n.output[0], storage(n.input[1])))
        elif n.op_type == "MatMul" and const(n.input[1]) is not None:
            w = const(n.input[1])
            assert w is not None
            b, out = bias_after(n.output[0])
            layers.append(Layer(w.T, b, n.name, n.input[0], out, storage(n.input[1])))
        elif n.op_type == "MatMulInteger":
            wq, wz = const(n.input[1]), const(n.input[3]) if len(n.input) > 3 else np.zeros(())
            if wq is None or wz is None:
                raise CompressorError(f"cannot read the graph: {n.name!r} has no constant weight")
            cast = only_consumer(n.output[0], "Cast").output[0]
            mul = only_consumer(cast, "Mul")
            scales = producer.get(next((i for i in mul.input if i != cast), ""))
            ws = [const(i) for i in scales.input] if scales is not None else []
            w_scale = [s for s in ws if s is not None]
            if scales is None or scales.op_type != "Mul" or len(w_scale) != 1:
                raise CompressorError(f"cannot read the graph: no weight scale for {n.name!r}")
            w = (wq.astype(np.float64) - wz.astype(np.float64)) * w_scale[0].astype(np.float64)
            b, out = bias_after(mul.output[0])
            layers.append(Layer(w.T, b, n.name, n.input[0], out, "int8"))
    for k in range(1, len(layers)):
        if layers[k].weight.shape[1] != layers[k - 1].weight.shape[0]:
            raise CompressorError("cannot read the graph: its layers do not form a chain")
    if not layers:
        raise CompressorError("cannot read the graph: no Gemm / MatMul layers found")

    by_node = {la.node: k for k, la in enumerate(layers)}
    by_input = {la.input: k for k, la in enumerate(layers)}
    out_of = {la.output: k for k, la in enumerate(layers)}
    points: list[RoundingPoint] = []
    for n in g.node:
        if n.op_type == "DynamicQuantizeLinear":
            user = only_consumer(n.output[0], "MatMulInteger")
            points.append(RoundingPoint(n.input[0], by_node[user.name], "input", True))
        elif n.op_type == "QuantizeLinear" and const(n.input[0]) is None:
            s, zp = const(n.input[1]), const(n.input[2]) if len(n.input) > 2 else None
            if s is None or zp is None or s.size != 1:
                raise CompressorError(f"cannot certify: unexpected activation rounding {n.name!r}")
            zp_type = next(t.data_type for t in g.initializer if t.name == n.input[2])
            qmin, qmax = _QRANGE.get(zp_type, (0, 0))
            deq = only_consumer(n.output[0], "DequantizeLinear").output[0]
            if n.input[0] in out_of:
                k, where = out_of[n.input[0]], "pre_act"
            elif n.input[0] in by_input or deq in by_input:
                k, where = by_input.get(deq, by_input.get(n.input[0], -1)), "input"
            else:
                raise CompressorError(f"cannot certify: rounding of {n.input[0]!r} is off the MLP")
            if qmax == 0:
                raise CompressorError(f"cannot certify: unsupported quantised type at {n.name!r}")
            pt = RoundingPoint(n.input[0], k, where, False, float(s), int(zp), qmin, qmax)
            points.append(pt)
    return QuantGraph(layers, points)


# ---- dequantised policy, simulation, certificate --------------------------------------------
def dequantized_policy(policy: Policy, graph: QuantGraph) -> Policy:
    """``policy`` with its layers replaced by the graph's dequantised weights and biases.

    Normalisation, log_std and action bounds are the policy's (the quantiser leaves them in
    fp32). A compacted graph (dead neurons removed) gets a spec with its own, narrower hidden
    widths: removed neurons carry no path from input to output, so the certificate is unchanged.

    :param policy: the torch policy the graph was exported from.
    :param graph: from :func:`read_quantized`.
    """
    hidden = [int(la.weight.shape[0]) for la in graph.layers[:-1]]
    if graph.layers[0].weight.shape[1] != policy.spec.obs_dim or (
        graph.layers[-1].weight.shape[0] != policy.spec.act_dim
    ):
        raise CompressorError("the ONNX model's input/output sizes do not match the policy")
    if hidden == list(policy.spec.hidden):
        out = policy.clone()
        masks = [m.clone() for m in policy.masks()]
    else:
        spec = copy.deepcopy(policy.spec)
        spec.hidden = hidden
        out = Policy(spec)
        out.load_state_dict(
            {k: v for k, v in policy.state_dict().items() if not k.startswith(("mask", "layers"))},
            strict=False,
        )
        masks = [torch.as_tensor(la.weight != 0, dtype=torch.float32) for la in graph.layers]
    with torch.no_grad():
        for layer, la in zip(out.layers, graph.layers):
            layer.weight.copy_(torch.tensor(la.weight, dtype=torch.float32))
            layer.bias.copy_(torch.tensor(la.bias, dtype=torch.float32))
    out.set_masks(masks)
    return out.eval()


_NP_ACT: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "tanh": np.tanh,
    "relu": lambda x: np.maximum(x, 0.0),
    "elu": lambda x: np.where(x > 0, x, np.expm1(np.minimum(x, 0.0))),
}


def simulate_trunk(graph: QuantGraph, z: np.ndarray, activation: str) -> np.ndarray:
    """The head pre-activation the quantised graph computes, from the normalised input ``z``.

    Dequantised weights with every activation rounding applied where the graph applies it
    (dynamic points use the whole batch's range, as onnxruntime does).

    :param graph: from :func:`read_quantized`.
    :param z: normalised, clipped observations, shape (batch, obs_dim).
    :param activation: the hidden activation's name.
    """
    h = np.asarray(z, dtype=np.float64)
    last = len(graph.layers) - 1
    for k, la in enumerate(graph.layers):
        for p in graph.rounding:
            if p.layer == k and p.where == "input":
                h = p.apply(h)
        h = h @ la.weight.T + la.bias
        for p in graph.rounding:
            if p.layer == k and p.where == "pre_act":
                h = p.apply(h)
        if k < last:
            h = _NP_ACT[activation](h)
    return h


def _dynamic_steps(graph: QuantGraph, policy: Policy) -> dict[int, float]:
    """Largest run-time scale of each dynamic rounding point, by interval propagation.

    The input interval is the observation clip (unbounded without one); each rounding may
    widen it by half a step (widened by a whole one here, for margin).
    """
    clip = policy.spec.obs_clip
    c = float(clip) if clip is not None else math.inf
    lo = np.full(policy.spec.obs_dim, -c)
    hi = np.full(policy.spec.obs_dim, c)
    act = _NP_ACT[policy.spec.activation]
    steps: dict[int, float] = {}
    last = len(graph.layers) - 1
    for k, la in enumerate(graph.layers):
        if any(p.dynamic and p.layer == k for p in graph.rounding):
            s = (max(float(hi.max()), 0.0) - min(float(lo.min()), 0.0)) / 255.0
            steps[k] = s
            lo, hi = lo - s, hi + s
        fin = np.isfinite(lo) & np.isfinite(hi)
        with np.errstate(invalid="ignore"):  # inf - inf where unbounded; masked out below
            mid = np.where(fin, (lo + hi) / 2, 0.0)
            rad = np.where(fin, (hi - lo) / 2, 0.0)
        absw = np.abs(la.weight)
        # an unbounded input reaches every neuron with a non-zero weight from it
        unbounded = (absw[:, ~fin] > 0).any(axis=1)
        new_mid, new_rad = la.weight @ mid + la.bias, np.where(unbounded, math.inf, absw @ rad)
        lo, hi = new_mid - new_rad, new_mid + new_rad
        if k < last:
            lo, hi = act(lo), act(hi)  # every activation here is monotone
    return steps


def _rounding_slack(graph: QuantGraph, policy: Policy) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Per-output additive bound ``c`` from activation rounding, and what each point adds."""
    steps = _dynamic_steps(graph, policy)
    absw = [np.abs(la.weight) for la in graph.layers]
    total = np.zeros(graph.layers[-1].weight.shape[0])
    details = []
    for p in graph.rounding:
        # static: |r(x) - r(y)| ≤ |x - y| + s. dynamic: each call's rounding error is at most
        # half its own step (the range includes every value, so nothing saturates), hence
        # ≤ |x - y| + s_max; 1% covers float32 rounding of the scale and of x / s.
        slack = 1.01 * steps[p.layer] if p.dynamic else p.scale
        if p.where == "input":
            v, start = np.full(absw[p.layer].shape[1], slack), p.layer
        else:
            v, start = np.full(absw[p.layer].shape[0], slack), p.layer + 1
        with np.errstate(invalid="ignore"):
            for a in absw[start:]:
                v = a @ v
        v = np.where(np.isnan(v), math.inf, v)
        total = total + v
        details.append(
            {
                "tensor": p.tensor,
                "layer": p.layer,
                "where": p.where,
                "dynamic": p.dynamic,
                "slack": slack,
            }  # fmt: skip
        )
    return total, details


def certify_quantized(
    policy: Policy,
    graph: QuantGraph,
    threat: ThreatModel,
    tau: float = DEFAULT_TAU,
    fp32_policy: Policy | None = None,
) -> dict[str, Any]:
    """Certificate of the quantised graph: Lipschitz part on its dequantised weights, plus the
    additive part from its activation rounding (see the module docstring).

    :param policy: the dequantised policy (:func:`dequantized_policy`).
    :param graph: the graph it was read from.
    :param threat: ε, norm and space.
    :param tau: TV threshold of the certified radius.
    :param fp32_policy: the fp32 policy, whose certificate is added for comparison only.
    :returns: a JSON-ready dict; ``total`` is the quantised model's certificate.
    """
    weights = certify_global(policy, threat, tau)
    c, details = _rounding_slack(graph, policy)
    head = policy.spec.head
    if head in GAUSSIAN_HEADS:
        d = output_scale(policy).numpy()
        additive = float(np.linalg.norm(d * c))
    elif head == "categorical":
        big = c[:, None] + c[None, :]
        np.fill_diagonal(big, 0.0)
        additive = float(big.max()) if len(c) > 1 else 0.0
    else:
        additive = float(np.linalg.norm(c))
    shift = weights.lipschitz * threat.eps + additive
    tv = tv_from_shift(head, shift)
    star = shift_for_tv(head, tau)
    radius: float | None
    if star is None:
        radius = None
    elif additive >= star:
        radius = 0.0  # rounding alone may already move the action that far
    elif weights.lipschitz == 0.0 or math.isinf(star):
        radius = math.inf
    else:
        radius = (star - additive) / weights.lipschitz
    out: dict[str, Any] = {
        "covers": "the quantised graph as written: dequantised weights and activation rounding",
        "head": head,
        "shift_name": weights.shift_name,
        "eps": threat.eps,
        "norm": threat.norm,
        "space": threat.space,
        "tau": tau,
        "lipschitz": weights.lipschitz,
        "additive": additive,
        "shift_bound": shift,
        "tv_bound": None if tv is None else float(tv),
        "certified_radius": None if radius is None or math.isinf(radius) else radius,
        "radius_unbounded": radius is not None and math.isinf(radius),
        "rounding_points": details,
        "dequantized_weights": weights.to_dict(),
    }
    if fp32_policy is not None:
        out["fp32_for_comparison"] = certify_global(fp32_policy, threat, tau).to_dict()
    return out


# ---- running through onnxruntime ------------------------------------------------------------
class OnnxActor:
    """Acts through onnxruntime, so evaluation measures the file that ships.

    Dynamic quantisation computes one activation scale per call over the whole batch, so one
    row's action depends on the other rows. A robot calls the model one observation at a time;
    by default a graph with dynamic rounding is therefore run row by row.

    :param model: the ``.onnx`` file or its bytes.
    :param providers: onnxruntime providers (default CPU).
    :param threads: intra-op threads.
    :param row_by_row: run each observation as its own batch-1 call (default: only for graphs
        with dynamic rounding).
    """

    def __init__(
        self,
        model: str | Path | bytes,
        providers: list[str] | None = None,
        threads: int | None = 1,
        row_by_row: bool | None = None,
    ) -> None:
        self.session = load_onnx_session(model, providers, threads=threads)
        if row_by_row is None:
            proto = (
                onnx.load_from_string(model)
                if isinstance(model, bytes)
                else onnx.load(str(model), load_external_data=False)
            )
            row_by_row = any(n.op_type == "DynamicQuantizeLinear" for n in proto.graph.node)
        self.row_by_row = bool(row_by_row)

    def act(self, obs: torch.Tensor) -> torch.Tensor:
        """Deterministic actions for a batch of raw observations.

        :param obs: shape (batch, obs_dim).
        """
        x = obs.detach().cpu().numpy()
        if self.row_by_row and x.ndim == 2 and len(x) > 1:
            out = np.stack([onnx_act(self.session, x[i : i + 1])[0] for i in range(len(x))])
        else:
            out = onnx_act(self.session, x)
        return torch.from_numpy(np.ascontiguousarray(out))

    def sample(self, obs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Not available: the exported graph holds only the deterministic action."""
        raise CompressorError("an ONNX policy has only its deterministic action; cannot sample")


def evaluate_onnx(
    actor: OnnxActor,
    env_id: str,
    env_kwargs: dict,
    seeds: list[int],
    *,
    surrogate: Policy | None = None,
    attacks: Sequence[str] = (),
    threat: ThreatModel | None = None,
    attack_seed: int = 0,
    num_envs: int = 16,
    max_steps: int | None = None,
) -> SuiteResult:
    """Clean and attacked returns of an ONNX model, every action from onnxruntime.

    Attacks are *transfer* attacks: gradient attacks cannot differentiate through onnxruntime,
    so the perturbation is computed on ``surrogate`` (use the dequantised policy: it has the
    model's own weights) and the quantised model acts on the perturbed observation. A white-box
    attack on the rounding itself could do better, so the attacked return is an upper bound on
    the worst case, like every empirical attack; the certificate is the lower-bound side.
    ``mean_tv`` is None: the graph has no action distribution to measure.

    :param actor: the model to evaluate.
    :param env_id: gymnasium id. :param env_kwargs: kwargs for ``gymnasium.make``.
    :param seeds: one reset seed per episode (the same for every condition).
    :param surrogate: torch policy the attacks differentiate (needed when ``attacks``).
    :param attacks: attack names from :data:`compressor.attacks.ATTACKS`.
    :param threat: ε, norm and space of the attacks.
    :param attack_seed: seed of the attacks' own randomness.
    :param num_envs: parallel sub-envs.
    :param max_steps: truncate episodes after this many steps.
    """
    from compressor.attacks import AttackContext, make_attack

    def run(name: str, perturb: Any) -> EvalResult:
        res = rollout(
            actor,
            env_id,
            env_kwargs,
            seeds,
            num_envs=num_envs,
            perturb=perturb,
            max_steps=max_steps,
        )
        return EvalResult(name, summarize_returns(res.returns), None, res.steps, res.wall_s)

    out = SuiteResult(clean=run("clean", None), threat=threat)
    if attacks and (surrogate is None or threat is None):
        raise CompressorError("attacked evaluation needs a surrogate torch policy and a threat")
    for name in attacks:
        assert surrogate is not None and threat is not None
        attack = make_attack(name, AttackContext(surrogate, threat, attack_seed))
        out.attacks[name] = run(name, attack.perturb)
    return out


# ---- building the quantised file ------------------------------------------------------------
@dataclass
class QuantizeResult:
    """What :func:`quantize_model` wrote and measured.

    :param path: the quantised ``.onnx`` file.
    :param mode: ``dynamic``, ``qdq`` or ``fp16``.
    :param file_bytes: its size. :param fp32_file_bytes: the fp32 file's size.
    :param parity_max_abs_err: largest ``|onnxruntime(quantised) − torch fp32|`` action
        difference over typical observations, batch 1 (categorical: fraction of differing
        actions).
    :param dequantized_max_abs_err: the same against the dequantised torch policy (what the
        activation rounding alone changes).
    :param simulation_max_abs_err: the same against :func:`simulate_trunk`, which checks that
        onnxruntime computes what the certificate models. Most rows agree to float noise; a
        value within last-bit noise of a rounding boundary (onnxruntime's tanh is not numpy's)
        may round the other way, moving that row by one step times a weight column.
    :param simulation_median_abs_err: the median over rows of that difference.
    :param dequantized: the torch policy with the file's own weights (None if unreadable).
    :param certificate: from :func:`certify_quantized`.
    :param settings: mode options (per-channel, reduce_range, skipped layers, calibration).
    """

    path: Path
    mode: str
    file_bytes: int
    fp32_file_bytes: int
    parity_max_abs_err: float
    dequantized_max_abs_err: float
    simulation_max_abs_err: float
    simulation_median_abs_err: float
    dequantized: Policy | None
    certificate: dict[str, Any]
    settings: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (the policy object is left out)."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["path"] = str(self.path)
        d.pop("dequantized")
        return d


@contextlib.contextmanager
def _quiet_quantizer() -> Iterator[None]:
    """onnxruntime's quantiser logs a pre-processing advice on the root logger every call."""
    before = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(before)


def _matmul_name(model: onnx.ModelProto, gemm: str) -> str:
    """Name :func:`_gemm_to_matmul` gives the ``MatMul`` replacing the ``Gemm`` node ``gemm``."""
    node = next(n for n in model.graph.node if n.name == gemm)
    return f"{node.output[0]}_matmul"


def _gemm_to_matmul(model: onnx.ModelProto) -> onnx.ModelProto:
    """Rewrite every ``Gemm`` as ``MatMul`` + ``Add`` (the form the dynamic quantiser takes)."""
    m = copy.deepcopy(model)
    inits = {t.name: t for t in m.graph.initializer}
    nodes: list[onnx.NodeProto] = []
    for n in m.graph.node:
        if n.op_type != "Gemm":
            nodes.append(n)
            continue
        w = numpy_helper.to_array(inits[n.input[1]])
        w_t = np.ascontiguousarray(w.T if _attr(n, "transB", 0) else w)
        m.graph.initializer.remove(inits[n.input[1]])
        m.graph.initializer.append(numpy_helper.from_array(w_t, f"{n.input[1]}_T"))
        mm = f"{n.output[0]}_matmul"
        nodes.append(helper.make_node("MatMul", [n.input[0], f"{n.input[1]}_T"], [mm], name=mm))
        nodes.append(helper.make_node("Add", [mm, n.input[2]], [n.output[0]], name=n.name))
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    return m


def _to_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """Store every Gemm weight and bias as float16, cast back to float32 inside the graph."""
    m = copy.deepcopy(model)
    inits = {t.name: t for t in m.graph.initializer}
    casts: list[onnx.NodeProto] = []
    for n in m.graph.node:
        if n.op_type != "Gemm":
            continue
        for name in n.input[1:3]:
            if name not in inits:
                continue
            arr = numpy_helper.to_array(inits[name])
            if np.abs(arr).max(initial=0.0) > np.finfo(np.float16).max:
                raise CompressorError(f"{name} has values beyond float16's range; keep fp32")
            m.graph.initializer.remove(inits.pop(name))
            m.graph.initializer.append(
                numpy_helper.from_array(arr.astype(np.float16), f"{name}_fp16")
            )
            casts.append(
                helper.make_node("Cast", [f"{name}_fp16"], [name], name=f"{name}_cast", to=1)
            )
    nodes = casts + list(m.graph.node)
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    return m


def _to_int8_weights(model: onnx.ModelProto) -> onnx.ModelProto:
    """Store every Gemm weight as symmetric per-row int8, times its fp32 scale in the graph."""
    m = copy.deepcopy(model)
    inits = {t.name: t for t in m.graph.initializer}
    dqs: list[onnx.NodeProto] = []
    for n in m.graph.node:
        if n.op_type != "Gemm" or n.input[1] not in inits or not _attr(n, "transB", 0):
            continue
        name = n.input[1]
        w = numpy_helper.to_array(inits[name]).astype(np.float64)
        scale = np.abs(w).max(axis=1) / 127.0
        scale = np.where(scale > 0, scale, 1.0).astype(np.float32)  # an all-zero row stays 0
        q = np.clip(np.rint(w / scale[:, None]), -127, 127).astype(np.int8)
        m.graph.initializer.remove(inits.pop(name))
        m.graph.initializer.extend(
            [
                numpy_helper.from_array(q, f"{name}_int8"),
                numpy_helper.from_array(scale[:, None], f"{name}_scale"),
            ]
        )
        # Cast + Mul rather than DequantizeLinear: onnxruntime constant-folds these at load
        # (it keeps DequantizeLinear for QDQ fusion and would run it on every call)
        dqs.append(
            helper.make_node("Cast", [f"{name}_int8"], [f"{name}_cast"], name=f"{name}_cast", to=1)
        )
        dqs.append(
            helper.make_node(
                "Mul", [f"{name}_cast", f"{name}_scale"], [name], name=f"{name}_dequantize"
            )
        )
    nodes = dqs + list(m.graph.node)
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    return m


def _strict_json(obj: Any) -> str:
    """JSON any parser reads: an infinite bound (ReLU net without an observation clip) is
    written as the string "inf", as the exporter does, never as a bare ``Infinity``."""

    def fix(o: Any) -> Any:
        if isinstance(o, float) and not math.isfinite(o):
            return str(o)
        if isinstance(o, dict):
            return {str(k): fix(v) for k, v in o.items()}
        if isinstance(o, (list, tuple)):
            return [fix(v) for v in o]
        return o

    return json.dumps(fix(obj), allow_nan=False, default=str)


def _resolve_threat(policy: Policy, props: dict[str, str]) -> ThreatModel:
    """The fp32 file's own threat model if it has one, else the policy's env profile's."""
    if "eps" in props:
        return ThreatModel(
            float(props["eps"]), props.get("norm", "inf"), props.get("eps_space", "normalized")
        )
    from compressor.core.config import profile_for_env

    prof = profile_for_env(policy.spec.env_id) if policy.spec.env_id else None
    if prof is not None:
        return ThreatModel(prof.threat.eps, prof.threat.norm, prof.threat.space)
    return ThreatModel(0.05)


def quantize_model(
    policy: Policy,
    fp32_onnx_path: str | Path,
    out_path: str | Path,
    mode: str = "dynamic",
    calibration_obs: np.ndarray | None = None,
    *,
    threat: ThreatModel | None = None,
    tau: float = DEFAULT_TAU,
    per_channel: bool = True,
    reduce_range: bool = False,
    quantize_first_layer: bool = False,
) -> QuantizeResult:
    """Quantise an exported fp32 model, check it against torch and certify it on its own weights.

    The file is built in memory, checked, certified and only then written atomically; its
    metadata gets ``quantization`` (the settings) and ``certificate`` (the quantised model's),
    and an fp32 ``certificate`` already there is kept as ``fp32_certificate``.

    :param policy: the torch policy the fp32 file was exported from.
    :param fp32_onnx_path: that fp32 file.
    :param out_path: destination ``.onnx``.
    :param mode: ``dynamic`` (or ``int8``), ``qdq``, ``fp16`` or ``int8w``.
    :param calibration_obs: raw observations (N, obs_dim) to calibrate ``qdq`` scales on; use
        states the policy visits. Default: 512 Gaussian draws from the normalisation statistics
        (their first two moments match the visited states, their tails do not).
    :param threat: ε, norm and space (default: the fp32 file's metadata, else the env profile).
    :param tau: TV threshold of the certified radius.
    :param per_channel: one weight scale per output neuron (dynamic, qdq; int8w always is).
    :param reduce_range: 7-bit weights, for x86 CPUs without VNNI (see the module docstring).
    :param quantize_first_layer: also round the observation itself (dynamic, qdq).
    :raises CompressorError: unknown mode, unreadable file, or a graph that cannot be certified.
    """
    mode = ALIASES.get(mode, mode)
    if mode not in MODES:
        raise CompressorError(
            f"unknown quantisation mode {mode!r}; expected int8 (dynamic), qdq, fp16 or int8w"
        )
    src = Path(fp32_onnx_path)
    if not src.is_file():
        raise CompressorError(f"{src}: file not found")
    data = src.read_bytes()
    try:
        fp32 = onnx.load_from_string(data)
    except Exception as exc:  # protobuf DecodeError and friends
        raise CompressorError(f"{src}: not a readable ONNX model ({type(exc).__name__})") from None
    props = {p.key: p.value for p in fp32.metadata_props}
    if "quantization" in props:
        raise CompressorError(f"{src} is already quantised; start from the fp32 export")
    try:  # the normalisation and log_std come from ``policy``: it must be the file's source
        parity_error(policy, data)
    except CompressorError as exc:
        raise CompressorError(f"{src} was not exported from this policy ({exc})") from None
    gemms = [n.name for n in fp32.graph.node if n.op_type == "Gemm"]
    skip = [] if quantize_first_layer or len(gemms) < 2 else gemms[:1]
    settings: dict[str, Any] = {"mode": mode, "fp32_sha256": hashlib.sha256(data).hexdigest()}
    if mode in ("dynamic", "qdq"):
        settings.update(per_channel=per_channel, reduce_range=reduce_range, fp32_layers=skip)

    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )

    with tempfile.TemporaryDirectory(prefix="compress-quant-") as tmp, _quiet_quantizer():
        out_tmp = Path(tmp) / "q.onnx"
        if mode == "fp16":
            model = _to_fp16(fp32)
        elif mode == "int8w":
            model = _to_int8_weights(fp32)
        elif mode == "dynamic":
            prepared = Path(tmp) / "matmul.onnx"
            # every Gemm becomes MatMul + Add here (onnxruntime would otherwise rewrite them
            # itself, under names we could not exclude); skipped layers stay fp32 MatMuls
            onnx.save(_gemm_to_matmul(fp32), str(prepared))
            quantize_dynamic(
                prepared,
                out_tmp,
                op_types_to_quantize=["MatMul"],
                nodes_to_exclude=[_matmul_name(fp32, name) for name in skip],
                per_channel=per_channel,
                reduce_range=reduce_range,
                weight_type=QuantType.QInt8,
            )
            model = onnx.load(str(out_tmp))
        else:
            if calibration_obs is None:
                calibration_obs = parity_observations(policy, 512, 1.0, seed=0)
            obs = np.asarray(calibration_obs, dtype=np.float32)
            if obs.ndim != 2 or obs.shape[1] != policy.spec.obs_dim or len(obs) == 0:
                raise CompressorError(
                    f"calibration observations must have shape (N, {policy.spec.obs_dim})"
                )
            name = fp32.graph.input[0].name
            batches = iter([{name: obs[i : i + 64]} for i in range(0, len(obs), 64)])

            class Reader(CalibrationDataReader):  # type: ignore[misc]
                def get_next(self) -> dict[str, np.ndarray] | None:
                    return next(batches, None)

            quantize_static(
                src,
                out_tmp,
                Reader(),
                quant_format=QuantFormat.QDQ,
                op_types_to_quantize=["Gemm"],
                per_channel=per_channel,
                reduce_range=reduce_range,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                nodes_to_exclude=skip,
                # The action mean (last Gemm's output) would otherwise be rounded to a step
                # of its calibrated range / 255: fp32 outputs keep the action precise.
                extra_options={"OpTypesToExcludeOutputQuantization": ["Gemm"]},
            )
            model = onnx.load(str(out_tmp))
            settings["calibration_observations"] = len(obs)

    graph = read_quantized(model)
    deq = dequantized_policy(policy, graph)
    threat = threat or _resolve_threat(policy, props)
    cert = certify_quantized(deq, graph, threat, tau, fp32_policy=policy)

    del model.metadata_props[:]
    for key, value in props.items():
        model.metadata_props.add(
            key="fp32_certificate" if key == "certificate" else key, value=value
        )
    model.metadata_props.add(key="quantization", value=json.dumps(settings, sort_keys=True))
    model.metadata_props.add(key="certificate", value=_strict_json(cert))
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        raise CompressorError(f"quantised model is invalid: {str(exc).splitlines()[0]}") from None
    blob = model.SerializeToString()

    # Parity at batch 1 (the deployment call): against fp32 torch, the dequantised policy and
    # the rounding simulation the certificate rests on.
    session = load_onnx_session(blob, threads=1)
    obs = parity_observations(policy, PARITY_N, 1.0, seed=7)
    with torch.no_grad():
        t_obs = torch.as_tensor(obs)
        ref = policy.act(t_obs).numpy()
        ref_deq = deq.act(t_obs).numpy()
        z = deq.normalize(t_obs).double().numpy()
    sim = np.concatenate(
        [
            policy.postprocess(
                torch.as_tensor(simulate_trunk(graph, z[i : i + 1], policy.spec.activation)).float()
            ).numpy()
            for i in range(len(z))
        ]
    )
    got = np.stack([onnx_act(session, obs[i : i + 1])[0] for i in range(len(obs))])
    if policy.spec.head == "categorical":
        rows = [(got != r).astype(np.float64) for r in (ref, ref_deq, sim)]
    else:
        rows = [np.abs(got.astype(np.float64) - r).max(axis=1) for r in (ref, ref_deq, sim)]
    errs = [float(r.mean() if policy.spec.head == "categorical" else r.max()) for r in rows]
    if float(np.median(rows[2])) > SIMULATION_TOL:
        # most rows must match the rounding model exactly; if not, the kernels compute
        # something else (e.g. saturating int16 sums) and the certificate would not hold
        raise CompressorError(
            f"onnxruntime's {mode} model departs from the rounding model the certificate "
            f"assumes (median |Δ| {np.median(rows[2]):.2g}); on x86 without VNNI retry with "
            "reduce_range=True; nothing was written"
        )
    atomic.write_bytes(out_path, blob)
    return QuantizeResult(
        path=Path(out_path),
        mode=mode,
        file_bytes=len(blob),
        fp32_file_bytes=len(data),
        parity_max_abs_err=errs[0],
        dequantized_max_abs_err=errs[1],
        simulation_max_abs_err=errs[2],
        simulation_median_abs_err=float(np.median(rows[2])),
        dequantized=deq,
        certificate=cert,
        settings=settings,
    )
