"""Local (per-state) certificates: IBP and CROWN bounds over the ε-ball around each state.

For each state ``s`` the network input ranges over ``Z(s) = {clip(z_u(s) + N δ) : ‖δ‖_p ≤ ε}``
(``N`` from :func:`~compressor.certify.global_bound.input_scale`). We over-approximate
``Z(s)`` by the clipped box ``[clip(z_u - εN), clip(z_u + εN)]`` and, for ℓ2, also by
``{z(s) + t : |t| ≤ N|δ|}`` (the clip is coordinate-wise 1-Lipschitz), and bound the head
output over it:

- IBP pushes intervals through every layer;
- CROWN bounds each neuron by two lines on its pre-activation interval and propagates linear
  bounds backwards to the input, where they are maximised in closed form (box: ``|a|·r``;
  ℓ2: ``ε‖a ⊙ N‖₂``). Intermediate bounds are CROWN bounds intersected with IBP's.

Besides the output intervals, a per-state absolute-product bound ``|Δout| ≤ Q_s |δ|`` (the global
bound with each activation's slope replaced by its largest slope on the neuron's interval; a
ReLU that is off everywhere in the ball contributes 0) is combined with them and with the global
bound. Every bound here is sound, so the minimum is too: the local certificate is never looser
than the global one. Bounds are computed in float64; the float32 policy differs by rounding only.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from compressor.certify.empirical import as_states
from compressor.certify.global_bound import (
    DEFAULT_TAU,
    GAUSSIAN_HEADS,
    abs_product,
    certified_head,
    input_scale,
    output_scale,
    pair_bounds,
    shift_per_unit_eps,
    tv_from_shift,
)
from compressor.core.errors import CompressorError
from compressor.core.threat import ThreatModel
from compressor.policy.model import DISCRETE_HEADS, Policy

METHODS = ("crown", "ibp")
Tensor = torch.Tensor
# below this interval width a neuron is bounded by constants: chord slopes lose precision there
_TINY = 1e-9
# cap on per-chunk elements of the largest (states × width × width) tensor CROWN builds
_CHUNK_ELEMENTS = 1 << 24


# ---- activations and their linear relaxations ------------------------------------------------
def _act(name: str, x: Tensor) -> Tensor:
    return {"tanh": torch.tanh, "relu": torch.relu, "elu": F.elu}[name](x)


def _dact(name: str, x: Tensor) -> Tensor:
    if name == "tanh":
        return 1.0 - torch.tanh(x) ** 2
    if name == "relu":
        return (x > 0).to(x.dtype)
    return torch.where(x > 0, torch.ones_like(x), torch.exp(x.clamp_max(0.0)))


def _max_slope(name: str, lo: Tensor, hi: Tensor) -> Tensor:
    """Largest derivative on ``[lo, hi]``: a per-neuron local Lipschitz constant."""
    if name == "tanh":
        return _dact(name, torch.clamp(torch.zeros_like(lo), lo, hi))  # tanh' peaks at 0
    return _dact(name, hi)  # ReLU and ELU have non-decreasing derivatives


def _tangent(name: str, d: Tensor) -> tuple[Tensor, Tensor]:
    a = _dact(name, d)
    return a, _act(name, d) - a * d


def _chord(name: str, lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
    a = (_act(name, hi) - _act(name, lo)) / (hi - lo).clamp_min(_TINY)
    return a, _act(name, lo) - a * lo


def _tanh_tangent(d: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """The tangent of tanh at ``d`` (``t = tanh d``): slope and intercept."""
    a = 1.0 - t * t
    return a, t - a * d


def _touching_point(lo: Tensor, hi: Tensor, t_lo: Tensor) -> Tensor:
    """The smallest ``d ∈ [0, hi]`` whose tangent passes above ``(lo, tanh lo)``, ``lo < 0``,
    from the right: 30 halvings leave hi·1e-9 of slack, and keeping the ``right`` end (line
    above ``(lo, tanh lo)``) keeps it sound.
    """
    left, right = torch.zeros_like(lo), hi
    for _ in range(30):
        mid = 0.5 * (left + right)
        a_mid, b_mid = _tanh_tangent(mid, torch.tanh(mid))
        above = a_mid * lo + b_mid - t_lo >= 0
        right, left = torch.where(above, mid, right), torch.where(above, left, mid)
    return right


def _touching_table() -> tuple[Tensor, Tensor]:
    """``d*(lo) / -lo`` on a grid of ``log(-lo)``: the touching point of :func:`_touching_tangent`
    depends on ``lo`` only (64 halvings per grid point, once per process)."""
    global _TOUCH
    if _TOUCH is None:
        s = torch.linspace(math.log(_TOUCH_LO), math.log(_TOUCH_HI), _TOUCH_N, dtype=torch.float64)
        lo = -torch.exp(s)
        left, right = torch.zeros_like(lo), -lo  # d* < -lo/2 < -lo
        t_lo = torch.tanh(lo)
        for _ in range(64):
            mid = 0.5 * (left + right)
            a_mid, b_mid = _tanh_tangent(mid, torch.tanh(mid))
            above = a_mid * lo + b_mid - t_lo >= 0
            right, left = torch.where(above, mid, right), torch.where(above, left, mid)
        _TOUCH = (s, right / -lo)
    return _TOUCH


_TOUCH: tuple[Tensor, Tensor] | None = None
_TOUCH_LO, _TOUCH_HI, _TOUCH_N = 1e-4, 40.0, 16384
# relative step above the interpolated touching point: 5x the linear interpolation's largest
# underestimate on this grid (3.7e-8, measured against 64 halvings on 100,003 points)
_TOUCH_SLACK = 2e-7


def _touching_tangent(
    lo: Tensor, hi: Tensor, t_lo: Tensor, floor: Tensor, where: Tensor
) -> tuple[Tensor, Tensor]:
    """The tangent of tanh at ``d = max(d*, floor)``, ``d*`` the touching point (the smallest
    ``d ∈ [0, hi]`` whose tangent passes above ``(lo, tanh lo)``), at the entries ``where``
    (elementwise over whole tensors: cheaper than gathering them).

    Any ``d ∈ [d*, hi]`` gives a sound line (the tangent at ``d``, evaluated at ``lo``, rises
    with ``d``). ``d*`` comes from a table (:func:`_touching_table`), nudged up and checked
    with the bisection's own test, so what passes is sound; the few that fail (``lo`` off the
    table, or so close to 0 that the test is rounding noise) take the bisection.
    """
    s, ratio = _touching_table()
    neg = (-lo).clamp_min(_TOUCH_LO)
    pos = (torch.log(neg).clamp(s[0], s[-1]) - s[0]) * ((len(s) - 1) / (s[-1] - s[0]))
    i = pos.floor().long().clamp_max(len(s) - 2)
    f = pos - i
    r = torch.lerp(ratio[i], ratio[i + 1], f)
    # the check of the final point: it passes iff that point is at or above d*
    d = torch.maximum(torch.minimum(neg * r * (1.0 + _TOUCH_SLACK), hi), floor)
    a, b = _tanh_tangent(d, torch.tanh(d))
    bad = where & ~(a * lo + b - t_lo >= 0)
    if bad.any():
        d_bad = torch.maximum(_touching_point(lo[bad], hi[bad], t_lo[bad]), floor[bad])
        a[bad], b[bad] = _tanh_tangent(d_bad, torch.tanh(d_bad))
    return a, b


def _relax_tanh(
    lo: Tensor, hi: Tensor, t_lo: Tensor, t_hi: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """:func:`_relax` for tanh.

    Upper line: tanh is convex below 0 and concave above. Concave interval: tangent at the
    midpoint. Convex interval: the chord. Mixed: the chord when it stays above the curve, else
    the tangent at ``d = max(d*, midpoint)``, ``d*`` the touching point of
    :func:`_touching_tangent`: the line through ``(lo, tanh lo)`` tangent at ``d* ≥ 0``, or
    any tangent at ``d ∈ [d*, hi]``, is sound (``g(x) - tanh(x)`` is concave on ``[lo, 0]``
    with ``g(lo) ≥ tanh(lo)`` and ``g(0) ≥ 0``, and ≥ 0 on the concave side), and the midpoint
    makes the line continuous in ``lo`` across 0. The chord dips below the curve exactly when
    the tangent at ``hi`` already passes above ``(lo, tanh lo)`` (the touching point is then
    inside ``[0, hi]``). Lower line: the same for ``[-hi, -lo]``, mirrored (tanh is odd). The
    two sides share the tanh evaluations.
    """
    mid = 0.5 * (lo + hi)
    a_m, b_m = _tanh_tangent(mid, torch.tanh(mid))
    width = hi - lo
    a_c = (t_hi - t_lo) / width.clamp_min(_TINY)
    b_c = t_lo - a_c * lo
    concave, convex = lo >= 0, hi <= 0
    au, bu = torch.where(concave, a_m, a_c), torch.where(concave, b_m, b_c)
    al, bl = torch.where(convex, a_m, a_c), torch.where(convex, b_m, b_c)
    idx = ((lo < 0) & (hi > 0)).reshape(-1).nonzero().squeeze(1)  # the mixed intervals
    if len(idx):
        lo_s, hi_s, tl_s, th_s, mid_s = (
            t.reshape(-1).index_select(0, idx) for t in (lo, hi, t_lo, t_hi, mid)
        )
        # upper: the tangent at hi passes above (lo, tanh lo); lower: its mirror image
        bent_u = th_s + (1.0 - th_s * th_s) * (lo_s - hi_s) - tl_s > 0
        bent_l = tl_s + (1.0 - tl_s * tl_s) * (hi_s - lo_s) - th_s < 0
        au, bu, al, bl = (t.contiguous() for t in (au, bu, al, bl))
        for bent, (a_out, b_out), sign, args in (
            (bent_u, (au, bu), 1.0, (lo_s, hi_s, tl_s, mid_s)),
            (bent_l, (al, bl), -1.0, (-hi_s, -lo_s, -th_s, -mid_s)),
        ):
            if bent.any():
                a_t, b_t = _touching_tangent(*args, bent)
                a_flat, b_flat = a_out.view(-1), b_out.view(-1)
                a_flat.index_copy_(0, idx, torch.where(bent, a_t, a_flat.index_select(0, idx)))
                b_new = torch.where(bent, sign * b_t, b_flat.index_select(0, idx))
                b_flat.index_copy_(0, idx, b_new)
    flat = width < _TINY
    if flat.any():
        zero = torch.zeros_like(lo)
        al, bl = torch.where(flat, zero, al), torch.where(flat, t_lo, bl)
        au, bu = torch.where(flat, zero, au), torch.where(flat, t_hi, bu)
    return al, bl, au, bu


def _relax(
    name: str,
    lo: Tensor,
    hi: Tensor,
    act_lo: Tensor | None = None,
    act_hi: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Lines ``al·x + bl ≤ σ(x) ≤ au·x + bu`` on ``[lo, hi]`` (elementwise); ``act_lo``,
    ``act_hi``: ``σ(lo)``, ``σ(hi)`` when the caller has them."""
    if name == "tanh":
        t_lo = torch.tanh(lo) if act_lo is None else act_lo
        return _relax_tanh(lo, hi, t_lo, torch.tanh(hi) if act_hi is None else act_hi)
    # ReLU and ELU are convex: chord above, tangent below (the midpoint tangent of ReLU is
    # CROWN's adaptive lower slope: 1 iff hi > -lo)
    au, bu = _chord(name, lo, hi)
    al, bl = _tangent(name, 0.5 * (lo + hi))
    flat = (hi - lo) < _TINY
    zero = torch.zeros_like(lo)
    return (
        torch.where(flat, zero, al),
        torch.where(flat, _act(name, lo), bl),
        torch.where(flat, zero, au),
        torch.where(flat, _act(name, hi), bu),
    )


# ---- the input set and closed-form maximisation over it ---------------------------------------
@dataclass
class _InputSet:
    lo: Tensor  # (B, n0) clipped box
    hi: Tensor
    center: Tensor  # (B, n0) clean network input
    radius: Tensor  # (n0,) N: input change per unit δ
    eps: float | Tensor  # the radius, or (B, 1) one per state
    norm: str


def _input_set(
    policy: Policy,
    x: Tensor,
    threat: ThreatModel,
    dtype: torch.dtype,
    eps: Tensor | None = None,
) -> _InputSet:
    """The input set of the ball around each row of ``x``; ``eps`` (B,) overrides
    ``threat.eps`` with one radius per state (the certified-radius bisection)."""
    x = x.to(dtype)
    r: float | Tensor = threat.eps if eps is None else eps.to(dtype)[:, None]
    zu = x
    if policy.spec.obs_norm:
        zu = (x - policy.obs_mean.to(dtype)) / policy.obs_scale().detach().to(dtype)
    n = input_scale(policy, threat).to(dtype)
    lo, hi, c = zu - r * n, zu + r * n, zu
    clip = policy.spec.obs_clip
    if clip is not None:
        lo, hi, c = lo.clamp(-clip, clip), hi.clamp(-clip, clip), c.clamp(-clip, clip)
    return _InputSet(lo, hi, c, n, r, threat.norm)


def _dot(lam: Tensor, v: Tensor) -> Tensor:
    """Row-wise ``lam · v``: lam (m, n) shared or (B, m, n) per state, v (B, n) -> (B, m)."""
    return v @ lam.T if lam.ndim == 2 else torch.einsum("bmn,bn->bm", lam, v)


def _concretize(lam: Tensor, const: Tensor, inp: _InputSet) -> tuple[Tensor, Tensor]:
    """Lower and upper bounds of ``lam·z + const`` over the input set."""
    mid, rad = 0.5 * (inp.lo + inp.hi), 0.5 * (inp.hi - inp.lo)
    centre, spread = _dot(lam, mid), _dot(lam.abs(), rad)
    lower, upper = centre - spread, centre + spread
    if inp.norm == "2":
        # the ℓ2 set {z + t : |t| ≤ N|δ|, ‖δ‖₂ ≤ ε} gives lam·z ± ε‖lam ⊙ N‖₂; both sets are
        # sound over-approximations, so keep the tighter side of each
        c = _dot(lam, inp.center)
        r = inp.eps * torch.linalg.vector_norm(lam * inp.radius, dim=-1)
        lower, upper = torch.maximum(lower, c - r), torch.minimum(upper, c + r)
    return lower + const, upper + const


# ---- CROWN backward pass ----------------------------------------------------------------------
def _step_pair(
    lam: Tensor,
    const: Tensor,
    relax: tuple[Tensor, Tensor, Tensor, Tensor],
    w: Tensor,
    b: Tensor,
) -> tuple[Tensor, Tensor]:
    """Move per-state linear bounds ``lam·a_j + const`` through ``a_j = σ(h_j)``,
    ``h_j = W a_{j-1} + b``: ``lam`` (B, 2K, n) holds K lower bounds, then K upper ones. For an
    upper bound positive coefficients take the upper line and negative ones the lower,
    ``pos·upper + neg·lower = lam·m + |lam|·d`` with ``m``, ``d`` the mid and half-gap lines;
    a lower bound flips the sign of ``d``."""
    al, bl, au, bu = relax
    a_m, a_d = 0.5 * (au + al), 0.5 * (au - al)
    c_m, c_d = 0.5 * (bu + bl) + a_m * b, 0.5 * (bu - bl) + a_d * b
    k = lam.shape[1] // 2
    mag = lam.abs()
    mag[:, :k].neg_()  # -|lam| for the lower rows, +|lam| for the upper
    # per-state dot products as a multiply and a sum: a batched GEMV (bmm) is slower here
    const = const + (lam * c_m[:, None, :]).add_(mag * c_d[:, None, :]).sum(-1)
    return (lam * a_m[:, None, :]).add_(mag.mul_(a_d[:, None, :])) @ w, const


def _first_step(
    coef: Tensor, bias: Tensor, relax: tuple[Tensor, Tensor, Tensor, Tensor], w: Tensor, b: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """:func:`_step_pair` for the shared (state-independent) starting coefficients, both sides.

    With ``m = (upper + lower)/2`` and ``d = (upper - lower)/2`` lines, ``pos·upper + neg·lower =
    coef·m + |coef|·d`` and the lower bound flips the sign of the second term: two products
    instead of four. Returns ``(lam_lower, const_lower, lam_upper, const_upper)``.
    """
    al, bl, au, bu = relax
    a_m, a_d = 0.5 * (au + al), 0.5 * (au - al)
    # intercept of each line after substituting h_j = W a + b
    c_m, c_d = 0.5 * (bu + bl) + a_m * b, 0.5 * (bu - bl) + a_d * b
    mag = coef.abs()
    c_mid, c_rad = c_m @ coef.T, c_d @ mag.T
    bsz, nj, nprev = a_m.shape[0], w.shape[0], w.shape[1]
    if coef.shape[0] > nprev:
        # many rows (identity spec of a wide layer): scale W's rows per state instead, so the
        # tensors stay (B, n_j, n_{j-1}) and each product is one big GEMM

        def apply(c: Tensor, slope: Tensor) -> Tensor:
            x = (slope[:, :, None] * w).permute(1, 0, 2).reshape(nj, bsz * nprev)
            return (c @ x).reshape(-1, bsz, nprev).permute(1, 0, 2)

        lam_mid, lam_rad = apply(coef, a_m), apply(mag, a_d)
    else:
        lam_mid, lam_rad = (coef * a_m[:, None, :]) @ w, (mag * a_d[:, None, :]) @ w
    lower = (lam_mid - lam_rad, bias + c_mid - c_rad)
    upper = (lam_mid + lam_rad, bias + c_mid + c_rad)
    return lower[0], lower[1], upper[0], upper[1]


def _first_step32(
    coef: Tensor,
    bias: Tensor,
    relax: tuple[Tensor, Tensor, Tensor, Tensor],
    w: Tensor,
    b: Tensor,
    ibp: tuple[Tensor, Tensor, Tensor],
) -> tuple[Tensor, Tensor]:
    """:func:`_first_step` (few rows) with the product ``(coef·diag(slope)) @ w`` in float32,
    for a layer whose input ``a`` is a hidden activation; ``ibp``: ``(a_c, w @ a_c, |w| @ a_r)``
    for the centre ``a_c`` and half-width ``a_r`` of its bounds (IBP's own products).

    Returns the K lower bounds' and then the K upper bounds' coefficients (B, 2K, n) and
    constants (B, 2K). The computed coefficients ``λ̃`` are bounded downstream as they are;
    the true function differs by ``(λ - λ̃)·a = (λ - λ̃)·a_c + (λ - λ̃)·(a - a_c)``: the first
    term is computed (``λ·a_c`` exactly as ``coef @ (slope * (w @ a_c))`` in float64) and the
    second is at most ``γ·|coef| @ (|slope| * (|w| @ a_r))`` (γ as in :func:`_input_crown32`);
    both go into the constants.
    """
    al, bl, au, bu = relax
    a_m, a_d = 0.5 * (au + al), 0.5 * (au - al)
    mag = coef.abs()
    c_m, c_d = 0.5 * (bu + bl) + a_m * b, 0.5 * (bu - bl) + a_d * b
    # the lower rows' and the upper rows' coefficients on a, (B, 2K, n_j), in one product
    f32 = torch.float32
    mid = coef.to(f32) * a_m.to(f32)[:, None, :]
    gap = mag.to(f32) * a_d.to(f32)[:, None, :]
    lam = (torch.cat([mid - gap, mid.add_(gap)], dim=1) @ w.to(f32)).to(torch.float64)
    a_c, h, spread = ibp
    # exact λ·a_c (+ intercepts) for the mid line; the half-gap line's plus the margin (both
    # multiply |coef|, and both widen the bound)
    mid_line = (c_m + a_m * h) @ coef.T + bias
    margin = _gamma(w.shape[0] + 5) * (a_m.abs() + a_d.abs()) * spread
    gap_line = (c_d + a_d * h + margin) @ mag.T + _UNDERFLOW
    # constants such that λ̃·a + const bounds the true function for every a in its bounds
    const = torch.cat([mid_line - gap_line, mid_line + gap_line], dim=1)
    return lam, const - (lam * a_c[:, None, :]).sum(-1)


# ---- the float32 back-substitution onto the input, with its rounding-error margin ----------------
_U32 = 2.0**-24  # float32's unit roundoff
# absolute slack for underflow: γ_n bounds relative errors only while no product or partial sum
# falls below float32's normal range (each subnormal or flushed result adds at most 2^-126); the
# float32 products here are of weights and slopes of size ~1, so 1e-30 covers any count of those
_UNDERFLOW = 1e-30


def _gamma(n: int) -> float:
    """``γ_n = n·u / (1 - n·u)``: a float32 dot product of length ``n`` (any summation order,
    with or without FMA) is within ``γ_n·(|a|·|b|)`` of the exact one."""
    return n * _U32 / (1.0 - n * _U32)


def _up32(x: Tensor) -> Tensor:
    """``x`` in float32, rounded up (never below ``x``; ``x ≥ 0``)."""
    y = x.to(torch.float32)
    return torch.nextafter(y, torch.full_like(y, math.inf))


def _input_crown32(
    coef: Tensor,
    bias: Tensor,
    relax: tuple[Tensor, Tensor, Tensor, Tensor],
    w: Tensor,
    b: Tensor,
    inp: _InputSet,
) -> tuple[Tensor, Tensor]:
    """Bounds of ``coef·σ(h) + bias``, ``h = w z + b`` the first layer, over the input set: what
    ``_crown(coef, bias, 0, ...)`` computes, with the one big product in float32.

    That product is the per-state coefficient matrix on ``z``, ``L = coef·diag(slope)·w``
    (``(n_out, n_in)`` per state). Everything else is float64: the constants, and the centre
    term ``L·z_c`` as the matrix-vector chain ``coef @ (slope * (w @ z_c))``. Only the spread
    ``|L|·r`` (box) or ``ε‖L ⊙ N‖₂`` (ℓ2) reads the float32 ``L̃``, and is widened by what
    rounding can hide: ``|L - L̃| ≤ γ·|coef|·diag(|slope|)·|w|`` elementwise (γ for the
    ``n_h + 5`` roundings per term: the inputs to float32, the slope product, the dot product,
    the sum of the two sides), so ``|L|·r ≤ |L̃|·r + γ·|coef| @ (|slope| * (|w| @ r))``, a
    matrix-vector product; the float32 sum of non-negative terms itself is widened by
    ``1 + 2γ_{n_in+2}`` and ``r`` is rounded up. For the box (not ℓ2), ``r`` is one column for
    the chunk folded into ``w``'s float32 columns (one rounding more, ``γ_{n_h+6}``) unless a
    clip made some state's box narrower.
    """
    al, bl, au, bu = relax
    a_m, a_d = 0.5 * (au + al), 0.5 * (au - al)  # (B, n_h): slopes of the mid and half-gap lines
    mag = coef.abs()
    nb, (n_out, n_h), n_in = len(a_m), coef.shape, w.shape[1]
    rad = 0.5 * (inp.hi - inp.lo)
    # the box's radius: one column for the chunk (each coordinate's largest, rounded up; ≥ every
    # state's, so sound for all and tight unless the clip shrinks some state's box), folded into
    # w's columns so the spread is an ℓ1 norm of L̃ with no pass of its own; ℓ2 needs L itself
    r_col = _up32(rad.amax(0))
    fold = inp.norm != "2" and bool((rad >= r_col.to(rad.dtype) * (1.0 - 1e-6)).all())
    w32 = w.to(torch.float32) * r_col if fold else w.to(torch.float32)
    # (n_h, n_in, B) layout: one GEMM per side over all states, states innermost (contiguous)
    x_m = w32[:, :, None] * a_m.T.to(torch.float32).contiguous()[:, None, :]
    x_d = w32[:, :, None] * a_d.T.to(torch.float32).contiguous()[:, None, :]
    lam_m = (coef.to(torch.float32) @ x_m.view(n_h, -1)).view(n_out, n_in, nb)
    lam_d = (mag.to(torch.float32) @ x_d.view(n_h, -1)).view(n_out, n_in, nb)
    lam_l = torch.sub(lam_m, lam_d, out=x_m.view(n_out, n_in, nb) if n_out == n_h else None)
    lam_u = lam_m.add_(lam_d)
    slope_abs = a_m.abs() + a_d.abs()
    w_abs = w.abs()
    # roundings per term: coef, slope and w to float32, (the radius product,) the slope product,
    # the dot product, the sum of the two sides
    n_round = n_h + 5 + int(fold)

    def side(centre: Tensor, r: Tensor, scale: float | Tensor) -> tuple[Tensor, Tensor]:
        # the constants plus L·centre (float64; intercepts after substituting h = w z + b), and
        # the margin for r (B, n_in) or (n_in,), r ≥ 0
        h = centre @ w.T + b  # (B, n_h): h at the centre
        mid_line = (0.5 * (bu + bl) + a_m * h) @ coef.T + bias
        margin = _gamma(n_round) * slope_abs * (r @ w_abs.T) * scale
        # the half-gap line and the margin both multiply |coef| and both widen: one product
        gap_line = (0.5 * (bu - bl) + a_d * h + margin) @ mag.T
        return mid_line - gap_line, mid_line + gap_line

    def spread(lam: Tensor, r32: Tensor | None) -> Tensor:
        # Σ_j |L̃_ij| r_j over (n_out, n_in, B), r32 (1, n_in, B) ≥ r rounded up (or folded into
        # L̃ already); widened for the float32 sum of non-negative terms
        out = (lam.abs_() if r32 is None else lam.abs_() * r32).sum(1)
        return out.T.to(torch.float64) * (1.0 + 2.0 * _gamma(n_in + 2))

    if fold:
        low, high = side(0.5 * (inp.lo + inp.hi), r_col.to(torch.float64), 1.0)
        lower = low - spread(lam_l, None) - _UNDERFLOW
        upper = high + spread(lam_u, None) + _UNDERFLOW
        return lower, upper
    low, high = side(0.5 * (inp.lo + inp.hi), rad, 1.0)
    rad32 = _up32(rad).T.contiguous()[None]
    lower = low - spread(lam_l, rad32) - _UNDERFLOW
    upper = high + spread(lam_u, rad32) + _UNDERFLOW
    if inp.norm == "2":
        # ±ε‖L ⊙ N‖₂ around the clean input: ‖L ⊙ N‖ ≤ ‖L̃ ⊙ N‖ + ‖(L - L̃) ⊙ N‖₁
        low, high = side(inp.center, inp.radius, inp.eps)
        n32 = _up32(inp.radius)[None, :, None]
        grow = 1.0 + 2.0 * _gamma(n_in + 4)
        norm_l = torch.linalg.vector_norm(lam_l * n32, dim=1).T.to(torch.float64) * grow
        norm_u = torch.linalg.vector_norm(lam_u * n32, dim=1).T.to(torch.float64) * grow
        lower = torch.maximum(lower, low - inp.eps * norm_l - _UNDERFLOW)
        upper = torch.minimum(upper, high + inp.eps * norm_u + _UNDERFLOW)
    return lower, upper


def _crown(
    coef: Tensor,
    bias: Tensor,
    top: int,
    weights: list[Tensor],
    biases: list[Tensor],
    relax: list[tuple[Tensor, Tensor, Tensor, Tensor]],
    inp: _InputSet,
    ibp: list[tuple[Tensor, Tensor, Tensor]] | None = None,
) -> tuple[Tensor, Tensor]:
    """Bounds of ``coef·a_top + bias`` over the input set (``top = -1``: ``coef`` acts on z).

    ``ibp`` (the fast path): per layer ``j ≥ 1``, IBP's ``(a_c, W_j a_c, |W_j| a_r)`` of its
    input's bounds (entry 0 unused); the first step's product
    is then computed in float32 and widened by its rounding-error bound
    (:func:`_input_crown32` onto the input, :func:`_first_step32` onto a hidden layer)."""
    if top < 0:
        return _concretize(coef, bias, inp)
    if ibp is not None and top == 0 and coef.shape[0] > weights[0].shape[1]:
        return _input_crown32(coef, bias, relax[0], weights[0], biases[0], inp)
    if ibp is not None and top > 0 and coef.shape[0] <= weights[top].shape[1]:
        step = _first_step32(coef, bias, relax[top], weights[top], biases[top], ibp[top])
    else:
        lam_l, c_l, lam_u, c_u = _first_step(coef, bias, relax[top], weights[top], biases[top])
        step = torch.cat([lam_l, lam_u], dim=1), torch.cat([c_l, c_u], dim=1)
    lam, const = step
    for j in range(top - 1, -1, -1):
        lam, const = _step_pair(lam, const, relax[j], weights[j], biases[j])
    k = lam.shape[1] // 2
    lower, _ = _concretize(lam[:, :k], const[:, :k], inp)
    _, upper = _concretize(lam[:, k:], const[:, k:], inp)
    return lower, upper


# ---- per-chunk bounds ---------------------------------------------------------------------------
@dataclass
class _ChunkBounds:
    out_lo: Tensor  # (B, K) head output bounds over the ball
    out_hi: Tensor
    pair_hi: Tensor | None  # (B, K, K) bounds on z_i - z_j (categorical) over the ball
    q_local: Tensor  # (B, K, n0) per-state absolute-product matrix (includes N)


def _bound_chunk(
    policy: Policy,
    weights: list[Tensor],
    biases: list[Tensor],
    inp: _InputSet,
    method: str,
    intersect: bool,
    fast: bool = True,
    need_q: bool = True,
) -> _ChunkBounds:
    """Output (and pairwise) bounds of one chunk; ``fast``: see :func:`_crown`; ``need_q``:
    also the per-state absolute-product matrix (else ``q_local`` is empty)."""
    name = policy.spec.activation
    n_layers = len(weights)
    relax: list[tuple[Tensor, Tensor, Tensor, Tensor]] = []
    slopes: list[Tensor] = []
    lo, hi = _crown(weights[0], biases[0], -1, weights, biases, relax, inp)
    # per layer j ≥ 1: IBP's (a_c, W_j a_c, |W_j| a_r) of its input's bounds (entry 0 unused)
    ibp: list[tuple[Tensor, Tensor, Tensor]] = [(lo, lo, lo)]
    fast_ibp = ibp if fast else None
    for j in range(1, n_layers):  # pre-activations h_j (the last one: the head)
        a_lo, a_hi = _act(name, lo), _act(name, hi)  # σ is monotone
        if method == "crown":  # IBP needs no lines
            relax.append(_relax(name, lo, hi, a_lo, a_hi))
        if need_q:
            slopes.append(_max_slope(name, lo, hi))
        a_c = 0.5 * (a_lo + a_hi)
        ibp.append((a_c, a_c @ weights[j].T, 0.5 * (a_hi - a_lo) @ weights[j].abs().T))
        lo, hi = ibp[j][1] + biases[j] - ibp[j][2], ibp[j][1] + biases[j] + ibp[j][2]
        if method == "crown" and j < n_layers - 1:
            c_lo, c_hi = _crown(weights[j], biases[j], j - 1, weights, biases, relax, inp, fast_ibp)
            if intersect:
                lo, hi = torch.maximum(lo, c_lo), torch.minimum(hi, c_hi)
            else:
                lo, hi = c_lo, c_hi

    w_out, b_out = weights[-1], biases[-1]
    k = w_out.shape[0]
    out_lo, out_hi = lo, hi  # IBP's head bounds (or the first and only layer's)
    pair_hi = None
    if policy.spec.head in DISCRETE_HEADS:
        pair_hi = out_hi[:, :, None] - out_lo[:, None, :]
    if method == "crown":
        if n_layers > 1:
            c_lo, c_hi = _crown(w_out, b_out, n_layers - 2, weights, biases, relax, inp, fast_ibp)
            if intersect:
                out_lo, out_hi = torch.maximum(out_lo, c_lo), torch.minimum(out_hi, c_hi)
            else:
                out_lo, out_hi = c_lo, c_hi
        if pair_hi is not None:
            # bound z_i - z_j as one linear function: tighter than u_i - l_j
            eye = torch.eye(k, dtype=w_out.dtype)
            spec = (eye[:, None, :] - eye[None, :, :]).reshape(k * k, k)
            top = n_layers - 2
            _, p_hi = _crown(spec @ w_out, spec @ b_out, top, weights, biases, relax, inp, fast_ibp)
            p_hi = p_hi.reshape(-1, k, k)
            pair_hi = torch.minimum(pair_hi, p_hi) if intersect else p_hi

    if not need_q:
        return _ChunkBounds(out_lo, out_hi, pair_hi, torch.zeros(0))
    q = w_out.abs()
    for j in range(n_layers - 2, -1, -1):
        q = (q * slopes[j][:, None, :]) @ weights[j].abs()
    q = q * inp.radius
    if q.ndim == 2:
        q = q.expand(len(inp.lo), -1, -1)
    return _ChunkBounds(out_lo, out_hi, pair_hi, q)


def _network(policy: Policy, dtype: torch.dtype) -> tuple[list[Tensor], list[Tensor]]:
    weights = [w.detach().to(dtype) for w in policy.effective_weights()]
    biases = [layer.bias.detach().to(dtype) for layer in policy.layers]
    return weights, biases


def _chunk_size(weights: list[Tensor], requested: int) -> int:
    widest = max(w.shape[0] * w.shape[1] for w in weights)
    return max(1, min(requested, _CHUNK_ELEMENTS // widest))


def output_bounds(
    policy: Policy,
    states: np.ndarray | Tensor,
    threat: ThreatModel,
    method: str = "crown",
    intersect: bool = True,
    chunk_size: int = 1024,
    precise: bool = False,
) -> tuple[Tensor, Tensor]:
    """Per-state bounds on the head output (mean or logits) over the ε-ball, float64.

    :param policy: the policy.
    :param states: raw observations, shape (N, obs_dim).
    :param threat: ε, norm, space.
    :param method: ``"crown"`` or ``"ibp"``.
    :param intersect: intersect CROWN's bounds with IBP's (False gives pure CROWN, for study).
    :param chunk_size: states per batch (capped to bound memory).
    :param precise: every product in float64 (the default computes CROWN's back-substitution
        onto the input in float32 and widens it by its rounding-error bound: as sound, a few
        times faster, and looser by that margin only).
    :returns: ``(lower, upper)``, each (N, act_dim).
    """
    _check_method(method)
    x = as_states(policy, states)
    weights, biases = _network(policy, torch.float64)
    size = _chunk_size(weights, chunk_size)
    los, his = [], []
    for start in range(0, len(x), size):
        inp = _input_set(policy, x[start : start + size], threat, torch.float64)
        b = _bound_chunk(policy, weights, biases, inp, method, intersect, not precise, False)
        los.append(b.out_lo)
        his.append(b.out_hi)
    return torch.cat(los), torch.cat(his)


@dataclass(frozen=True)
class BallBounds:
    """Head-output bounds over the ball around each state (float64).

    :param clean: (N, K) head output at the clean state.
    :param lower: (N, K) lower bounds over the ball. :param upper: (N, K) upper bounds.
    :param pair_upper: (N, K, K) upper bounds on ``z_i - z_j`` over the ball (argmax heads).
    """

    clean: Tensor
    lower: Tensor
    upper: Tensor
    pair_upper: Tensor | None


def ball_bounds(
    policy: Policy,
    states: np.ndarray | Tensor,
    threat: ThreatModel,
    method: str = "crown",
    eps: np.ndarray | Tensor | None = None,
    chunk_size: int = 1024,
    precise: bool = False,
) -> BallBounds:
    """:func:`output_bounds` with the clean output and, for argmax heads, the pairwise bounds.

    :param eps: (N,) one radius per state instead of ``threat.eps`` (same units and norm).
    :param precise: as in :func:`output_bounds`.
    """
    _check_method(method)
    x = as_states(policy, states)
    per = None if eps is None else torch.as_tensor(np.asarray(eps), dtype=torch.float64)
    if per is not None and per.shape != (len(x),):
        raise CompressorError(f"eps must have shape ({len(x)},), got {tuple(per.shape)}")
    weights, biases = _network(policy, torch.float64)
    size = _chunk_size(weights, chunk_size)
    parts: list[tuple[Tensor, Tensor, Tensor, Tensor | None]] = []
    for start in range(0, len(x), size):
        chunk_eps = None if per is None else per[start : start + size]
        inp = _input_set(policy, x[start : start + size], threat, torch.float64, chunk_eps)
        b = _bound_chunk(policy, weights, biases, inp, method, True, not precise, False)
        clean = inp.center
        for j, (w, bias) in enumerate(zip(weights, biases)):
            clean = clean @ w.T + bias
            if j < len(weights) - 1:
                clean = _act(policy.spec.activation, clean)
        parts.append((clean, b.out_lo, b.out_hi, b.pair_hi))
    k = policy.spec.act_dim if policy.spec.head not in DISCRETE_HEADS else weights[-1].shape[0]
    if not parts:
        empty = torch.zeros(0, k, dtype=torch.float64)
        return BallBounds(empty, empty, empty, None)
    pairs = [p[3] for p in parts]
    return BallBounds(
        torch.cat([p[0] for p in parts]),
        torch.cat([p[1] for p in parts]),
        torch.cat([p[2] for p in parts]),
        None if pairs[0] is None else torch.cat([p for p in pairs if p is not None]),
    )


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise CompressorError(f"local certificate method must be one of {METHODS}, got {method!r}")


# ---- the certificate ----------------------------------------------------------------------------
@dataclass
class LocalCertificate:
    """Per-state certified bounds over the ε-ball around each given state.

    :param head: the policy head.
    :param norm: threat norm.
    :param space: ε's units.
    :param eps: the threat radius.
    :param method: ``"crown"`` or ``"ibp"``.
    :param tau: TV threshold of ``frac_tv_le_tau``.
    :param shift_bound: (N,) certified Mahalanobis Δ, logit oscillation or ‖Δa‖₂.
    :param tv_bound: (N,) certified TV (None for deterministic heads).
    :param argmax_certified: (N,) the greedy action provably cannot change (categorical only).
    :param global_shift_bound: the global certificate's shift at ``eps``, for comparison.
    :param seconds: wall time of the computation.
    """

    head: str
    norm: str
    space: str
    eps: float
    method: str
    tau: float
    shift_bound: np.ndarray
    tv_bound: np.ndarray | None
    argmax_certified: np.ndarray | None
    global_shift_bound: float
    seconds: float

    def summary(self) -> dict[str, Any]:
        """Mean, median, p95 and max of the shift and TV bounds and the certified fractions."""
        out: dict[str, Any] = {"n_states": int(len(self.shift_bound))}

        def stats(prefix: str, v: np.ndarray) -> None:
            out[f"{prefix}_mean"] = float(np.mean(v))
            out[f"{prefix}_median"] = float(np.median(v))
            out[f"{prefix}_p95"] = float(np.percentile(v, 95))
            out[f"{prefix}_max"] = float(np.max(v))

        if len(self.shift_bound):
            stats("shift", self.shift_bound)
            if self.tv_bound is not None:
                stats("tv", self.tv_bound)
                out["frac_tv_le_tau"] = float(np.mean(self.tv_bound <= self.tau))
            if self.argmax_certified is not None:
                out["frac_argmax_certified"] = float(np.mean(self.argmax_certified))
        return out

    def to_dict(self, per_state: bool = False) -> dict[str, Any]:
        """JSON-ready summary; ``per_state=True`` adds the per-state arrays as lists."""
        d: dict[str, Any] = {
            "head": self.head,
            "norm": self.norm,
            "space": self.space,
            "eps": self.eps,
            "method": self.method,
            "tau": self.tau,
            "global_shift_bound": self.global_shift_bound,
            "seconds": self.seconds,
            **self.summary(),
        }
        if per_state:
            d["shift_bound"] = self.shift_bound.tolist()
            d["tv_bound"] = None if self.tv_bound is None else self.tv_bound.tolist()
            d["argmax_certified"] = (
                None if self.argmax_certified is None else self.argmax_certified.tolist()
            )
        return d


def certify_local(
    policy: Policy,
    states: np.ndarray | Tensor,
    threat: ThreatModel,
    method: str = "crown",
    tau: float = DEFAULT_TAU,
    chunk_size: int = 1024,
    precise: bool = False,
) -> LocalCertificate:
    """Certified per-state bounds on the shift and TV over the ε-ball around each state.

    :param policy: the policy.
    :param states: raw observations, shape (N, obs_dim) (e.g. states visited by the policy).
    :param threat: ε, norm, space.
    :param method: ``"crown"`` (tighter) or ``"ibp"`` (faster).
    :param tau: TV threshold for ``frac_tv_le_tau``.
    :param chunk_size: states per batch (capped to bound memory).
    :param precise: as in :func:`output_bounds`.
    """
    _check_method(method)
    if not 0.0 < tau <= 1.0:
        raise CompressorError(f"τ must be in (0, 1], got {tau}")
    t0 = time.perf_counter()
    head, eps, norm = certified_head(policy), threat.eps, threat.norm
    x = as_states(policy, states)
    dt = torch.float64
    weights, biases = _network(policy, dt)
    d = output_scale(policy)
    q_global = abs_product(policy) * input_scale(policy, threat)[None, :]
    global_shift = float(shift_per_unit_eps(head, q_global, d, norm)) * eps
    shifts, argmax_ok = [], []
    size = _chunk_size(weights, chunk_size)
    for start in range(0, len(x), size):
        inp = _input_set(policy, x[start : start + size], threat, dt)
        b = _bound_chunk(policy, weights, biases, inp, method, True, not precise)
        clean = inp.center
        for j, (w, bias) in enumerate(zip(weights, biases)):
            clean = clean @ w.T + bias
            if j < len(weights) - 1:
                clean = _act(policy.spec.activation, clean)
        if head == "categorical":
            shift, ok = _categorical(b, clean, q_global, eps, norm)
            argmax_ok.append(ok)
        else:
            shift = _continuous(head, b, clean, q_global, d, eps, norm)
        shifts.append(torch.minimum(shift, torch.tensor(global_shift, dtype=dt)))
    shift_all = torch.cat(shifts).numpy() if shifts else np.zeros(0)
    tv = tv_from_shift(head, shift_all)
    return LocalCertificate(
        head=policy.spec.head,
        norm=norm,
        space=threat.space,
        eps=eps,
        method=method,
        tau=tau,
        shift_bound=shift_all,
        tv_bound=None if tv is None else np.asarray(tv),
        argmax_certified=torch.cat(argmax_ok).numpy() if argmax_ok else None,
        global_shift_bound=global_shift,
        seconds=time.perf_counter() - t0,
    )


def _row_dual(q: Tensor, norm: str) -> Tensor:
    """Per row, the maximum of ``q_i·|δ|`` over the unit ball (ℓ1 row sums for ℓ∞, else ℓ2)."""
    return q.sum(-1) if norm == "inf" else torch.linalg.vector_norm(q, dim=-1)


def _continuous(
    head: str, b: _ChunkBounds, clean: Tensor, q_global: Tensor, d: Tensor, eps: float, norm: str
) -> Tensor:
    # per coordinate, the tightest of: the interval, the local and the global abs-product bound
    per = torch.maximum(b.out_hi - clean, clean - b.out_lo).clamp_min(0.0)
    per = torch.minimum(per, eps * _row_dual(b.q_local, norm))
    per = torch.minimum(per, eps * _row_dual(q_global, norm))
    if head not in GAUSSIAN_HEADS:
        d = torch.ones_like(d)
    from_intervals = torch.linalg.vector_norm(per * d, dim=-1)
    # for ℓ2 the spectral norm of the local product can beat the per-coordinate bound
    from_local = eps * shift_per_unit_eps(head, b.q_local, d, norm)
    return torch.minimum(from_intervals, from_local)


def _categorical(
    b: _ChunkBounds, clean: Tensor, q_global: Tensor, eps: float, norm: str
) -> tuple[Tensor, Tensor]:
    k = clean.shape[-1]
    if k < 2:
        zeros = torch.zeros(len(clean), dtype=clean.dtype)
        return zeros, torch.ones(len(clean), dtype=torch.bool)
    clean_pair = clean[:, :, None] - clean[:, None, :]
    assert b.pair_hi is not None
    # bound on Δ(z_i - z_j): from the output bounds, the local and the global product
    dpair = (b.pair_hi - clean_pair).clamp_min(0.0)
    dpair = torch.minimum(dpair, eps * pair_bounds(b.q_local, norm))
    dpair = torch.minimum(dpair, eps * pair_bounds(q_global, norm))
    off = ~torch.eye(k, dtype=torch.bool)
    osc = dpair.masked_fill(~off, -math.inf).amax((-1, -2))
    # the greedy action a survives iff z_j - z_a stays < 0 for every j ≠ a over the ball
    a = clean.argmax(-1)
    rival = (clean_pair + dpair)[torch.arange(len(clean)), :, a]  # (B, K): bound on z_j - z_a
    rival = rival.masked_fill(torch.nn.functional.one_hot(a, k).bool(), -math.inf)
    return osc, (rival < 0).all(-1)
