"""The certificate of a quantised graph, computed from the file's own weights and rounding.

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
intermediates, so use ``reduce_range=True`` there.
:attr:`~compressor.deploy.quantize.build.QuantizeResult.simulation_max_abs_err` checks this
model of the arithmetic against what onnxruntime actually returns.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from compressor.certify.global_bound import (
    DEFAULT_TAU,
    GAUSSIAN_HEADS,
    abs_product,
    certified_head,
    certify_global,
    input_scale,
    output_scale,
    shift_for_tv,
    tv_from_shift,
)
from compressor.core.threat import ThreatModel
from compressor.deploy.quantize.graph import QuantGraph
from compressor.deploy.quantize.simulate import rounding_slack
from compressor.policy.model import DISCRETE_HEADS, Policy

__all__ = ["certify_quantized"]


def certify_quantized(
    policy: Policy,
    graph: QuantGraph,
    threat: ThreatModel,
    tau: float = DEFAULT_TAU,
    fp32_policy: Policy | None = None,
) -> dict[str, Any]:
    """Certificate of the quantised graph: Lipschitz part on its dequantised weights, plus the
    additive part from its activation rounding (see the module docstring).

    :param policy: the dequantised policy
        (:func:`~compressor.deploy.quantize.simulate.dequantized_policy`).
    :param graph: the graph it was read from.
    :param threat: ε, norm and space.
    :param tau: TV threshold of the certified radius.
    :param fp32_policy: the fp32 policy, whose certificate is added for comparison only.
    :returns: a JSON-ready dict; ``total`` is the quantised model's certificate.
    """
    weights = certify_global(policy, threat, tau)
    c, details = rounding_slack(graph, policy)
    additive = _additive_shift(policy, c)
    shift = weights.lipschitz * threat.eps + additive
    formulas = certified_head(policy)
    tv = tv_from_shift(formulas, shift)
    radius = _radius(shift_for_tv(formulas, tau), additive, weights.lipschitz)
    out: dict[str, Any] = {
        "covers": "the quantised graph as written: dequantised weights and activation rounding",
        "head": policy.spec.head,
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
    out["deployed_action"] = deployed_action_bound(policy, threat, c)
    if fp32_policy is not None:
        out["fp32_for_comparison"] = certify_global(fp32_policy, threat, tau).to_dict()
    return out


def deployed_action_bound(policy: Policy, threat: ThreatModel, c: np.ndarray) -> dict[str, Any]:
    """The quantised graph's deployed action: a bound on ``max |a(ŝ) − a(s)|`` per dimension,
    worst case over all states (continuous heads).

    Per output, ``|Δout_i| ≤ ε·‖(Q N)_i‖_* + c_i`` (``Q`` the dequantised weights'
    absolute product, ``c`` the rounding bound; this pairwise form holds with saturating static
    scales too, where a per-state interval around the fp32 output would not). The deployment map
    has slope ≤ 1 (clip) or ≤ (high − low)/2 (tanh-rescale), and no action moves more than its
    range. Argmax heads: None (see ``additive`` for the logit gap).
    """
    if policy.spec.head in DISCRETE_HEADS:
        return {"per_dim": None, "scope": "worst case over all states"}
    q = abs_product(policy) * input_scale(policy, threat)[None, :]
    dual = q.sum(-1) if threat.norm == "inf" else torch.linalg.vector_norm(q, dim=-1)
    per_out = threat.eps * dual.numpy() + c
    span = (policy.action_high - policy.action_low).to(torch.float64).numpy()
    slope = span / 2.0 if policy.action_map == "tanh_rescale" else np.ones_like(span)
    with np.errstate(invalid="ignore"):
        dev = np.minimum(np.where(np.isfinite(per_out), slope * per_out, math.inf), span)
    return {
        "scope": "worst case over all states",
        "per_dim": [float(x) for x in dev],
        "frac_range": [float(x) for x in dev / span] if np.all(np.isfinite(span)) else None,
    }


def _additive_shift(policy: Policy, c: np.ndarray) -> float:
    """The head's shift measure of the per-output rounding bound ``c``."""
    head = certified_head(policy)
    if head in GAUSSIAN_HEADS:
        d = output_scale(policy).numpy()
        return float(np.linalg.norm(d * c))
    if head == "categorical":  # a logit gap moves by at most c_i + c_j
        big = c[:, None] + c[None, :]
        np.fill_diagonal(big, 0.0)
        return float(big.max()) if len(c) > 1 else 0.0
    return float(np.linalg.norm(c))


def _radius(star: float | None, additive: float, lipschitz: float) -> float | None:
    """Largest ε with ``lipschitz·ε + additive ≤ star`` (None: the head has no such shift)."""
    if star is None:
        return None
    if additive >= star:
        return 0.0  # rounding alone may already move the action that far
    if lipschitz == 0.0 or math.isinf(star):
        return math.inf
    return (star - additive) / lipschitz
