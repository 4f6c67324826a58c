"""Shared test helpers: tiny random policies of every head, and the shared-folder locator."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from compressor.policy.model import Policy, PolicySpec

# tiny networks: extra threads only oversubscribe the 2 cores CI has
torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
SHARED_POLICIES = SHARED / "policies"


def make_policy(
    head: str = "gaussian",
    hidden: tuple[int, ...] = (16, 16),
    activation: str = "tanh",
    obs_dim: int = 4,
    act_dim: int = 2,
    obs_norm: bool = True,
    seed: int = 0,
    env_id: str = "",
) -> Policy:
    """A small policy with random weights and random (but valid) normalisation stats."""
    g = torch.Generator().manual_seed(seed)
    spec = PolicySpec(
        obs_dim=obs_dim,
        act_dim=act_dim,
        hidden=list(hidden),
        activation=activation,
        head=head,
        obs_norm=obs_norm,
        obs_clip=10.0 if obs_norm else None,
        action_low=None if head == "categorical" else [-1.0] * act_dim,
        action_high=None if head == "categorical" else [1.0] * act_dim,
        env_id=env_id,
    )
    p = Policy(spec)
    with torch.no_grad():
        for layer in p.layers:
            layer.weight.copy_(
                torch.randn(layer.weight.shape, generator=g) / layer.in_features**0.5
            )
            layer.bias.copy_(torch.randn(layer.bias.shape, generator=g) * 0.1)
        p.obs_mean.copy_(torch.randn(obs_dim, generator=g))
        p.obs_var.copy_(torch.rand(obs_dim, generator=g) * 4 + 0.1)
        if hasattr(p, "log_std"):
            p.log_std.copy_(torch.randn(act_dim, generator=g) * 0.3 - 0.5)
    return p


@pytest.fixture
def shared_policies() -> Path:
    """Path to ../shared/policies; skips the test when the shared folder is absent."""
    if not SHARED_POLICIES.is_dir():
        pytest.skip("../shared/policies is absent (real SB3 policies are only in the dev checkout)")
    return SHARED_POLICIES


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """``compress argv`` in this process: its exit code, stdout and stderr."""
    import sys

    from compressor.cli.app import main

    saved = sys.argv
    sys.argv = ["compress", *argv]
    try:
        with pytest.raises(SystemExit) as stop:
            main()
    finally:
        sys.argv = saved
    out, err = capsys.readouterr()
    return int(stop.value.code or 0), out, err
