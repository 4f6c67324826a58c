"""Global robustness certificate: one bound valid at every state, monotone under pruning.

The certified quantity is how far the action distribution can move when the observation moves
inside the threat model's ε-ball:

- gaussian / squashed_gaussian heads: the Mahalanobis shift ``Δ = ‖Σ^{-1/2}(μ(ŝ) - μ(s))‖₂``,
  whose exact TV is ``2Φ(Δ/2) - 1 = erf(Δ / 2√2)``. tanh is a bijection, so squashing does not
  change the TV between two equal-Σ Gaussians: the same formula is exact for SAC heads too;
- categorical heads: the logit oscillation ``osc(Δz) = max_i Δz_i - min_j Δz_j``. If the
  log-likelihood ratio of two distributions lies in an interval of width ``c`` then
  ``TV ≤ tanh(c / 4)`` (the worst case puts mass on two points; maximising over the split gives
  ``(cosh(c/2) - 1) / sinh(c/2)``). For softmax, ``log(q_i / p_i) = Δz_i - const``, so
  ``c = osc`` and ``TV ≤ tanh(osc/4) ≤ min(1, osc/4)``; we use the tighter tanh form;
- deterministic heads: the ℓ2 norm of the head output change (the action before the clip to the
  bounds, which is 1-Lipschitz, so it also bounds the change of the executed action). There is no
  TV for a deterministic policy.

The bound is the absolute-product bound. Every activation here is 1-Lipschitz coordinate-wise
(``|σ(a) - σ(b)| ≤ |a - b|``), so by induction over layers ``|Δh_k| ≤ |W_k| |Δh_{k-1}|``
entrywise and ``|Δout| ≤ P |Δz|`` with ``P = |W_L| ··· |W_1|``; the observation clip is also
coordinate-wise 1-Lipschitz. ``P`` grows entrywise with every ``|w|``, and every norm of a
non-negative matrix used below is monotone in its entries, so pruning (``W ↦ M ⊙ W``) can only
shrink the certificate. The classic per-layer norm products are reported beside it; the spectral
product is not monotone: ``‖[[1,1],[-1,1]]‖₂ = √2`` but zeroing the -1 gives φ ≈ 1.618.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from compressor.core.errors import CompressorError
from compressor.core.threat import ThreatModel
from compressor.policy.model import Policy

DEFAULT_TAU = 0.1
GAUSSIAN_HEADS = ("gaussian", "squashed_gaussian")


# ---- scalar maps between shift, TV and radius ------------------------------------------------
def tv_from_shift(head: str, shift: float | np.ndarray) -> Any:
    """Certified TV implied by a certified shift (Mahalanobis Δ, or logit oscillation).

    :param head: the policy head.
    :param shift: Δ (Gaussian heads) or osc (categorical), scalar or array.
    :returns: the TV bound (same shape), or None for deterministic heads.
    """
    s = np.asarray(shift, dtype=np.float64)
    if head in GAUSSIAN_HEADS:
        return torch.erf(torch.as_tensor(s / (2.0 * math.sqrt(2.0)), dtype=torch.float64)).numpy()
    if head == "categorical":
        return np.tanh(s / 4.0)
    return None


def shift_for_tv(head: str, tau: float) -> float | None:
    """The largest shift whose certified TV is ≤ ``tau`` (inverse of :func:`tv_from_shift`).

    :param head: the policy head.
    :param tau: TV threshold in (0, 1].
    :returns: Δ* or osc*, ``inf`` when ``tau ≥ 1``, None for deterministic heads.
    """
    if head == "deterministic":
        return None
    if tau >= 1.0:
        return math.inf
    if head in GAUSSIAN_HEADS:
        return float(2.0 * math.sqrt(2.0) * torch.erfinv(torch.tensor(tau, dtype=torch.float64)))
    return float(4.0 * math.atanh(tau))


# ---- the matrices the bounds are built from ---------------------------------------------------
def input_scale(policy: Policy, threat: ThreatModel) -> torch.Tensor:
    """Diagonal ``N``: network-input (normalised) change per unit of ε, per dimension (float64).

    The attack moves the raw observation by ``δ ⊙ threat.scale``; ``Policy.normalize`` divides by
    ``obs_scale``. In normalised space ``threat.scale == obs_scale`` so the two cancel; in raw
    space the network sees ``δ / obs_scale`` (``obs_scale`` is 1 without normalisation).
    """
    ts = threat.scale(policy).to(torch.float64)
    return ts / policy.obs_scale().detach().to(torch.float64)


def abs_product(policy: Policy) -> torch.Tensor:
    """``|W_L| ··· |W_1|`` of the effective (masked) weights, float64, shape (out, obs)."""
    p: torch.Tensor | None = None
    for w in policy.effective_weights():
        a = w.detach().to(torch.float64).abs()
        p = a if p is None else a @ p
    assert p is not None
    return p


def output_scale(policy: Policy) -> torch.Tensor:
    """Diagonal ``D``: ``1/σ`` for Gaussian heads (Mahalanobis), ones otherwise (float64).

    A state-dependent σ (SAC's ``log_std_layer``) is only known to lie in
    ``spec.log_std_bounds``: ``D`` is then its largest value ``exp(-low)`` (sound, and usually
    vacuous for the TV; the deployed-action certificate does not use σ). Without bounds it is
    unbounded: ``inf``.
    """
    if policy.spec.head in GAUSSIAN_HEADS:
        if policy.std_kind == "state":
            bounds = policy.spec.log_std_bounds
            big = math.inf if bounds is None else math.exp(-float(bounds[0]))
            return torch.full((policy.spec.act_dim,), big, dtype=torch.float64)
        return torch.exp(-policy.log_std.detach().to(torch.float64))
    return torch.ones(policy.spec.act_dim, dtype=torch.float64)


def pair_bounds(q: torch.Tensor, norm: str) -> torch.Tensor:
    """Bounds on ``|Δz_i| + |Δz_j|`` per unit ε from non-negative ``|Δz| ≤ Q|δ|`` matrices.

    ``osc(Δz) = max_{i≠j} (Δz_i - Δz_j) ≤ max_{i≠j} (Q_i + Q_j)·|δ|``, whose maximum over the
    unit ball is the dual norm of the row ``Q_i + Q_j``: ℓ1 for ℓ∞ and ℓ2 for ℓ2. The ℓ2 case is
    at most ``√2 ‖Q‖₂`` (``‖Q_i + Q_j‖ ≤ √2 ‖[Q_i; Q_j]‖₂ ≤ √2 ‖Q‖₂``), the simpler bound, and
    stays monotone in the entries of ``Q``.

    :param q: shape (..., K, n), non-negative.
    :param norm: the threat norm.
    :returns: shape (..., K, K); the diagonal is meaningless (set to 0).
    """
    if norm == "inf":
        u = q.sum(-1)
        out = u[..., :, None] + u[..., None, :]
    else:
        g = q @ q.transpose(-1, -2)
        d = torch.diagonal(g, dim1=-2, dim2=-1)
        out = torch.sqrt((d[..., :, None] + d[..., None, :] + 2 * g).clamp_min(0.0))
    eye = torch.eye(out.shape[-1], dtype=torch.bool)
    return out.masked_fill(eye, 0.0)


def shift_per_unit_eps(head: str, q: torch.Tensor, d: torch.Tensor, norm: str) -> torch.Tensor:
    """The certified shift per unit ε from a non-negative bound ``|Δout| ≤ Q|δ|``.

    :param head: policy head.
    :param q: shape (..., out, n): ``Q`` (global ``P·N`` or a per-state product).
    :param d: shape (out,): ``D`` (1/σ for Gaussian heads).
    :param norm: the threat norm.
    :returns: shape (...,): Δ, osc or ‖Δa‖₂ per unit ε.
    """
    if head == "categorical":
        if q.shape[-2] < 2:
            return torch.zeros(q.shape[:-2], dtype=q.dtype)  # one action: nothing can change
        return pair_bounds(q, norm).amax((-1, -2))
    dq = q * d[:, None]
    if norm == "inf":
        # |δ| ≤ 1 and DQ ≥ 0: the majorant ‖DQ|δ|‖₂ is largest at |δ| = 1
        return torch.linalg.vector_norm(dq.sum(-1), dim=-1)
    # spectral norm of a non-negative matrix is monotone in its entries (Perron–Frobenius)
    return torch.linalg.matrix_norm(dq, ord=2)


# ---- the certificate --------------------------------------------------------------------------
@dataclass
class GlobalCertificate:
    """A certificate valid at every state.

    :param head: the policy head.
    :param norm: threat norm (``"inf"`` or ``"2"``).
    :param space: ε's units (``"normalized"`` or ``"raw"``).
    :param eps: the threat radius the bounds are evaluated at.
    :param method: ``"abs_product"``.
    :param lipschitz: certified shift per unit ε: Mahalanobis Δ (Gaussian heads), logit
        oscillation (categorical), ℓ2 head-output change (deterministic).
    :param shift_bound: ``lipschitz * eps``.
    :param tv_bound: certified TV at ``eps`` (None for deterministic heads).
    :param tau: TV threshold of the radius.
    :param certified_radius: largest ε with TV bound ≤ ``tau`` (None: deterministic head;
        ``inf``: the policy ignores its observation).
    :param output_lipschitz: per output coordinate, ``|Δout_i| ≤ output_lipschitz[i] * ε``.
    :param comparison: classic per-layer norm products of the effective weights (normalisation
        and Σ excluded), each ``{"value", "monotone"}``.
    """

    head: str
    norm: str
    space: str
    eps: float
    method: str
    lipschitz: float
    shift_bound: float
    tv_bound: float | None
    tau: float
    certified_radius: float | None
    output_lipschitz: list[float] = field(default_factory=list)
    comparison: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def shift_name(self) -> str:
        """What ``lipschitz`` measures, for reports."""
        if self.head in GAUSSIAN_HEADS:
            return "mahalanobis_shift"
        return "logit_oscillation" if self.head == "categorical" else "action_deviation_l2"

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GlobalCertificate:
        """Inverse of :meth:`to_dict`."""
        fields = {k: v for k, v in d.items() if k not in ("shift_name", "radius_unbounded")}
        if d.get("radius_unbounded"):
            fields["certified_radius"] = math.inf
        return cls(**fields)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (an infinite radius becomes None with ``radius_unbounded``)."""
        d = asdict(self)
        d["shift_name"] = self.shift_name
        r = self.certified_radius
        d["radius_unbounded"] = r is not None and math.isinf(r)
        if d["radius_unbounded"]:
            d["certified_radius"] = None
        return d


def layer_norm_products(policy: Policy) -> dict[str, dict[str, Any]]:
    """The classic per-layer norm products of the effective weights.

    ℓ∞→ℓ∞ (max absolute row sum) and Frobenius norms grow with every ``|w|``, so their products
    are monotone under pruning; the spectral norm is not.
    """
    ws = [w.detach().to(torch.float64) for w in policy.effective_weights()]
    linf = math.prod(float(w.abs().sum(1).max()) for w in ws)
    fro = math.prod(float(torch.linalg.matrix_norm(w)) for w in ws)
    spec = math.prod(float(torch.linalg.matrix_norm(w, ord=2)) for w in ws)
    return {
        "linf_row_sum_product": {"value": linf, "monotone": True},
        "frobenius_product": {"value": fro, "monotone": True},
        "spectral_product": {"value": spec, "monotone": False},
    }


def certify_global(
    policy: Policy, threat: ThreatModel, tau: float = DEFAULT_TAU
) -> GlobalCertificate:
    """The absolute-product certificate of ``policy`` under ``threat``.

    :param policy: the policy (its masks are respected: effective weights ``W ⊙ M``).
    :param threat: ε, norm and space.
    :param tau: TV threshold for the certified radius.
    """
    if not 0.0 < tau <= 1.0:
        raise CompressorError(f"τ must be in (0, 1], got {tau}")
    head = policy.spec.head
    q = abs_product(policy) * input_scale(policy, threat)[None, :]
    lip = float(shift_per_unit_eps(head, q, output_scale(policy), threat.norm))
    per_out = q.sum(-1) if threat.norm == "inf" else torch.linalg.vector_norm(q, dim=-1)
    shift = lip * threat.eps
    tv = tv_from_shift(head, shift)
    star = shift_for_tv(head, tau)
    if star is None:
        radius = None
    elif lip == 0.0 or math.isinf(star):
        radius = math.inf
    else:
        radius = star / lip
    return GlobalCertificate(
        head=head,
        norm=threat.norm,
        space=threat.space,
        eps=threat.eps,
        method="abs_product",
        lipschitz=lip,
        shift_bound=shift,
        tv_bound=None if tv is None else float(tv),
        tau=tau,
        certified_radius=radius,
        output_lipschitz=[float(v) for v in per_out],
        comparison=layer_norm_products(policy),
    )
