"""Import Stable-Baselines3 and sb3-contrib MLP policies from their ``.zip`` files, without
running them: PPO, A2C, TRPO, SAC, TQC, TD3, DDPG, DQN and QR-DQN (see :mod:`.sb3_algos`), from
SB3 1.x (gym) and 2.x (gymnasium), pickled under numpy 1 or 2.

An SB3 zip holds ``data`` (JSON; fields that JSON cannot hold are base64 cloudpickles marked
``:serialized:``), ``policy.pth`` (the policy's state dict) and version files. We read only the
plain JSON fields and the state dict (``torch.load(weights_only=True)``); serialized fields are
never unpickled, only their opcodes are read to find the activation class and to notice tampering.
The spaces are read from the plain fields SB3 writes beside each pickle (``shape`` under gym,
``_shape`` under gymnasium; ``low``/``high`` as numpy reprs). Observation normalisation lives in
a separate ``vecnormalize.pkl`` (RL Zoo), read with the restricted unpickler; the RL Zoo's
``config.yml`` wrappers and ``env_kwargs`` are read as text (:mod:`.zoo`).
"""

from __future__ import annotations

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
    load_norm_stats,
    resolve_env_id,
    torch_load_safe,
)
from compressor.policy.importers.sb3_algos import (
    Source,
    extract,
    family_of,
    policy_class,
    serialized_globals,
)
from compressor.policy.importers.zoo import ZooLayout, read_layout
from compressor.policy.model import Policy, PolicySpec
from compressor.policy.native import sha256_file
from compressor.rl.envs import env_dims

FORMAT = "sb3-zip"
#: Largest zip member read; SB3 MLP policies are a few MiB.
MAX_MEMBER_BYTES = 1 << 30
#: Globals no SB3 data field has a reason to reference: seeing one means the file was tampered
#: with. We never unpickle these fields anyway; this only turns a hostile file into an error.
_HOSTILE_MODULES = (
    "os", "posix", "nt", "subprocess", "sys", "shutil", "socket", "importlib", "runpy",
    "ctypes", "pathlib", "io", "pickle", "marshal", "code", "pty", "webbrowser",
    "multiprocessing", "tempfile", "urllib", "http", "requests",
)  # fmt: skip
_HOSTILE_BUILTINS = {"eval", "exec", "open", "compile", "__import__", "breakpoint", "input"}


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


def _check_serialized_fields(data: dict[str, Any], origin: str) -> None:
    for key, value in data.items():
        for module, name in serialized_globals(value):
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


def _shape(space: dict[str, Any]) -> list[int]:
    """A space's shape: ``shape`` under gym (SB3 1.x), ``_shape`` under gymnasium (SB3 2.x)."""
    return _ints(space.get("shape", space.get("_shape")))


def _float_list(text: Any, n: int) -> list[float] | None:
    """Parse a numpy repr like ``[-1. -1. -1.]``; None if elided (``...``) or malformed."""
    if not isinstance(text, str) or "..." in text:
        return None
    try:
        vals = [float(t) for t in re.split(r"[\s,\[\]]+", text) if t]
    except ValueError:
        return None
    return vals if len(vals) == n else None


def _obs_dim(data: dict[str, Any], origin: str) -> int:
    space = data.get("observation_space") or {}
    kind, shape = _space_kind(space), _shape(space) if isinstance(space, dict) else []
    if kind == "Dict":
        raise CompressorError(f"{origin}: dict observations are not supported (flat Box only)")
    if kind == "Box" and len(shape) in (2, 3):
        raise CompressorError(
            f"{origin}: image observations {tuple(shape)} (CNN policies) are not supported"
        )
    if kind != "Box" or len(shape) != 1:
        raise CompressorError(
            f"{origin}: observation space {kind} is not supported (flat Box observations only)"
        )
    return shape[0]


def _actions(data: dict[str, Any], origin: str) -> tuple[int, bool, dict[str, Any]]:
    """``(act_dim, discrete, the action space's fields)``."""
    space = data.get("action_space") or {}
    if not isinstance(space, dict):
        space = {}
    kind = _space_kind(space)
    if kind == "Box":
        shape = _shape(space)
        if len(shape) != 1:
            raise CompressorError(f"{origin}: only 1-D Box action spaces are supported")
        return shape[0], False, space
    if kind == "Discrete" and len(_ints(space.get("n"))) == 1:
        if _ints(space.get("start", 0)) not in ([], [0]):
            raise CompressorError(f"{origin}: Discrete actions with start != 0 are not supported")
        return _ints(space.get("n"))[0], True, space
    raise CompressorError(
        f"{origin}: action space {kind} is not supported (Box and Discrete only; "
        "MultiDiscrete, MultiBinary and Dict actions cannot be imported)"
    )


# ---- the importer ------------------------------------------------------------------------------
def import_sb3(
    path: Path,
    env_id: str | None = None,
    vecnormalize: str | Path | None = None,
    env_kwargs: dict[str, Any] | None = None,
) -> ImportResult:
    """Import an SB3 / sb3-contrib MLP ``.zip`` with its normalisation stats and RL Zoo layout.

    :param path: the zip file.
    :param env_id: the environment to use; default: found from the RL Zoo layout or names.
    :param vecnormalize: statistics file; default: a ``vecnormalize.pkl`` found beside the zip.
    :param env_kwargs: env kwargs; default: the RL Zoo run's (``env_kwargs.yml``/``args.yml``).
    """
    origin = path.name
    data, state, versions = read_archive(path)
    cls = policy_class(data)
    fam = family_of(cls, state, origin)
    obs_dim = _obs_dim(data, origin)
    act_dim, discrete, act_space = _actions(data, origin)
    zoo = read_layout(path)
    warnings: list[str] = []
    kwargs = dict(zoo.env_kwargs if env_kwargs is None else env_kwargs)
    trained_env, env_source = zoo.trained_env, zoo.env_source
    if env_id is None:
        if trained_env is None:
            raise CompressorError(
                f"{origin}: cannot tell which environment it was trained on; pass --env ENV_ID"
            )
        env_id, env_warning = resolve_env_id(trained_env, kwargs, obs_dim, zoo.wrappers)
        if env_warning:
            warnings.append(env_warning)
    else:
        env_source = "given"

    bounds = None
    if not discrete:
        low = _float_list(act_space.get("low"), act_dim)
        high = _float_list(act_space.get("high"), act_dim)
        if low is None or high is None:
            dims = env_dims(env_id, kwargs, zoo.wrappers)
            low, high = dims["low"], dims["high"]
            warnings.append(f"action bounds not readable from {origin}; taken from {env_id}")
        bounds = (low, high)
    src = Source(data, state, obs_dim, act_dim, discrete, bounds, origin)
    parts = extract(fam, src)

    source: dict[str, Any] = {
        "format": FORMAT,
        "file": origin,
        "sha256": sha256_file(path),
        "sb3_version": versions.get("_stable_baselines3_version", "unknown").strip(),
        "algo": parts.algo,
        "policy_class": cls or "unknown",
        "activation_source": parts.activation_source,
        "trained_env_id": trained_env,
        "env_id_source": env_source,
        "env_kwargs_source": "given" if env_kwargs is not None else zoo.env_kwargs_source,
        "num_timesteps": data.get("num_timesteps"),
        "system_info": _system_info(versions.get("system_info.txt", "")),
        "obs_stats": None,
    }
    if zoo.wrappers:
        source["env_wrappers_source"] = zoo.config
    spec = PolicySpec(
        obs_dim=obs_dim,
        act_dim=act_dim,
        hidden=[int(w.shape[0]) for w, _ in parts.layers[:-1]],
        activation=parts.activation,
        head=parts.head,
        action_low=None if bounds is None else bounds[0],
        action_high=None if bounds is None else bounds[1],
        env_id=env_id,
        env_kwargs=kwargs,
        source=source,
        env_wrappers=zoo.wrappers,
        **parts.options,
    )
    policy = build_policy(spec, parts.layers, origin, parts.log_std, parts.log_std_layer)
    _install_stats(policy, path, vecnormalize, zoo, warnings)
    return ImportResult(policy, parts.critic, warnings, parts.q_nets)


def _install_stats(
    policy: Policy, path: Path, vecnormalize: str | Path | None, zoo: ZooLayout, warnings: list[str]
) -> None:
    """Install the normalisation statistics given or found beside the zip; warn when the Zoo
    config says there should be some and none was found."""
    origin = path.name
    stats_path = Path(vecnormalize) if vecnormalize is not None else zoo.stats
    if stats_path is not None:
        apply_norm_stats(policy, load_norm_stats(stats_path))
        policy.spec.source["obs_stats"] = {
            "file": stats_path.name,
            "sha256": sha256_file(stats_path),
        }
    elif zoo.normalize:
        warnings.append(
            f"NO OBSERVATION NORMALISATION STATISTICS: {zoo.config} says the policy was trained "
            f"with normalize: true, but no vecnormalize.pkl was found beside {origin} or in the "
            "RL Zoo folder; the policy will see raw observations and will likely fail. "
            "Pass the file with --vecnormalize PATH"
        )
    elif zoo.normalize is None:
        warnings.append(
            f"no vecnormalize.pkl beside {origin} and no RL Zoo config.yml saying whether it "
            "was trained with observation normalisation; if it was, pass --vecnormalize PATH"
        )


def _system_info(text: str) -> dict[str, str]:
    """``key: value`` lines of SB3's system_info.txt (OS line dropped: it identifies a host)."""
    out = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() and key.strip() != "OS":
            out[key.strip()] = value.strip()
    return out
