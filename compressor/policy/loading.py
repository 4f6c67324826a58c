"""The single entry point that turns any supported policy file into a :class:`LoadedPolicy`.

The format is decided by the file's content, not its extension: a native ``.pt``, a
Stable-Baselines3 / sb3-contrib ``.zip`` (with the RL Zoo's layout and ``vecnormalize.pkl``), a
CleanRL agent (PPO, DQN, TD3/DDPG, SAC), an rsl_rl ``model_*.pt`` checkpoint, a dense ONNX
policy, or a plain ``{"spec": ..., "state_dict": ...}``. Nothing in any of them is executed:
torch files load with ``weights_only=True``, pickles with a restricted unpickler, ONNX graphs are
parsed node by node. Every failure a user can cause is a one-line :class:`CompressorError`.
"""

from __future__ import annotations

import math
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from compressor.core import atomic
from compressor.core.errors import CompressorError
from compressor.policy.importers import cleanrl, onnx_policy, rslrl, sb3
from compressor.policy.importers.common import (
    ImportResult,
    apply_norm_stats,
    load_norm_stats,
    resolve_env_id,
    torch_load_safe,
)
from compressor.policy.model import DISCRETE_HEADS, Policy, PolicySpec, check_finite
from compressor.policy.native import policy_from_dict, policy_to_dict, sha256_file
from compressor.policy.value import QNet, ValueNet
from compressor.rl.envs import check_policy_fits_env

NATIVE = "native"
PLAIN = "state-dict+spec"
_ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_PROTO = 0x80  # first byte of a protocol >= 2 pickle (torch's legacy format)


@dataclass
class LoadedPolicy:
    """A policy file, loaded.

    :param policy: the policy.
    :param critic: its value network on normalised observations, when the file has one.
    :param warnings: things the user must see (missing statistics, env version mapped, ...).
    :param path: the file it came from.
    :param format: ``native``, ``sb3-zip``, ``cleanrl``, ``rsl_rl``, ``onnx`` or
        ``state-dict+spec``.
    :param sha256: SHA-256 of the file.
    :param q_nets: the Q-networks the file holds beyond the actor (SAC/TD3/TQC critics, DQN's
        target network), for the stages that can use them.
    """

    policy: Policy
    critic: ValueNet | None
    warnings: list[str]
    path: Path
    format: str
    sha256: str = field(default="")
    q_nets: list[QNet] = field(default_factory=list)


# ---- dispatch ------------------------------------------------------------------------------
def load_policy(
    path: str | Path,
    *,
    env_id: str | None = None,
    env_kwargs: dict[str, Any] | None = None,
    vecnormalize: str | Path | None = None,
) -> LoadedPolicy:
    """Load any supported policy file, without executing anything it contains.

    :param path: native ``.pt``, SB3 ``.zip``, CleanRL model, rsl_rl checkpoint, ``.onnx``, or
        ``{"spec", "state_dict"}`` file.
    :param env_id: the environment to use instead of the one recorded or inferred (needed for
        CleanRL models outside their run folder, rsl_rl checkpoints and foreign ONNX files): a
        gymnasium id, or ``module:EnvName-v0`` to import a module that registers it.
    :param env_kwargs: keyword arguments for ``gymnasium.make`` instead of the recorded ones.
    :param vecnormalize: observation statistics to install (SB3 ``vecnormalize.pkl``, or
        ``.npz``/``.json`` with mean and var); default: found beside an SB3 zip.
    :raises CompressorError: missing, empty, truncated or corrupt file, refused pickle content,
        unknown architecture, NaN/inf weights, or a policy that does not fit the environment.
    """
    p = Path(path)
    if not p.exists():
        raise CompressorError(f"{p}: file not found")
    if p.is_dir():
        raise CompressorError(f"{p}: is a folder; pass the policy file inside it")
    if p.stat().st_size == 0:
        raise CompressorError(f"{p}: file is empty")
    with open(p, "rb") as fh:
        magic = fh.read(4)

    if magic == _ZIP_MAGIC:
        try:
            with zipfile.ZipFile(p) as zf:
                names = zf.namelist()
        # a corrupt member name raises UnicodeDecodeError, a corrupt header NotImplementedError
        except (zipfile.BadZipFile, UnicodeDecodeError, NotImplementedError):
            raise CompressorError(f"{p}: truncated or corrupt zip file") from None
        if sb3.is_sb3_zip(names):
            result, fmt = sb3.import_sb3(p, env_id, vecnormalize, env_kwargs), sb3.FORMAT
        elif any(n.endswith("data.pkl") for n in names):  # torch.save's zip container
            obj = torch_load_safe(p, p.name)
            result, fmt = _from_torch_object(obj, p, env_id, vecnormalize, env_kwargs)
        else:
            raise CompressorError(
                f"{p}: zip file is not a policy (neither an SB3 model nor a torch file)"
            )
    elif magic[:1] == bytes([_PICKLE_PROTO]):
        obj = torch_load_safe(p, p.name)
        result, fmt = _from_torch_object(obj, p, env_id, vecnormalize, env_kwargs)
    elif onnx_policy.looks_like_onnx(p, magic):
        result = onnx_policy.import_onnx(p, env_id, vecnormalize, env_kwargs)
        fmt = onnx_policy.FORMAT
    else:
        raise CompressorError(
            f"{p}: not a recognised policy file (expected a native .pt, an SB3 .zip, a CleanRL "
            "model, an rsl_rl checkpoint, an .onnx policy or a torch-saved state dict with spec)"
        )

    policy = result.policy
    _check_env(policy, result.warnings, explicit=env_id is not None)
    critic = (
        ValueNet.from_entry(result.critic, policy.spec.obs_dim, p.name)
        if result.critic is not None
        else None
    )
    q_nets = [
        QNet.from_entry(e, policy.spec.obs_dim, policy.spec.act_dim, p.name) for e in result.q_nets
    ]
    return LoadedPolicy(policy, critic, result.warnings, p, fmt, sha256_file(p), q_nets)


def _from_torch_object(
    obj: Any,
    path: Path,
    env_id: str | None,
    vecnormalize: str | Path | None,
    env_kwargs: dict[str, Any] | None = None,
) -> tuple[ImportResult, str]:
    origin = path.name
    if isinstance(obj, dict) and "format" in obj:
        policy, fmt = policy_from_dict(obj, origin), NATIVE
    elif isinstance(obj, dict) and "spec" in obj and "state_dict" in obj:
        policy, fmt = _from_plain(obj, origin), PLAIN
    elif rslrl.looks_like_rsl_rl(obj):
        return rslrl.import_rsl_rl(obj, path, env_id, vecnormalize, env_kwargs), rslrl.FORMAT
    elif cleanrl.looks_like_cleanrl(obj):
        result = cleanrl.import_cleanrl(obj, path, env_id, vecnormalize, env_kwargs=env_kwargs)
        return result, cleanrl.FORMAT
    elif isinstance(obj, dict) and any(str(k).startswith("mlp_extractor.") for k in obj):
        raise CompressorError(f"{origin}: an SB3 policy.pth alone; pass the model .zip instead")
    elif isinstance(obj, (tuple, list)):
        raise CompressorError(
            f"{origin}: holds several networks, none of them a CleanRL actor this tool reads "
            "(fc1.., fc_mu or fc_mean with action_scale/action_bias)"
        )
    else:
        raise CompressorError(f"{origin}: unknown architecture (not a policy this tool can read)")

    warnings: list[str] = []
    spec = policy.spec
    spec.source = dict(spec.source)
    if fmt == PLAIN:
        spec.source.update(format=PLAIN, file=origin, sha256=sha256_file(path))
    else:  # keep the provenance chain of a converted/pruned policy; fill in what is missing
        spec.source.setdefault("format", NATIVE)
        spec.source.setdefault("file", origin)
        spec.source.setdefault("sha256", sha256_file(path))
    if env_id is not None:
        spec.env_id = env_id
    if env_kwargs is not None:
        spec.env_kwargs = dict(env_kwargs)
    if vecnormalize is not None:
        stats_path = Path(vecnormalize)
        apply_norm_stats(policy, load_norm_stats(stats_path))
        spec.source["obs_stats"] = {"file": stats_path.name, "sha256": sha256_file(stats_path)}
        warnings.append(f"normalisation statistics in {origin} replaced by {stats_path.name}")
    critic = obj.get("critic") if isinstance(obj, dict) else None
    q_nets = obj.get("q_nets", []) if isinstance(obj, dict) else []
    if not isinstance(q_nets, list):
        raise CompressorError(f"{origin}: malformed q_nets entry (not a list)")
    return ImportResult(policy=policy, critic=critic, warnings=warnings, q_nets=q_nets), fmt


def _from_plain(obj: dict[str, Any], origin: str) -> Policy:
    """A policy from ``{"spec": PolicySpec fields, "state_dict": Policy state dict}``.

    Buffers the user may not have (masks, action bounds, unit normalisation) get defaults; the
    layer weights, ``log_std`` for Gaussian heads and the statistics when ``obs_norm`` is set are
    required.
    """
    spec_d, state = obj["spec"], obj["state_dict"]
    if not isinstance(spec_d, dict) or not isinstance(state, dict):
        raise CompressorError(f"{origin}: 'spec' and 'state_dict' must both be dicts")
    try:
        spec = PolicySpec(**spec_d)
        policy = Policy(spec)
    except TypeError as exc:  # a field name the spec does not have (one line: it is the file's)
        detail = " ".join(str(exc).split())
        raise CompressorError(f"{origin}: malformed policy spec ({detail})") from None
    except CompressorError as exc:  # validate() does not know the file name
        raise CompressorError(f"{origin}: {exc}") from None
    full = policy.state_dict()
    required = {k for k in full if k.startswith("layers.")}
    required |= {"log_std"} if "log_std" in full else set()
    required |= {k for k in full if k.startswith("log_std_layer.")}
    required |= {"obs_mean", "obs_var"} if spec.obs_norm else set()
    missing = sorted(required - state.keys())
    unexpected = sorted(set(state) - set(full), key=str)  # a corrupt file may have non-str keys
    if missing or unexpected:
        what = f"missing {missing[0]!r}" if missing else f"unexpected {str(unexpected[0])!r}"
        raise CompressorError(
            f"{origin}: state_dict does not match the spec ({what}); keys must be those of "
            "compressor.policy.model.Policy (layers.<i>.weight, layers.<i>.bias, log_std, "
            "log_std_layer.weight, ...)"
        )
    try:
        policy.load_state_dict({**full, **state}, strict=True)
    except (RuntimeError, TypeError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else "shape mismatch"
        raise CompressorError(f"{origin}: weights do not match the spec ({first})") from None
    check_finite(policy, origin)
    return policy


def _check_env(policy: Policy, warnings: list[str], explicit: bool) -> None:
    """Map an unavailable recorded env to an installed version, then check the sizes fit."""
    spec = policy.spec
    if not spec.env_id:
        warnings.append("the policy does not record its environment; pass --env ENV_ID")
        return
    if not explicit and ":" in spec.env_id:
        # gymnasium imports the module named before ':' — a file must not choose code to run
        raise CompressorError(
            f"the policy names env {spec.env_id!r}, which would import module "
            f"{spec.env_id.split(':')[0]!r}; pass --env ENV_ID to choose the environment"
        )
    if not explicit:
        try:
            env_id, note = resolve_env_id(spec.env_id, spec.env_kwargs, spec.obs_dim)
        except CompressorError:
            warnings.append(
                f"environment {spec.env_id} is not available here; evaluation needs --env ENV_ID"
            )
            return
        if note:
            spec.source.setdefault("trained_env_id", spec.env_id)
            spec.env_id = env_id
            warnings.append(note)
    discrete = spec.head in DISCRETE_HEADS
    check_policy_fits_env(
        spec.obs_dim, spec.act_dim, discrete, spec.env_id, spec.env_kwargs, spec.env_wrappers
    )


# ---- saving and describing -----------------------------------------------------------------
def save_loaded(loaded: LoadedPolicy, path: str | Path) -> None:
    """Atomically save a loaded policy in the native format, with its critic when it has one.

    :param loaded: the policy (and critic) to save.
    :param path: the ``.pt`` destination.
    """
    payload = policy_to_dict(loaded.policy)
    if loaded.critic is not None:
        payload["critic"] = loaded.critic.to_entry()
    if loaded.q_nets:
        payload["q_nets"] = [q.to_entry() for q in loaded.q_nets]
    atomic.write_with(path, lambda tmp: torch.save(payload, tmp))


def _finite_or_none(values: list[float] | None) -> list[float | None] | None:
    if values is None:
        return None
    return [float(v) if math.isfinite(v) else None for v in values]


def describe(loaded: LoadedPolicy) -> dict[str, Any]:
    """A JSON-ready summary for ``compress inspect`` (unbounded action limits are ``None``).

    :param loaded: the loaded policy.
    """
    policy, spec = loaded.policy, loaded.policy.spec
    stats = spec.source.get("obs_stats")
    if not spec.obs_norm:
        stats_source = None
    elif isinstance(stats, dict) and stats.get("file"):
        stats_source = str(stats["file"])
    else:
        stats_source = "stored in the policy file"
    bounds = None
    if spec.head not in DISCRETE_HEADS and spec.action_low is not None:
        bounds = {
            "low": _finite_or_none(spec.action_low),
            "high": _finite_or_none(spec.action_high),
        }
    std: list[float] | str | None = None
    if policy.std_kind == "parameter":
        std = [round(float(s), 6) for s in policy.log_std.detach().exp()]
    elif policy.std_kind == "state":
        std = "state-dependent (a Linear layer on the last hidden activation)"
    return {
        "file": str(loaded.path),
        "format": loaded.format,
        "sha256": loaded.sha256,
        "env_id": spec.env_id or None,
        "env_kwargs": dict(spec.env_kwargs),
        "head": spec.head,
        "obs_dim": spec.obs_dim,
        "act_dim": spec.act_dim,
        "layer_sizes": [spec.obs_dim, *spec.hidden, spec.act_dim],
        "activation": spec.activation,
        "normalisation": {
            "enabled": spec.obs_norm,
            "clip": spec.obs_clip,
            "epsilon": spec.obs_eps if spec.obs_norm else None,
            "stats_source": stats_source,
        },
        "action_bounds": bounds,
        "action_map": policy.action_map,
        "action_std": std,
        "env_wrappers": list(spec.env_wrappers),
        "parameters": policy.num_parameters(),
        "nonzero_parameters": policy.num_parameters(nonzero_only=True),
        "sparsity": round(policy.sparsity(), 6),
        "layer_sparsity": [round(v, 4) for v in policy.layer_sparsity()],
        "critic": None
        if loaded.critic is None
        else {"hidden": list(loaded.critic.hidden), "activation": loaded.critic.activation},
        "q_nets": [
            {"kind": q.kind, "role": q.role, "hidden": list(q.hidden), "activation": q.activation}
            for q in loaded.q_nets
        ],
        "source": dict(spec.source),
        "warnings": list(loaded.warnings),
    }
