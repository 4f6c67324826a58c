"""Certificates on the deployed action: what the exported graph computes, at the threat ε.

The robot runs the deterministic action ``a(s) = g(f(clip(norm(s))))`` of the exported ONNX
graph (:mod:`compressor.deploy.export`): observation normalisation and its clip, the MLP ``f``,
and the head's deployment map ``g`` (:attr:`Policy.action_map`): ``tanh``-rescale to the action
bounds (squashed heads), clip to the bounds (Gaussian means, clipping deterministic heads), or
argmax (categorical, q_greedy). For every given state this module bounds

    ``dev_i(s) = max_{ŝ ∈ B(s)} |a_i(ŝ) - a_i(s)|``  per action dimension ``i``,

in action units and as a fraction of the action range, with the local CROWN (IBP as the fast
fallback) bounds of :func:`~compressor.certify.local.ball_bounds` on the head output pushed
through ``g``: ``g`` is monotone per coordinate, so ``dev_i ≤ max(g(u_i) - g(c_i), g(c_i) -
g(l_i))``. For argmax heads it certifies instead that the argmax provably cannot change
(every rival's margin stays negative over the ball).

The certified radius of a state is the largest ε (found by bisection on the bound, each value
reported having been checked) at which every dimension stays within the tolerance ``δ``
(default :data:`DEFAULT_TOLERANCE` of the action range), or, for argmax heads, at which the
action provably cannot change. Balls are nested, so certified at ``r`` means certified at every
smaller ε.

Bounds are computed in float64; the graph runs in float32. Each bound on the head output is
widened by :data:`ROUNDING_ALLOWANCE` (relative) before the map, an allowance for float32
rounding (measured to be orders of magnitude above it on the tests' networks, not proven).
PGD's lower bound at the same states (:func:`compressor.core.pgd.pgd`, maximising the deployed
deviation itself) is computed beside it, and ``sound`` records certified ≥ empirical.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from compressor.certify.empirical import as_states
from compressor.certify.local import METHODS, ball_bounds
from compressor.core.errors import CompressorError
from compressor.core.pgd import pgd
from compressor.core.threat import ThreatModel
from compressor.policy.model import DISCRETE_HEADS, Policy

#: Default tolerance δ on each action dimension, as a fraction of that dimension's range.
DEFAULT_TOLERANCE = 0.05
TOLERANCE_UNITS = ("range", "action")
#: Relative widening of the float64 head-output bounds, for the float32 graph's rounding.
ROUNDING_ALLOWANCE = 1e-5


def measurement_slack(policy: Policy) -> np.ndarray:
    """Per dimension, how far a float32 measurement of the deployed action (PGD's, sampling's)
    may sit above the exact deviation from rounding alone: a few float32 ulps of the largest
    action magnitude (``2.4e-7`` at 2.0), which is what a saturated tanh leaves of a deviation.
    """
    top = np.maximum(policy.action_high.abs().numpy(), policy.action_low.abs().numpy())
    top = np.where(np.isfinite(top), top, 0.0).astype(np.float64)
    return 4.0 * float(np.finfo(np.float32).eps) * (1.0 + top)


#: The radius bisection searches [0, RADIUS_CAP_FACTOR · ε]; a state certified at the cap is
#: reported at the cap (a lower bound on its radius).
RADIUS_CAP_FACTOR = 4.0
RADIUS_STEPS = 14


class UnsoundCertificateError(CompressorError):
    """PGD found a deviation above the certified bound."""


@dataclass(frozen=True)
class DeployedCertificate:
    """The deployed action's certified deviation at the threat ε, at visited states.

    :param head: policy head. :param action_map: ``tanh_rescale``, ``clip`` or ``argmax``.
    :param norm: threat norm. :param space: ε's units. :param eps: the threat ε.
    :param method: ``crown`` or ``ibp``.
    :param tolerance: δ per action dimension, in action units (argmax heads: empty).
    :param tolerance_spec: δ as given (value and units).
    :param action_range: ``high - low`` per dimension (inf where unbounded; argmax: empty).
    :param deviation: (N, act_dim) certified ``max |a(ŝ) - a(s)|`` in action units.
    :param empirical: (M, act_dim) PGD's deviation at the first M states (argmax: (M, 1), 1 where
        PGD flipped the action), or None.
    :param argmax_certified: (N,) the action provably cannot change (argmax heads).
    :param radius: (M ≤ N,) certified radius in ε units (capped at ``radius_cap``), on the
        first M states.
    :param radius_cap: the bisection's upper end.
    :param sound: certified ≥ empirical at every state PGD attacked (None: no PGD).
    :param seconds: wall time.
    """

    head: str
    action_map: str
    norm: str
    space: str
    eps: float
    method: str
    tolerance: np.ndarray
    tolerance_spec: tuple[float, str]
    action_range: np.ndarray
    deviation: np.ndarray
    empirical: np.ndarray | None
    argmax_certified: np.ndarray | None
    radius: np.ndarray
    radius_cap: float
    sound: bool | None
    seconds: float

    @property
    def certified(self) -> np.ndarray:
        """(N,) the deployed action provably stays within δ (argmax: cannot change) at ε."""
        if self.argmax_certified is not None:
            return self.argmax_certified
        return np.all(self.deviation <= self.tolerance[None, :], axis=1)

    def summary(self) -> dict[str, Any]:
        """Distributions over states (median, p95, max; per dimension for the deviation)."""
        n = len(self.certified)
        out: dict[str, Any] = {"n_states": n}
        if n == 0:
            return out
        out["n_radius_states"] = int(len(self.radius))
        out["frac_certified_at_eps"] = float(np.mean(self.certified))
        out["radius"] = _stats(self.radius)
        out["frac_radius_at_cap"] = float(np.mean(self.radius >= self.radius_cap))
        if self.argmax_certified is None:
            out["deviation"] = _per_dim(self.deviation)
            with np.errstate(invalid="ignore", divide="ignore"):
                frac = self.deviation / self.action_range[None, :]
            if np.all(np.isfinite(self.action_range)):
                out["deviation_frac_range"] = _per_dim(frac)
        if self.empirical is not None and len(self.empirical):
            if self.argmax_certified is None:
                out["empirical_deviation"] = _per_dim(self.empirical)
            else:
                out["empirical_frac_flipped"] = float(np.mean(self.empirical[:, 0] > 0))
            out["n_empirical_states"] = int(len(self.empirical))
        return out

    def to_dict(self, per_state: bool = False) -> dict[str, Any]:
        """JSON-ready dict; ``per_state`` adds the per-state arrays."""
        d: dict[str, Any] = {
            "quantity": "deployed deterministic action, max over the ε-ball of |a(ŝ) - a(s)|",
            "head": self.head,
            "action_map": self.action_map,
            "norm": self.norm,
            "space": self.space,
            "eps": self.eps,
            "method": self.method,
            "tolerance": self.tolerance.tolist(),
            "tolerance_given": {"value": self.tolerance_spec[0], "units": self.tolerance_spec[1]},
            "action_range": [float(x) for x in self.action_range],
            "radius_cap": self.radius_cap,
            "sound": self.sound,
            "seconds": self.seconds,
            **self.summary(),
        }
        if per_state:
            d["deviation_per_state"] = self.deviation.tolist()
            d["radius_per_state"] = self.radius.tolist()
        return d


def _stats(v: np.ndarray) -> dict[str, float]:
    return {
        "median": float(np.median(v)),
        "p95": float(np.percentile(v, 95)),
        "max": float(np.max(v)),
    }


def _per_dim(v: np.ndarray) -> dict[str, list[float]]:
    return {
        "median": np.median(v, axis=0).tolist(),
        "p95": np.percentile(v, 95, axis=0).tolist(),
        "max": np.max(v, axis=0).tolist(),
    }


# ---- the deployment map over intervals ----------------------------------------------------------
def _bounds64(policy: Policy) -> tuple[torch.Tensor, torch.Tensor]:
    return policy.action_low.to(torch.float64), policy.action_high.to(torch.float64)


def deploy_map(policy: Policy, out: torch.Tensor) -> torch.Tensor:
    """The head's deployment map on float64 head outputs (continuous heads)."""
    low, high = _bounds64(policy)
    if policy.action_map == "tanh_rescale":
        return low + (torch.tanh(out) + 1.0) * 0.5 * (high - low)
    return torch.maximum(torch.minimum(out, high), low)


def _deviation(policy: Policy, clean: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> Any:
    slack = ROUNDING_ALLOWANCE * (1.0 + torch.maximum(lo.abs(), hi.abs()))
    a0 = deploy_map(policy, clean)
    up = deploy_map(policy, hi + slack) - a0
    down = a0 - deploy_map(policy, lo - slack)
    return torch.maximum(up, down).clamp_min(0.0)


def _argmax_safe(clean: torch.Tensor, pair_upper: torch.Tensor) -> torch.Tensor:
    """(N,) every rival ``j`` of the clean argmax ``a`` has ``z_j - z_a < 0`` over the ball."""
    k = clean.shape[-1]
    if k < 2:
        return torch.ones(len(clean), dtype=torch.bool)
    a = clean.argmax(-1)
    rival = pair_upper[torch.arange(len(clean)), :, a]  # (N, K): bound on z_j - z_a
    scale = ROUNDING_ALLOWANCE * (1.0 + clean.abs().amax(-1, keepdim=True))
    rival = (rival + scale).masked_fill(torch.nn.functional.one_hot(a, k).bool(), -torch.inf)
    return (rival < 0).all(-1)


def _certified_at(
    policy: Policy,
    x: torch.Tensor,
    threat: ThreatModel,
    method: str,
    tol: torch.Tensor,
    eps: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(certified per state, deviation per state and dimension or None for argmax heads)."""
    b = ball_bounds(policy, x, threat, method=method, eps=eps)
    if policy.spec.head in DISCRETE_HEADS:
        assert b.pair_upper is not None
        return _argmax_safe(b.clean, b.pair_upper), None
    dev = _deviation(policy, b.clean, b.lower, b.upper)
    return (dev <= tol[None, :]).all(-1), dev


def _radius(
    policy: Policy, x: torch.Tensor, threat: ThreatModel, method: str, tol: torch.Tensor
) -> np.ndarray:
    """Per-state bisection on [0, cap]; each reported value was certified (0 if none was)."""
    cap = RADIUS_CAP_FACTOR * threat.eps
    lo = torch.zeros(len(x), dtype=torch.float64)
    hi = torch.full((len(x),), cap, dtype=torch.float64)
    ok_cap, _ = _certified_at(policy, x, threat, method, tol, hi)
    lo = torch.where(ok_cap, hi, lo)
    todo = ~ok_cap
    for _ in range(RADIUS_STEPS):
        if not todo.any():
            break
        mid = 0.5 * (lo + hi)
        idx = todo.nonzero().squeeze(-1)
        ok, _ = _certified_at(policy, x[idx], threat, method, tol, mid[idx])
        lo[idx] = torch.where(ok, mid[idx], lo[idx])
        hi[idx] = torch.where(ok, hi[idx], mid[idx])
    return lo.numpy()


# ---- PGD on the deployed action -----------------------------------------------------------------
def empirical_deviation(
    policy: Policy,
    states: np.ndarray | torch.Tensor,
    threat: ThreatModel,
    *,
    steps: int = 50,
    restarts: int = 2,
    seed: int = 0,
) -> np.ndarray:
    """PGD's lower bound on the deployed deviation: (M, act_dim) per dimension, or for argmax
    heads (M, 1) holding the largest rival margin ``max_j z_j - z_a`` found (> 0: flipped)."""
    x = as_states(policy, states)
    scale = threat.scale(policy).to(torch.float32)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        out0 = policy(x)
    discrete = policy.spec.head in DISCRETE_HEADS
    a0 = out0.argmax(-1) if discrete else policy.postprocess(out0)
    objectives: list[Any] = []
    if discrete:
        mask = torch.nn.functional.one_hot(a0, out0.shape[-1]).bool()

        def margin(xa: torch.Tensor) -> torch.Tensor:
            z = policy(xa)
            za = z.gather(1, a0[:, None])
            return (z - za).masked_fill(mask, -torch.inf).amax(-1)

        objectives.append(margin)
    else:
        for i in range(policy.spec.act_dim):

            def dev_i(xa: torch.Tensor, i: int = i) -> torch.Tensor:
                # the raw output's distance, so the clip's flat region keeps a gradient; the
                # value kept is the deployed action's (see below)
                return (policy(xa)[:, i] - out0[:, i]).abs()

            objectives.append(dev_i)
    best = torch.full((len(x), len(objectives)), -torch.inf if discrete else 0.0)
    with policy.frozen():
        for k, obj in enumerate(objectives):
            for r in range(restarts):
                xa = pgd(
                    obj,
                    x,
                    scale,
                    threat.eps,
                    norm=threat.norm,
                    steps=steps,
                    random_start=r > 0,
                    generator=gen,
                )
                with torch.no_grad():
                    if discrete:
                        val = obj(xa)
                    else:
                        val = (policy.act(xa)[:, k] - a0[:, k]).abs()
                best[:, k] = torch.maximum(best[:, k], val)
    return best.numpy().astype(np.float64)


def resolve_tolerance(policy: Policy, tolerance: float, units: str) -> np.ndarray:
    """δ per action dimension in action units."""
    if units not in TOLERANCE_UNITS:
        raise CompressorError(f"tolerance units must be one of {TOLERANCE_UNITS}, got {units!r}")
    if not tolerance > 0:
        raise CompressorError(f"deployed-action tolerance must be positive, got {tolerance}")
    if policy.spec.head in DISCRETE_HEADS:
        return np.zeros(0)
    span = (policy.action_high - policy.action_low).to(torch.float64).numpy()
    if units == "action":
        return np.full(policy.spec.act_dim, float(tolerance))
    if not np.all(np.isfinite(span)):
        raise CompressorError(
            "the action space is unbounded: give the deployed-action tolerance in action units"
        )
    return tolerance * span


def certify_deployed(
    policy: Policy,
    states: np.ndarray | torch.Tensor,
    threat: ThreatModel,
    *,
    method: str = "crown",
    tolerance: float = DEFAULT_TOLERANCE,
    tolerance_units: str = "range",
    empirical_states: int = 200,
    radius_states: int | None = None,
    seed: int = 0,
) -> DeployedCertificate:
    """Certify the deployed action at ``states`` (raw observations, (N, obs_dim)).

    :param method: ``crown`` (tighter) or ``ibp`` (faster).
    :param tolerance: δ, a fraction of the range (``tolerance_units="range"``) or in action units.
    :param empirical_states: the first this many states are also attacked by PGD (0: none).
    :param radius_states: the certified radius (a bisection: ~15 bounds per state) on the first
        this many states only (None: all of them).
    :param seed: PGD's random-start seed.
    """
    if method not in METHODS:
        raise CompressorError(f"deployed certificate method must be one of {METHODS}")
    t0 = time.perf_counter()
    x = as_states(policy, states)
    tol_np = resolve_tolerance(policy, tolerance, tolerance_units)
    tol = torch.as_tensor(tol_np, dtype=torch.float64)
    ok, dev = _certified_at(policy, x, threat, method, tol)
    radius = _radius(
        policy, x[: len(x) if radius_states is None else radius_states], threat, method, tol
    )
    discrete = policy.spec.head in DISCRETE_HEADS
    dev_np = np.zeros((len(x), 0)) if dev is None else dev.numpy()
    emp: np.ndarray | None = None
    sound: bool | None = None
    k = min(empirical_states, len(x))
    if k > 0:
        emp = empirical_deviation(policy, x[:k], threat, seed=seed)
        if discrete:
            # a certified state must not flip
            sound = bool(not np.any(ok[:k].numpy() & (emp[:, 0] > 0)))
        else:
            sound = bool(np.all(emp <= dev_np[:k] + measurement_slack(policy)[None, :]))
    span = (policy.action_high - policy.action_low).to(torch.float64).numpy()
    return DeployedCertificate(
        head=policy.spec.head,
        action_map=policy.action_map,
        norm=threat.norm,
        space=threat.space,
        eps=threat.eps,
        method=method,
        tolerance=tol_np,
        tolerance_spec=(float(tolerance), tolerance_units),
        action_range=np.zeros(0) if discrete else span,
        deviation=dev_np,
        empirical=emp,
        argmax_certified=ok.numpy() if discrete else None,
        radius=radius,
        radius_cap=RADIUS_CAP_FACTOR * threat.eps,
        sound=sound,
        seconds=time.perf_counter() - t0,
    )
