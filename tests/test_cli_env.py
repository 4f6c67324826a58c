"""A plain SB3 zip records no environment: ``--env`` lets every command that loads it name one.

The file is written by SB3 itself (a tiny PPO on CartPole, 64 steps); ``export`` and ``run`` are
the commands a user needs to compress it, and both must work on it with ``--env``.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest

from compressor.deploy.export import load_onnx_session, onnx_act
from conftest import cli

sb3 = pytest.importorskip("stable_baselines3")

TINY = """
name = "tiny-sb3-cartpole"
[env]
id = "CartPole-v1"
[threat]
eps = 0.1
[evaluation]
episodes = 2
num_envs = 2
[attacks]
screen = ["random"]
final = ["random"]
[finetune]
steps = 20
state_episodes = 1
dagger_episodes = 1
[certificate]
states = 20
empirical_states = 5
[search]
grid = [0.5]
refine = 0
"""


@pytest.fixture(scope="module")
def sb3_zip(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    root = tmp_path_factory.mktemp("plain")
    kw = {"n_steps": 64, "batch_size": 64, "n_epochs": 1, "seed": 0, "device": "cpu"}
    model = sb3.PPO("MlpPolicy", "CartPole-v1", policy_kwargs={"net_arch": [8, 8]}, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.learn(64)
    path = root / "model.zip"
    model.save(path)
    return path, model


def test_export_takes_env_and_matches_predict(
    sb3_zip: tuple[Path, object], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path, model = sb3_zip
    out = tmp_path / "p.onnx"
    code, stdout, err = cli(capsys, "export", str(path), "--env", "CartPole-v1", "-o", str(out))
    assert code == 0, err
    sess = load_onnx_session(out)
    obs = np.random.default_rng(0).normal(size=(32, 4)).astype(np.float32)
    want, _ = model.predict(obs, deterministic=True)  # type: ignore[attr-defined]
    assert np.array_equal(np.asarray(onnx_act(sess, obs)).reshape(-1), want)


def test_run_takes_env(
    sb3_zip: tuple[Path, object], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path, _ = sb3_zip
    prof = tmp_path / "tiny.toml"
    prof.write_text(TINY)
    argv = ["run", str(path), "--env", "CartPole-v1", "--profile", str(prof)]
    code, stdout, err = cli(capsys, *argv, "--out", str(tmp_path), "--workers", "1", "--json")
    assert code in (0, 4), err  # 4: no level within the budget (a verdict, not an error)
    report = json.loads(stdout)
    assert report["profile"]["env"]["id"] == report["source"]["env_id"] == "CartPole-v1"
    assert (tmp_path / "model" / "report.json").is_file()
