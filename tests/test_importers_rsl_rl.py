"""rsl_rl checkpoints: a real ``rsl-rl-lib`` runner trains on Pendulum for two iterations and
saves ``model_<iter>.pt``; the import must act as the runner's inference policy, with the
empirical normaliser, and rsl_rl's own ONNX export must import to the same policy.

``rsl-rl-lib`` 2.x and 3.x cannot be installed beside 5.x: their checkpoints are rebuilt from the
5.x weights with the keys those versions write (``ActorCritic``'s ``actor.<i>``, ``critic.<i>``,
``std``/``log_std``, 3.x's ``actor_obs_normalizer.*``, 2.x's ``obs_norm_state_dict``), as their
``OnPolicyRunner.save`` does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import pytest
import torch

from compressor.core.errors import CompressorError
from compressor.policy.loading import load_policy

rsl_rl = pytest.importorskip("rsl_rl")
tensordict = pytest.importorskip("tensordict")


class _GymVecEnv:
    """rsl_rl's ``VecEnv`` interface over gymnasium Pendulum sub-envs (CPU tensors)."""

    def __init__(self, n: int = 2) -> None:
        self.envs = [gym.make("Pendulum-v1") for _ in range(n)]
        self.num_envs, self.num_actions = n, 1
        self.max_episode_length = 200
        self.episode_length_buf = torch.zeros(n, dtype=torch.long)
        self.device, self.cfg = "cpu", {}
        obs = [e.reset(seed=i)[0] for i, e in enumerate(self.envs)]
        self.obs = torch.tensor(np.stack(obs), dtype=torch.float32)

    def get_observations(self) -> Any:
        return tensordict.TensorDict({"policy": self.obs}, batch_size=[self.num_envs])

    def step(self, actions: torch.Tensor) -> tuple[Any, torch.Tensor, torch.Tensor, dict]:
        rows, rewards, dones = [], [], []
        for env, a in zip(self.envs, actions):
            o, r, term, trunc, _ = env.step(a.numpy())
            if term or trunc:
                o, _ = env.reset()
            rows.append(o)
            rewards.append(float(r))
            dones.append(term or trunc)
        self.obs = torch.tensor(np.stack(rows), dtype=torch.float32)
        return self.get_observations(), torch.tensor(rewards), torch.tensor(dones), {}


def _train(std_type: str, normalise: bool) -> Any:
    from rsl_rl.runners import OnPolicyRunner

    model = {"class_name": "MLPModel", "hidden_dims": [8, 8], "activation": "elu"}
    cfg = {
        "num_steps_per_env": 16,
        "save_interval": 1,
        "obs_groups": {"actor": ["policy"], "critic": ["policy"]},
        "multi_gpu": None,
        "algorithm": {"class_name": "PPO", "num_learning_epochs": 1, "num_mini_batches": 1},
        "actor": {
            **model,
            "obs_normalization": normalise,
            "distribution_cfg": {"class_name": "GaussianDistribution", "std_type": std_type},
        },
        "critic": {**model, "obs_normalization": normalise},
    }
    runner = OnPolicyRunner(_GymVecEnv(), cfg, log_dir=None, device="cpu")
    runner.learn(2)
    return runner


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Any]]:
    root = tmp_path_factory.mktemp("rsl")
    out = {}
    for name, std_type, normalise in (("log-norm", "log", True), ("scalar", "scalar", False)):
        runner = _train(std_type, normalise)
        path = root / name / "model_2.pt"
        path.parent.mkdir()
        runner.save(str(path))
        out[name] = (path, runner)
    return out


def _obs(n: int = 64) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 3, generator=g) * torch.tensor([1.0, 1.0, 8.0])


def _reference(runner: Any, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    td = tensordict.TensorDict({"policy": obs}, batch_size=[obs.shape[0]])
    with torch.no_grad():
        return runner.get_inference_policy()(td), runner.alg.critic(td).squeeze(-1)


@pytest.mark.parametrize("name", ["log-norm", "scalar"])
def test_checkpoint_acts_as_the_runner(runs: dict[str, tuple[Path, Any]], name: str) -> None:
    path, runner = runs[name]
    loaded = load_policy(path, env_id="Pendulum-v1")
    spec = loaded.policy.spec
    assert (loaded.format, spec.head, spec.activation) == ("rsl_rl", "gaussian", "elu")
    assert spec.obs_norm == (name == "log-norm") and spec.source["rsl_rl_layout"] == "5.x"
    obs = _obs()
    mean, value = _reference(runner, obs)
    with torch.no_grad():
        torch.testing.assert_close(loaded.policy(obs), mean, rtol=0, atol=1e-6)
        torch.testing.assert_close(loaded.policy.act(obs), mean.clamp(-2.0, 2.0), rtol=0, atol=1e-6)
        assert loaded.critic is not None  # folded onto the actor's normalised input
        z = loaded.policy.normalize(obs)
        torch.testing.assert_close(loaded.critic(z), value, rtol=1e-5, atol=1e-5)
    std = runner.alg.get_policy().distribution
    expected = std.log_std_param if name == "log-norm" else torch.log(std.std_param)
    torch.testing.assert_close(loaded.policy.log_std.detach(), expected.detach())


def test_rsl_rl_onnx_export_imports(runs: dict[str, tuple[Path, Any]], tmp_path: Path) -> None:
    path, runner = runs["log-norm"]
    runner.export_policy_to_onnx(str(tmp_path), "policy.onnx")
    loaded = load_policy(tmp_path / "policy.onnx", env_id="Pendulum-v1")
    assert loaded.format == "onnx" and loaded.policy.spec.obs_norm
    obs = _obs()
    mean, _ = _reference(runner, obs)
    with torch.no_grad():  # the graph outputs the unbounded mean: so does the import
        torch.testing.assert_close(loaded.policy.act(obs), mean, rtol=0, atol=1e-6)


def _old_layouts(path: Path) -> dict[str, dict[str, Any]]:
    """The 5.x checkpoint as rsl-rl-lib 2.x and 3.x/4.x save the same networks."""
    ck = torch.load(path, weights_only=True)
    actor, critic = ck["actor_state_dict"], ck["critic_state_dict"]
    model: dict[str, torch.Tensor] = {"log_std": actor["distribution.log_std_param"]}
    for net, sd in (("actor", actor), ("critic", critic)):
        model.update({f"{net}.{k[4:]}": v for k, v in sd.items() if k.startswith("mlp.")})
    norm = {k[len("obs_normalizer.") :]: v for k, v in actor.items() if "obs_normalizer." in k}
    cnorm = {k[len("obs_normalizer.") :]: v for k, v in critic.items() if "obs_normalizer." in k}
    v3 = dict(model)
    v3.update({f"actor_obs_normalizer.{k}": v for k, v in norm.items()})
    v3.update({f"critic_obs_normalizer.{k}": v for k, v in cnorm.items()})
    rest = {"optimizer_state_dict": {}, "iter": 2, "infos": None}
    return {
        "2.x": {"model_state_dict": model, "obs_norm_state_dict": norm,
                "privileged_obs_norm_state_dict": cnorm, **rest},
        "3.x": {"model_state_dict": v3, **rest},
    }  # fmt: skip


def test_older_layouts(runs: dict[str, tuple[Path, Any]], tmp_path: Path) -> None:
    path, runner = runs["log-norm"]
    obs = _obs()
    mean, value = _reference(runner, obs)
    for version, ck in _old_layouts(path).items():
        f = tmp_path / version / "model_2.pt"
        f.parent.mkdir()
        torch.save(ck, f)
        loaded = load_policy(f, env_id="Pendulum-v1")
        assert loaded.policy.spec.obs_norm and loaded.critic is not None, version
        with torch.no_grad():
            torch.testing.assert_close(loaded.policy(obs), mean, rtol=0, atol=1e-6)
            z = loaded.policy.normalize(obs)
            torch.testing.assert_close(loaded.critic(z), value, rtol=1e-5, atol=1e-5)


def test_agent_yaml_activation_and_refusals(
    runs: dict[str, tuple[Path, Any]], tmp_path: Path
) -> None:
    path, _ = runs["scalar"]
    with pytest.raises(CompressorError, match="pass --env") as info:
        load_policy(path)
    assert "\n" not in str(info.value)
    ck = torch.load(path, weights_only=True)
    run = tmp_path / "run"
    (run / "params").mkdir(parents=True)
    torch.save(ck, run / "model_2.pt")
    agent_yaml = run / "params" / "agent.yaml"  # Isaac Lab writes the run's config there
    agent_yaml.write_text("actor:\n  activation: tanh\n  hidden_dims: [8, 8]\n")
    loaded = load_policy(run / "model_2.pt", env_id="Pendulum-v1")
    assert loaded.policy.spec.activation == "tanh"
    assert loaded.policy.spec.source["activation_source"].endswith("agent.yaml")
    agent_yaml.write_text("actor:\n  activation: selu\n")
    with pytest.raises(CompressorError, match="activation 'selu' is not supported"):
        load_policy(run / "model_2.pt", env_id="Pendulum-v1")
    wide = dict(ck)  # a state-dependent std: the last layer outputs mean and std
    wide["actor_state_dict"] = dict(ck["actor_state_dict"])
    last = wide["actor_state_dict"]
    last["mlp.4.weight"] = torch.cat([last["mlp.4.weight"]] * 2)
    last["mlp.4.bias"] = torch.cat([last["mlp.4.bias"]] * 2)
    torch.save(wide, tmp_path / "wide.pt")
    with pytest.raises(CompressorError, match="state-dependent std"):
        load_policy(tmp_path / "wide.pt", env_id="Pendulum-v1")


def test_env_from_a_module_factory(
    runs: dict[str, tuple[Path, Any]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--env module:factory``: the user names a function that builds the env (Isaac Lab and
    mjlab register theirs on import: ``module:EnvId`` works the same way)."""
    from compressor.rl.envs import env_dims
    from compressor.rl.rollout import rollout

    (tmp_path / "my_robot_envs.py").write_text(
        "import gymnasium as gym\n\n\ndef make_pendulum(**kwargs):\n"
        "    return gym.make('Pendulum-v1', **kwargs)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    env_id = "my_robot_envs:make_pendulum"
    assert env_dims(env_id, {"g": 9.0})["obs_dim"] == 3
    loaded = load_policy(runs["scalar"][0], env_id=env_id, env_kwargs={"g": 9.0})
    spec = loaded.policy.spec
    assert (spec.env_id, spec.env_kwargs) == (env_id, {"g": 9.0})
    res = rollout(loaded.policy, spec.env_id, spec.env_kwargs, [0], num_envs=1)
    assert res.lengths.tolist() == [200]
    with pytest.raises(CompressorError, match="cannot import 'no_such_module'"):
        env_dims("no_such_module:make")
