"""The restricted unpickler: real vecnormalize stats load, hostile pickles are refused unrun."""

from __future__ import annotations

import base64
import builtins
import os
import pickle
import re
import sys
import types
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from compressor.core.errors import CompressorError
from compressor.policy.importers.common import load_norm_stats
from compressor.policy.importers.safe_pickle import (
    load_vecnormalize,
    referenced_globals,
    safe_loads,
)
from compressor.policy.loading import load_policy


class _WriteFile:
    """Unpickling this calls ``exec`` with code that creates ``path``."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (builtins.exec, (f"open({str(self.path)!r}, 'w').write('pwned')",))


class _Shell:
    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.system, (f"touch {self.path}",))


def test_payload_is_live_under_plain_pickle(tmp_path: Path) -> None:
    # Control: proves the payload used below really writes a file when a normal unpickler runs it.
    target = tmp_path / "control"
    pickle.loads(pickle.dumps(_WriteFile(target)))
    assert target.exists()


def test_hostile_pickle_refused_and_not_run(tmp_path: Path) -> None:
    target = tmp_path / "pwned"
    with pytest.raises(CompressorError, match=r"refused to load builtins\.exec from evil\.pkl"):
        safe_loads(pickle.dumps({"x": _WriteFile(target)}), "evil.pkl")
    assert not target.exists()


def test_every_refused_global_is_named(tmp_path: Path) -> None:
    data = pickle.dumps([_WriteFile(tmp_path / "a"), _Shell(tmp_path / "b")])
    with pytest.raises(CompressorError) as info:
        safe_loads(data, "evil.pkl")
    msg = str(info.value)
    assert "builtins.exec" in msg and f"{os.system.__module__}.system" in msg
    assert "\n" not in msg
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_referenced_globals_reads_stack_global() -> None:
    found = referenced_globals(pickle.dumps(_WriteFile(Path("/nonexistent")), protocol=4))
    assert ("builtins", "exec") in found


@pytest.mark.parametrize("data", [b"", b"\x80\x04\x95", np.random.default_rng(0).bytes(64) + b"."])
def test_corrupt_pickles(data: bytes) -> None:
    with pytest.raises(CompressorError):
        safe_loads(data, "bad.pkl")


def test_numpy_arrays_allowed() -> None:
    arr = np.arange(6, dtype=np.float32).reshape(2, 3)
    out = safe_loads(pickle.dumps({"a": arr, "s": np.float64(2.5)}), "ok.pkl")
    np.testing.assert_array_equal(out["a"], arr)
    assert out["s"] == 2.5


def test_shared_vecnormalize_without_gym_or_sb3(shared_policies: Path) -> None:
    # other tests import stable_baselines3 itself (to compare with it): hide it while loading
    def named(m: str) -> bool:
        return m == "gym" or m.startswith(("gym.", "stable_baselines3"))

    hidden = {m: sys.modules.pop(m) for m in list(sys.modules) if named(m)}
    try:
        stats = load_vecnormalize(shared_policies / "sb3-ppo-Hopper-v3" / "vecnormalize.pkl")
        imported = [m for m in sys.modules if named(m)]
    finally:
        sys.modules.update(hidden)
    assert stats.mean.shape == (11,) and stats.var.shape == (11,)
    assert stats.clip_obs == 10.0 and stats.epsilon == 1e-8 and stats.norm_obs
    assert (stats.var > 0).all() and stats.count > 1e6
    assert imported == []


# ---- synthetic VecNormalize pickles (the classes live in fake modules removed before loading) --
_FAKE_MODULES = {
    "stable_baselines3": None,
    "stable_baselines3.common": None,
    "stable_baselines3.common.vec_env": None,
    "stable_baselines3.common.vec_env.vec_normalize": "VecNormalize",
    "stable_baselines3.common.running_mean_std": "RunningMeanStd",
    "gymnasium.spaces.box_fake": "Box",
}


@pytest.fixture
def fake_sb3() -> Iterator[dict[str, type]]:
    """Classes whose pickles name SB3's globals; their modules vanish before loading."""
    classes: dict[str, type] = {}
    saved = {name: sys.modules.get(name) for name in _FAKE_MODULES}
    for mod_name, cls_name in _FAKE_MODULES.items():
        mod = types.ModuleType(mod_name)
        if cls_name:
            cls = type(cls_name, (), {"__module__": mod_name})
            setattr(mod, cls_name, cls)
            classes[cls_name] = cls
        sys.modules[mod_name] = mod
    try:
        yield classes
    finally:
        for name, old in saved.items():
            if old is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = old


def _vecnormalize_bytes(classes: dict[str, type], extra: object = None, mean=None) -> bytes:
    rms = classes["RunningMeanStd"]()
    rms.mean = np.array([1.0, 2.0, 3.0]) if mean is None else mean
    rms.var = np.array([4.0, 5.0, 6.0])
    rms.count = 123.0
    vn = classes["VecNormalize"]()
    vn.obs_rms, vn.clip_obs, vn.epsilon, vn.norm_obs = rms, 5.0, 1e-6, True
    vn.observation_space = classes["Box"]()
    vn.rng = np.random.default_rng(0)  # gymnasium-era spaces carry numpy Generators
    vn.extra = extra
    return pickle.dumps(vn, protocol=4)


def test_synthetic_vecnormalize(tmp_path: Path, fake_sb3: dict[str, type]) -> None:
    data = _vecnormalize_bytes(fake_sb3)
    for name in _FAKE_MODULES:
        sys.modules.pop(name, None)  # the loader must not need them
    path = tmp_path / "vecnormalize.pkl"
    path.write_bytes(data)
    stats = load_norm_stats(path)
    np.testing.assert_array_equal(stats.mean, [1.0, 2.0, 3.0])
    np.testing.assert_array_equal(stats.var, [4.0, 5.0, 6.0])
    assert (stats.clip_obs, stats.epsilon, stats.count) == (5.0, 1e-6, 123.0)


def test_payload_inside_vecnormalize(tmp_path: Path, fake_sb3: dict[str, type]) -> None:
    target = tmp_path / "pwned"
    path = tmp_path / "vecnormalize.pkl"
    path.write_bytes(_vecnormalize_bytes(fake_sb3, extra=_WriteFile(target)))
    with pytest.raises(CompressorError, match=r"refused to load builtins\.exec"):
        load_vecnormalize(path)
    assert not target.exists()


def test_nan_stats_rejected(tmp_path: Path, fake_sb3: dict[str, type]) -> None:
    path = tmp_path / "vecnormalize.pkl"
    path.write_bytes(_vecnormalize_bytes(fake_sb3, mean=np.array([np.nan, 0.0, 0.0])))
    with pytest.raises(CompressorError, match="NaN"):
        load_vecnormalize(path)


def test_not_a_vecnormalize(tmp_path: Path) -> None:
    path = tmp_path / "vecnormalize.pkl"
    path.write_bytes(pickle.dumps({"mean": np.zeros(3)}))
    with pytest.raises(CompressorError, match="not an SB3 VecNormalize"):
        load_vecnormalize(path)
    with pytest.raises(CompressorError, match="not found"):
        load_vecnormalize(tmp_path / "missing.pkl")


def test_npz_stats(tmp_path: Path) -> None:
    path = tmp_path / "stats.npz"
    np.savez(path, mean=np.zeros(3), var=np.ones(3))
    stats = load_norm_stats(path)
    assert stats.clip_obs == 10.0 and stats.mean.shape == (3,)
    bad = tmp_path / "bad.npz"
    np.savez(bad, mean=np.zeros(3))
    with pytest.raises(CompressorError, match="'mean' and 'var'"):
        load_norm_stats(bad)


# ---- through the public loader: an SB3 zip and the vecnormalize.pkl found beside it ----------
class _WriteText:
    """Unpickling this calls ``pathlib.Path.write_text`` on ``path``."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (Path.write_text, (self.path, "pwned"))


_PAYLOADS = {
    "exec": (_WriteFile, "builtins.exec"),
    "system": (_Shell, f"{os.system.__module__}.system"),
    "write_text": (_WriteText, "pathlib.Path.write_text"),
}


def _hostile_sources(tmp_path: Path, classes: dict[str, type], payload: object) -> list[Path]:
    """An SB3 zip whose ``data`` carries ``payload``, and a clean zip with a hostile stats file."""
    from test_importers import _sb3_data, _write_sb3_zip

    data = _sb3_data()
    blob = base64.b64encode(pickle.dumps(payload, protocol=4)).decode()
    data["policy_kwargs"] = {":type:": "<class 'dict'>", ":serialized:": blob}
    in_zip = _write_sb3_zip(tmp_path / "a" / "sb3-ppo-CartPole-v1" / "model.zip", data=data)
    beside = _write_sb3_zip(tmp_path / "b" / "sb3-ppo-CartPole-v1" / "model.zip")
    stats = _vecnormalize_bytes(classes, extra=payload, mean=np.zeros(4))
    (beside.parent / "vecnormalize.pkl").write_bytes(stats)
    return [in_zip, beside]


@pytest.mark.parametrize("kind", sorted(_PAYLOADS))
def test_payloads_through_load_policy_write_nothing(
    tmp_path: Path, fake_sb3: dict[str, type], kind: str
) -> None:
    make, refused = _PAYLOADS[kind]
    target = tmp_path / "pwned"
    pickle.loads(pickle.dumps(make(target), protocol=4))  # control: the payload is live
    assert target.exists()
    target.unlink()
    for src in _hostile_sources(tmp_path, fake_sb3, make(target)):
        with pytest.raises(CompressorError, match=re.escape(refused)) as info:
            load_policy(src)
        assert "\n" not in str(info.value)
    assert not target.exists()


def test_payloads_through_cli_inspect_are_one_line_exit_3(
    tmp_path: Path,
    fake_sb3: dict[str, type],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from compressor.cli import main

    # main(), not CliRunner(app): the one-line message and exit code 3 are main()'s job
    target = tmp_path / "pwned"
    for src in _hostile_sources(tmp_path, fake_sb3, _Shell(target)):
        monkeypatch.setattr(sys, "argv", ["compress", "inspect", str(src)])
        with pytest.raises(SystemExit) as info:
            main()
        assert info.value.code == 3
        captured = capsys.readouterr()
        lines = captured.err.strip().splitlines()
        assert len(lines) == 1 and f"{os.system.__module__}.system" in lines[0], captured.err
        assert "Traceback" not in captured.err and captured.out == ""
    assert not target.exists()


def test_env_id_naming_a_module_is_refused(tmp_path: Path) -> None:
    """gymnasium would import ``module`` for ``module:Env``: a file may not choose that."""
    from compressor.policy.loading import load_policy
    from compressor.policy.native import save_policy
    from conftest import make_policy

    pol = make_policy("categorical", obs_dim=4, act_dim=2, env_id="CartPole-v1")
    pol.spec.env_id = "antigravity:Fly-v0"
    save_policy(pol, tmp_path / "p.pt")
    with pytest.raises(CompressorError, match="would import module 'antigravity'"):
        load_policy(tmp_path / "p.pt")
    # the user's own choice of env is honoured
    assert load_policy(tmp_path / "p.pt", env_id="CartPole-v1").policy.spec.env_id == "CartPole-v1"


# ---- the other readers: rsl_rl checkpoints, CleanRL tuples, ONNX, RL Zoo YAML ------------------
def _hostile_torch_files(tmp_path: Path, payload: object) -> list[Path]:
    """Files each importer would read, every one carrying ``payload`` where a tensor belongs."""
    import torch

    actor = {"fc1.weight": torch.zeros(4, 3), "fc1.bias": torch.zeros(4)}
    cases = {
        "model_100.pt": {"actor_state_dict": {"mlp.0.weight": payload}, "iter": 100},
        "model_7.pt": {"model_state_dict": {"actor.0.weight": torch.zeros(2, 3)}, "infos": payload},
        "td3.cleanrl_model": (actor, {"fc1.weight": payload}),
        "dqn.cleanrl_model": {"network.0.weight": payload},
    }
    out = []
    for name, obj in cases.items():
        torch.save(obj, tmp_path / name)
        out.append(tmp_path / name)
    return out


@pytest.mark.parametrize("kind", sorted(_PAYLOADS))
def test_payloads_in_rsl_rl_and_cleanrl_files_write_nothing(tmp_path: Path, kind: str) -> None:
    make, _ = _PAYLOADS[kind]
    refused = {"exec": "builtins.exec", "system": ".system", "write_text": "pathlib.Path"}[kind]
    target = tmp_path / "pwned"
    for src in _hostile_torch_files(tmp_path, make(target)):
        with pytest.raises(CompressorError, match=re.escape(refused)) as info:
            load_policy(src, env_id="Pendulum-v1")
        assert "\n" not in str(info.value) and "nothing was executed" in str(info.value)
    assert not target.exists()


def test_onnx_external_weights_outside_the_folder_are_refused(tmp_path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    secret = tmp_path / "secret.bin"
    secret.write_bytes(np.ones(24, np.float32).tobytes())
    w = numpy_helper.from_array(np.zeros((3, 8), np.float32), "W0")
    w.ClearField("raw_data")
    w.data_location = TensorProto.EXTERNAL
    for key, value in (("location", "../secret.bin"), ("length", "96")):
        entry = w.external_data.add()
        entry.key, entry.value = key, value
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["obs", "W0"], ["actions"])],
        "g",
        [helper.make_tensor_value_info("obs", TensorProto.FLOAT, ["b", 3])],
        [helper.make_tensor_value_info("actions", TensorProto.FLOAT, ["b", 8])],
        initializer=[w],
    )
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "policy.onnx").write_bytes(helper.make_model(graph).SerializeToString())
    assert onnx.load(tmp_path / "sub" / "policy.onnx", load_external_data=False) is not None
    with pytest.raises(CompressorError, match="cannot read its external weights") as info:
        load_policy(tmp_path / "sub" / "policy.onnx", env_id="Pendulum-v1")
    assert "\n" not in str(info.value)


def test_zoo_yaml_tags_are_text(tmp_path: Path) -> None:
    """A Zoo config or env_kwargs.yml naming code is read as text: nothing is constructed, and
    a wrapper the tool does not re-create is refused in one line."""
    from test_importers import _write_sb3_zip

    target = tmp_path / "pwned"
    folder = tmp_path / "ppo" / "CartPole-v1_1"
    zip_path = _write_sb3_zip(folder / "CartPole-v1.zip")
    (folder / "CartPole-v1").mkdir()
    config = folder / "CartPole-v1" / "config.yml"
    config.write_text(
        "!!python/object/apply:collections.OrderedDict\n"
        "- - - env_wrapper\n"
        f"    - !!python/object/apply:os.system ['touch {target}']\n"
    )
    with pytest.raises(CompressorError, match="os.system, which this tool does not") as info:
        load_policy(zip_path)
    assert "\n" not in str(info.value)
    config.write_text("normalize: false\n")
    (folder / "CartPole-v1" / "env_kwargs.yml").write_text(
        f"render_mode: !!python/object/apply:os.system ['touch {target}']\n"
    )
    with pytest.raises(CompressorError, match="refused the YAML tag") as info:
        load_policy(zip_path)
    assert "\n" not in str(info.value)
    assert not target.exists()
