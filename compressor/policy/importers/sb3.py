"""Import Stable-Baselines3 PPO / A2C MLP policies from their ``.zip`` files, without running them.

An SB3 zip holds ``data`` (JSON; fields that JSON cannot hold are base64 cloudpickles marked
``:serialized:``), ``policy.pth`` (the policy's state dict) and version files. We read only the
plain JSON fields and the state dict (``torch.load(weights_only=True)``); serialized fields are
never unpickled, only their opcodes are read to find the activation class and to notice tampering.
Observation normalisation lives in a separate ``vecnormalize.pkl`` (RL Zoo), read with the
restricted unpickler.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import zipfile
from pathlib import Path
from typing import Any

import torch

from compressor.core.errors import CompressorError
from compressor.policy.importers.common import (
    ImportResult,
    apply_norm_stats,
    build_policy,
    check_chain,
    critic_entry,
    linear_chain,
    load_norm_stats,
    resolve_env_id,
    torch_load_safe,
)
from compressor.policy.importers.safe_pickle import referenced_globals
from compressor.policy.model import PolicySpec
from compressor.policy.native import sha256_file
from compressor.rl.envs import env_dims

FORMAT = "sb3-zip"
#: Largest zip member read; SB3 MLP policies are a few MiB.
MAX_MEMBER_BYTES = 1 << 30
#: SB3's default activation for ActorCriticPolicy (PPO, A2C) when policy_kwargs does not set one.
DEFAULT_ACTIVATION = "tanh"
SB3_ACTIVATIONS = {"Tanh": "tanh", "ReLU": "relu", "ELU": "elu"}
#: Globals no SB3 data field has a reason to reference: seeing one means the file was tampered
#: with. We never unpickle these fields anyway; this only turns a hostile file into an error.
_HOSTILE_MODULES = (
    "os", "posix", "nt", "subprocess", "sys", "shutil", "socket", "importlib", "runpy",
    "ctypes", "pathlib", "io", "pickle", "marshal", "code", "pty", "webbrowser",
    "multiprocessing", "tempfile", "urllib", "http", "requests",
)  # fmt: skip
_HOSTILE_BUILTINS = {"eval", "exec", "open", "compile", "__import__", "breakpoint", "input"}
_POLICY_PREFIXES = (
    "mlp_extractor.policy_net.",
    "mlp_extractor.value_net.",
    "action_net.",
    "value_net.",
    "log_std",
)
_ENV_RE = re.compile(r"[A-Za-z][A-Za-z0-9_]*(?:/[A-Za-z0-9_]+)?-v\d+")


def is_sb3_zip(names: list[str]) -> bool:
    """Whether a zip's member names look like an SB3 model (rather than a torch archive)."""
    return "data" in names or "policy.pth" in names


# ---- reading the archive -------------------------------------------------------------------
def _read_member(zf: zipfile.ZipFile, name: str, origin: str) -> bytes:
    info = zf.getinfo(name)
    if info.file_size > MAX_MEMBER_BYTES:
        raise CompressorError(f"{origin}: member {name} is implausibly large for a policy")
    try:
        return zf.read(name)
    except Exception as exc:  # BadZipFile (CRC), zlib.error, EOFError on truncated members
        raise CompressorError(f"{origin}: member {name} is corrupt ({exc})") from None


def read_archive(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, str]]:
    """The plain ``data`` fields, the policy state dict and version info of an SB3 zip.

    :param path: the zip file.
    :returns: ``(data, state_dict, versions)``.
    """
    origin = path.name
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
            if "policy.pth" not in names or "data" not in names:
                missing = "policy.pth" if "policy.pth" not in names else "data"
                raise CompressorError(
                    f"{origin}: zip is not a Stable-Baselines3 model (no {missing}); "
                    "pass the model .zip saved by SB3's model.save()"
                )
            raw_data = _read_member(zf, "data", origin)
            raw_policy = _read_member(zf, "policy.pth", origin)
            versions: dict[str, str] = {}
            for member in ("_stable_baselines3_version", "system_info.txt"):
                if member in names:
                    versions[member] = _read_member(zf, member, origin).decode("utf-8", "replace")
    except (
        zipfile.BadZipFile,
        UnicodeDecodeError,
        NotImplementedError,
    ) as exc:  # the latter: a corrupt member name
        raise CompressorError(f"{origin}: truncated or corrupt zip file ({exc})") from None
    try:
        data = json.loads(raw_data)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise CompressorError(f"{origin}: the 'data' member is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise CompressorError(f"{origin}: the 'data' member is not an SB3 parameter dict")
    _check_serialized_fields(data, origin)
    state = torch_load_safe(raw_policy, f"{origin}:policy.pth")
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise CompressorError(f"{origin}: policy.pth is not a state dict of tensors")
    return data, state, versions


def _serialized_globals(field: Any) -> list[tuple[str, str]]:
    """Globals referenced by a ``:serialized:`` field's pickle (opcodes only, nothing runs)."""
    if not isinstance(field, dict) or not isinstance(field.get(":serialized:"), str):
        return []
    try:
        blob = base64.b64decode(field[":serialized:"], validate=False)
    except (binascii.Error, ValueError):
        return []
    return referenced_globals(blob)


def _check_serialized_fields(data: dict[str, Any], origin: str) -> None:
    for key, value in data.items():
        for module, name in _serialized_globals(value):
            root = module.split(".")[0]
            if root in _HOSTILE_MODULES or (root == "builtins" and name in _HOSTILE_BUILTINS):
                raise CompressorError(
                    f"refused to load {origin}: its data field {key!r} carries a pickle that "
                    f"calls {module}.{name} (nothing was executed; the file has been tampered with)"
                )


# ---- plain-field parsing -----------------------------------------------------------------------
def _space_kind(space: Any) -> str:
    t = space.get(":type:") if isinstance(space, dict) else None
    m = re.search(r"spaces\.\w+\.(\w+)'", t) if isinstance(t, str) else None
    return m.group(1) if m else "unknown"


def _ints(text: Any) -> list[int]:
    return [int(x) for x in re.findall(r"-?\d+", str(text))]


def _float_list(text: Any, n: int) -> list[float] | None:
    """Parse a numpy repr like ``[-1. -1. -1.]``; None if elided (``...``) or malformed."""
    if not isinstance(text, str) or "..." in text:
        return None
    try:
        vals = [float(t) for t in re.split(r"[\s,\[\]]+", text) if t]
    except ValueError:
        return None
    return vals if len(vals) == n else None


def _activation(data: dict[str, Any], origin: str) -> tuple[str, str]:
    """The trunk activation and where it was read from."""
    kwargs = data.get("policy_kwargs")
    cls_name, where = None, "SB3 default for ActorCriticPolicy"
    if isinstance(kwargs, dict) and "activation_fn" in kwargs:
        m = re.search(r"\.(\w+)'>", str(kwargs["activation_fn"]))
        if m:
            cls_name, where = m.group(1), "data.policy_kwargs"
    if cls_name is None:
        acts = [n for mod, n in _serialized_globals(kwargs) if mod.startswith("torch.nn")]
        if acts:
            cls_name, where = acts[0], "data.policy_kwargs (pickle opcodes)"
    if cls_name is None:
        return DEFAULT_ACTIVATION, where
    if cls_name not in SB3_ACTIVATIONS:
        raise CompressorError(
            f"{origin}: activation {cls_name} is not supported (only Tanh, ReLU, ELU)"
        )
    return SB3_ACTIVATIONS[cls_name], where


def _policy_class(data: dict[str, Any]) -> str:
    globals_ = _serialized_globals(data.get("policy_class"))
    return globals_[0][1] if globals_ else "ActorCriticPolicy"


def _check_architecture(data: dict[str, Any], state: dict[str, Any], origin: str) -> str:
    cls = _policy_class(data)
    if cls != "ActorCriticPolicy":
        kind = {
            "RecurrentActorCriticPolicy": "recurrent (LSTM) policies",
            "ActorCriticCnnPolicy": "CNN policies",
            "MultiInputActorCriticPolicy": "dict-observation policies",
        }.get(cls, f"{cls} (SAC/TD3/DQN and other algorithms)")
        raise CompressorError(
            f"{origin}: {kind} are not supported; only SB3 PPO/A2C MLP policies can be imported"
        )
    if any(k.startswith("mlp_extractor.shared_net.") for k in state):
        raise CompressorError(
            f"{origin}: policy has layers shared by actor and critic (net_arch with shared "
            "layers); only separate pi/vf MLPs are supported"
        )
    if any("lstm" in k for k in state):
        raise CompressorError(f"{origin}: recurrent (LSTM) policies are not supported")
    unknown = [k for k in state if not k.startswith(_POLICY_PREFIXES)]
    if unknown:
        raise CompressorError(
            f"{origin}: unknown architecture (unexpected weights {unknown[0]!r}; custom feature "
            "extractors and CNNs are not supported)"
        )
    if data.get("use_sde") is True:
        raise CompressorError(f"{origin}: gSDE policies (use_sde=True) are not supported")
    return cls


# ---- RL Zoo layout -----------------------------------------------------------------------------
def read_zoo_yaml(path: Path) -> dict[str, str]:
    """Top-level scalars of an RL Zoo ``config.yml`` / ``args.yml``, as raw strings.

    The Zoo dumps an OrderedDict as a list of ``[key, value]`` pairs; plain ``key: value``
    files are read too. Only text is parsed (no YAML tags are honoured, nothing is constructed).

    :param path: the YAML file.
    """
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return {}
    out: dict[str, str] = {}
    pair = r"^(?:- |  )- - (\S+)\n    - (.*(?:\n      .*)*)"
    for m in re.finditer(pair, text, re.MULTILINE):
        out.setdefault(m.group(1), " ".join(m.group(2).split()))
    for m in re.finditer(r"^([A-Za-z_]\w*):[ \t]*(\S.*)$", text, re.MULTILINE):
        out.setdefault(m.group(1), m.group(2).strip())
    return out


def _zoo_dirs(path: Path, env_name: str | None) -> list[Path]:
    dirs = [path.parent]
    for name in (env_name, path.stem):
        if name and (path.parent / name).is_dir():
            dirs.append(path.parent / name)
    return list(dict.fromkeys(dirs))


def find_env_id(path: Path) -> tuple[str | None, str]:
    """The env id an SB3 zip was trained on, from the RL Zoo layout or the file/folder names.

    :param path: the zip file.
    :returns: ``(env id or None, where it was found)``.
    """
    for d in _zoo_dirs(path, None):
        env = read_zoo_yaml(d / "args.yml").get("env")
        if env:
            return env.strip("'\""), f"{d.name}/args.yml"
    for name in (path.stem, path.parent.name, path.parent.parent.name):
        for cand in _ENV_RE.findall(name):
            base = cand.rsplit("-v", 1)[0]
            if any(k.rsplit("-v", 1)[0] == base for k in _registry_ids()):
                return cand, f"name {name!r}"
    return None, ""


def _registry_ids() -> list[str]:
    import gymnasium as gym

    return list(gym.registry)


def find_vecnormalize(path: Path, env_name: str | None) -> Path | None:
    """``vecnormalize.pkl`` beside the zip or in the RL Zoo layout (``<dir>/<env>/``), if any.

    :param path: the zip file.
    :param env_name: the env id the zip was trained on (the Zoo's subfolder name).
    """
    for d in _zoo_dirs(path, env_name):
        if (d / "vecnormalize.pkl").is_file():
            return d / "vecnormalize.pkl"
    return None


def _zoo_expects_normalize(path: Path, env_name: str | None) -> tuple[bool | None, str]:
    """Whether a Zoo config says the policy was trained with observation normalisation."""
    for d in _zoo_dirs(path, env_name):
        cfg = d / "config.yml"
        if cfg.is_file():
            value = read_zoo_yaml(cfg).get("normalize")
            if value is None:
                return False, str(cfg)
            if re.search(r"norm_obs['\"]?\s*[:=]\s*False", value):
                return False, str(cfg)
            return value.strip().lower() not in ("false", "0", "no", "null", "~", ""), str(cfg)
    return None, ""


# ---- the importer ------------------------------------------------------------------------------
def import_sb3(
    path: Path, env_id: str | None = None, vecnormalize: str | Path | None = None
) -> ImportResult:
    """Import an SB3 PPO/A2C ``.zip`` (Box or Discrete actions) with its normalisation stats.

    :param path: the zip file.
    :param env_id: the environment to use; default: found from the RL Zoo layout or names.
    :param vecnormalize: statistics file; default: a ``vecnormalize.pkl`` found beside the zip.
    """
    origin = path.name
    data, state, versions = read_archive(path)
    policy_class = _check_architecture(data, state, origin)
    warnings: list[str] = []

    obs_space, act_space = data.get("observation_space") or {}, data.get("action_space") or {}
    if _space_kind(obs_space) != "Box" or len(_ints(obs_space.get("shape"))) != 1:
        raise CompressorError(f"{origin}: only flat Box observations are supported")
    obs_dim = _ints(obs_space.get("shape"))[0]
    kind = _space_kind(act_space)
    if kind == "Box":
        shape = _ints(act_space.get("shape"))
        if len(shape) != 1:
            raise CompressorError(f"{origin}: only 1-D Box action spaces are supported")
        act_dim, head = shape[0], "gaussian"
    elif kind == "Discrete" and len(_ints(act_space.get("n"))) == 1:
        act_dim, head = _ints(act_space.get("n"))[0], "categorical"
    else:
        raise CompressorError(f"{origin}: action space {kind} is not supported (Box, Discrete)")

    activation, act_source = _activation(data, origin)
    pi = linear_chain(state, "mlp_extractor.policy_net.", origin)
    if "action_net.weight" not in state or "action_net.bias" not in state:
        raise CompressorError(f"{origin}: policy.pth has no action_net (not an SB3 policy?)")
    layers = [*pi, (state["action_net.weight"], state["action_net.bias"])]
    check_chain(layers, obs_dim, "policy", origin)  # every layer a Linear with bias, sizes fit
    if layers[-1][0].shape[0] != act_dim:
        raise CompressorError(
            f"{origin}: action_net has {layers[-1][0].shape[0]} outputs, expected {act_dim}"
        )

    trained_env, env_source = find_env_id(path)
    if env_id is None:
        if trained_env is None:
            raise CompressorError(
                f"{origin}: cannot tell which environment it was trained on; pass --env ENV_ID"
            )
        env_id, env_warning = resolve_env_id(trained_env, obs_dim=obs_dim)
        if env_warning:
            warnings.append(env_warning)
    else:
        env_source = "given"

    low = high = None
    if head == "gaussian":
        low = _float_list(act_space.get("low"), act_dim)
        high = _float_list(act_space.get("high"), act_dim)
        if low is None or high is None:
            dims = env_dims(env_id)
            low, high = dims["low"], dims["high"]
            warnings.append(f"action bounds not readable from {origin}; taken from {env_id}")

    source: dict[str, Any] = {
        "format": FORMAT,
        "file": origin,
        "sha256": sha256_file(path),
        "sb3_version": versions.get("_stable_baselines3_version", "unknown").strip(),
        "algo": "PPO" if "clip_range" in data else "A2C",
        "policy_class": policy_class,
        "activation_source": act_source,
        "trained_env_id": trained_env,
        "env_id_source": env_source,
        "num_timesteps": data.get("num_timesteps"),
        "system_info": _system_info(versions.get("system_info.txt", "")),
        "obs_stats": None,
    }
    spec = PolicySpec(
        obs_dim=obs_dim,
        act_dim=act_dim,
        hidden=[int(w.shape[0]) for w, _ in pi],
        activation=activation,
        head=head,
        action_low=low,
        action_high=high,
        env_id=env_id,
        source=source,
    )
    policy = build_policy(spec, layers, origin, log_std=state.get("log_std"))

    stats_path = Path(vecnormalize) if vecnormalize is not None else None
    stats_path = stats_path or find_vecnormalize(path, trained_env)
    expects, cfg = _zoo_expects_normalize(path, trained_env)
    if stats_path is not None:
        stats = load_norm_stats(stats_path)
        apply_norm_stats(policy, stats)
        source["obs_stats"] = {"file": stats_path.name, "sha256": sha256_file(stats_path)}
    elif expects:
        warnings.append(
            f"NO OBSERVATION NORMALISATION STATISTICS: {cfg} says the policy was trained with "
            f"normalize: true, but no vecnormalize.pkl was found beside {origin} or in the RL Zoo "
            "folder; the policy will see raw observations and will likely fail. "
            "Pass the file with --vecnormalize PATH"
        )
    elif expects is None:
        warnings.append(
            f"no vecnormalize.pkl beside {origin} and no RL Zoo config.yml saying whether it "
            "was trained with observation normalisation; if it was, pass --vecnormalize PATH"
        )

    vf = linear_chain(state, "mlp_extractor.value_net.", origin)
    critic = None
    if "value_net.weight" in state and "value_net.bias" in state:
        critic = critic_entry(
            [*vf, (state["value_net.weight"], state["value_net.bias"])], activation, obs_dim, origin
        )
    return ImportResult(policy=policy, critic=critic, warnings=warnings)


def _system_info(text: str) -> dict[str, str]:
    """``key: value`` lines of SB3's system_info.txt (OS line dropped: it identifies a host)."""
    out = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() and key.strip() != "OS":
            out[key.strip()] = value.strip()
    return out
