"""load_policy on every supported format, the shared SB3 policies, hostile and corrupt files."""

from __future__ import annotations

import base64
import builtins
import dataclasses
import io
import json
import pickle
import shutil
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from compressor.core.errors import CompressorError
from compressor.policy.importers.common import resolve_env_id
from compressor.policy.loading import LoadedPolicy, describe, load_policy, save_loaded
from compressor.policy.native import policy_to_dict
from compressor.policy.value import ValueNet
from compressor.rl.rollout import rollout
from conftest import make_policy


class _WriteFile:
    """Unpickling this calls ``exec`` with code that creates ``path``."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (builtins.exec, (f"open({str(self.path)!r}, 'w').write('pwned')",))


# ---- synthetic SB3 zips (built here so the tests need neither SB3 nor ../shared) ---------------
def _pickled_global(module: str, name: str) -> dict[str, str]:
    blob = b"\x80\x02c" + f"{module}\n{name}\n".encode() + b"."
    return {":type:": "<class 'abc.ABCMeta'>", ":serialized:": base64.b64encode(blob).decode()}


def _sb3_data(obs_dim: int = 4, n_actions: int = 2) -> dict[str, Any]:
    return {
        "policy_class": _pickled_global("stable_baselines3.common.policies", "ActorCriticPolicy"),
        "policy_kwargs": {},
        "observation_space": {
            ":type:": "<class 'gymnasium.spaces.box.Box'>",
            "shape": f"[{obs_dim}]",
            "dtype": "float32",
        },
        "action_space": {":type:": "<class 'gymnasium.spaces.discrete.Discrete'>", "n": "2"},
        "clip_range": {":type:": "<class 'function'>", ":serialized:": ""},
        "use_sde": False,
    }


def _sb3_state(obs_dim: int = 4, n_actions: int = 2, hidden: int = 8) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    state = {}
    for net in ("policy_net", "value_net"):
        state[f"mlp_extractor.{net}.0.weight"] = torch.randn(hidden, obs_dim, generator=g)
        state[f"mlp_extractor.{net}.0.bias"] = torch.randn(hidden, generator=g)
        state[f"mlp_extractor.{net}.2.weight"] = torch.randn(hidden, hidden, generator=g)
        state[f"mlp_extractor.{net}.2.bias"] = torch.randn(hidden, generator=g)
    state["action_net.weight"] = torch.randn(n_actions, hidden, generator=g)
    state["action_net.bias"] = torch.randn(n_actions, generator=g)
    state["value_net.weight"] = torch.randn(1, hidden, generator=g)
    state["value_net.bias"] = torch.randn(1, generator=g)
    return state


def _torch_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _write_sb3_zip(
    path: Path,
    data: dict[str, Any] | None = None,
    state: dict[str, Any] | None = None,
    policy_bytes: bytes | None = None,
) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("data", json.dumps(data if data is not None else _sb3_data()))
        zf.writestr("policy.pth", policy_bytes or _torch_bytes(state or _sb3_state()))
        zf.writestr("_stable_baselines3_version", "2.3.0")
    return path


def test_synthetic_sb3_zip_matches_manual_forward(tmp_path: Path) -> None:
    state = _sb3_state()
    path = _write_sb3_zip(tmp_path / "sb3-ppo-CartPole-v1" / "model.zip", state=state)
    loaded = load_policy(path)
    spec = loaded.policy.spec
    assert (loaded.format, spec.head, spec.hidden, spec.env_id) == (
        "sb3-zip",
        "categorical",
        [8, 8],
        "CartPole-v1",
    )
    assert spec.activation == "tanh"  # SB3's default when policy_kwargs does not set one
    obs = torch.randn(5, 4)
    h = torch.tanh(
        obs @ state["mlp_extractor.policy_net.0.weight"].T
        + state["mlp_extractor.policy_net.0.bias"]
    )
    h = torch.tanh(
        h @ state["mlp_extractor.policy_net.2.weight"].T + state["mlp_extractor.policy_net.2.bias"]
    )
    logits = h @ state["action_net.weight"].T + state["action_net.bias"]
    torch.testing.assert_close(loaded.policy(obs), logits)
    v = torch.tanh(
        obs @ state["mlp_extractor.value_net.0.weight"].T + state["mlp_extractor.value_net.0.bias"]
    )
    v = torch.tanh(
        v @ state["mlp_extractor.value_net.2.weight"].T + state["mlp_extractor.value_net.2.bias"]
    )
    assert loaded.critic is not None
    torch.testing.assert_close(
        loaded.critic(obs), (v @ state["value_net.weight"].T + state["value_net.bias"])[:, 0]
    )
    # no config.yml and no vecnormalize.pkl: the user is told how to pass statistics
    assert any("--vecnormalize" in w for w in loaded.warnings)


# ---- the real shared policies ------------------------------------------------------------------
def test_shared_hopper(shared_policies: Path) -> None:
    loaded = load_policy(shared_policies / "sb3-ppo-Hopper-v3" / "model.zip")
    spec = loaded.policy.spec
    assert spec.head == "gaussian" and spec.hidden == [256, 256] and spec.activation == "relu"
    assert spec.obs_norm and spec.obs_clip == 10.0 and (spec.obs_dim, spec.act_dim) == (11, 3)
    assert spec.action_low == [-1.0] * 3 and spec.action_high == [1.0] * 3
    assert spec.env_id == "Hopper-v5" and spec.source["trained_env_id"] == "Hopper-v3"
    assert any("Hopper-v3" in w and "Hopper-v5" in w for w in loaded.warnings)
    assert spec.source["obs_stats"]["file"] == "vecnormalize.pkl"
    assert spec.source["sb3_version"] == "1.3.1a2" and spec.source["algo"] == "PPO"
    assert loaded.critic is not None and loaded.critic.hidden == [256, 256]
    assert float(loaded.policy.obs_var.min()) > 0
    res = rollout(loaded.policy, spec.env_id, spec.env_kwargs, [0, 1], num_envs=2)
    assert res.returns.mean() > 1500  # background.md: 2440.7 mean over seeds 0-4


def test_shared_cartpole(shared_policies: Path) -> None:
    loaded = load_policy(shared_policies / "sb3-ppo-CartPole-v1" / "model.zip")
    spec = loaded.policy.spec
    assert spec.head == "categorical" and not spec.obs_norm and spec.obs_clip is None
    assert (spec.obs_dim, spec.act_dim, spec.env_id) == (4, 2, "CartPole-v1")
    assert loaded.warnings == []
    res = rollout(loaded.policy, "CartPole-v1", {}, [0, 1, 2], num_envs=3)
    assert res.returns.tolist() == [500.0, 500.0, 500.0]


def test_zoo_layout_and_missing_stats(shared_policies: Path, tmp_path: Path) -> None:
    src = shared_policies / "sb3-ppo-Hopper-v3"
    run = tmp_path / "logs" / "ppo" / "Hopper-v3_1"
    (run / "Hopper-v3").mkdir(parents=True)
    shutil.copy(src / "model.zip", run / "Hopper-v3.zip")
    shutil.copy(src / "config.yml", run / "Hopper-v3" / "config.yml")
    missing = load_policy(run / "Hopper-v3.zip")
    assert not missing.policy.spec.obs_norm
    assert any(w.startswith("NO OBSERVATION NORMALISATION") for w in missing.warnings)
    shutil.copy(src / "vecnormalize.pkl", run / "Hopper-v3" / "vecnormalize.pkl")
    found = load_policy(run / "Hopper-v3.zip")
    assert found.policy.spec.obs_norm and found.policy.spec.obs_clip == 10.0
    explicit = load_policy(
        run / "Hopper-v3.zip", env_id="Hopper-v4", vecnormalize=src / "vecnormalize.pkl"
    )
    assert explicit.policy.spec.env_id == "Hopper-v4" and explicit.policy.spec.obs_norm


def test_env_version_mapping() -> None:
    env_id, note = resolve_env_id("Hopper-v3", obs_dim=11)
    assert env_id == "Hopper-v5" and note is not None
    assert resolve_env_id("CartPole-v1") == ("CartPole-v1", None)
    with pytest.raises(CompressorError, match="--env"):
        resolve_env_id("NoSuchEnv-v0")


def test_sb3_to_native_round_trip(shared_policies: Path, tmp_path: Path) -> None:
    loaded = load_policy(shared_policies / "sb3-ppo-Hopper-v3" / "model.zip")
    save_loaded(loaded, tmp_path / "hopper.pt")
    again = load_policy(tmp_path / "hopper.pt")
    assert again.format == "native" and again.policy.spec == loaded.policy.spec
    obs = torch.randn(7, 11)
    torch.testing.assert_close(again.policy(obs), loaded.policy(obs))
    assert again.critic is not None and loaded.critic is not None
    z = loaded.policy.normalize(obs)
    torch.testing.assert_close(again.critic(z), loaded.critic(z))


# ---- hostile files -----------------------------------------------------------------------------
def test_payload_in_sb3_data_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "pwned"
    data = _sb3_data()
    blob = pickle.dumps(_WriteFile(target), protocol=4)
    data["policy_kwargs"] = {
        ":type:": "<class 'dict'>",
        ":serialized:": base64.b64encode(blob).decode(),
    }
    path = _write_sb3_zip(tmp_path / "sb3-ppo-CartPole-v1" / "model.zip", data=data)
    with pytest.raises(CompressorError, match=r"builtins\.exec"):
        load_policy(path)
    assert not target.exists()


def test_payload_in_sb3_policy_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "pwned"
    evil = _torch_bytes({"action_net.weight": _WriteFile(target)})
    path = _write_sb3_zip(tmp_path / "sb3-ppo-CartPole-v1" / "model.zip", policy_bytes=evil)
    with pytest.raises(CompressorError, match=r"refused to load builtins\.exec"):
        load_policy(path)
    assert not target.exists()


def test_payload_in_native_file_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "pwned"
    path = tmp_path / "policy.pt"
    path.write_bytes(_torch_bytes({"format": "x", "spec": _WriteFile(target)}))
    with pytest.raises(CompressorError, match="refused"):
        load_policy(path)
    assert not target.exists()


# ---- corrupt and unsupported inputs --------------------------------------------------------------
def test_corrupt_inputs(tmp_path: Path) -> None:
    good = _write_sb3_zip(tmp_path / "good" / "model.zip")
    cases = {
        "truncated.zip": good.read_bytes()[: good.stat().st_size // 2],
        "random.pt": np.random.default_rng(0).bytes(4096),
        "empty.pt": b"",
        "pickle_noise.pt": b"\x80" + np.random.default_rng(1).bytes(300),
    }
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(CompressorError) as info:
            load_policy(tmp_path / name, env_id="CartPole-v1")
        assert "\n" not in str(info.value), name
    with pytest.raises(CompressorError, match="not found"):
        load_policy(tmp_path / "missing.zip")


def test_zip_without_policy(tmp_path: Path) -> None:
    no_policy = tmp_path / "a.zip"
    with zipfile.ZipFile(no_policy, "w") as zf:
        zf.writestr("data", json.dumps(_sb3_data()))
    with pytest.raises(CompressorError, match="no policy.pth"):
        load_policy(no_policy, env_id="CartPole-v1")
    other = tmp_path / "b.zip"
    with zipfile.ZipFile(other, "w") as zf:
        zf.writestr("readme.txt", "hello")
    with pytest.raises(CompressorError, match="not a policy"):
        load_policy(other)


def test_nan_weights(tmp_path: Path) -> None:
    state = _sb3_state()
    state["mlp_extractor.policy_net.2.weight"][0, 0] = float("nan")
    with pytest.raises(CompressorError, match="NaN"):
        load_policy(_write_sb3_zip(tmp_path / "x" / "model.zip", state=state), env_id="CartPole-v1")
    policy = make_policy(head="categorical", obs_dim=4, env_id="CartPole-v1")
    payload = policy_to_dict(policy)
    payload["state_dict"]["layers.0.bias"][0] = float("inf")
    torch.save(payload, tmp_path / "nan.pt")
    with pytest.raises(CompressorError, match="NaN or inf"):
        load_policy(tmp_path / "nan.pt")


def test_unsupported_architectures(tmp_path: Path) -> None:
    shared = _sb3_state()
    shared["mlp_extractor.shared_net.0.weight"] = torch.zeros(8, 4)
    shared["mlp_extractor.shared_net.0.bias"] = torch.zeros(8)
    with pytest.raises(CompressorError, match="shared"):
        load_policy(_write_sb3_zip(tmp_path / "a" / "m.zip", state=shared), env_id="CartPole-v1")
    data = _sb3_data()
    data["policy_class"] = _pickled_global(
        "sb3_contrib.common.recurrent.policies", "RecurrentActorCriticPolicy"
    )
    with pytest.raises(CompressorError, match="recurrent"):
        load_policy(_write_sb3_zip(tmp_path / "b" / "m.zip", data=data), env_id="CartPole-v1")
    torch.save({"network.0.weight": torch.zeros(2, 2)}, tmp_path / "cnn.pt")
    with pytest.raises(CompressorError, match="unknown architecture"):
        load_policy(tmp_path / "cnn.pt")


def test_obs_size_mismatch(tmp_path: Path) -> None:
    policy = make_policy(head="categorical", obs_dim=5, act_dim=2, env_id="CartPole-v1")
    torch.save(policy_to_dict(policy), tmp_path / "p.pt")
    with pytest.raises(CompressorError, match="expects 5 observations"):
        load_policy(tmp_path / "p.pt")


# ---- native and plain forms ----------------------------------------------------------------------
def test_native_round_trip_with_critic(tmp_path: Path) -> None:
    policy = make_policy(head="gaussian", obs_dim=11, act_dim=3, env_id="Hopper-v5")
    critic = ValueNet(11, [16, 16], "tanh")
    loaded = LoadedPolicy(policy, critic, [], tmp_path / "x", "native")
    save_loaded(loaded, tmp_path / "p.pt")
    again = load_policy(tmp_path / "p.pt")
    assert again.format == "native" and again.warnings == []
    assert again.policy.spec.source["sha256"] == again.sha256
    obs = torch.randn(4, 11)
    torch.testing.assert_close(again.policy(obs), policy(obs))
    assert again.critic is not None
    torch.testing.assert_close(again.critic(obs), critic(obs))
    info = describe(again)
    assert info["critic"] == {"hidden": [16, 16], "activation": "tanh"}
    assert info["normalisation"]["stats_source"] == "stored in the policy file"
    assert info["layer_sizes"] == [11, 16, 16, 3] and info["sparsity"] == 0.0
    json.dumps(info, allow_nan=False)


def test_plain_state_dict_with_spec(tmp_path: Path) -> None:
    policy = make_policy(head="categorical", obs_dim=4, act_dim=2, obs_norm=False)
    state = {k: v for k, v in policy.state_dict().items() if k.startswith("layers.")}
    spec = dataclasses.asdict(policy.spec)
    torch.save({"spec": spec, "state_dict": state}, tmp_path / "plain.pt")
    loaded = load_policy(tmp_path / "plain.pt", env_id="CartPole-v1")
    assert loaded.format == "state-dict+spec" and loaded.policy.spec.env_id == "CartPole-v1"
    obs = torch.randn(3, 4)
    torch.testing.assert_close(loaded.policy(obs), policy(obs))
    del state["layers.1.weight"]
    torch.save({"spec": spec, "state_dict": state}, tmp_path / "bad.pt")
    with pytest.raises(CompressorError, match="layers.1.weight"):
        load_policy(tmp_path / "bad.pt", env_id="CartPole-v1")


# ---- CleanRL -------------------------------------------------------------------------------------
class _CleanRLContinuous(nn.Module):
    """The key layout of CleanRL's ppo_continuous_action.py Agent (narrow, for speed)."""

    def __init__(self, obs_dim: int, act_dim: int, width: int = 8) -> None:
        super().__init__()

        def mlp(out: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Linear(obs_dim, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(),
                nn.Linear(width, out),
            )  # fmt: skip

        self.critic = mlp(1)
        self.actor_mean = mlp(act_dim)
        self.actor_logstd = nn.Parameter(torch.full((1, act_dim), -0.5))


def test_cleanrl_continuous(tmp_path: Path) -> None:
    agent = _CleanRLContinuous(11, 3)
    run = tmp_path / "runs" / "Hopper-v5__ppo_continuous_action__1__1700000000"
    run.mkdir(parents=True)
    torch.save(agent.state_dict(), run / "ppo_continuous_action.cleanrl_model")
    loaded = load_policy(run / "ppo_continuous_action.cleanrl_model")
    spec = loaded.policy.spec
    assert loaded.format == "cleanrl" and spec.env_id == "Hopper-v5" and spec.head == "gaussian"
    assert spec.hidden == [8, 8] and not spec.obs_norm
    assert spec.action_low == [-1.0] * 3
    assert any(w.startswith("NO OBSERVATION NORMALISATION") for w in loaded.warnings)
    obs = torch.randn(6, 11)
    with torch.no_grad():
        torch.testing.assert_close(loaded.policy(obs), agent.actor_mean(obs))
        torch.testing.assert_close(loaded.policy.log_std, agent.actor_logstd[0])
        assert loaded.critic is not None
        torch.testing.assert_close(loaded.critic(obs), agent.critic(obs)[:, 0])
    stats = tmp_path / "stats.npz"
    np.savez(stats, mean=np.full(11, 0.5), var=np.full(11, 4.0))
    normed = load_policy(run / "ppo_continuous_action.cleanrl_model", vecnormalize=stats)
    assert normed.policy.spec.obs_norm and normed.policy.spec.obs_clip == 10.0
    assert not any(w.startswith("NO OBSERVATION") for w in normed.warnings)
    with torch.no_grad():
        z = ((obs - 0.5) / np.sqrt(4.0 + 1e-8)).clamp(-10, 10)
        torch.testing.assert_close(normed.policy(obs), agent.actor_mean(z))


def test_cleanrl_discrete_needs_env(tmp_path: Path) -> None:
    actor = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    critic = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    state = {f"actor.{k}": v for k, v in actor.state_dict().items()}
    state.update({f"critic.{k}": v for k, v in critic.state_dict().items()})
    torch.save(state, tmp_path / "ppo.cleanrl_model")
    with pytest.raises(CompressorError, match="--env"):
        load_policy(tmp_path / "ppo.cleanrl_model")
    loaded = load_policy(tmp_path / "ppo.cleanrl_model", env_id="CartPole-v1")
    assert loaded.policy.spec.head == "categorical" and loaded.policy.spec.act_dim == 2
    with pytest.raises(CompressorError, match="expects 4 observations"):
        load_policy(tmp_path / "ppo.cleanrl_model", env_id="Pendulum-v1")


def test_critic_written_by_trainer_loads(tmp_path: Path) -> None:
    from compressor.rl.ppo import PPOConfig, _mlp, save_trained

    policy = make_policy(head="categorical", obs_dim=4, env_id="CartPole-v1")
    critic = _mlp([4, 16, 16, 1], nn.Tanh, 1.0)
    save_trained(policy, critic, PPOConfig(env_id="CartPole-v1"), {}, tmp_path / "t.pt")
    loaded = load_policy(tmp_path / "t.pt")
    assert loaded.policy.spec.source["format"] == "compressor-ppo"
    z = torch.randn(5, 4)
    assert loaded.critic is not None
    with torch.no_grad():
        torch.testing.assert_close(loaded.critic(z), critic(z)[:, 0])
