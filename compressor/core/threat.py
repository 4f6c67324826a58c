"""The threat model (SA-MDP observation perturbations) and ε-ball geometry shared by every stage.

The adversary replaces the observation ``s`` by ``ŝ`` with ``‖(ŝ - s) / scale‖_p ≤ ε``. With
``space="normalized"`` (the literature's convention) ``scale`` is the policy's normalisation
``sqrt(var + eps)``, so ε is measured in normalised observation units; with ``space="raw"``,
``scale = 1``. Perturbations are applied to the raw observation, so the policy's own clip still
applies (it is 1-Lipschitz, which keeps every certificate valid).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from compressor.core.errors import CompressorError
from compressor.policy.model import Policy

NORMS = ("inf", "2")
SPACES = ("normalized", "raw")


@dataclass(frozen=True)
class ThreatModel:
    """:param eps: ball radius. :param norm: ``"inf"`` or ``"2"``. :param space: ε's units."""

    eps: float
    norm: str = "inf"
    space: str = "normalized"

    def __post_init__(self) -> None:
        if not (self.eps > 0) or self.eps != self.eps:
            raise CompressorError(f"ε must be positive, got {self.eps}")
        if self.eps > 10:
            raise CompressorError(
                f"ε = {self.eps} is absurd for observation attacks (expected ≤ 10)"
            )
        if self.norm not in NORMS:
            raise CompressorError(f"norm must be one of {NORMS}, got {self.norm!r}")
        if self.space not in SPACES:
            raise CompressorError(f"space must be one of {SPACES}, got {self.space!r}")

    def scale(self, policy: Policy) -> torch.Tensor:
        """Raw-observation size of one ε unit, per dimension."""
        if self.space == "raw":
            return torch.ones(policy.spec.obs_dim)
        return policy.obs_scale().detach()


def project(delta: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    """Project each row of ``delta`` (in ε units) onto the ε-ball of the given norm."""
    if norm == "inf":
        return delta.clamp(-eps, eps)
    n = delta.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return delta * torch.clamp(eps / n, max=1.0)


def sample_ball(
    shape: tuple[int, ...], eps: float, norm: str, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Uniform samples from the ε-ball (rows of the last dimension)."""
    if norm == "inf":
        return (torch.rand(shape, generator=generator) * 2 - 1) * eps
    d = shape[-1]
    g = torch.randn(shape, generator=generator)
    g = g / g.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    r = torch.rand((*shape[:-1], 1), generator=generator) ** (1.0 / d)
    return g * r * eps


def ball_norm(delta: torch.Tensor, norm: str) -> torch.Tensor:
    """Per-row norm of ``delta`` (in ε units)."""
    return delta.abs().amax(-1) if norm == "inf" else delta.norm(dim=-1)
