"""CleanRL agents as its scripts define and save them (CleanRL is a set of scripts, not a
package: the networks below are those of ``dqn.py``, ``td3_continuous_action.py``,
``ddpg_continuous_action.py`` and ``sac_continuous_action.py``, trained for a few steps here)."""

from __future__ import annotations

from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from compressor.core.errors import CompressorError
from compressor.deploy.export import export_onnx, load_onnx_session, onnx_act
from compressor.policy.loading import load_policy

PENDULUM = gym.make("Pendulum-v1")


class QNetwork(nn.Module):  # cleanrl/dqn.py
    def __init__(self, obs_dim: int, n: int) -> None:
        super().__init__()
        self.network = nn.Sequential(
            nn.Linear(obs_dim, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, n)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.network(x)


class _Scaled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        space = PENDULUM.action_space
        scale, bias = (space.high - space.low) / 2.0, (space.high + space.low) / 2.0
        self.register_buffer("action_scale", torch.tensor(scale, dtype=torch.float32))
        self.register_buffer("action_bias", torch.tensor(bias, dtype=torch.float32))


class TD3Actor(_Scaled):  # cleanrl/td3_continuous_action.py (and ddpg_continuous_action.py)
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc_mu = nn.Linear(3, 16), nn.Linear(16, 16), nn.Linear(16, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.fc2(F.relu(self.fc1(x))))
        return torch.tanh(self.fc_mu(x)) * self.action_scale + self.action_bias


class SACActor(_Scaled):  # cleanrl/sac_continuous_action.py
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(3, 16), nn.Linear(16, 16)
        self.fc_mean, self.fc_logstd = nn.Linear(16, 1), nn.Linear(16, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = F.relu(self.fc2(F.relu(self.fc1(x))))
        log_std = torch.tanh(self.fc_logstd(x))
        return self.fc_mean(x), -5 + 0.5 * (2 - (-5)) * (log_std + 1)

    def deterministic(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self(x)[0]) * self.action_scale + self.action_bias


class SoftQ(nn.Module):  # the critics of both scripts
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(4, 16), nn.Linear(16, 16), nn.Linear(16, 1)

    def forward(self, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        x = torch.cat([x, a], 1)
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


def _fit(module: nn.Module, loss_of: object, steps: int = 50) -> None:
    """A few optimiser steps so the weights are not their initialisation."""
    opt = torch.optim.Adam(module.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        x = torch.randn(32, 3, generator=g) * torch.tensor([1.0, 1.0, 8.0])
        loss = loss_of(x)  # type: ignore[operator]
        opt.zero_grad()
        loss.backward()
        opt.step()


def _obs(dim: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randn(64, dim, generator=g) * 3


def _run_folder(tmp_path: Path, env_id: str, exp: str) -> Path:
    folder = tmp_path / "runs" / f"{env_id}__{exp}__1__1700000000"
    folder.mkdir(parents=True)
    return folder


def _onnx_matches(loaded: object, ref: np.ndarray, obs: torch.Tensor, tmp_path: Path) -> None:
    export_onnx(loaded.policy.eval(), tmp_path / "p.onnx")  # type: ignore[attr-defined]
    got = onnx_act(load_onnx_session(tmp_path / "p.onnx"), obs.numpy())
    if ref.dtype.kind in "iu":
        np.testing.assert_array_equal(got, ref)
    else:
        np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5)


def test_dqn(tmp_path: Path) -> None:
    q = QNetwork(4, 2)
    _fit(q, lambda x: (q(torch.cat([x, x[:, :1]], 1)) - 1).pow(2).mean())
    folder = _run_folder(tmp_path, "CartPole-v1", "dqn")
    torch.save(q.state_dict(), folder / "dqn.cleanrl_model")  # dqn.py's save
    loaded = load_policy(folder / "dqn.cleanrl_model")
    spec = loaded.policy.spec
    assert (spec.head, spec.activation, spec.env_id, spec.hidden) == (
        "q_greedy", "relu", "CartPole-v1", [120, 84])  # fmt: skip
    obs = _obs(4)
    with torch.no_grad():
        ref = q(obs).argmax(1).numpy()
        np.testing.assert_array_equal(loaded.policy.act(obs).numpy(), ref)
    _onnx_matches(loaded, ref, obs, tmp_path)


@pytest.mark.parametrize("critics", [2, 1])  # TD3 saves (actor, qf1, qf2), DDPG (actor, qf1)
def test_td3_and_ddpg(tmp_path: Path, critics: int) -> None:
    actor, qfs = TD3Actor(), [SoftQ() for _ in range(critics)]
    _fit(actor, lambda x: (actor(x) - torch.sin(x[:, :1])).pow(2).mean())
    folder = _run_folder(tmp_path, "Pendulum-v1", "td3_continuous_action")
    model = folder / "td3_continuous_action.cleanrl_model"
    torch.save((actor.state_dict(), *[q.state_dict() for q in qfs]), model)
    loaded = load_policy(model)
    spec = loaded.policy.spec
    assert (spec.head, spec.squash) == ("deterministic", True)
    assert loaded.policy.action_map == "tanh_rescale"
    assert (spec.action_low, spec.action_high) == ([-2.0], [2.0])
    obs = _obs()
    with torch.no_grad():
        ref = actor(obs)
        torch.testing.assert_close(loaded.policy.act(obs), ref, rtol=0, atol=1e-6)
        a = torch.rand(64, 1) * 4 - 2  # CleanRL's critics see raw actions
        assert len(loaded.q_nets) == critics
        for qn, q in zip(loaded.q_nets, qfs):
            torch.testing.assert_close(qn(obs, a), q(obs, a)[:, 0], rtol=1e-5, atol=1e-5)
    _onnx_matches(loaded, ref.numpy(), obs, tmp_path)


def test_sac_actor(tmp_path: Path) -> None:
    actor = SACActor()
    _fit(actor, lambda x: (actor(x)[0] - x[:, :1]).pow(2).mean() + actor(x)[1].pow(2).mean())
    folder = _run_folder(tmp_path, "Pendulum-v1", "sac_continuous_action")
    torch.save(actor.state_dict(), folder / "actor.pt")  # the script saves nothing itself
    loaded = load_policy(folder / "actor.pt")
    policy = loaded.policy
    assert (policy.spec.head, policy.std_kind) == ("squashed_gaussian", "state")
    obs = _obs()
    with torch.no_grad():
        ref = actor.deterministic(obs)
        torch.testing.assert_close(policy.act(obs), ref, rtol=0, atol=1e-6)
        mean, log_std = policy.distribution_params(obs)
        ref_mean, ref_log_std = actor(obs)
        torch.testing.assert_close(mean, ref_mean)
        torch.testing.assert_close(log_std, ref_log_std, rtol=1e-6, atol=1e-6)
        samples = policy.sample(obs, torch.Generator().manual_seed(0))
        assert bool((samples.abs() <= 2.0).all()) and bool((samples != ref).any())
    _onnx_matches(loaded, ref.numpy(), obs, tmp_path)


def test_cleanrl_needs_an_env_outside_its_run_folder(tmp_path: Path) -> None:
    torch.save((TD3Actor().state_dict(), SoftQ().state_dict()), tmp_path / "m.cleanrl_model")
    with pytest.raises(CompressorError, match="pass --env") as info:
        load_policy(tmp_path / "m.cleanrl_model")
    assert "\n" not in str(info.value)
    assert load_policy(tmp_path / "m.cleanrl_model", env_id="Pendulum-v1").policy.spec.squash
    odd = TD3Actor().state_dict()
    odd["fc_extra.weight"] = torch.zeros(1, 1)
    torch.save((odd,), tmp_path / "odd.pt")
    with pytest.raises(CompressorError, match="unknown CleanRL actor weights"):
        load_policy(tmp_path / "odd.pt", env_id="Pendulum-v1")
