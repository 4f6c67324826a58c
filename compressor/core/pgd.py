"""The one projected-gradient ascent, used by every gradient attack and by certificate tests."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from compressor.core.threat import ThreatModel, project, sample_ball

if TYPE_CHECKING:
    from compressor.policy.model import Policy


def pgd(
    objective: Callable[[torch.Tensor], torch.Tensor],
    x0: torch.Tensor,
    scale: torch.Tensor,
    eps: float,
    *,
    norm: str = "inf",
    steps: int = 10,
    step_size: float | None = None,
    random_start: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Maximise ``objective`` row-wise over ``‖(x - x0) / scale‖_p ≤ eps``; return the best ``x``.

    ℓ∞ takes sign steps, ℓ2 normalised-gradient steps, each followed by projection. The best
    iterate per row (by objective) is returned, so more steps never give a weaker result.

    :param objective: maps a batch ``x`` (same shape as ``x0``) to one value per row.
    :param x0: clean inputs, shape (batch, dim).
    :param scale: per-dimension size of one ε unit (normalisation std or ones).
    :param eps: ball radius in those units.
    :param norm: ``"inf"`` or ``"2"``.
    :param steps: number of ascent steps (literature: 10).
    :param step_size: step in ε units (default ``eps / steps``: 10 steps of ε/10, as SA-PPO).
    :param random_start: start from a uniform point of the ball instead of the centre.
    :param generator: RNG for the random start.
    """
    x0 = x0.detach()
    scale = scale.detach().to(x0.dtype)
    alpha = step_size if step_size is not None else eps / max(steps, 1)
    if random_start:
        delta = sample_ball(tuple(x0.shape), eps, norm, generator).to(x0.dtype)
    else:
        delta = torch.zeros_like(x0)
    best = delta.clone()
    best_val = torch.full((x0.shape[0],), -torch.inf, dtype=x0.dtype)
    for i in range(steps + 1):
        # one objective evaluation per iterate serves both the best-iterate bookkeeping and
        # the gradient of the next step (the last iterate needs no gradient)
        last = i == steps
        delta.requires_grad_(not last)
        with torch.set_grad_enabled(not last):
            val = objective(x0 + delta * scale)
        with torch.no_grad():
            better = val.detach() > best_val
            best = torch.where(better[:, None], delta.detach(), best)
            best_val = torch.where(better, val.detach(), best_val)
        if last:
            break
        (grad,) = torch.autograd.grad(val.sum(), delta)
        with torch.no_grad():
            if norm == "inf":
                step = grad.sign()
            else:
                step = grad / grad.norm(dim=-1, keepdim=True).clamp_min(1e-12)
            delta = project(delta.detach() + alpha * step, eps, norm)
    return (x0 + best * scale).detach()


def pgd_in_ball(
    objective: Callable[[torch.Tensor], torch.Tensor],
    x0: torch.Tensor,
    scale: torch.Tensor,
    threat: ThreatModel,
    steps: int,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """:func:`pgd` in ``threat``'s ball (its ε and norm) from a random start, ``steps`` steps
    of ε/steps: how the attacks and the fine-tuning's adversarial terms call it."""
    return pgd(
        objective,
        x0,
        scale,
        threat.eps,
        norm=threat.norm,
        steps=steps,
        random_start=True,
        generator=generator,
    )


def max_divergence_point(
    policy: Policy,
    x: torch.Tensor,
    scale: torch.Tensor,
    threat: ThreatModel,
    steps: int,
    generator: torch.Generator | None = None,
    ref: torch.Tensor | None = None,
) -> torch.Tensor:
    """The point of the ball around each row of ``x`` where the policy's output moves most from
    its output at ``x`` (MAD's objective, :meth:`Policy.attack_objective`; SA-PPO's smoothness
    regulariser's inner max).

    :param ref: ``policy(x)`` if the caller already has it (without gradient)."""
    if ref is None:
        with torch.no_grad():
            ref = policy(x)
    return pgd_in_ball(
        lambda z: policy.attack_objective(ref, policy(z)), x, scale, threat, steps, generator
    )
