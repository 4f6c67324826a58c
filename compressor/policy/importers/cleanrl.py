"""Import CleanRL agents as their scripts save them (``torch.save`` of state dicts).

- ``ppo.py`` / ``ppo_continuous_action.py``: one agent state dict, ``actor`` (discrete) or
  ``actor_mean`` + ``actor_logstd`` (continuous, tanh), and ``critic``;
- ``dqn.py``: ``q_network.state_dict()``, a ``network`` Sequential (ReLU) of Q-values;
- ``td3_continuous_action.py`` / ``ddpg_continuous_action.py``: a tuple ``(actor, qf1[, qf2])``
  of state dicts; the actor is ``fc1``, ``fc2``, ``fc_mu`` (ReLU, tanh, then
  ``· action_scale + action_bias``), the critics ``fc1..fc3`` on ``[obs, action]``;
- ``sac_continuous_action.py`` (which saves nothing itself; ``torch.save(actor.state_dict())``
  or the TD3-style tuple): ``fc1``, ``fc2``, ``fc_mean``, ``fc_logstd`` (tanh-squashed into
  [-5, 2]), ``action_scale``, ``action_bias``.

The file records neither the environment nor the observation normalisation statistics (the
continuous PPO script trains behind ``NormalizeObservation``), so the env id must be given or
read from CleanRL's run folder name (``runs/<env>__<exp>__<seed>__<time>/``), and the statistics
must be passed separately.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from compressor.core.errors import CompressorError
from compressor.policy.importers.common import (
    ImportResult,
    Layer,
    apply_norm_stats,
    build_policy,
    critic_entry,
    linear_chain,
    load_norm_stats,
    q_entry,
    resolve_env_id,
)
from compressor.policy.model import PolicySpec
from compressor.policy.native import sha256_file
from compressor.rl.envs import env_dims

FORMAT = "cleanrl"
#: CleanRL's PPO scripts hard-code Tanh; the state dict does not record it.
DEFAULT_ACTIVATION = "tanh"
_KNOWN_PREFIXES = ("actor_mean.", "actor.", "critic.", "actor_logstd")
#: CleanRL SAC's ``LOG_STD_MIN``, ``LOG_STD_MAX`` (tanh-squashed into them).
SAC_LOG_STD_BOUNDS = [-5.0, 2.0]
#: CleanRL's TD3/DDPG ``exploration_noise`` and DQN's ``end_e``.
TD3_EXPLORATION, DQN_EXPLORATION = 0.1, 0.05
_FC = re.compile(r"fc(\d+)\.weight")


def _tensor_dict(obj: Any) -> bool:
    return (
        isinstance(obj, dict)
        and bool(obj)
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
    )


def _is_ppo(obj: Any) -> bool:
    keys = [k for k in obj if isinstance(k, str)] if isinstance(obj, dict) else []
    has_actor = any(k.startswith(("actor_mean.", "actor.")) for k in keys)
    return has_actor and any(k.startswith("critic.") for k in keys)


def _is_dqn(obj: Any) -> bool:
    if not _tensor_dict(obj) or not all(k.startswith("network.") for k in obj):
        return False
    weights = [k for k in obj if k.endswith(".weight")]
    return bool(weights) and all(
        obj[k].dim() == 2 and k[: -len("weight")] + "bias" in obj for k in weights
    )


def _is_actor(obj: Any) -> bool:
    return _tensor_dict(obj) and any(k.startswith(("fc_mu.", "fc_mean.")) for k in obj)


def looks_like_cleanrl(obj: Any) -> bool:
    """Whether a loaded object is a CleanRL agent: a PPO agent or DQN Q-network state dict, an
    actor state dict, or a ``(actor, qf1, ...)`` tuple of them.

    :param obj: what ``torch.load`` returned.
    """
    if isinstance(obj, (tuple, list)):
        return bool(obj) and _is_actor(obj[0]) and all(_tensor_dict(o) for o in obj)
    return _is_ppo(obj) or _is_dqn(obj) or _is_actor(obj)


def env_id_from_run_folder(path: Path) -> str | None:
    """The env id in CleanRL's run folder name ``<env>__<exp>__<seed>__<time>``, if present.

    :param path: the saved model file.
    """
    for name in (path.parent.name, path.stem):
        head = name.split("__")[0]
        if "__" in name and re.fullmatch(r"[A-Za-z][\w/]*-v\d+", head):
            return head
    return None


def import_cleanrl(
    obj: Any,
    path: Path,
    env_id: str | None = None,
    vecnormalize: str | Path | None = None,
    activation: str = DEFAULT_ACTIVATION,
    env_kwargs: dict[str, Any] | None = None,
) -> ImportResult:
    """Import a CleanRL agent (see the module docstring for the layouts).

    :param obj: what ``torch.load(weights_only=True)`` returned.
    :param path: the file it came from (for names, hash and the run-folder env id).
    :param env_id: the environment; default: from the run folder name.
    :param vecnormalize: normalisation statistics (``.npz``/``.json`` with mean/var, or an SB3
        ``vecnormalize.pkl``); CleanRL does not save them.
    :param activation: the PPO trunk's activation (CleanRL's PPO uses tanh; the off-policy
        scripts hard-code ReLU).
    :param env_kwargs: kwargs for ``gymnasium.make``.
    """
    if isinstance(obj, (tuple, list)) or _is_actor(obj):
        nets = list(obj) if isinstance(obj, (tuple, list)) else [obj]
        return _off_policy_actor(nets, path, env_id, vecnormalize, env_kwargs)
    if _is_dqn(obj):
        return _dqn(obj, path, env_id, vecnormalize, env_kwargs)
    return _ppo(obj, path, env_id, vecnormalize, activation, env_kwargs)


def _env(
    path: Path, env_id: str | None, obs_dim: int, env_kwargs: dict[str, Any] | None
) -> tuple[str, str | None, list[str]]:
    """``(env id, the run folder's env id, warnings)``."""
    warnings: list[str] = []
    found_env = env_id_from_run_folder(path)
    if env_id is None:
        if found_env is None:
            raise CompressorError(
                f"{path.name}: CleanRL models do not record their environment; pass --env ENV_ID"
            )
        env_id, env_warning = resolve_env_id(found_env, env_kwargs, obs_dim=obs_dim)
        if env_warning:
            warnings.append(env_warning)
    return env_id, found_env, warnings


def _source(path: Path, algo: str, activation_source: str, trained: str) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "file": path.name,
        "sha256": sha256_file(path),
        "algo": algo,
        "activation_source": activation_source,
        "trained_env_id": trained,
        "obs_stats": None,
    }


def _stats(
    result: ImportResult, vecnormalize: str | Path | None, warn_missing: str | None
) -> ImportResult:
    """Install the statistics given, or add the warning that none were."""
    if vecnormalize is not None:
        stats_path = Path(vecnormalize)
        apply_norm_stats(result.policy, load_norm_stats(stats_path))
        result.policy.spec.source["obs_stats"] = {
            "file": stats_path.name,
            "sha256": sha256_file(stats_path),
        }
    elif warn_missing:
        result.warnings.append(warn_missing)
    return result


_NO_STATS = (
    "CleanRL models do not save observation normalisation statistics; if this policy "
    "was trained with normalisation, pass them with --vecnormalize FILE"
)


def _ppo(
    state: dict[str, Any],
    path: Path,
    env_id: str | None,
    vecnormalize: str | Path | None,
    activation: str,
    env_kwargs: dict[str, Any] | None,
) -> ImportResult:
    """CleanRL PPO (Gaussian or categorical head, with its critic)."""
    origin = path.name
    unknown = [k for k in state if not str(k).startswith(_KNOWN_PREFIXES)]
    if unknown or not all(isinstance(v, torch.Tensor) for v in state.values()):
        first = unknown[0] if unknown else "a non-tensor entry"
        raise CompressorError(
            f"{origin}: unknown CleanRL architecture ({first!r}); only the MLP agents of "
            "ppo.py, ppo_continuous_action.py, dqn.py, td3/ddpg/sac_continuous_action.py "
            "are supported"
        )
    continuous = any(str(k).startswith("actor_mean.") for k in state)
    layers = linear_chain(state, "actor_mean." if continuous else "actor.", origin)
    if not layers:
        raise CompressorError(f"{origin}: CleanRL agent has no actor layers")
    obs_dim, act_dim = int(layers[0][0].shape[1]), int(layers[-1][0].shape[0])
    env_id, found_env, warnings = _env(path, env_id, obs_dim, env_kwargs)
    dims = env_dims(env_id, env_kwargs)
    spec = PolicySpec(
        obs_dim=obs_dim,
        act_dim=act_dim,
        hidden=[int(w.shape[0]) for w, _ in layers[:-1]],
        activation=activation,
        head="gaussian" if continuous else "categorical",
        action_low=dims["low"] if continuous else None,
        action_high=dims["high"] if continuous else None,
        env_id=env_id,
        env_kwargs=dict(env_kwargs or {}),
        source=_source(path, "PPO", "assumed (CleanRL PPO uses tanh)", found_env or env_id),
    )
    log_std = state.get("actor_logstd") if continuous else None
    policy = build_policy(spec, layers, origin, log_std=log_std)
    critic_layers = linear_chain(state, "critic.", origin)
    critic = critic_entry(critic_layers, activation, obs_dim, origin) if critic_layers else None
    missing = (
        "NO OBSERVATION NORMALISATION STATISTICS: CleanRL's continuous PPO trains behind "
        "NormalizeObservation but does not save its statistics, so this policy sees raw "
        "observations and will likely fail; pass them with --vecnormalize FILE (.npz or "
        ".json with mean, var[, clip, epsilon], or an SB3 vecnormalize.pkl)"
        if continuous
        else _NO_STATS
    )
    return _stats(ImportResult(policy, critic, warnings), vecnormalize, missing)


def _dqn(
    state: dict[str, torch.Tensor],
    path: Path,
    env_id: str | None,
    vecnormalize: str | Path | None,
    env_kwargs: dict[str, Any] | None,
) -> ImportResult:
    """CleanRL DQN: greedy over the ``network`` Sequential's Q-values (ReLU)."""
    origin = path.name
    layers = linear_chain(state, "network.", origin)
    obs_dim, n_actions = int(layers[0][0].shape[1]), int(layers[-1][0].shape[0])
    env_id, found_env, warnings = _env(path, env_id, obs_dim, env_kwargs)
    spec = PolicySpec(
        obs_dim=obs_dim,
        act_dim=n_actions,
        hidden=[int(w.shape[0]) for w, _ in layers[:-1]],
        activation="relu",
        head="q_greedy",
        env_id=env_id,
        env_kwargs=dict(env_kwargs or {}),
        source=_source(path, "DQN", "CleanRL dqn.py uses ReLU", found_env or env_id),
        exploration=DQN_EXPLORATION,
    )
    policy = build_policy(spec, layers, origin)
    return _stats(ImportResult(policy, None, warnings), vecnormalize, None)


def _fc_chain(state: dict[str, torch.Tensor], last: str, origin: str) -> list[Layer]:
    """``fc1, fc2, ...`` in number order, then ``last``, each a Linear with bias."""
    ids = sorted(int(m.group(1)) for k in state if (m := _FC.fullmatch(k)))
    names = [f"fc{i}" for i in ids] + ([last] if last else [])
    layers = []
    for name in names:
        w, b = state.get(f"{name}.weight"), state.get(f"{name}.bias")
        if not isinstance(w, torch.Tensor) or not isinstance(b, torch.Tensor) or w.dim() != 2:
            raise CompressorError(f"{origin}: layer {name} is not a Linear layer with bias")
        layers.append((w, b))
    return layers


def _bounds(scale: Any, bias: Any, act_dim: int, origin: str) -> tuple[list[float], list[float]]:
    """The action bounds ``bias ± scale`` the actor rescales its tanh into."""
    ok = all(
        isinstance(t, torch.Tensor)
        and (t.is_floating_point() or t.dtype in (torch.int32, torch.int64))
        and t.numel() == act_dim
        for t in (scale, bias)
    )
    if not ok:
        raise CompressorError(
            f"{origin}: CleanRL actor needs action_scale and action_bias of {act_dim} numbers"
        )
    s, b = scale.reshape(-1).double(), bias.reshape(-1).double()
    if not (torch.isfinite(s).all() and torch.isfinite(b).all() and (s > 0).all()):
        raise CompressorError(f"{origin}: CleanRL actor has a non-finite or non-positive scale")
    return (b - s).tolist(), (b + s).tolist()


def _off_policy_actor(
    nets: list[dict[str, torch.Tensor]],
    path: Path,
    env_id: str | None,
    vecnormalize: str | Path | None,
    env_kwargs: dict[str, Any] | None,
) -> ImportResult:
    """CleanRL TD3/DDPG (``fc_mu``) and SAC (``fc_mean`` + ``fc_logstd``) actors, with the
    critics saved beside them."""
    origin, actor = path.name, nets[0]
    sac = "fc_mean.weight" in actor
    extra = set(actor) - {"action_scale", "action_bias"}
    extra -= {k for k in actor if _FC.fullmatch(k) or re.fullmatch(r"fc\d+\.bias", k)}
    extra -= {f"{n}.{p}" for n in ("fc_mu", "fc_mean", "fc_logstd") for p in ("weight", "bias")}
    if extra:
        raise CompressorError(f"{origin}: unknown CleanRL actor weights ({sorted(extra)[0]!r})")
    layers = _fc_chain(actor, "fc_mean" if sac else "fc_mu", origin)
    obs_dim, act_dim = int(layers[0][0].shape[1]), int(layers[-1][0].shape[0])
    env_id, found_env, warnings = _env(path, env_id, obs_dim, env_kwargs)
    low, high = _bounds(actor.get("action_scale"), actor.get("action_bias"), act_dim, origin)
    options: dict[str, Any] = (
        {
            "state_dependent_std": True,
            "log_std_bounds": list(SAC_LOG_STD_BOUNDS),
            "log_std_transform": "tanh",
        }
        if sac
        else {"squash": True, "exploration": TD3_EXPLORATION}
    )
    algo = "SAC" if sac else "TD3/DDPG"
    spec = PolicySpec(
        obs_dim=obs_dim,
        act_dim=act_dim,
        hidden=[int(w.shape[0]) for w, _ in layers[:-1]],
        activation="relu",
        head="squashed_gaussian" if sac else "deterministic",
        action_low=low,
        action_high=high,
        env_id=env_id,
        env_kwargs=dict(env_kwargs or {}),
        source=_source(path, algo, "CleanRL's off-policy scripts use ReLU", found_env or env_id),
        **options,
    )
    w, b = actor.get("fc_logstd.weight"), actor.get("fc_logstd.bias")
    log_std_layer = (w, b) if sac and w is not None and b is not None else None
    policy = build_policy(spec, layers, origin, log_std_layer=log_std_layer)
    q_nets = [
        q_entry(
            _fc_chain(q, "", origin),
            "relu",
            obs_dim,
            act_dim,
            origin,
            kind="state_action",
            role="critic",
            action_input="raw",
            bounds=(low, high),
        )
        for q in nets[1:]
    ]
    return _stats(ImportResult(policy, None, warnings, q_nets), vecnormalize, None)
