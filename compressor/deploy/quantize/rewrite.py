"""Graph rewrites on an exported fp32 model, each returning a new model (the input is kept).

- :func:`gemm_to_matmul`: every ``Gemm`` as ``MatMul`` + ``Add``, the form onnxruntime's dynamic
  quantiser takes;
- :func:`to_fp16`: weights and biases stored as float16, cast back to float32 in the graph;
- :func:`to_int8_weights`: weights stored as symmetric per-row int8, times their fp32 scale in
  the graph.
"""

from __future__ import annotations

import copy

import numpy as np
import onnx
from onnx import helper, numpy_helper

from compressor.core.errors import CompressorError
from compressor.deploy.quantize.graph import node_attr

__all__ = ["gemm_to_matmul", "matmul_name", "to_fp16", "to_int8_weights"]


def matmul_name(model: onnx.ModelProto, gemm: str) -> str:
    """Name :func:`gemm_to_matmul` gives the ``MatMul`` replacing the ``Gemm`` node ``gemm``.

    :param model: the model before the rewrite. :param gemm: the ``Gemm`` node's name.
    """
    node = next(n for n in model.graph.node if n.name == gemm)
    return f"{node.output[0]}_matmul"


def gemm_to_matmul(model: onnx.ModelProto) -> onnx.ModelProto:
    """Rewrite every ``Gemm`` as ``MatMul`` + ``Add`` (the form the dynamic quantiser takes).

    :param model: an fp32 export.
    """
    m = copy.deepcopy(model)
    inits = {t.name: t for t in m.graph.initializer}
    nodes: list[onnx.NodeProto] = []
    for n in m.graph.node:
        if n.op_type != "Gemm":
            nodes.append(n)
            continue
        w = numpy_helper.to_array(inits[n.input[1]])
        w_t = np.ascontiguousarray(w.T if node_attr(n, "transB", 0) else w)
        m.graph.initializer.remove(inits[n.input[1]])
        m.graph.initializer.append(numpy_helper.from_array(w_t, f"{n.input[1]}_T"))
        mm = f"{n.output[0]}_matmul"
        nodes.append(helper.make_node("MatMul", [n.input[0], f"{n.input[1]}_T"], [mm], name=mm))
        nodes.append(helper.make_node("Add", [mm, n.input[2]], [n.output[0]], name=n.name))
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    return m


def to_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """Store every Gemm weight and bias as float16, cast back to float32 inside the graph.

    :param model: an fp32 export.
    :raises CompressorError: a value beyond float16's range.
    """
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


def to_int8_weights(model: onnx.ModelProto) -> onnx.ModelProto:
    """Store every Gemm weight as symmetric per-row int8, times its fp32 scale in the graph.

    :param model: an fp32 export.
    """
    m = copy.deepcopy(model)
    inits = {t.name: t for t in m.graph.initializer}
    dqs: list[onnx.NodeProto] = []
    for n in m.graph.node:
        if n.op_type != "Gemm" or n.input[1] not in inits or not node_attr(n, "transB", 0):
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
