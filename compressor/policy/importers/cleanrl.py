"""Import CleanRL PPO agents saved as plain state dicts (``torch.save(agent.state_dict(), ...)``).

CleanRL's ``ppo_continuous_action.py`` agent has ``actor_mean`` (Sequential Linear/Tanh/...),
``actor_logstd`` (shape ``(1, act_dim)``) and ``critic``; ``ppo.py`` (discrete) has ``actor``
and ``critic``. The file records neither the environment nor the observation normalisation
statistics (the continuous script trains behind ``NormalizeObservation``), so the env id must be
given or read from CleanRL's run folder name (``runs/<env>__<exp>__<seed>__<time>/``), and the
statistics must be passed separately.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from compressor.core.errors import CompressorError
from compressor.policy.importers.common import (
    ImportResult,
    apply_norm_stats,
    build_policy,
    critic_entry,
    linear_chain,
    load_norm_stats,
    resolve_env_id,
)
from compressor.policy.model import PolicySpec
from compressor.policy.native import sha256_file
from compressor.rl.envs import env_dims

FORMAT = "cleanrl"
#: CleanRL's PPO scripts hard-code Tanh; the state dict does not record it.
DEFAULT_ACTIVATION = "tanh"
_KNOWN_PREFIXES = ("actor_mean.", "actor.", "critic.", "actor_logstd")


def looks_like_cleanrl(obj: Any) -> bool:
    """Whether a loaded object is a CleanRL PPO agent state dict.

    :param obj: what ``torch.load`` returned.
    """
    if not isinstance(obj, dict) or not obj:
        return False
    keys = [k for k in obj if isinstance(k, str)]
    has_actor = any(k.startswith(("actor_mean.", "actor.")) for k in keys)
    return has_actor and any(k.startswith("critic.") for k in keys)


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
    state: dict[str, Any],
    path: Path,
    env_id: str | None = None,
    vecnormalize: str | Path | None = None,
    activation: str = DEFAULT_ACTIVATION,
) -> ImportResult:
    """Import a CleanRL PPO agent state dict (Gaussian or categorical head).

    :param state: the state dict (already loaded with ``weights_only=True``).
    :param path: the file it came from (for names, hash and the run-folder env id).
    :param env_id: the environment; default: from the run folder name.
    :param vecnormalize: normalisation statistics (``.npz``/``.json`` with mean/var, or an SB3
        ``vecnormalize.pkl``); CleanRL does not save them.
    :param activation: the trunk activation (CleanRL's PPO uses tanh).
    """
    origin = path.name
    unknown = [k for k in state if not str(k).startswith(_KNOWN_PREFIXES)]
    if unknown or not all(isinstance(v, torch.Tensor) for v in state.values()):
        first = unknown[0] if unknown else "a non-tensor entry"
        raise CompressorError(
            f"{origin}: unknown CleanRL architecture ({first!r}); only the MLP agents of "
            "ppo.py and ppo_continuous_action.py are supported"
        )
    continuous = any(str(k).startswith("actor_mean.") for k in state)
    layers = linear_chain(state, "actor_mean." if continuous else "actor.", origin)
    if not layers:
        raise CompressorError(f"{origin}: CleanRL agent has no actor layers")
    obs_dim, act_dim = int(layers[0][0].shape[1]), int(layers[-1][0].shape[0])

    warnings: list[str] = []
    found_env = env_id_from_run_folder(path)
    if env_id is None:
        if found_env is None:
            raise CompressorError(
                f"{origin}: CleanRL models do not record their environment; pass --env ENV_ID"
            )
        env_id, env_warning = resolve_env_id(found_env, obs_dim=obs_dim)
        if env_warning:
            warnings.append(env_warning)
    dims = env_dims(env_id)

    source: dict[str, Any] = {
        "format": FORMAT,
        "file": origin,
        "sha256": sha256_file(path),
        "algo": "PPO",
        "activation_source": "assumed (CleanRL PPO uses tanh)",
        "trained_env_id": found_env or env_id,
        "obs_stats": None,
    }
    spec = PolicySpec(
        obs_dim=obs_dim,
        act_dim=act_dim,
        hidden=[int(w.shape[0]) for w, _ in layers[:-1]],
        activation=activation,
        head="gaussian" if continuous else "categorical",
        action_low=dims["low"] if continuous else None,
        action_high=dims["high"] if continuous else None,
        env_id=env_id,
        source=source,
    )
    log_std = state.get("actor_logstd") if continuous else None
    policy = build_policy(spec, layers, origin, log_std=log_std)

    if vecnormalize is not None:
        stats_path = Path(vecnormalize)
        apply_norm_stats(policy, load_norm_stats(stats_path))
        source["obs_stats"] = {"file": stats_path.name, "sha256": sha256_file(stats_path)}
    elif continuous:
        warnings.append(
            "NO OBSERVATION NORMALISATION STATISTICS: CleanRL's continuous PPO trains behind "
            "NormalizeObservation but does not save its statistics, so this policy sees raw "
            "observations and will likely fail; pass them with --vecnormalize FILE (.npz or "
            ".json with mean, var[, clip, epsilon], or an SB3 vecnormalize.pkl)"
        )
    else:
        warnings.append(
            "CleanRL models do not save observation normalisation statistics; if this policy "
            "was trained with normalisation, pass them with --vecnormalize FILE"
        )

    critic_layers = linear_chain(state, "critic.", origin)
    critic = critic_entry(critic_layers, activation, obs_dim, origin) if critic_layers else None
    return ImportResult(policy=policy, critic=critic, warnings=warnings)
