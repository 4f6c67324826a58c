"""Fuzzing every loader: a mutated file gives a clean result or one CompressorError, nothing else.

Inputs start from valid files (a native ``.pt`` in both torch formats, SB3 zips, protocol 2-5
pickles, the shipped TOML files) and are mutated at the byte level (flip, overwrite, insert,
delete, truncate) and at the structure level (a field dropped or replaced by a value of the wrong
kind, a zip member removed). Any other exception fails the test with the input that caused it.
``COMPRESSOR_FUZZ_SCALE=N`` runs N times as many examples, randomised (a longer local hunt).
"""

from __future__ import annotations

import base64
import io
import json
import os
import pickle
import re
import sys
import types
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from test_importers import _sb3_data, _sb3_state, _torch_bytes
from test_safe_pickle import _FAKE_MODULES, _vecnormalize_bytes

from compressor.core.config import load_profile, load_target
from compressor.core.errors import CompressorError
from compressor.policy.importers.common import load_norm_stats
from compressor.policy.importers.safe_pickle import safe_loads
from compressor.policy.loading import load_policy
from compressor.policy.native import policy_to_dict
from compressor.policy.value import ValueNet
from conftest import REPO, make_policy

SCALE = int(os.environ.get("COMPRESSOR_FUZZ_SCALE", "1"))
# torch notes the protocol byte of every mutated pickle it then reads or refuses cleanly
pytestmark = pytest.mark.filterwarnings("ignore:Detected pickle protocol")


def fuzz(examples: int) -> settings:
    """Fixed examples in CI (reproducible); random and ``SCALE`` times more when hunting."""
    return settings(
        max_examples=examples * SCALE,
        deadline=None,
        derandomize=SCALE == 1,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


def outcome(load: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
    """Run a loader: it may succeed or raise a one-line CompressorError; anything else escapes."""
    try:
        load(*args, **kwargs)
    except CompressorError as exc:
        assert str(exc) and "\n" not in str(exc), repr(str(exc))


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # module-scoped: one folder for every example (hypothesis refuses function-scoped fixtures,
    # which would not be reset between examples); each test overwrites its own file names
    return tmp_path_factory.mktemp("fuzz")


# ---- mutations -----------------------------------------------------------------------------------
_OPS = ("flip", "set", "insert", "delete", "truncate")
byte_edits = st.lists(
    st.tuples(st.sampled_from(_OPS), st.integers(0, 1 << 30), st.integers(0, 255)),
    min_size=1,
    max_size=6,
)


def mutate(
    data: bytes, edits: list[tuple[str, int, int]], lo: int = 0, hi: int | None = None
) -> bytes:
    """Apply byte edits at positions folded into ``[lo, hi)`` (default: the whole input)."""
    b = bytearray(data)
    for op, pos, val in edits:
        end = len(b) if hi is None else min(hi, len(b))
        if end <= lo:
            break
        i = lo + pos % (end - lo)
        if op == "flip":
            b[i] ^= 1 << (val % 8)
        elif op == "set":
            b[i] = val
        elif op == "insert":
            b.insert(i, val)
        elif op == "delete":
            del b[i]
        else:
            del b[i:]
    return bytes(b)


_DTYPES = [torch.float32, torch.float64, torch.float16, torch.int64, torch.uint8, torch.bool]
_DTYPES += [torch.complex64]  # a complex tensor copied into a float weight: a warning, no error
tensors = st.builds(
    lambda shape, dtype, fill: torch.full(shape, fill).to(dtype),
    st.lists(st.integers(0, 5), max_size=3),
    st.sampled_from(_DTYPES),
    st.floats(-1e3, 1e3) | st.sampled_from([float("nan"), float("inf")]),
)
_ints = st.sampled_from([0, 1, 2, 3, 4, -1, 2**31, 2**40, 2**64]) | st.integers(-(2**70), 2**70)
_scalars = st.none() | st.booleans() | _ints | st.floats() | st.text(max_size=6)
#: Values of the wrong kind (and sometimes the right one) for any field of a torch file.
odd_values = st.recursive(
    _scalars | tensors,
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.text(max_size=6) | st.integers(0, 3), inner, max_size=3)
    ),
    max_leaves=6,
)
#: The same for JSON (SB3's ``data`` member).
json_values = st.recursive(
    st.none() | st.booleans() | _ints | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=6,
)


def edit_tree(tree: dict[str, Any], path: list[Any], value: Any, delete: bool) -> None:
    """Drop or replace the entry at ``path`` (keys into nested dicts) when it exists."""
    node: Any = tree
    for key in path[:-1]:
        if not isinstance(node, dict) or key not in node:
            return
        node = node[key]
    if not isinstance(node, dict):
        return
    if delete:
        node.pop(path[-1], None)
    else:
        node[path[-1]] = value


# ---- native .pt files ----------------------------------------------------------------------------
def _native_payload(categorical: bool) -> dict[str, Any]:
    if categorical:  # records CartPole-v1: loading checks it against the environment
        policy = make_policy("categorical", hidden=(4,), obs_dim=4, env_id="CartPole-v1")
    else:  # records no environment: no gym on this path
        policy = make_policy("gaussian", hidden=(4,), obs_dim=3, act_dim=1)
    payload = policy_to_dict(policy)
    payload["critic"] = ValueNet(policy.spec.obs_dim, [4]).to_entry()
    return payload


def _save(obj: Any, legacy: bool) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf, _use_new_zipfile_serialization=not legacy)
    return buf.getvalue()


NATIVE = {cat: _native_payload(cat) for cat in (False, True)}
NATIVE_BYTES = {
    (cat, legacy): _save(NATIVE[cat], legacy) for cat in (False, True) for legacy in (False, True)
}


def _pickle_span(data: bytes) -> tuple[int, int]:
    """Where torch's zip format stores the (uncompressed) pickle of the object."""
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        name = next(n for n in zf.namelist() if n.endswith("data.pkl"))
        pkl = zf.read(name)
    start = data.find(pkl)
    return start, start + len(pkl)


def test_mutation_helpers_change_the_input() -> None:
    data = NATIVE_BYTES[(False, False)]
    lo, hi = _pickle_span(data)
    assert 0 < lo < hi and mutate(data, [("flip", 0, 0)], lo, hi) != data
    assert mutate(data, [("truncate", 10, 0)]) == data[:10]
    assert mutate(data, [("insert", 0, 7), ("delete", 0, 0)]) == data


@fuzz(150)
@given(
    categorical=st.booleans(),
    legacy=st.booleans(),
    in_pickle=st.booleans(),
    edits=byte_edits,
)
def test_native_file_bytes(
    work: Path, categorical: bool, legacy: bool, in_pickle: bool, edits: list[tuple[str, int, int]]
) -> None:
    data = NATIVE_BYTES[(categorical, legacy)]
    lo, hi = _pickle_span(data) if in_pickle and not legacy else (0, None)
    path = work / "native.pt"
    path.write_bytes(mutate(data, edits, lo, hi))
    outcome(load_policy, path)


_NATIVE_PATHS = [
    ["format"],
    ["version"],
    ["spec"],
    ["state_dict"],
    ["critic"],
    *[["spec", k] for k in NATIVE[False]["spec"]],
    ["spec", "unknown_field"],
    ["spec", "multi\nline"],
    *[["state_dict", k] for k in NATIVE[True]["state_dict"]],
    ["state_dict", "layers.9.weight"],
    *[["critic", k] for k in ("hidden", "activation", "input", "state_dict")],
    ["critic", "state_dict", "0.weight"],
    ["critic", "state_dict", "2.bias"],
]


@fuzz(250)
@given(
    categorical=st.booleans(),
    plain=st.booleans(),
    edits=st.lists(
        st.tuples(st.sampled_from(_NATIVE_PATHS), odd_values, st.booleans()), min_size=1, max_size=3
    ),
    env=st.sampled_from([None, None, "CartPole-v1"]),
)
def test_native_file_fields(
    work: Path,
    categorical: bool,
    plain: bool,
    edits: list[tuple[list[str], Any, bool]],
    env: str | None,
) -> None:
    payload = torch.load(io.BytesIO(NATIVE_BYTES[(categorical, False)]), weights_only=True)
    if plain:  # the {"spec", "state_dict"} form has no format tag
        del payload["format"], payload["version"]
    for path_, value, delete in edits:
        edit_tree(payload, path_, value, delete)
    path = work / "fields.pt"
    try:
        path.write_bytes(_save(payload, legacy=False))
    except Exception:  # torch.save itself cannot write some odd values: nothing to load
        return
    outcome(load_policy, path, env_id=env)


# ---- SB3 zips ------------------------------------------------------------------------------------
def _sb3_box_data() -> dict[str, Any]:
    data = _sb3_data(obs_dim=3)
    data["action_space"] = {
        ":type:": "<class 'gymnasium.spaces.box.Box'>",
        "shape": "(1,)",
        "low": "[-2.]",
        "high": "[2.]",
    }
    return data


def _sb3_box_state() -> dict[str, torch.Tensor]:
    state = _sb3_state(obs_dim=3, n_actions=1)
    state["log_std"] = torch.zeros(1)
    return state


def _pickled_class(module: str, name: str) -> dict[str, str]:
    blob = b"\x80\x02c" + module.encode() + b"\n" + name.encode() + b"\nq\x00."
    return {":type:": "<class 'abc.ABCMeta'>", ":serialized:": base64.b64encode(blob).decode()}


def _chain(prefix: str, sizes: list[int], g: torch.Generator) -> dict[str, torch.Tensor]:
    out = {}
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        out[f"{prefix}{2 * i}.weight"] = torch.randn(b, a, generator=g)
        out[f"{prefix}{2 * i}.bias"] = torch.randn(b, generator=g)
    return out


def _sac_base() -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """A gymnasium-era SAC zip's fields (``_shape``) and weights, Pendulum sizes."""
    data = _sb3_box_data()
    data["policy_class"] = _pickled_class("stable_baselines3.sac.policies", "SACPolicy")
    data["action_space"]["_shape"] = data["action_space"].pop("shape")
    g = torch.Generator().manual_seed(1)
    state = _chain("actor.latent_pi.", [3, 4, 4], g)
    for name in ("mu", "log_std"):
        state[f"actor.{name}.weight"] = torch.randn(1, 4, generator=g)
        state[f"actor.{name}.bias"] = torch.randn(1, generator=g)
    state.update(_chain("critic.qf0.", [4, 4, 1], g))
    return data, state


def _dqn_base() -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    data = _sb3_data()
    data["policy_class"] = _pickled_class("stable_baselines3.dqn.policies", "DQNPolicy")
    g = torch.Generator().manual_seed(2)
    state = _chain("q_net.q_net.", [4, 4, 2], g)
    state.update(_chain("q_net_target.q_net.", [4, 4, 2], g))
    return data, state


#: (folder the zip sits in, data, state): CartPole (Discrete) and Pendulum (Box) policies of the
#: actor-critic, SAC and DQN families.
SB3_BASES = [
    ("sb3-ppo-CartPole-v1", _sb3_data(), _sb3_state()),
    ("sb3-ppo-Pendulum-v1", _sb3_box_data(), _sb3_box_state()),
    ("sb3-sac-Pendulum-v1", *_sac_base()),
    ("sb3-dqn-CartPole-v1", *_dqn_base()),
]
_SB3_DATA_PATHS = (
    [[k] for k in ("policy_class", "policy_kwargs", "observation_space", "action_space", "use_sde")]
    + [
        [space, k]
        for space in ("observation_space", "action_space")
        for k in (":type:", "shape", "_shape", "n", "low", "high")
    ]
    + [["policy_kwargs", "activation_fn"], ["policy_class", ":serialized:"]]
)
_SB3_STATE_KEYS = sorted(
    set().union(*(set(b[2]) for b in SB3_BASES))
    | {"mlp_extractor.policy_net.4.weight", "actor.log_std", "critic.qf1.0.weight"}
)

members = st.fixed_dictionaries(
    {
        "base": st.sampled_from(range(len(SB3_BASES))),
        "data_edits": st.lists(
            st.tuples(st.sampled_from(_SB3_DATA_PATHS), json_values, st.booleans()), max_size=3
        ),
        "data_bytes": st.none() | byte_edits,
        "state_edits": st.lists(
            st.tuples(
                st.sampled_from(_SB3_STATE_KEYS) | st.integers(0, 2),
                tensors | odd_values,
                st.booleans(),
            ),
            max_size=3,
        ),
        "policy_bytes": st.none() | byte_edits,
        "drop": st.sets(
            st.sampled_from(["data", "policy.pth", "_stable_baselines3_version"]), max_size=2
        ),
        "deflate": st.booleans(),
        "zip_bytes": st.none() | byte_edits,
    }
)


UNMUTATED: dict[str, Any] = {
    "base": 0, "data_edits": [], "data_bytes": None, "state_edits": [], "policy_bytes": None,
    "drop": set(), "deflate": True, "zip_bytes": None,
}  # fmt: skip


def _sb3_zip(m: dict[str, Any]) -> tuple[str, bytes]:
    folder, data, state = SB3_BASES[m["base"]]
    data = json.loads(json.dumps(data))
    for path_, value, delete in m["data_edits"]:
        edit_tree(data, path_, value, delete)
    state = dict(state)
    for key, value, delete in m["state_edits"]:
        if delete:
            state.pop(key, None)
        else:
            state[key] = value
    raw_data = json.dumps(data).encode()
    try:
        raw_policy = _torch_bytes(state)
    except Exception:  # torch.save cannot write some odd values: keep the valid weights
        raw_policy = _torch_bytes(SB3_BASES[m["base"]][2])
    if m["data_bytes"]:
        raw_data = mutate(raw_data, m["data_bytes"])
    if m["policy_bytes"]:
        raw_policy = mutate(raw_policy, m["policy_bytes"])
    buf = io.BytesIO()
    mode = zipfile.ZIP_DEFLATED if m["deflate"] else zipfile.ZIP_STORED
    with zipfile.ZipFile(buf, "w", mode) as zf:
        for name, content in (("data", raw_data), ("policy.pth", raw_policy)):
            if name not in m["drop"]:
                zf.writestr(name, content)
        if "_stable_baselines3_version" not in m["drop"]:
            zf.writestr("_stable_baselines3_version", "2.3.0")
    out = buf.getvalue()
    return folder, mutate(out, m["zip_bytes"]) if m["zip_bytes"] else out


@fuzz(200)
@given(m=members)
def test_sb3_zips(work: Path, m: dict[str, Any]) -> None:
    folder, content = _sb3_zip(m)
    path = work / folder / "model.zip"
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(content)
    outcome(load_policy, path)


def test_unmutated_bases_load(work: Path) -> None:
    # the fuzz tests mean something only if the files they start from are valid
    for folder, data, state in SB3_BASES:
        path = work / "valid" / folder / "model.zip"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(_sb3_zip({**UNMUTATED, "base": SB3_BASES.index((folder, data, state))})[1])
        assert load_policy(path).format == "sb3-zip"
    for (cat, legacy), data in NATIVE_BYTES.items():
        path = work / "valid" / f"native-{cat}-{legacy}.pt"
        path.write_bytes(data)
        assert load_policy(path).critic is not None
    for data in PICKLES:
        assert safe_loads(data, "ok.pkl") is not None
    (work / "valid" / "vecnormalize.pkl").write_bytes(PICKLES[-1])
    assert load_norm_stats(work / "valid" / "vecnormalize.pkl").mean.shape == (3,)


@fuzz(60)
@given(
    content=st.binary(max_size=400),
    magic=st.sampled_from([b"", b"PK\x03\x04", b"\x80\x02", b"\x80\x05"]),
)
@example(content=b"", magic=b"")
def test_random_bytes_as_policy(work: Path, content: bytes, magic: bytes) -> None:
    path = work / "random.pt"
    path.write_bytes(magic + content)
    outcome(load_policy, path)


# ---- pickles (the restricted unpickler) ----------------------------------------------------------
def _pickles() -> list[bytes]:
    """Protocol 2-5 pickles of plain data and of an RL Zoo VecNormalize (built from stand-ins)."""
    plain = {"mean": np.arange(3.0), "var": np.ones(3, np.float32), "n": 3, "t": (1, 2.5, None)}
    plain.update(s={1, 2}, b=b"ab", c=complex(1, 2), o=np.int64(7), big=2**70)
    saved = {name: sys.modules.get(name) for name in _FAKE_MODULES}
    classes: dict[str, type] = {}
    try:
        for mod_name, cls_name in _FAKE_MODULES.items():
            mod = types.ModuleType(mod_name)
            if cls_name:
                classes[cls_name] = type(cls_name, (), {"__module__": mod_name})
                setattr(mod, cls_name, classes[cls_name])
            sys.modules[mod_name] = mod
        vn = pickle.loads(_vecnormalize_bytes(classes))
        records = [pickle.dumps(vn, protocol=p) for p in range(2, 6)]
    finally:
        for name, old in saved.items():
            if old is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = old
    return [pickle.dumps(plain, protocol=p) for p in range(2, 6)] + records


PICKLES = _pickles()


@fuzz(300)
@given(which=st.integers(0, len(PICKLES) - 1), edits=byte_edits)
def test_mutated_pickles(work: Path, which: int, edits: list[tuple[str, int, int]]) -> None:
    data = mutate(PICKLES[which], edits)
    outcome(safe_loads, data, "mutated.pkl")
    path = work / "vecnormalize.pkl"
    path.write_bytes(data)
    outcome(load_norm_stats, path)


@fuzz(150)
@given(
    data=st.binary(max_size=300),
    proto=st.sampled_from([b"", b"\x80\x02", b"\x80\x04", b"\x80\x05"]),
)
def test_arbitrary_bytes_as_pickle(data: bytes, proto: bytes) -> None:
    outcome(safe_loads, proto + data, "random.pkl")


# ---- TOML profiles and targets -------------------------------------------------------------------
TOML_BASES = {
    "profile": (REPO / "profiles" / "hopper.toml").read_text(),
    "target": (REPO / "targets" / "cpu-x86.toml").read_text(),
}
_TOML_VALUES = [
    '"x"', '""', "0", "-1", "1.5", "1e400", "nan", "-inf", "true", "[]", '[1, "a"]', "[[1]]",
    "{a = 1}", "{}", "1979-05-27", "'lit'", "[0.5, 2]", "99999999999999999999", "[0.5, nan]",
]  # fmt: skip
_KEYS = sorted(set(re.findall(r"^(\w+) *=", "\n".join(TOML_BASES.values()), re.MULTILINE)))
_LINE_OPS = ("drop", "dup", "value", "key", "section", "flip", "truncate")
toml_edits = st.lists(
    st.tuples(
        st.sampled_from(_LINE_OPS),
        st.integers(0, 1 << 20),
        st.sampled_from(_TOML_VALUES + _KEYS) | st.text(max_size=5),
    ),
    min_size=1,
    max_size=5,
)


def mutate_toml(text: str, edits: list[tuple[str, int, str]]) -> str:
    """Line-level TOML edits: drop/duplicate a line, change a value, key or section, or a char."""
    lines = text.splitlines()
    for op, pos, arg in edits:
        if not lines:
            break
        i = pos % len(lines)
        key, eq, _ = lines[i].partition("=")
        if op == "drop":
            del lines[i]
        elif op == "dup":
            lines.insert(i, lines[i])
        elif op == "value" and eq:
            lines[i] = f"{key}= {arg}"
        elif op == "key" and eq:
            lines[i] = f"{arg} ={lines[i].partition('=')[2]}"
        elif op == "section":
            lines.insert(i, f"[{arg}]")
        elif op == "flip" and lines[i]:
            j = pos % len(lines[i])
            lines[i] = lines[i][:j] + (arg[:1] or "\x00") + lines[i][j + 1 :]
        elif op == "truncate":
            lines = lines[:i] + [lines[i][: pos % (len(lines[i]) + 1)]]
    return "\n".join(lines) + "\n"


_LOADERS = {"profile": load_profile, "target": load_target}


@fuzz(300)
@given(kind=st.sampled_from(["profile", "target"]), edits=toml_edits)
@example(kind="profile", edits=[("value", 8, "[" * 5000)])
def test_mutated_toml(work: Path, kind: str, edits: list[tuple[str, int, str]]) -> None:
    path = work / f"{kind}.toml"
    path.write_text(mutate_toml(TOML_BASES[kind], edits), encoding="utf-8")
    outcome(_LOADERS[kind], str(path))


@fuzz(100)
@given(kind=st.sampled_from(["profile", "target"]), text=st.text(max_size=200))
def test_random_toml_text(work: Path, kind: str, text: str) -> None:
    path = work / f"random-{kind}.toml"
    path.write_bytes(text.encode("utf-8", "surrogatepass"))
    outcome(_LOADERS[kind], str(path))


def test_unmutated_toml_loads(work: Path) -> None:
    for kind, text in TOML_BASES.items():
        path = work / f"valid-{kind}.toml"
        path.write_text(mutate_toml(text, []), encoding="utf-8")
        assert _LOADERS[kind](str(path)).name in ("hopper", "cpu-x86")


def test_deep_nesting_is_one_error(work: Path) -> None:
    # tomllib and json recurse once per nesting level: a RecursionError must not escape
    path = work / "deep.toml"
    path.write_text("name = " + "[" * 100_000)
    with pytest.raises(CompressorError, match="nested too deeply"):
        load_profile(str(path))
    folder, data, state = SB3_BASES[0]
    zpath = work / "deep" / folder / "model.zip"
    zpath.parent.mkdir(parents=True)
    with zipfile.ZipFile(zpath, "w") as zf:
        zf.writestr("data", "[" * 100_000)
        zf.writestr("policy.pth", _torch_bytes(state))
    with pytest.raises(CompressorError, match="not valid JSON"):
        load_policy(zpath)


# ---- the other importers: rsl_rl, CleanRL, ONNX graphs, RL Zoo YAML ------------------------------
def _rsl_bases() -> dict[str, Any]:
    g = torch.Generator().manual_seed(3)
    mlp = _chain("mlp.", [3, 4, 1], g)
    norm = {"_mean": torch.zeros(1, 3), "_var": torch.ones(1, 3), "_std": torch.ones(1, 3)}
    norm["count"] = torch.tensor(5)
    actor = {**mlp, "distribution.std_param": torch.ones(1)}
    actor.update({f"obs_normalizer.{k}": v for k, v in norm.items()})
    v2 = {f"actor.{k[4:]}": v for k, v in mlp.items()}
    v2.update({f"critic.{k[4:]}": v for k, v in _chain("mlp.", [3, 4, 1], g).items()})
    return {
        "rsl5": {"actor_state_dict": actor, "critic_state_dict": dict(mlp), "iter": 3},
        "rsl2": {"model_state_dict": {**v2, "log_std": torch.zeros(1)},
                 "obs_norm_state_dict": dict(norm), "iter": 3},
        "dqn": _chain("network.", [4, 4, 2], g),
        "td3": ({"fc1.weight": torch.randn(4, 3, generator=g), "fc1.bias": torch.zeros(4),
                 "fc_mu.weight": torch.randn(1, 4, generator=g), "fc_mu.bias": torch.zeros(1),
                 "action_scale": torch.full((1,), 2.0), "action_bias": torch.zeros(1)},
                {"fc1.weight": torch.randn(4, 4, generator=g), "fc1.bias": torch.zeros(4),
                 "fc2.weight": torch.randn(1, 4, generator=g), "fc2.bias": torch.zeros(1)}),
    }  # fmt: skip


OTHER_BASES = _rsl_bases()
_OTHER_ENVS = {"rsl5": "Pendulum-v1", "rsl2": "Pendulum-v1", "dqn": "CartPole-v1", "td3": None}


def _paths(obj: Any, prefix: list[Any]) -> list[list[Any]]:
    if isinstance(obj, dict):
        out = [prefix + [k] for k in obj]
        for k, v in obj.items():
            out += _paths(v, prefix + [k])
        return out
    return []


@fuzz(200)
@given(
    base=st.sampled_from(sorted(OTHER_BASES)),
    which=st.integers(0, 1 << 16),
    value=odd_values | tensors,
    delete=st.booleans(),
    with_env=st.booleans(),
)
def test_rsl_rl_and_cleanrl_fields(
    work: Path, base: str, which: int, value: Any, delete: bool, with_env: bool
) -> None:
    obj = torch.load(io.BytesIO(_torch_bytes(OTHER_BASES[base])), weights_only=True)
    root = {"t": list(obj)} if isinstance(obj, tuple) else obj
    nets = root["t"] if isinstance(obj, tuple) else [root]
    paths = [(n, p) for n, net in enumerate(nets) for p in _paths(net, [])]
    n, path_ = paths[which % len(paths)]
    edit_tree(nets[n], path_, value, delete)
    saved = tuple(nets) if isinstance(obj, tuple) else nets[0]
    path = work / "runs" / "Pendulum-v1__td3__1__1" / "model_3.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        path.write_bytes(_torch_bytes(saved))
    except Exception:  # torch.save cannot write some odd values
        return
    outcome(load_policy, path, env_id=_OTHER_ENVS[base] if with_env else None)


def _onnx_bases() -> list[bytes]:
    import onnx

    from compressor.deploy.export import build_model

    out = []
    for head in ("gaussian", "deterministic"):
        p = make_policy(head, hidden=(4,), obs_dim=3, act_dim=1, env_id="Pendulum-v1")
        out.append(build_model(p)[0].SerializeToString())
    sparse = make_policy("categorical", hidden=(8,), obs_dim=4, env_id="CartPole-v1")
    with torch.no_grad():
        sparse.layers[0].weight[:, :3] = 0
    out.append(build_model(sparse, sparse_storage=True)[0].SerializeToString())
    assert all(onnx.load_from_string(b) is not None for b in out)
    return out


ONNX_BASES = _onnx_bases()
_ONNX_OPS = ["Gemm", "MatMul", "Add", "Sub", "Div", "Mul", "Tanh", "Relu", "Elu", "Clip",
             "ArgMax", "Sigmoid", "Identity", "Reshape", "Expand", "Cast", "Min",
             "Max"]  # fmt: skip


@fuzz(150)
@given(which=st.integers(0, len(ONNX_BASES) - 1), edits=byte_edits)
def test_onnx_bytes(work: Path, which: int, edits: list[tuple[str, int, int]]) -> None:
    path = work / "policy.onnx"
    path.write_bytes(mutate(ONNX_BASES[which], edits))
    outcome(load_policy, path)


@fuzz(150)
@given(
    which=st.integers(0, len(ONNX_BASES) - 1),
    node=st.integers(0, 1 << 10),
    op=st.sampled_from(["op", "input", "drop", "init", "attr", "output"]),
    arg=st.sampled_from(_ONNX_OPS) | st.text(max_size=4),
)
def test_onnx_structure(work: Path, which: int, node: int, op: str, arg: str) -> None:
    import onnx

    model = onnx.load_from_string(ONNX_BASES[which])
    nodes, inits = model.graph.node, model.graph.initializer
    target = nodes[node % len(nodes)]
    if op == "op":
        target.op_type = arg
    elif op == "input" and target.input:
        target.input[node % len(target.input)] = arg
    elif op == "drop":
        del nodes[node % len(nodes)]
    elif op == "init" and inits:
        del inits[node % len(inits)]
    elif op == "attr" and target.attribute:
        target.attribute[0].i = node - 512
    elif op == "output":
        model.graph.output[0].name = arg
    path = work / "structure.onnx"
    path.write_bytes(model.SerializeToString())
    outcome(load_policy, path, env_id="Pendulum-v1" if which < 2 else "CartPole-v1")


_ZOO_CONFIG = """!!python/object/apply:collections.OrderedDict
- - - env_wrapper
    - sb3_contrib.common.wrappers.TimeFeatureWrapper:
        max_steps: 1000
  - - normalize
    - false
"""


@fuzz(150)
@given(edits=toml_edits, kwargs=st.text(max_size=40) | st.sampled_from(["{}", "g: 9.0", "g: x"]))
def test_zoo_yaml(work: Path, edits: list[tuple[str, int, str]], kwargs: str) -> None:
    folder = work / "zoo" / "Pendulum-v1_1"
    (folder / "Pendulum-v1").mkdir(parents=True, exist_ok=True)
    zpath = folder / "Pendulum-v1.zip"
    if not zpath.exists():
        zpath.write_bytes(_sb3_zip({**UNMUTATED, "base": 1})[1])
    (folder / "Pendulum-v1" / "config.yml").write_text(mutate_toml(_ZOO_CONFIG, edits))
    (folder / "Pendulum-v1" / "env_kwargs.yml").write_bytes(kwargs.encode("utf-8", "replace"))
    outcome(load_policy, zpath)


def test_unmutated_other_bases_load(work: Path) -> None:
    for base, obj in OTHER_BASES.items():
        path = work / "valid-other" / "runs" / "Pendulum-v1__td3__1__1" / f"{base}.pt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(_torch_bytes(obj))
        assert load_policy(path, env_id=_OTHER_ENVS[base]).format in ("rsl_rl", "cleanrl")
    for data in ONNX_BASES:
        path = work / "valid-other" / "p.onnx"
        path.write_bytes(data)
        assert load_policy(path).format == "onnx"
    zpath = work / "valid-other" / "zoo" / "Pendulum-v1.zip"
    zpath.parent.mkdir(parents=True)
    zpath.write_bytes(_sb3_zip({**UNMUTATED, "base": 1})[1])
    (zpath.parent / "config.yml").write_text(
        _ZOO_CONFIG.replace("sb3_contrib.common.wrappers.TimeFeatureWrapper", "x.NotAWrapper")
    )
    with pytest.raises(CompressorError, match="does not re-create"):
        load_policy(zpath)
