"""Fuzzing every loader: a mutated file gives a clean result or one CompressorError, nothing else.

Inputs start from valid files (a native ``.pt`` in both torch formats, SB3 zips, protocol 2-5
pickles, the shipped TOML files) and are mutated at the byte level (flip, overwrite, insert,
delete, truncate) and at the structure level (a field dropped or replaced by a value of the wrong
kind, a zip member removed). Any other exception fails the test with the input that caused it.
``COMPRESSOR_FUZZ_SCALE=N`` runs N times as many examples, randomised (a longer local hunt).
"""

from __future__ import annotations

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


#: (folder the zip sits in, data, state): CartPole (Discrete) and Pendulum (Box) policies.
SB3_BASES = [
    ("sb3-ppo-CartPole-v1", _sb3_data(), _sb3_state()),
    ("sb3-ppo-Pendulum-v1", _sb3_box_data(), _sb3_box_state()),
]
_SB3_DATA_PATHS = (
    [[k] for k in ("policy_class", "policy_kwargs", "observation_space", "action_space", "use_sde")]
    + [
        [space, k]
        for space in ("observation_space", "action_space")
        for k in (":type:", "shape", "n", "low", "high")
    ]
    + [["policy_kwargs", "activation_fn"], ["policy_class", ":serialized:"]]
)
_SB3_STATE_KEYS = sorted(
    set(SB3_BASES[0][2]) | set(SB3_BASES[1][2]) | {"mlp_extractor.policy_net.4.weight"}
)

members = st.fixed_dictionaries(
    {
        "base": st.sampled_from([0, 1]),
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
