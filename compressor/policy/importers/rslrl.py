"""Import rsl_rl (``rsl-rl-lib``) PPO checkpoints: the ``model_<iter>.pt`` files Isaac Lab and
mjlab train legged robots into, read with ``torch.load(weights_only=True)``.

Layouts (``OnPolicyRunner.save``):

- 2.x: ``model_state_dict`` of ``ActorCritic`` (``actor.<i>``, ``critic.<i>``, ``std`` or
  ``log_std``) and, with ``empirical_normalization``, ``obs_norm_state_dict``;
- 3.x, 4.x: the same, the normalisers inside (``actor_obs_normalizer.*``,
  ``critic_obs_normalizer.*``);
- 5.x: ``actor_state_dict`` of ``MLPModel`` (``mlp.<i>``, ``distribution.std_param`` or
  ``distribution.log_std_param``, ``obs_normalizer.*``) and ``critic_state_dict``.

The actor is an MLP (ELU by default; the checkpoint does not record it, Isaac Lab's
``params/agent.yaml`` beside it does) whose output is the Gaussian mean. rsl_rl's
``EmpiricalNormalization`` computes ``(x - mean) / (std + 0.01)``; it is stored here as
``var = (std + 0.01)²`` with ``eps = 0`` (``sqrt`` of a float32 square is exact). The checkpoint
records no environment: it comes from ``--env``. Actions are clipped to that env's bounds.
The critic is kept when it reads the actor's observations (it is folded onto the actor's
normalised input); one on privileged observations is not.
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
    tensor_state,
)
from compressor.policy.model import ACTIVATIONS, PolicySpec
from compressor.policy.native import sha256_file
from compressor.rl.envs import env_dims

FORMAT = "rsl_rl"
#: ``EmpiricalNormalization``'s default ``eps`` (every rsl-rl-lib version).
NORM_EPS = 1e-2
DEFAULT_ACTIVATION = "elu"


def looks_like_rsl_rl(obj: Any) -> bool:
    """Whether a loaded object is an rsl_rl ``OnPolicyRunner`` checkpoint.

    :param obj: what ``torch.load`` returned.
    """
    if not isinstance(obj, dict):
        return False
    return isinstance(obj.get("actor_state_dict"), dict) or isinstance(
        obj.get("model_state_dict"), dict
    )


def _norm(state: Any, prefix: str, origin: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(mean, std + eps)`` of an ``EmpiricalNormalization`` under ``prefix``, if present."""
    if not isinstance(state, dict) or f"{prefix}_mean" not in state:
        return None
    mean, std = state.get(f"{prefix}_mean"), state.get(f"{prefix}_std")
    if not isinstance(mean, torch.Tensor) or not isinstance(std, torch.Tensor):
        raise CompressorError(f"{origin}: observation normaliser {prefix!r} is incomplete")
    mean, std = mean.reshape(-1).to(torch.float32), std.reshape(-1).to(torch.float32)
    if mean.shape != std.shape or not (torch.isfinite(mean).all() and torch.isfinite(std).all()):
        raise CompressorError(f"{origin}: observation normaliser {prefix!r} is malformed")
    return mean, std + NORM_EPS


def _activation(path: Path) -> tuple[str, str]:
    """The actor's activation from Isaac Lab's ``params/agent.yaml`` beside the checkpoint."""
    for cfg in (path.parent / "params" / "agent.yaml", path.parent / "agent.yaml"):
        try:
            text = cfg.read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue
        m = re.search(r"^\s*activation:\s*['\"]?(\w+)", text, re.MULTILINE)
        if m:
            name = m.group(1).lower()
            if name not in ACTIVATIONS:
                raise CompressorError(
                    f"{cfg}: activation {name!r} is not supported (only {', '.join(ACTIVATIONS)})"
                )
            return name, str(cfg)
    return DEFAULT_ACTIVATION, "assumed (rsl_rl's default elu; no params/agent.yaml found)"


def _layout(obj: dict[str, Any], origin: str) -> dict[str, Any]:
    """The actor's and critic's pieces, whatever the version wrote."""
    if isinstance(obj.get("actor_state_dict"), dict):  # 5.x: MLPModel
        actor = tensor_state(obj["actor_state_dict"], "actor_state_dict", origin)
        saved_critic = obj.get("critic_state_dict")
        critic = tensor_state(
            {} if saved_critic is None else saved_critic, "critic_state_dict", origin
        )
        std = actor.get("distribution.std_param")
        log_std = actor.get("distribution.log_std_param")
        return {
            "version": "5.x",
            "actor": linear_chain(actor, "mlp.", origin),
            "std": std,
            "log_std": log_std,
            "norm": _norm(actor, "obs_normalizer.", origin),
            "critic": linear_chain(critic, "mlp.", origin),
            "critic_norm": _norm(critic, "obs_normalizer.", origin),
            "keys": [
                k
                for k in actor
                if not str(k).startswith(("mlp.", "obs_normalizer."))
                and k not in ("distribution.std_param", "distribution.log_std_param")
            ],
        }
    model = tensor_state(obj["model_state_dict"], "model_state_dict", origin)
    if any(str(k).startswith(("student.", "teacher.")) for k in model):
        raise CompressorError(
            f"{origin}: rsl_rl distillation (student/teacher) checkpoints are not supported"
        )
    if any(str(k).startswith(("memory_a.", "memory_c.")) for k in model):
        raise CompressorError(f"{origin}: recurrent rsl_rl policies are not supported")
    saved = {
        k: tensor_state(obj[k], k, origin)
        for k in ("obs_norm_state_dict", "privileged_obs_norm_state_dict")
        if obj.get(k) is not None
    }
    norm = _norm(model, "actor_obs_normalizer.", origin) or _norm(
        saved.get("obs_norm_state_dict"), "", origin
    )
    critic_norm = _norm(model, "critic_obs_normalizer.", origin) or _norm(
        saved.get("privileged_obs_norm_state_dict"), "", origin
    )
    return {
        "version": "3.x/4.x" if any("obs_normalizer." in str(k) for k in model) else "2.x+",
        "actor": linear_chain(model, "actor.", origin),
        "std": model.get("std"),
        "log_std": model.get("log_std"),
        "norm": norm,
        "critic": linear_chain(model, "critic.", origin),
        "critic_norm": critic_norm,
        "keys": [
            k
            for k in model
            if not str(k).startswith(("actor.", "critic.", "actor_obs_normalizer.", "critic_obs"))
            and k not in ("std", "log_std")
        ],
    }


def import_rsl_rl(
    obj: dict[str, Any],
    path: Path,
    env_id: str | None = None,
    vecnormalize: str | Path | None = None,
    env_kwargs: dict[str, Any] | None = None,
) -> ImportResult:
    """Import an rsl_rl PPO checkpoint (Gaussian head, optional empirical normaliser).

    :param obj: the checkpoint (loaded with ``weights_only=True``).
    :param path: the file (its folder may hold Isaac Lab's ``params/agent.yaml``).
    :param env_id: the environment (required: the checkpoint does not record it).
    :param vecnormalize: statistics to use instead of the checkpoint's own normaliser.
    :param env_kwargs: kwargs for ``gymnasium.make``.
    """
    origin = path.name
    parts = _layout(obj, origin)
    if parts["keys"]:
        raise CompressorError(
            f"{origin}: unsupported rsl_rl actor (unexpected weights {parts['keys'][0]!r}; only "
            "MLP actors with a state-independent Gaussian std are supported)"
        )
    layers: list[Layer] = parts["actor"]
    if not layers:
        raise CompressorError(f"{origin}: rsl_rl checkpoint has no actor MLP")
    if env_id is None:
        raise CompressorError(
            f"{origin}: rsl_rl checkpoints do not record their environment; pass --env ENV_ID "
            "(a gymnasium id, or module:EnvId to import the module that registers it)"
        )
    obs_dim, act_dim = int(layers[0][0].shape[1]), int(layers[-1][0].shape[0])
    log_std = _log_std(parts, act_dim, origin)
    activation, act_source = _activation(path)
    dims = env_dims(env_id, env_kwargs)
    if dims["discrete"]:
        raise CompressorError(f"{origin}: rsl_rl policies act in continuous (Box) action spaces")
    source: dict[str, Any] = {
        "format": FORMAT,
        "file": origin,
        "sha256": sha256_file(path),
        "algo": "PPO (rsl_rl)",
        "rsl_rl_layout": parts["version"],
        "iteration": obj.get("iter") if isinstance(obj.get("iter"), int) else None,
        "activation_source": act_source,
        "obs_stats": None,
    }
    spec = PolicySpec(
        obs_dim=obs_dim,
        act_dim=act_dim,
        hidden=[int(w.shape[0]) for w, _ in layers[:-1]],
        activation=activation,
        head="gaussian",
        obs_norm=parts["norm"] is not None,
        obs_eps=0.0,
        action_low=dims["low"],
        action_high=dims["high"],
        env_id=env_id,
        env_kwargs=dict(env_kwargs or {}),
        source=source,
    )
    policy = build_policy(spec, layers, origin, log_std=log_std)
    warnings: list[str] = []
    if parts["norm"] is not None:
        mean, scale = parts["norm"]
        if mean.numel() != obs_dim:
            raise CompressorError(f"{origin}: normaliser size {mean.numel()} != obs {obs_dim}")
        with torch.no_grad():
            policy.obs_mean.copy_(mean)
            policy.obs_var.copy_(scale * scale)
        source["obs_stats"] = {"file": origin, "kind": "rsl_rl EmpiricalNormalization"}
    if vecnormalize is not None:
        stats_path = Path(vecnormalize)
        apply_norm_stats(policy, load_norm_stats(stats_path))
        source["obs_stats"] = {"file": stats_path.name, "sha256": sha256_file(stats_path)}
    critic = _critic(parts, policy.obs_mean, policy.obs_scale(), activation, obs_dim, origin)
    if parts["critic"] and critic is None:
        warnings.append("the critic reads other (privileged) observations than the actor: not kept")
    return ImportResult(policy, critic, warnings)


def _log_std(parts: dict[str, Any], act_dim: int, origin: str) -> torch.Tensor:
    std, log_std = parts["std"], parts["log_std"]
    if isinstance(log_std, torch.Tensor):
        out = log_std.reshape(-1).to(torch.float32)
    elif isinstance(std, torch.Tensor):
        out = torch.log(std.reshape(-1).to(torch.float32).clamp_min(1e-6))
    else:
        raise CompressorError(f"{origin}: rsl_rl actor has no Gaussian std or log_std")
    if out.numel() != act_dim:
        raise CompressorError(
            f"{origin}: the actor outputs {act_dim} values but its std has {out.numel()} "
            "(state-dependent std, Beta and other distributions are not supported)"
        )
    return out


def _critic(
    parts: dict[str, Any],
    mean: torch.Tensor,
    scale: torch.Tensor,
    activation: str,
    obs_dim: int,
    origin: str,
) -> dict[str, Any] | None:
    """The critic as a value net on the actor's normalised input: the critic's own
    normalisation ``(x - m_c) / s_c`` of ``x = z·s + m`` is affine in ``z``, folded into its
    first layer (``W' = W·diag(s / s_c)``, ``b' = b + W·((m - m_c) / s_c)``)."""
    layers: list[Layer] = list(parts["critic"])
    if not layers or int(layers[0][0].shape[1]) != obs_dim:
        return None
    m_c, s_c = parts["critic_norm"] or (torch.zeros(obs_dim), torch.ones(obs_dim))
    if m_c.numel() != obs_dim:
        return None
    w, b = layers[0][0].to(torch.float64), layers[0][1].to(torch.float64)
    ratio = (scale.to(torch.float64) / s_c.to(torch.float64))[None, :]
    shift = (mean.to(torch.float64) - m_c.to(torch.float64)) / s_c.to(torch.float64)
    layers[0] = ((w * ratio).to(torch.float32), (b + w @ shift).to(torch.float32))
    return critic_entry(layers, activation, obs_dim, origin)
