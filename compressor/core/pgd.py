"""The one projected-gradient ascent, used by every gradient attack and by certificate tests."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from compressor.core.mlp_grad import OutputObjective
from compressor.core.objectives import divergence_objective_and_ref, policy_objective
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

    :param objective: maps a batch ``x`` (same shape as ``x0``) to one value per row. An
        :class:`~compressor.core.mlp_grad.OutputObjective` (from :func:`policy_objective`)
        takes its gradient by hand, a plain callable by autograd; the steps are the same.
    :param x0: clean inputs, shape (batch, dim).
    :param scale: per-dimension size of one ε unit (normalisation std or ones).
    :param eps: ball radius in those units.
    :param norm: ``"inf"`` or ``"2"``.
    :param steps: number of ascent steps (literature: 10).
    :param step_size: step in ε units (default ``eps / steps``: 10 steps of ε/10, as SA-PPO).
    :param random_start: start from a uniform point of the ball instead of the centre.
    :param generator: RNG for the random start.
    """
    return pgd_with_output(
        objective,
        x0,
        scale,
        eps,
        norm=norm,
        steps=steps,
        step_size=step_size,
        random_start=random_start,
        generator=generator,
    )[0]


def pgd_with_output(
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
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`pgd` (the same steps), and the network's output at the returned point where the
    objective is an :class:`~compressor.core.mlp_grad.OutputObjective` (its evaluation there,
    kept from the ascent: no extra forward pass), else None."""
    x0 = x0.detach()
    scale = scale.detach().to(x0.dtype)
    alpha = step_size if step_size is not None else eps / max(steps, 1)
    if random_start:
        delta = sample_ball(tuple(x0.shape), eps, norm, generator).to(x0.dtype)
    else:
        delta = torch.zeros_like(x0)
    # with every derivative written out, no tensor here needs autograd's bookkeeping at all
    analytic = isinstance(objective, OutputObjective) and objective.head_grad is not None
    quiet = torch.inference_mode if analytic else torch.no_grad
    if isinstance(objective, OutputObjective):
        value_and_grad = _by_hand(objective, x0, scale)
    else:
        value_and_grad = _by_autograd(objective, x0, scale)
    best = delta.clone()
    best_val = torch.full((x0.shape[0],), -torch.inf, dtype=x0.dtype)
    best_out: torch.Tensor | None = None
    with quiet():
        for i in range(steps + 1):
            # one objective evaluation per iterate serves both the best-iterate bookkeeping
            # and the gradient of the next step (the last iterate needs no gradient)
            val, grad, out = value_and_grad(delta, i < steps)
            better = val > best_val
            best = torch.where(better[:, None], delta, best)
            best_val = torch.where(better, val, best_val)
            if out is not None:
                best_out = out if best_out is None else torch.where(better[:, None], out, best_out)
            if grad is None:
                break
            if norm == "inf":  # α·sign(g) is exact, so the fused add rounds as δ + α·sign(g)
                delta = project(torch.add(delta, grad.sign(), alpha=alpha), eps, norm)
            else:
                step = grad / grad.norm(dim=-1, keepdim=True).clamp_min(1e-12)
                delta = project(delta + alpha * step, eps, norm)
    return (x0 + best * scale).detach(), best_out


#: ``(δ, need_grad) -> (objective at x0 + δ·scale, its gradient with respect to δ or None, the
#: network's output there or None)``, called with gradients off (each path turns on what it
#: needs)
ValueAndGrad = Callable[
    [torch.Tensor, bool], tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]
]


def _by_autograd(
    objective: Callable[[torch.Tensor], torch.Tensor], x0: torch.Tensor, scale: torch.Tensor
) -> ValueAndGrad:
    def value_and_grad(delta: torch.Tensor, need_grad: bool) -> tuple[torch.Tensor, Any, None]:
        if not need_grad:
            return objective(x0 + delta * scale).detach(), None, None
        d = delta.detach().requires_grad_(True)
        with torch.enable_grad():
            val = objective(x0 + d * scale)
            (grad,) = torch.autograd.grad(val.sum(), d)
        return val.detach(), grad, None

    return value_and_grad


def _by_hand(objective: OutputObjective, x0: torch.Tensor, scale: torch.Tensor) -> ValueAndGrad:
    # the same chain rule as autograd's through ``x0 + δ·scale``: ∂/∂δ = scale · ∂/∂x
    def value_and_grad(delta: torch.Tensor, need_grad: bool) -> tuple[torch.Tensor, Any, Any]:
        val, grad_x, out = objective.value_grad_output(x0 + delta * scale, need_grad)
        return val, None if grad_x is None else grad_x * scale, out

    return value_and_grad


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
    return max_divergence_measured(policy, x, scale, threat, steps, generator, ref)[0]


def max_divergence_measured(
    policy: Policy,
    x: torch.Tensor,
    scale: torch.Tensor,
    threat: ThreatModel,
    steps: int,
    generator: torch.Generator | None = None,
    ref: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """:func:`max_divergence_point` (the same point), with the policy's output at ``x`` it
    measured from and its output at the returned point (None where the network is not one
    :mod:`compressor.core.mlp_grad` evaluates by hand): both come from the ascent itself."""
    if policy.spec.head == "q_greedy":  # MAD's margin, not a divergence (attack_objective)
        if ref is None:
            with torch.no_grad():
                ref = policy(x)
        clean = ref
        objective = policy_objective(policy, lambda out: policy.attack_objective(clean, out), x)
    else:  # attack_objective is the divergence: its gradient by hand where it is recognised
        objective, clean = divergence_objective_and_ref(policy, ref, x)
    adv, out = pgd_with_output(
        objective,
        x,
        scale,
        threat.eps,
        norm=threat.norm,
        steps=steps,
        random_start=True,
        generator=generator,
    )
    return adv, clean, out
