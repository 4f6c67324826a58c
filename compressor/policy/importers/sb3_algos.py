"""What each Stable-Baselines3 / sb3-contrib MLP algorithm keeps in its zip, as policy parts.

Every algorithm's ``policy.pth`` names its networks differently; this module maps each family to
the :class:`Policy` head that computes the same deterministic action as SB3's own
``predict(obs, deterministic=True)``:

=================  ==================================================  ====================
family             policy.pth (deployed path first)                    head
=================  ==================================================  ====================
PPO, A2C, TRPO     ``mlp_extractor.policy_net.*``, ``action_net``,      gaussian (mean,
                   ``log_std``; critic ``mlp_extractor.value_net.*``,   clipped) or
                   ``value_net``                                        categorical
SAC, TQC           ``actor.latent_pi.*``, ``actor.mu``,                 squashed_gaussian
                   ``actor.log_std`` (Linear, clipped to [-20, 2]);     (state-dependent σ)
                   critics ``critic.qf<i>.*`` (TQC: quantiles)
TD3, DDPG          ``actor.mu.*`` (ending in tanh); critics             deterministic,
                   ``critic.qf<i>.*``                                   tanh-rescaled
DQN                ``q_net.q_net.*``; target ``q_net_target.q_net.*``   q_greedy
QR-DQN             ``quantile_net.quantile_net.*`` (n_quantiles ×       q_greedy on the
                   n_actions outputs); target likewise                  quantile means
=================  ==================================================  ====================

The critics are kept as :class:`compressor.policy.value.QNet` items (action input scaled to
[-1, 1], as SB3's replay buffer stores it; TQC quantiles folded into their mean), DQN's target
network likewise; target copies of actors and critics are not kept.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass, field
from typing import Any

import torch

from compressor.core.errors import CompressorError
from compressor.policy.importers.common import (
    Layer,
    check_chain,
    critic_entry,
    fold_quantile_mean,
    linear_chain,
    q_entry,
)
from compressor.policy.importers.safe_pickle import referenced_globals

SB3_ACTIVATIONS = {"Tanh": "tanh", "ReLU": "relu", "ELU": "elu"}
#: SB3's ``LOG_STD_MIN`` / ``LOG_STD_MAX`` of SAC's and TQC's actor.
SAC_LOG_STD_BOUNDS = [-20.0, 2.0]
#: Exploration noise of TD3/DDPG (std as a fraction of half the action range): the TD3 paper's
#: and the RL Zoo's 0.1 (the zip's own ``action_noise`` is a pickled object we do not read).
TD3_EXPLORATION = 0.1
#: SB3 DQN's default final exploration rate, when the zip does not record it.
DQN_EXPLORATION = 0.05

FAMILIES = {
    "ActorCriticPolicy": "actor_critic",
    "SACPolicy": "sac",
    "TQCPolicy": "sac",
    "TD3Policy": "td3",
    "DQNPolicy": "dqn",
    "QRDQNPolicy": "qrdqn",
}
#: The state-dict prefixes each family may hold; anything else is an unsupported extra network.
PREFIXES = {
    "actor_critic": (
        "mlp_extractor.policy_net.",
        "mlp_extractor.value_net.",
        "action_net.",
        "value_net.",
        "log_std",
    ),
    "sac": ("actor.latent_pi.", "actor.mu.", "actor.log_std", "critic.qf", "critic_target.qf"),
    "td3": ("actor.mu.", "actor_target.mu.", "critic.qf", "critic_target.qf"),
    "dqn": ("q_net.q_net.", "q_net_target.q_net."),
    "qrdqn": ("quantile_net.quantile_net.", "quantile_net_target.quantile_net."),
}
#: A key only one family has: the family of a zip whose policy class cannot be read.
_KEY_HINTS = (
    ("mlp_extractor.", "actor_critic"),
    ("action_net.", "actor_critic"),
    ("actor.latent_pi.", "sac"),
    ("actor.mu.", "td3"),
    ("q_net.q_net.", "dqn"),
    ("quantile_net.", "qrdqn"),
)
#: Words in a policy class name that mean an architecture no MLP head can represent.
_REFUSED_KINDS = (
    ("Recurrent", "recurrent (LSTM) policies"),
    ("Cnn", "CNN policies"),
    ("MultiInput", "dict-observation policies"),
    ("Maskable", "action-masking policies (MaskablePPO)"),
    ("CrossQ", "CrossQ policies (batch normalisation)"),
    ("ARS", "ARS policies"),
)
SUPPORTED = "PPO, A2C, TRPO, SAC, TQC, TD3, DDPG, DQN and QR-DQN MLP policies"


def serialized_globals(value: Any) -> list[tuple[str, str]]:
    """Globals referenced by a ``:serialized:`` data field's pickle (opcodes only, nothing runs).

    :param value: the data field (a dict with ``:serialized:`` base64 text), or anything.
    """
    if not isinstance(value, dict) or not isinstance(value.get(":serialized:"), str):
        return []
    try:
        blob = base64.b64decode(value[":serialized:"], validate=False)
    except (binascii.Error, ValueError):
        return []
    return referenced_globals(blob)


def policy_class(data: dict[str, Any]) -> str:
    """The policy class name the zip's ``policy_class`` field pickles ("" if unreadable).

    :param data: the zip's ``data`` fields.
    """
    found = serialized_globals(data.get("policy_class"))
    return found[0][1] if found else ""


def family_of(cls: str, state: dict[str, torch.Tensor], origin: str) -> str:
    """The algorithm family of a zip (a key of :data:`PREFIXES`), refusing what is unsupported.

    :param cls: the policy class name ("" if unreadable).
    :param state: ``policy.pth``.
    :param origin: file name for error messages.
    """
    for word, kind in _REFUSED_KINDS:
        if word in cls:
            raise CompressorError(f"{origin}: {kind} are not supported; only {SUPPORTED}")
    if any("lstm" in k for k in state):
        raise CompressorError(f"{origin}: recurrent (LSTM) policies are not supported")
    fam = FAMILIES.get(cls)
    if fam is None:
        hints = [f for prefix, f in _KEY_HINTS if any(k.startswith(prefix) for k in state)]
        if cls and cls != "MlpPolicy" or not hints:
            shown = cls or "an unreadable policy class"
            raise CompressorError(f"{origin}: {shown} is not supported; only {SUPPORTED}")
        fam = hints[0]
    if any(k.startswith("mlp_extractor.shared_net.") for k in state):
        raise CompressorError(
            f"{origin}: policy has layers shared by actor and critic (net_arch with shared "
            "layers); only separate pi/vf MLPs are supported"
        )
    unknown = [k for k in state if not k.startswith(PREFIXES[fam])]
    if unknown:
        raise CompressorError(
            f"{origin}: unknown architecture (unexpected weights {unknown[0]!r}; custom feature "
            "extractors and CNNs are not supported)"
        )
    return fam


def activation(data: dict[str, Any], origin: str, default: str) -> tuple[str, str]:
    """The trunk activation and where it was read from.

    :param data: the zip's ``data`` fields.
    :param origin: file name for error messages.
    :param default: the family's SB3 default (tanh for actor-critic, ReLU off-policy).
    """
    kwargs = data.get("policy_kwargs")
    cls_name, where = None, f"SB3 default ({default})"
    if isinstance(kwargs, dict) and "activation_fn" in kwargs:
        m = re.search(r"\.(\w+)'>", str(kwargs["activation_fn"]))
        if m:
            cls_name, where = m.group(1), "data.policy_kwargs"
    if cls_name is None:
        acts = [n for mod, n in serialized_globals(kwargs) if mod.startswith("torch.nn")]
        if acts:
            cls_name, where = acts[0], "data.policy_kwargs (pickle opcodes)"
    if cls_name is None:
        return default, where
    if cls_name not in SB3_ACTIVATIONS:
        raise CompressorError(
            f"{origin}: activation {cls_name} is not supported (only Tanh, ReLU, ELU)"
        )
    return SB3_ACTIVATIONS[cls_name], where


@dataclass
class Source:
    """What the extractors read: the zip's fields and weights, and the spaces' sizes.

    :param data: the ``data`` fields. :param state: ``policy.pth``.
    :param obs_dim: observation size. :param act_dim: action size or count.
    :param discrete: Discrete action space. :param bounds: action bounds (Box) or None.
    :param origin: file name for error messages.
    """

    data: dict[str, Any]
    state: dict[str, torch.Tensor]
    obs_dim: int
    act_dim: int
    discrete: bool
    bounds: tuple[list[float], list[float]] | None
    origin: str


@dataclass
class Parts:
    """A policy's pieces, read from one family's weights.

    :param algo: the algorithm (PPO, SAC, ...). :param head: the Policy head.
    :param layers: the deployed path's Linear layers. :param activation: the trunk's.
    :param activation_source: where the activation was read.
    :param log_std: a parameter ``log σ``. :param log_std_layer: a state-dependent one.
    :param options: further PolicySpec fields (squash, state_dependent_std, ...).
    :param critic: a native value-net entry. :param q_nets: native Q-network items.
    """

    algo: str
    head: str
    layers: list[Layer]
    activation: str
    activation_source: str
    log_std: torch.Tensor | None = None
    log_std_layer: Layer | None = None
    options: dict[str, Any] = field(default_factory=dict)
    critic: dict[str, Any] | None = None
    q_nets: list[dict[str, Any]] = field(default_factory=list)


def _linear(state: dict[str, torch.Tensor], name: str, origin: str) -> Layer:
    w, b = state.get(f"{name}.weight"), state.get(f"{name}.bias")
    if not isinstance(w, torch.Tensor) or not isinstance(b, torch.Tensor):
        raise CompressorError(f"{origin}: policy.pth has no {name} layer (not an SB3 policy?)")
    return w, b


def _need_actions(src: Source, discrete: bool, algo: str) -> None:
    if src.discrete != discrete:
        want = "Discrete" if discrete else "Box"
        raise CompressorError(f"{src.origin}: a {algo} policy needs a {want} action space")


def _critics(src: Source, prefix: str, role: str, act: str) -> list[dict[str, Any]]:
    """The ``Q(s, a)`` networks ``<prefix><i>.*``, quantile outputs folded into their mean."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    ids = sorted({int(m.group(1)) for k in src.state if (m := pattern.match(k))})
    out = []
    for i in ids:
        layers = linear_chain(src.state, f"{prefix}{i}.", src.origin)
        if layers and layers[-1][0].shape[0] > 1:  # TQC: n_quantiles outputs
            layers[-1] = fold_quantile_mean(*layers[-1], 1)
        out.append(
            q_entry(
                layers,
                act,
                src.obs_dim,
                src.act_dim,
                src.origin,
                kind="state_action",
                role=role,
                action_input="scaled",
                bounds=src.bounds,
            )
        )
    return out


def actor_critic(src: Source) -> Parts:
    """PPO / A2C / TRPO (``ActorCriticPolicy``): Gaussian or categorical, with its value net."""
    data, state, origin = src.data, src.state, src.origin
    if data.get("use_sde") is True:
        raise CompressorError(f"{origin}: gSDE policies (use_sde=True) are not supported")
    act, where = activation(data, origin, "tanh")
    pi = linear_chain(state, "mlp_extractor.policy_net.", origin)
    layers = [*pi, _linear(state, "action_net", origin)]
    algo = "PPO" if "clip_range" in data else "TRPO" if "cg_max_steps" in data else "A2C"
    critic = None
    if "value_net.weight" in state and "value_net.bias" in state:
        vf = linear_chain(state, "mlp_extractor.value_net.", origin)
        vf_layers = [*vf, (state["value_net.weight"], state["value_net.bias"])]
        critic = critic_entry(vf_layers, act, src.obs_dim, origin)
    head = "categorical" if src.discrete else "gaussian"
    log_std = None if src.discrete else state.get("log_std")
    return Parts(algo, head, layers, act, where, log_std=log_std, critic=critic)


def sac(src: Source) -> Parts:
    """SAC / TQC: squashed Gaussian with SB3's state-dependent, clipped ``log σ`` layer."""
    data, state, origin = src.data, src.state, src.origin
    _need_actions(src, False, "SAC/TQC")
    kwargs = data.get("policy_kwargs")
    sde = data.get("use_sde") is True or (
        isinstance(kwargs, dict) and str(kwargs.get("use_sde")) == "True"
    )
    if sde or "actor.log_std" in state or any(k.startswith("actor.mu.0.") for k in state):
        raise CompressorError(f"{origin}: gSDE policies (use_sde=True) are not supported")
    act, where = activation(data, origin, "relu")
    layers = [*linear_chain(state, "actor.latent_pi.", origin), _linear(state, "actor.mu", origin)]
    tqc = policy_class(data) == "TQCPolicy" or "top_quantiles_to_drop_per_net" in data
    return Parts(
        "TQC" if tqc else "SAC",
        "squashed_gaussian",
        layers,
        act,
        where,
        log_std_layer=_linear(state, "actor.log_std", origin),
        options={
            "state_dependent_std": True,
            "log_std_bounds": list(SAC_LOG_STD_BOUNDS),
            "log_std_transform": "clip",
        },
        q_nets=_critics(src, "critic.qf", "critic", act),
    )


def td3(src: Source) -> Parts:
    """TD3 / DDPG (``TD3Policy``): a deterministic actor ending in tanh, rescaled to the bounds."""
    data, origin = src.data, src.origin
    _need_actions(src, False, "TD3/DDPG")
    act, where = activation(data, origin, "relu")
    layers = linear_chain(src.state, "actor.mu.", origin)
    ddpg = data.get("policy_delay") == 1 and data.get("target_noise_clip") in (0, 0.0)
    return Parts(
        "DDPG" if ddpg else "TD3",
        "deterministic",
        layers,
        act,
        where,
        options={"squash": True, "exploration": TD3_EXPLORATION},
        q_nets=_critics(src, "critic.qf", "critic", act),
    )


def _exploration(data: dict[str, Any]) -> float:
    eps = data.get("exploration_final_eps", DQN_EXPLORATION)
    ok = isinstance(eps, (int, float)) and not isinstance(eps, bool) and 0.0 <= eps <= 1.0
    return float(eps) if ok else DQN_EXPLORATION


def dqn(src: Source, quantiles: bool = False) -> Parts:
    """DQN (``q_net``) and QR-DQN (``quantile_net``, folded into the quantile means): greedy
    over Q-values, with the target network kept as a ``state`` Q-network."""
    data, state, origin = src.data, src.state, src.origin
    algo = "QR-DQN" if quantiles else "DQN"
    _need_actions(src, True, algo)
    act, where = activation(data, origin, "relu")
    net, target = (
        ("quantile_net.quantile_net.", "quantile_net_target.quantile_net.")
        if quantiles
        else ("q_net.q_net.", "q_net_target.q_net.")
    )
    layers = linear_chain(state, net, origin)
    target_layers = linear_chain(state, target, origin)
    if quantiles:
        for chain in (layers, target_layers):
            if chain:
                chain[-1] = fold_quantile_mean(*chain[-1], src.act_dim)
    q_nets = []
    if target_layers:
        n_obs, n_act = src.obs_dim, src.act_dim
        entry = q_entry(target_layers, act, n_obs, n_act, origin, kind="state", role="target")
        q_nets.append(entry)
    options = {"exploration": _exploration(data)}
    return Parts(algo, "q_greedy", layers, act, where, options=options, q_nets=q_nets)


def extract(fam: str, src: Source) -> Parts:
    """The parts of family ``fam`` (from :func:`family_of`), their sizes checked.

    :param fam: the family.
    :param src: the zip's fields, weights and space sizes.
    """
    parts = {
        "actor_critic": actor_critic,
        "sac": sac,
        "td3": td3,
        "dqn": dqn,
        "qrdqn": lambda s: dqn(s, quantiles=True),
    }[fam](src)
    if not parts.layers:
        raise CompressorError(f"{src.origin}: policy.pth has no actor layers")
    check_chain(parts.layers, src.obs_dim, "policy", src.origin)
    out = int(parts.layers[-1][0].shape[0])
    if out != src.act_dim:
        raise CompressorError(
            f"{src.origin}: the {parts.algo} actor has {out} outputs, expected {src.act_dim}"
        )
    return parts
