"""Reading a policy graph back: its affine layers (dequantised) and its activation rounding.

Understands the forms this package writes: fp32 ``Gemm`` (dense or with export's bitmask
weight storage); ``Gemm`` fed by ``Cast`` (fp16) or ``DequantizeLinear`` (QDQ); ``MatMul`` +
``Add``; and onnxruntime's dynamic ``MatMulInteger`` → ``Cast`` → ``Mul`` → ``Add`` chain.
Anything else that rounds is refused, so an unexpected graph can never be certified as if it
were exact.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from compressor.core.errors import CompressorError
from compressor.deploy.export import decode_sparse_weight

__all__ = ["Layer", "QuantGraph", "RoundingPoint", "node_attr", "read_quantized"]

_QRANGE = {TensorProto.UINT8: (0, 255), TensorProto.INT8: (-128, 127)}
# Every operator the graphs read here may contain; anything else is refused, not guessed at.
_KNOWN_OPS = {
    "Sub", "Div", "Clip", "Gemm", "MatMul", "Add", "Mul", "Cast", "Tanh", "Relu", "Elu",
    "ArgMax", "Min", "Max", "Identity", "DequantizeLinear", "QuantizeLinear",
    "DynamicQuantizeLinear", "MatMulInteger",
}  # fmt: skip
# what export.py's bitmask storage decodes weights with (constant subgraphs only)
_DECODE_OPS = {"Unsqueeze", "BitShift", "Mod", "Reshape", "Slice", "Cast", "CumSum", "Mul", "Sub"}
_DECODE_OPS.add("Gather")


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


def node_attr(node: onnx.NodeProto, name: str, default: Any) -> Any:
    """The value of ``node``'s attribute ``name``, or ``default`` when it has none.

    :param node: an ONNX node. :param name: the attribute. :param default: its ONNX default.
    """
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


class _Index:
    """Look-ups over one graph: its constants, who produces and who consumes each tensor."""

    def __init__(self, graph: onnx.GraphProto) -> None:
        self.graph = graph
        self.inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
        self.producer = {o: n for n in graph.node for o in n.output}
        self.consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        for n in graph.node:
            for i in n.input:
                self.consumers[i].append(n)

    def const(self, name: str) -> np.ndarray | None:
        """The value of a constant tensor (initializer, or Cast / DequantizeLinear of one)."""
        if name in self.inits:
            return self.inits[name]
        n = self.producer.get(name)
        if n is None:
            return None
        sparse = [f"{name}_{part}" for part in ("mask", "values", "shape")]
        if n.op_type == "Reshape" and all(p in self.inits for p in sparse):  # bitmask storage
            return decode_sparse_weight(*(self.inits[p] for p in sparse)).astype(np.float64)
        if n.op_type == "Cast":
            x = self.const(n.input[0])
            return None if x is None else x.astype(np.float64)
        if n.op_type == "Mul":
            a, b = self.const(n.input[0]), self.const(n.input[1])
            return None if a is None or b is None else a.astype(np.float64) * b
        if n.op_type == "DequantizeLinear":
            return self._dequantize_linear(n)
        return None

    def _dequantize_linear(self, n: onnx.NodeProto) -> np.ndarray | None:
        x, s = self.const(n.input[0]), self.const(n.input[1])
        zp = self.const(n.input[2]) if len(n.input) > 2 and n.input[2] else np.zeros(())
        if x is None or s is None or zp is None:
            return None
        shape = [1] * x.ndim
        if s.ndim == 1 and x.ndim > 0:  # per-axis: broadcast along ``axis``
            shape[int(node_attr(n, "axis", 1)) % x.ndim] = -1
            s, zp = s.reshape(shape), zp.reshape(shape)
        return (x.astype(np.float64) - zp.astype(np.float64)) * s.astype(np.float64)

    def storage(self, name: str) -> str:
        """How the weight tensor ``name`` is stored: fp32, fp32-bitmask, fp16 or int8."""
        n = self.producer.get(name)
        if n is None:
            return {"float16": "fp16", "int8": "int8", "uint8": "int8"}.get(
                str(self.inits[name].dtype), "fp32"
            )
        if n.op_type == "Reshape" and f"{name}_mask" in self.inits:
            return "fp32-bitmask"
        return "int8" if n.op_type == "DequantizeLinear" else self.storage(n.input[0])

    def only_consumer(self, name: str, op: str) -> onnx.NodeProto:
        """The one ``op`` node reading ``name`` (anything else: an unreadable graph)."""
        found = [c for c in self.consumers.get(name, []) if c.op_type == op]
        if len(found) != 1:
            raise CompressorError(f"cannot read the graph: {name!r} does not feed one {op} node")
        return found[0]

    def bias_after(self, name: str) -> tuple[np.ndarray, str]:
        """The constant bias added to ``name`` by its ``Add``, and that sum's tensor."""
        add = self.only_consumer(name, "Add")
        other = [i for i in add.input if i != name]
        b = self.const(other[0]) if len(other) == 1 else None
        if b is None:
            raise CompressorError(f"cannot read the graph: no constant bias after {name!r}")
        return b.astype(np.float64), add.output[0]


def read_quantized(model: onnx.ModelProto | str | Path) -> QuantGraph:
    """Read the layers (dequantised) and rounding points of an exported or quantised graph.

    Understands the forms listed in this module's docstring; anything else that rounds is
    refused, so an unexpected graph can never be certified as if it were exact.

    :param model: the model or its file.
    :raises CompressorError: on a graph it cannot read faithfully.
    """
    m = model if isinstance(model, onnx.ModelProto) else onnx.load(str(model))
    ix = _Index(m.graph)
    _refuse_unknown_operators(ix)
    layers = _read_layers(ix)
    return QuantGraph(layers, _read_rounding(ix, layers))


def _refuse_unknown_operators(ix: _Index) -> None:
    """Raise on an operator outside :data:`_KNOWN_OPS` (e.g. a fused integer kernel whose
    rounding is not modelled here). Nodes computed from initialisers alone (the bitmask weight
    decoding of sparse storage) are exact integer and indexing ops, read through ``const``."""
    constant = set(ix.inits)
    for n in ix.graph.node:
        if n.op_type in _DECODE_OPS and all(i in constant for i in n.input if i):
            constant.update(n.output)
    live = [
        n for n in ix.graph.node if not (n.op_type in _DECODE_OPS and set(n.output) <= constant)
    ]
    unknown = sorted({n.op_type for n in live} - _KNOWN_OPS)
    if unknown:
        raise CompressorError(f"cannot read the graph: unexpected operators {unknown}")


def _read_layers(ix: _Index) -> list[Layer]:
    """The graph's affine layers, in node order, checked to form a chain."""
    layers: list[Layer] = []
    for n in ix.graph.node:
        if n.op_type == "Gemm":
            layers.append(_gemm_layer(ix, n))
        elif n.op_type == "MatMul" and ix.const(n.input[1]) is not None:
            w = ix.const(n.input[1])
            assert w is not None
            b, out = ix.bias_after(n.output[0])
            layers.append(Layer(w.T, b, n.name, n.input[0], out, ix.storage(n.input[1])))
        elif n.op_type == "MatMulInteger":
            layers.append(_integer_layer(ix, n))
    for k in range(1, len(layers)):
        if layers[k].weight.shape[1] != layers[k - 1].weight.shape[0]:
            raise CompressorError("cannot read the graph: its layers do not form a chain")
    if not layers:
        raise CompressorError("cannot read the graph: no Gemm / MatMul layers found")
    return layers


def _gemm_layer(ix: _Index, n: onnx.NodeProto) -> Layer:
    """``Gemm(x, W, b)`` with a constant (possibly dequantised) weight."""
    w = ix.const(n.input[1])
    if w is None or node_attr(n, "transA", 0) or node_attr(n, "alpha", 1.0) != 1.0:
        raise CompressorError(f"cannot read the graph: unexpected Gemm {n.name!r}")
    w = w if node_attr(n, "transB", 0) else w.T
    b = ix.const(n.input[2]) if len(n.input) > 2 and n.input[2] else None
    b = np.zeros(w.shape[0]) if b is None else b * float(node_attr(n, "beta", 1.0))
    b = b.astype(np.float64)
    return Layer(w, b, n.name, n.input[0], n.output[0], ix.storage(n.input[1]))


def _integer_layer(ix: _Index, n: onnx.NodeProto) -> Layer:
    """onnxruntime's dynamic chain ``MatMulInteger → Cast → Mul(x scale · w scale) → Add``."""
    wq = ix.const(n.input[1])
    wz = ix.const(n.input[3]) if len(n.input) > 3 else np.zeros(())
    if wq is None or wz is None:
        raise CompressorError(f"cannot read the graph: {n.name!r} has no constant weight")
    cast = ix.only_consumer(n.output[0], "Cast").output[0]
    mul = ix.only_consumer(cast, "Mul")
    scales = ix.producer.get(next((i for i in mul.input if i != cast), ""))
    ws = [ix.const(i) for i in scales.input] if scales is not None else []
    w_scale = [s for s in ws if s is not None]
    if scales is None or scales.op_type != "Mul" or len(w_scale) != 1:
        raise CompressorError(f"cannot read the graph: no weight scale for {n.name!r}")
    w = (wq.astype(np.float64) - wz.astype(np.float64)) * w_scale[0].astype(np.float64)
    b, out = ix.bias_after(mul.output[0])
    return Layer(w.T, b, n.name, n.input[0], out, "int8")


def _read_rounding(ix: _Index, layers: list[Layer]) -> list[RoundingPoint]:
    """The activation rounding points: dynamic (per call) and static (calibrated) ones."""
    by_node = {la.node: k for k, la in enumerate(layers)}
    points: list[RoundingPoint] = []
    for n in ix.graph.node:
        if n.op_type == "DynamicQuantizeLinear":
            user = ix.only_consumer(n.output[0], "MatMulInteger")
            points.append(RoundingPoint(n.input[0], by_node[user.name], "input", True))
        elif n.op_type == "QuantizeLinear" and ix.const(n.input[0]) is None:
            points.append(_static_point(ix, n, layers))
    return points


def _static_point(ix: _Index, n: onnx.NodeProto, layers: list[Layer]) -> RoundingPoint:
    """A ``QuantizeLinear → DequantizeLinear`` pair on an activation, with its fixed scale."""
    by_input = {la.input: k for k, la in enumerate(layers)}
    out_of = {la.output: k for k, la in enumerate(layers)}
    s, zp = ix.const(n.input[1]), ix.const(n.input[2]) if len(n.input) > 2 else None
    if s is None or zp is None or s.size != 1:
        raise CompressorError(f"cannot certify: unexpected activation rounding {n.name!r}")
    zp_type = next(t.data_type for t in ix.graph.initializer if t.name == n.input[2])
    qmin, qmax = _QRANGE.get(zp_type, (0, 0))
    deq = ix.only_consumer(n.output[0], "DequantizeLinear").output[0]
    if n.input[0] in out_of:
        k, where = out_of[n.input[0]], "pre_act"
    elif n.input[0] in by_input or deq in by_input:
        k, where = by_input.get(deq, by_input.get(n.input[0], -1)), "input"
    else:
        raise CompressorError(f"cannot certify: rounding of {n.input[0]!r} is off the MLP")
    if qmax == 0:
        raise CompressorError(f"cannot certify: unsupported quantised type at {n.name!r}")
    return RoundingPoint(n.input[0], k, where, False, float(s), int(zp), qmin, qmax)
