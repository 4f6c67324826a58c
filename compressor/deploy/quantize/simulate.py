"""What a quantised graph computes, modelled in torch and numpy.

- :func:`dequantized_policy`: the torch policy with the file's own (dequantised) weights;
- :func:`simulate_trunk`: those weights with every activation rounding applied where the graph
  applies it, which :func:`~compressor.deploy.quantize.build.quantize_model` checks against
  what onnxruntime returns;
- :func:`rounding_slack`: how far the rounding can move each output beyond the weights'
  Lipschitz bound, the additive part of the quantised certificate
  (:mod:`compressor.deploy.quantize.certificate`).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from compressor.core.errors import CompressorError
from compressor.deploy.quantize.graph import QuantGraph
from compressor.policy.model import Policy

__all__ = ["dequantized_policy", "rounding_slack", "simulate_trunk"]

_NP_ACT: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "tanh": np.tanh,
    "relu": lambda x: np.maximum(x, 0.0),
    "elu": lambda x: np.where(x > 0, x, np.expm1(np.minimum(x, 0.0))),
}


def dequantized_policy(policy: Policy, graph: QuantGraph) -> Policy:
    """``policy`` with its layers replaced by the graph's dequantised weights and biases.

    Normalisation, log_std and action bounds are the policy's (the quantiser leaves them in
    fp32). A compacted graph (dead neurons removed) gets a spec with its own, narrower hidden
    widths: removed neurons carry no path from input to output, so the certificate is unchanged.

    :param policy: the torch policy the graph was exported from.
    :param graph: from :func:`~compressor.deploy.quantize.graph.read_quantized`.
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


def simulate_trunk(graph: QuantGraph, z: np.ndarray, activation: str) -> np.ndarray:
    """The head pre-activation the quantised graph computes, from the normalised input ``z``.

    Dequantised weights with every activation rounding applied where the graph applies it
    (dynamic points use the whole batch's range, as onnxruntime does).

    :param graph: from :func:`~compressor.deploy.quantize.graph.read_quantized`.
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


def rounding_slack(graph: QuantGraph, policy: Policy) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Per-output additive bound ``c`` from activation rounding, and what each point adds.

    :param graph: from :func:`~compressor.deploy.quantize.graph.read_quantized`.
    :param policy: the dequantised policy (its observation clip bounds the dynamic scales).
    """
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
