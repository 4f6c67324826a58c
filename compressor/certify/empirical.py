"""The empirical side of every certificate: PGD searches the ε-ball for the largest change it
can find. It is a lower bound on the true maximum, so a sound certificate is never below it (the
soundness tests and every run check this)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from compressor.core.errors import CompressorError
from compressor.core.pgd import pgd
from compressor.core.threat import ThreatModel
from compressor.policy.model import Policy


# ---- empirical lower bound --------------------------------------------------------------------
@dataclass
class EmpiricalResult:
    """Per-state maxima found by PGD (lower bounds on the true maxima).

    :param tv: TV between clean and perturbed action distributions (for deterministic heads,
        the ℓ2 head-output distance, as :meth:`Policy.total_variation` defines it).
    :param shift: the certified quantity: Mahalanobis Δ, logit oscillation or ‖Δa‖₂.
    """

    tv: np.ndarray
    shift: np.ndarray


def output_shift(policy: Policy, clean: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Per-row value of the certified quantity between two head outputs (differentiable)."""
    if policy.spec.head == "categorical":
        dz = out - clean
        return dz.amax(-1) - dz.amin(-1)
    return torch.sqrt(policy.divergence(clean, out).clamp_min(0.0))


def as_states(policy: Policy, states: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Validate a (batch, obs_dim) state array and return it as a float32 tensor."""
    x = states if torch.is_tensor(states) else torch.as_tensor(np.asarray(states))
    x = x.detach().to(torch.float32)
    if x.ndim != 2 or x.shape[1] != policy.spec.obs_dim:
        raise CompressorError(
            f"states must have shape (N, {policy.spec.obs_dim}), got {tuple(x.shape)}"
        )
    if not torch.isfinite(x).all():
        raise CompressorError("states contain NaN or inf")
    return x


def empirical_search(
    policy: Policy,
    states: np.ndarray | torch.Tensor,
    threat: ThreatModel,
    steps: int = 50,
    restarts: int = 2,
    generator: torch.Generator | None = None,
    step_size: float | None = None,
) -> EmpiricalResult:
    """PGD for the largest TV and shift in the ε-ball around each state.

    Gaussian heads ascend Δ² (TV is monotone in Δ, and Δ² keeps gradients where erf saturates);
    categorical heads ascend both TV and the oscillation, since their maximisers differ.

    :param policy: the policy.
    :param states: raw observations, shape (N, obs_dim).
    :param threat: ε, norm, space.
    :param steps: PGD steps per restart (more than the attack's 10: this is a bound check).
    :param restarts: random starts per objective.
    :param generator: RNG for the random starts.
    :param step_size: PGD step in ε units (default: 2.5ε/steps for ℓ∞, at least ε/4 for ℓ2).
    """
    x0 = as_states(policy, states)
    scale = threat.scale(policy).to(torch.float32)
    with torch.no_grad():
        clean = policy(x0)

    def tv_of(x: torch.Tensor) -> torch.Tensor:
        return policy.total_variation(clean, policy(x))

    def shift_of(x: torch.Tensor) -> torch.Tensor:
        return output_shift(policy, clean, policy(x))

    def div_of(x: torch.Tensor) -> torch.Tensor:
        return policy.divergence(clean, policy(x))

    objectives = [tv_of, shift_of] if policy.spec.head == "categorical" else [div_of]
    best_tv = torch.zeros(len(x0))
    best_shift = torch.zeros(len(x0))
    if step_size is not None:
        alpha = step_size
    elif threat.norm == "inf":
        # 2.5 ε / steps lets a sign walk cross the ball and come back (Madry et al.)
        alpha = 2.5 * threat.eps / max(steps, 1)
    else:
        # on the ℓ2 sphere each step only turns δ by about α/ε radians towards the gradient, so
        # small steps leave a random start's off-gradient component (measured: 1% short of the
        # exact maximum of a linear policy after 300 steps of 2.5ε/300); PGD keeps the best iterate
        alpha = max(2.5 * threat.eps / max(steps, 1), threat.eps / 4)
    for obj in objectives:
        for _ in range(restarts):
            x = pgd(
                obj,
                x0,
                scale,
                threat.eps,
                norm=threat.norm,
                steps=steps,
                step_size=alpha,
                random_start=True,
                generator=generator,
            )
            with torch.no_grad():
                best_tv = torch.maximum(best_tv, tv_of(x))
                best_shift = torch.maximum(best_shift, shift_of(x))
    return EmpiricalResult(tv=best_tv.numpy(), shift=best_shift.numpy())


def empirical_tv(
    policy: Policy,
    states: np.ndarray | torch.Tensor,
    threat: ThreatModel,
    steps: int = 50,
    restarts: int = 2,
    generator: torch.Generator | None = None,
) -> np.ndarray:
    """Per-state maximum TV found by PGD (see :func:`empirical_search`, which also gives Δ).

    :param policy: the policy.
    :param states: raw observations, shape (N, obs_dim).
    :param threat: ε, norm, space.
    :param steps: PGD steps per restart.
    :param restarts: random starts per objective.
    :param generator: RNG for the random starts.
    """
    return empirical_search(policy, states, threat, steps, restarts, generator).tv
