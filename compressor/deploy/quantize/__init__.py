"""Quantised ONNX models, re-evaluated through onnxruntime and re-certified on their own weights.

Four modes, all starting from an exported fp32 file (:func:`compressor.deploy.export.export_onnx`):

- ``dynamic`` (alias ``int8``): int8 weights, activations quantised to uint8 at run time from
  each call's own min/max (``onnxruntime.quantization.quantize_dynamic``). onnxruntime's dynamic
  quantiser only handles ``MatMul``, so each ``Gemm`` is first rewritten as ``MatMul`` + ``Add``;
- ``qdq``: int8 weights, int32 biases and activations quantised with fixed scales calibrated on
  observations (``quantize_static``, QDQ format);
- ``fp16``: weights and biases stored as float16 and cast back to float32 in the graph. The file
  halves; arithmetic stays float32 (onnxruntime's CPU provider has no fp16 ``Gemm``), so every
  provider runs it and its certificate is exact for it;
- ``int8w``: weight-only int8 (symmetric, one scale per output neuron), cast and scaled back
  to float32 in the graph (folded once at session start); arithmetic stays float32. A quarter
  of the weight bytes and no activation rounding, so, like ``fp16``, its certificate has no
  additive part.

The first layer stays fp32 by default: its input is the normalised, clipped observation (up to
±10 units), where one int8 step (≥ 0.04 units) is as large as the threat ε itself, while the
layer holds a few percent of the parameters.

The modules, in the order a file goes through them:

- :mod:`~compressor.deploy.quantize.rewrite`: graph rewrites (Gemm → MatMul, fp16, int8 weights);
- :mod:`~compressor.deploy.quantize.build`: :func:`quantize_model`, which quantises, certifies,
  checks and writes one file;
- :mod:`~compressor.deploy.quantize.graph`: reading a graph back (:func:`read_quantized`);
- :mod:`~compressor.deploy.quantize.simulate`: dequantisation and activation-rounding simulation;
- :mod:`~compressor.deploy.quantize.certificate`: the quantised certificate (why the fp32 one
  does not cover the file);
- :mod:`~compressor.deploy.quantize.workflow`: :func:`quantize_policy`, what ``compress
  quantize`` does (export, calibrate, quantise, re-evaluate through onnxruntime).
"""

from compressor.deploy.quantize.build import MODES, QuantizeResult, quantize_model
from compressor.deploy.quantize.graph import QuantGraph, read_quantized
from compressor.deploy.quantize.simulate import dequantized_policy
from compressor.deploy.quantize.workflow import QuantizeReport, quantize_policy, transfer_attacks

__all__ = [
    "MODES",
    "QuantGraph",
    "QuantizeReport",
    "QuantizeResult",
    "dequantized_policy",
    "quantize_model",
    "quantize_policy",
    "read_quantized",
    "transfer_attacks",
]
