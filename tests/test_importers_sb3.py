"""SB3 and sb3-contrib zips written by the real libraries, for every MLP algorithm.

Each file is trained for a few hundred steps with a tiny network, then imported without running
anything it contains; the imported policy's deterministic action must equal the library's own
``predict(obs, deterministic=True)`` on raw observations, and so must the exported ONNX graph in
onnxruntime. SB3 2.x cannot write the 1.x (gym) format any more: that format is covered by the
shared RL Zoo files (``shared_policies``, real SB3 1.0 and 1.3 zips) and by rewriting a 2.x
file's fields the way 1.x wrote them (``gym`` space types, ``shape`` instead of ``_shape``,
numpy 1 module names in the pickles).
"""

from __future__ import annotations

import base64
import json
import warnings
import zipfile
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import pytest
import torch

from compressor.core.errors import CompressorError
from compressor.deploy.export import export_onnx, load_onnx_session, onnx_act
from compressor.evaluate import evaluate
from compressor.policy.loading import load_policy, save_loaded

sb3 = pytest.importorskip("stable_baselines3")
sb3_contrib = pytest.importorskip("sb3_contrib")

ATOL = 1e-5
#: (algorithm, env, expected head, expected action map)
CASES = [
    ("PPO", "Pendulum-v1", "gaussian", "clip"),
    ("PPO", "CartPole-v1", "categorical", "argmax"),
    ("A2C", "Pendulum-v1", "gaussian", "clip"),
    ("A2C", "CartPole-v1", "categorical", "argmax"),
    ("SAC", "Pendulum-v1", "squashed_gaussian", "tanh_rescale"),
    ("TQC", "Pendulum-v1", "squashed_gaussian", "tanh_rescale"),
    ("TD3", "Pendulum-v1", "deterministic", "tanh_rescale"),
    ("DDPG", "Pendulum-v1", "deterministic", "tanh_rescale"),
    ("DQN", "CartPole-v1", "q_greedy", "argmax"),
    ("QRDQN", "CartPole-v1", "q_greedy", "argmax"),
]
_ON_POLICY = ("PPO", "A2C")


def _algo(name: str) -> Any:
    return getattr(sb3_contrib if name in ("TQC", "QRDQN") else sb3, name)


def _train(name: str, env: Any, steps: int = 200, **extra: Any) -> Any:
    """A tiny ``name`` model after ``steps`` env steps (a few dozen gradient updates)."""
    kwargs: dict[str, Any] = {"policy_kwargs": {"net_arch": [8, 8]}, "seed": 0, "device": "cpu"}
    if name == "PPO":
        kwargs.update(n_steps=64, batch_size=64, n_epochs=2)
    elif name == "A2C":
        kwargs.update(n_steps=16)
    else:
        kwargs.update(learning_starts=150, buffer_size=1000, batch_size=32)
    if name == "QRDQN":
        kwargs["policy_kwargs"]["n_quantiles"] = 5
    if name == "TQC":
        kwargs["policy_kwargs"]["n_quantiles"] = 5
    kwargs.update(extra)
    model = _algo(name)("MlpPolicy", env, **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # SB3's advice on batch sizes for tiny runs
        model.learn(steps)
    return model


@pytest.fixture(scope="module")
def zips(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], tuple[Path, Any]]:
    """One zip per case, saved by the library itself, and the model it came from."""
    root = tmp_path_factory.mktemp("sb3")
    out = {}
    for name, env_id, _, _ in CASES:
        model = _train(name, env_id)
        path = root / f"{name}-{env_id}" / "model.zip"
        path.parent.mkdir()
        model.save(path)
        out[(name, env_id)] = (path, model)
    return out


def _observations(env_id: str, n: int = 64, wrap: Any = None) -> np.ndarray:
    """Raw observations: visited states of a random-action episode plus samples of the space."""
    env = gym.make(env_id)
    env = wrap(env) if wrap is not None else env
    obs, _ = env.reset(seed=0)
    rows = []
    for _ in range(n // 2):
        rows.append(obs)
        obs, _, term, trunc, _ = env.step(env.action_space.sample())
        if term or trunc:
            obs, _ = env.reset()
    space = env.observation_space
    space.seed(1)
    rows += [np.clip(space.sample(), -10, 10) for _ in range(n - len(rows))]
    return np.asarray(rows, dtype=space.dtype)


def _check_parity(loaded: Any, model: Any, obs: np.ndarray, tmp_path: Path) -> float:
    """Largest |imported - predict| and |onnx - predict| (both must be within ATOL)."""
    ref, _ = model.predict(obs, deterministic=True)
    with torch.no_grad():
        got = loaded.policy.act(torch.as_tensor(obs)).numpy()
    export_onnx(loaded.policy.eval(), tmp_path / "p.onnx")
    onnx = onnx_act(load_onnx_session(tmp_path / "p.onnx"), obs)
    assert got.shape == ref.shape == onnx.shape
    if loaded.policy.action_map == "argmax":
        np.testing.assert_array_equal(got, ref)
        np.testing.assert_array_equal(onnx, ref)
        return 0.0
    np.testing.assert_allclose(got, ref, rtol=0, atol=ATOL)
    np.testing.assert_allclose(onnx, ref, rtol=0, atol=ATOL)
    return float(np.abs(got - ref).max())


@pytest.mark.parametrize(("name", "env_id", "head", "action_map"), CASES)
def test_imported_action_is_predict(
    zips: dict[tuple[str, str], tuple[Path, Any]],
    tmp_path: Path,
    name: str,
    env_id: str,
    head: str,
    action_map: str,
) -> None:
    path, model = zips[(name, env_id)]
    loaded = load_policy(path, env_id=env_id)
    spec = loaded.policy.spec
    assert (spec.head, loaded.policy.action_map) == (head, action_map)
    assert spec.source["algo"] == {"QRDQN": "QR-DQN"}.get(name, name)
    assert spec.source["sb3_version"] == sb3.__version__
    _check_parity(loaded, model, _observations(env_id), tmp_path)


def _gym_era(data: dict[str, Any]) -> dict[str, Any]:
    """``data`` as SB3 1.x wrote it: gym space types, ``shape``, numpy 1 pickles."""
    old = json.loads(json.dumps(data))
    for key in ("observation_space", "action_space"):
        space = old[key]
        space[":type:"] = space[":type:"].replace("gymnasium.spaces", "gym.spaces")
        space["shape"] = space.pop("_shape")
        for k in ("low_repr", "high_repr", "start"):
            space.pop(k, None)
    for value in old.values():
        if isinstance(value, dict) and ":serialized:" in value:
            blob = base64.b64decode(value[":serialized:"])
            # the globals a 1.x pickle names (module names only; nothing here is unpickled)
            blob = blob.replace(b"gymnasium.spaces", b"gym.spaces")
            blob = blob.replace(b"numpy._core", b"numpy.core")
            value[":serialized:"] = base64.b64encode(blob).decode()
    return old


@pytest.mark.parametrize("name", ["PPO", "SAC", "TD3", "DQN"])
def test_gym_era_fields_import_the_same(
    zips: dict[tuple[str, str], tuple[Path, Any]], tmp_path: Path, name: str
) -> None:
    env_id = next(e for n, e, _, _ in CASES if n == name)
    path, model = zips[(name, env_id)]
    old = tmp_path / "old" / "model.zip"
    old.parent.mkdir()
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(old, "w") as dst:
        for member in src.namelist():
            content = src.read(member)
            if member == "data":
                content = json.dumps(_gym_era(json.loads(content))).encode()
            elif member == "_stable_baselines3_version":
                content = b"1.8.0"
            dst.writestr(member, content)
    new, was = load_policy(path, env_id=env_id), load_policy(old, env_id=env_id)
    assert was.policy.spec.source["sb3_version"] == "1.8.0"
    assert was.policy.spec.head == new.policy.spec.head
    _check_parity(was, model, _observations(env_id), tmp_path)


def test_vecnormalize_saved_by_sb3_2(tmp_path: Path) -> None:
    """A numpy 2 ``vecnormalize.pkl`` (``numpy._core``, gymnasium spaces) found beside the zip."""
    from stable_baselines3.common.env_util import make_vec_env
    from stable_baselines3.common.vec_env import VecNormalize

    venv = VecNormalize(make_vec_env("Pendulum-v1", n_envs=2, seed=0), clip_obs=5.0)
    model = _train("PPO", venv)
    folder = tmp_path / "ppo-Pendulum-v1"
    folder.mkdir()
    model.save(folder / "model.zip")
    venv.save(str(folder / "vecnormalize.pkl"))
    assert b"numpy._core" in (folder / "vecnormalize.pkl").read_bytes()
    loaded = load_policy(folder / "model.zip")
    spec = loaded.policy.spec
    assert spec.obs_norm and spec.obs_clip == 5.0 and spec.env_id == "Pendulum-v1"
    assert spec.source["obs_stats"]["file"] == "vecnormalize.pkl"
    venv.training = False
    obs = _observations("Pendulum-v1").astype(np.float64)
    ref, _ = model.predict(venv.normalize_obs(obs), deterministic=True)
    with torch.no_grad():
        got = loaded.policy.act(torch.as_tensor(obs)).numpy()
    np.testing.assert_allclose(got, ref, rtol=0, atol=ATOL)


def test_q_networks_are_kept(zips: dict[tuple[str, str], tuple[Path, Any]], tmp_path: Path) -> None:
    obs = _observations("Pendulum-v1", 16)
    z = torch.as_tensor(obs, dtype=torch.float32)
    act = torch.rand(16, 1) * 4 - 2  # env units; the critics saw them scaled to [-1, 1]
    for name in ("SAC", "TQC", "TD3", "DDPG"):
        path, model = zips[(name, "Pendulum-v1")]
        loaded = load_policy(path, env_id="Pendulum-v1")
        n = 1 if name == "DDPG" else 2
        assert [q.kind for q in loaded.q_nets] == ["state_action"] * n
        with torch.no_grad():
            ref = model.critic(z, act / 2.0)
            if name == "TQC":  # (batch, critics, quantiles): each critic folded into its mean
                ref = tuple(ref.mean(-1).unbind(-1))
            for q, r in zip(loaded.q_nets, ref):
                torch.testing.assert_close(q(z, act), r.reshape(-1), rtol=1e-5, atol=1e-5)
    for name in ("DQN", "QRDQN"):
        path, model = zips[(name, "CartPole-v1")]
        loaded = load_policy(path, env_id="CartPole-v1")
        (target,) = loaded.q_nets
        assert (target.kind, target.role) == ("state", "target")
        x = torch.as_tensor(_observations("CartPole-v1", 16))
        with torch.no_grad():
            ref = model.policy.q_net_target(x) if name == "DQN" else None
            if name == "QRDQN":
                ref = model.policy.quantile_net_target(x).mean(dim=1)
        torch.testing.assert_close(target(x), ref, rtol=1e-5, atol=1e-5)
        save_loaded(loaded, tmp_path / f"{name}.pt")
        again = load_policy(tmp_path / f"{name}.pt")
        assert again.q_nets[0].to_entry()["hidden"] == target.hidden
        torch.testing.assert_close(again.q_nets[0](x), target(x))


def test_exploration_comes_from_the_file(zips: dict[tuple[str, str], tuple[Path, Any]]) -> None:
    path, model = zips[("DQN", "CartPole-v1")]
    spec = load_policy(path, env_id="CartPole-v1").policy.spec
    assert spec.exploration == pytest.approx(model.exploration_final_eps)
    td3 = load_policy(zips[("TD3", "Pendulum-v1")][0], env_id="Pendulum-v1").policy
    assert td3.spec.squash and td3.spec.exploration == 0.1
    x = torch.zeros(256, 3)
    noisy = td3.sample(x, torch.Generator().manual_seed(0))
    assert bool((noisy != td3.act(x)).any()) and bool((noisy.abs() <= 2.0).all())


# ---- the RL Zoo layout: TimeFeatureWrapper, env_kwargs ----------------------------------------
def test_time_feature_wrapper_is_sb3_contribs() -> None:
    from sb3_contrib.common.wrappers import TimeFeatureWrapper as Theirs

    from compressor.rl.wrappers import TimeFeatureWrapper as Ours

    for make, kwargs in (
        (lambda: gym.make("Pendulum-v1"), {}),  # T from the spec (200)
        (lambda: gym.make("Pendulum-v1", max_episode_steps=50), {}),
        (lambda: gym.make("Pendulum-v1"), {"test_mode": True}),
        (lambda: gym.envs.classic_control.PendulumEnv(), {"max_steps": 30}),  # no spec
    ):
        ours, theirs = Ours(make(), **kwargs), Theirs(make(), **kwargs)
        assert ours.observation_space == theirs.observation_space
        for episode in range(2):
            a, _ = ours.reset(seed=episode)
            b, _ = theirs.reset(seed=episode)
            for t in range(60):
                np.testing.assert_array_equal(a, b)
                assert a.dtype == b.dtype
                action = np.array([np.sin(t)], dtype=np.float32)
                a, _, term_a, trunc_a, _ = ours.step(action)
                b, _, term_b, trunc_b, _ = theirs.step(action)
                assert (term_a, trunc_a) == (term_b, trunc_b)
                if term_a or trunc_a:
                    break


def _zoo_run(tmp_path: Path, config: str, env_kwargs: str | None) -> tuple[Path, Any]:
    from sb3_contrib.common.wrappers import TimeFeatureWrapper

    env = TimeFeatureWrapper(gym.make("Pendulum-v1", g=9.0))
    model = _train("PPO", env)
    folder = tmp_path / "logs" / "ppo" / "Pendulum-v1_1"
    (folder / "Pendulum-v1").mkdir(parents=True)
    model.save(folder / "Pendulum-v1.zip")
    (folder / "Pendulum-v1" / "config.yml").write_text(config)
    if env_kwargs is not None:
        (folder / "Pendulum-v1" / "env_kwargs.yml").write_text(env_kwargs)
    return folder / "Pendulum-v1.zip", model


ZOO_CONFIG = """!!python/object/apply:collections.OrderedDict
- - - env_wrapper
    - sb3_contrib.common.wrappers.TimeFeatureWrapper
  - - n_timesteps
    - 256
  - - policy
    - MlpPolicy
"""


def test_zoo_time_feature_everywhere(tmp_path: Path) -> None:
    path, model = _zoo_run(tmp_path, ZOO_CONFIG, "g: 9.0\n")
    loaded = load_policy(path)
    spec = loaded.policy.spec
    assert spec.env_wrappers == [
        {"name": "TimeFeatureWrapper", "max_steps": 1000, "test_mode": False}
    ]
    assert spec.env_kwargs == {"g": 9.0} and spec.obs_dim == 4
    # the evaluation engine builds the wrapped env: SB3's own loop gives the same returns
    from sb3_contrib.common.wrappers import TimeFeatureWrapper

    ours = evaluate(loaded.policy, spec.env_id, spec.env_kwargs, [0, 1], num_envs=2)[0]
    theirs = []
    for seed in (0, 1):
        env = TimeFeatureWrapper(gym.make("Pendulum-v1", g=9.0))
        obs, _ = env.reset(seed=seed)
        total, done = 0.0, False
        while not done:
            obs, r, term, trunc, _ = env.step(model.predict(obs, deterministic=True)[0])
            total, done = total + float(r), term or trunc
        theirs.append(total)
    np.testing.assert_allclose(ours.stats.returns, theirs, rtol=1e-9)
    # the exported graph's input is the wrapped observation, and its metadata says so
    from compressor.deploy.export import read_metadata

    export_onnx(loaded.policy.eval(), tmp_path / "p.onnx")
    interface = json.loads(read_metadata(tmp_path / "p.onnx")["interface"])
    assert interface["input_shape"] == ["batch", 4]
    assert interface["input_wrappers"][0]["name"] == "TimeFeatureWrapper"
    assert "remaining time" in interface["input_notes"][0]


def test_zoo_unknown_wrapper_is_one_line(tmp_path: Path) -> None:
    config = ZOO_CONFIG.replace(
        "sb3_contrib.common.wrappers.TimeFeatureWrapper", "rl_zoo3.wrappers.HistoryWrapper"
    )
    path, _ = _zoo_run(tmp_path, config, None)
    with pytest.raises(CompressorError, match="HistoryWrapper, which this tool does not") as info:
        load_policy(path)
    assert "\n" not in str(info.value)


# ---- what is refused, in one line --------------------------------------------------------------
def _edited(path: Path, tmp_path: Path, edit: Any) -> Path:
    out = tmp_path / "edited" / "model.zip"
    out.parent.mkdir(exist_ok=True)
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(out, "w") as dst:
        for member in src.namelist():
            content = src.read(member)
            if member == "data":
                data = json.loads(content)
                edit(data)
                content = json.dumps(data).encode()
            dst.writestr(member, content)
    return out


def _class_blob(module: str, name: str) -> dict[str, str]:
    """A ``policy_class`` field whose pickle names ``module.name`` (never unpickled)."""
    blob = b"\x80\x02c" + module.encode() + b"\n" + name.encode() + b"\nq\x00."
    return {":type:": "<class 'abc.ABCMeta'>", ":serialized:": base64.b64encode(blob).decode()}


def test_unsupported_is_refused_in_one_line(
    zips: dict[tuple[str, str], tuple[Path, Any]], tmp_path: Path
) -> None:
    ppo = zips[("PPO", "CartPole-v1")][0]
    sac = zips[("SAC", "Pendulum-v1")][0]
    cases = [
        (ppo, lambda d: d.update(policy_class=_class_blob(
            "stable_baselines3.common.policies", "ActorCriticCnnPolicy")), "CNN policies"),
        (ppo, lambda d: d["observation_space"].update({"_shape": "(84, 84, 3)"}), "CNN"),
        (ppo, lambda d: d["observation_space"].update(
            {":type:": "<class 'gymnasium.spaces.dict.Dict'>"}), "dict observations"),
        (ppo, lambda d: d["action_space"].update(
            {":type:": "<class 'gymnasium.spaces.multi_discrete.MultiDiscrete'>"}),
         "MultiDiscrete"),
        (sac, lambda d: d.update(policy_class=_class_blob(
            "sb3_contrib.ppo_recurrent.policies", "RecurrentActorCriticPolicy")), "recurrent"),
        (sac, lambda d: d.update(use_sde=True), "gSDE"),
    ]  # fmt: skip
    for src, edit, message in cases:
        with pytest.raises(CompressorError, match=message) as info:
            load_policy(_edited(src, tmp_path, edit), env_id="CartPole-v1")
        assert "\n" not in str(info.value)


def test_real_recurrent_and_gsde_files_are_refused(tmp_path: Path) -> None:
    recurrent = sb3_contrib.RecurrentPPO(
        "MlpLstmPolicy", "CartPole-v1", n_steps=16, batch_size=16, device="cpu",
        policy_kwargs={"net_arch": [8], "lstm_hidden_size": 4},
    )  # fmt: skip
    recurrent.save(tmp_path / "r" / "model.zip")
    with pytest.raises(CompressorError, match="recurrent"):
        load_policy(tmp_path / "r" / "model.zip", env_id="CartPole-v1")
    sde = sb3.SAC("MlpPolicy", "Pendulum-v1", use_sde=True, policy_kwargs={"net_arch": [8]})
    sde.save(tmp_path / "s" / "model.zip")
    with pytest.raises(CompressorError, match="gSDE"):
        load_policy(tmp_path / "s" / "model.zip", env_id="Pendulum-v1")


# ---- the shared RL Zoo files: SB3 1.x, gym, numpy 1 ---------------------------------------------
SHARED = [
    ("sb3-ppo-Hopper-v3", "PPO", "gaussian", "Hopper-v5"),
    ("sb3-ppo-CartPole-v1", "PPO", "categorical", "CartPole-v1"),
    ("sb3-sac-Hopper-v3", "SAC", "squashed_gaussian", "Hopper-v5"),
    ("sb3-tqc-HalfCheetah-v3", "TQC", "squashed_gaussian", "HalfCheetah-v5"),
    ("sb3-ppo-Walker2d-v3", "PPO", "gaussian", "Walker2d-v5"),
    ("sb3-dqn-CartPole-v1", "DQN", "q_greedy", "CartPole-v1"),
    ("sb3-ddpg-Pendulum-v1", "DDPG", "deterministic", "Pendulum-v1"),
]


@pytest.mark.parametrize(("folder", "algo", "head", "env_id"), SHARED)
def test_shared_zoo_policy_is_predict(
    shared_policies: Path, tmp_path: Path, folder: str, algo: str, head: str, env_id: str
) -> None:
    from sb3_contrib.common.wrappers import TimeFeatureWrapper

    from compressor.policy.importers.safe_pickle import load_vecnormalize

    path = shared_policies / folder / "model.zip"
    loaded = load_policy(path)
    spec = loaded.policy.spec
    assert (spec.source["algo"], spec.head, spec.env_id) == (algo, head, env_id)
    wrap = TimeFeatureWrapper if spec.env_wrappers else None
    assert bool(wrap) == (folder == "sb3-ppo-Walker2d-v3")
    env = wrap(gym.make(env_id)) if wrap else gym.make(env_id)
    custom = {  # SB3 itself would unpickle these gym-era fields: hand it gymnasium's instead
        "observation_space": env.observation_space,
        "action_space": env.action_space,
        "lr_schedule": lambda _: 0.0,
        "learning_rate": 0.0,
        "clip_range": lambda _: 0.0,
        "exploration_schedule": lambda _: 0.0,
    }
    model = _algo(algo).load(path, device="cpu", custom_objects=custom)
    obs = _observations(env_id, 64, wrap).astype(np.float64)
    seen = obs
    stats_file = shared_policies / folder / "vecnormalize.pkl"
    if stats_file.is_file():  # VecNormalize's own arithmetic, on the statistics in the file
        st = load_vecnormalize(stats_file)
        seen = np.clip((obs - st.mean) / np.sqrt(st.var + st.epsilon), -st.clip_obs, st.clip_obs)
    ref, _ = model.predict(seen, deterministic=True)
    with torch.no_grad():
        got = loaded.policy.act(torch.as_tensor(obs)).numpy()
    np.testing.assert_allclose(got, ref, rtol=0, atol=ATOL)
