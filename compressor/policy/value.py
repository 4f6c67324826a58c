"""The networks a policy file may ship beside its actor: a state-value net (SB3 PPO/A2C, rsl_rl,
CleanRL PPO, compress train), used by the critic attack and PPO fine-tuning, and Q-networks
(SAC/TD3/TQC critics, DQN's target net), kept for the critic attack and Q-guided fine-tuning."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from compressor.core.errors import CompressorError
from compressor.policy.model import ACTIVATIONS, MAX_PARAMETERS, mlp_parameters


class ValueNet(nn.Module):
    """A state-value MLP on the policy's *normalised* observation: ``V(z)``, shape ``(batch,)``.

    :param obs_dim: input size.
    :param hidden: hidden layer widths.
    :param activation: one of ``compressor.policy.model.ACTIVATIONS``.
    """

    def __init__(self, obs_dim: int, hidden: list[int], activation: str = "tanh") -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise CompressorError(f"critic activation {activation!r} is not supported")
        self.obs_dim, self.hidden, self.activation = obs_dim, list(hidden), activation
        sizes = [obs_dim, *hidden, 1]
        mods: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=False)):
            mods.append(nn.Linear(a, b))
            if i < len(sizes) - 2:
                mods.append(ACTIVATIONS[activation]())
        # Same key layout as compressor.rl.ppo's critic (0.weight, 2.weight, ...) for loading.
        self.net = nn.Sequential(*mods)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Normalised observation batch -> value of each row."""
        return self.net(z).squeeze(-1)

    @classmethod
    def from_entry(cls, entry: Any, obs_dim: int, origin: str = "critic") -> ValueNet:
        """Build from a native ``"critic"`` entry (``hidden``, ``activation``, ``state_dict``).

        :param entry: the entry.
        :param obs_dim: the policy's observation size.
        :param origin: file name for error messages.
        """
        state = entry.get("state_dict") if isinstance(entry, dict) else None
        if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
            raise CompressorError(f"{origin}: malformed critic entry")
        if entry.get("input", "normalized_obs") != "normalized_obs":
            shown = repr(entry["input"]) if isinstance(entry["input"], str) else "of another type"
            raise CompressorError(f"{origin}: critic input {shown} is not supported")
        hidden = entry.get("hidden")
        if not isinstance(hidden, list) or not all(type(h) is int and h > 0 for h in hidden):
            raise CompressorError(f"{origin}: critic entry has malformed hidden sizes")
        if mlp_parameters([obs_dim, *hidden, 1]) > MAX_PARAMETERS:
            raise CompressorError(f"{origin}: critic entry describes an implausibly large network")
        net = cls(obs_dim, hidden, str(entry.get("activation", "tanh")))
        _load_checked(net, entry, f"{origin}: critic")
        return net

    def to_entry(self) -> dict[str, Any]:
        """The native ``"critic"`` entry (loads with ``weights_only=True``)."""
        return {
            "hidden": list(self.hidden),
            "activation": self.activation,
            "input": "normalized_obs",
            "state_dict": {k: v.detach().clone() for k, v in self.net.state_dict().items()},
        }


#: ``QNet.kind`` values: ``Q(s, a)`` with one output (SAC/TD3/TQC critics) or ``Q(s, ·)`` with
#: one output per discrete action (DQN).
Q_KINDS = ("state_action", "state")
#: How a ``state_action`` Q-network received its action in training: ``scaled`` to [-1, 1] from
#: the bounds (SB3's critics) or ``raw`` env units (CleanRL's).
ACTION_INPUTS = ("scaled", "raw")


class QNet(nn.Module):
    """A Q-network on the policy's *normalised* observation, kept from the file for the stages
    that can use it (the critic attack, Q-guided fine-tuning).

    ``state_action``: ``Q(z, a)``, shape ``(batch,)``, the action in env units (scaled to
    [-1, 1] first when the network was trained so); quantile critics (TQC) are folded into the
    mean of their quantiles, which is exact (the mean of linear outputs is one linear output).
    ``state``: ``Q(z, ·)``, shape ``(batch, n_actions)``.

    :param obs_dim: observation size.
    :param act_dim: action size (``state_action``) or number of actions (``state``).
    :param hidden: hidden layer widths.
    :param activation: one of ``compressor.policy.model.ACTIVATIONS``.
    :param kind: one of :data:`Q_KINDS`.
    :param role: what the file used it for, e.g. ``critic`` or ``target``.
    :param action_input: one of :data:`ACTION_INPUTS` (``state_action`` only).
    :param action_low: lower action bounds (``scaled`` action input).
    :param action_high: upper action bounds (``scaled`` action input).
    """

    action_low: torch.Tensor
    action_high: torch.Tensor

    def __init__(
        self,
        obs_dim: int,
        act_dim: int,
        hidden: list[int],
        activation: str = "relu",
        kind: str = "state_action",
        role: str = "critic",
        action_input: str = "scaled",
        action_low: list[float] | None = None,
        action_high: list[float] | None = None,
    ) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise CompressorError(f"Q-network activation {activation!r} is not supported")
        if kind not in Q_KINDS or action_input not in ACTION_INPUTS:
            raise CompressorError(f"Q-network kind {kind!r} / action input {action_input!r}")
        self.obs_dim, self.act_dim, self.hidden = obs_dim, act_dim, list(hidden)
        self.activation, self.kind, self.role = activation, kind, role
        self.action_input = action_input
        in_dim = obs_dim + (act_dim if kind == "state_action" else 0)
        sizes = [in_dim, *hidden, 1 if kind == "state_action" else act_dim]
        mods: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=False)):
            mods.append(nn.Linear(a, b))
            if i < len(sizes) - 2:
                mods.append(ACTIVATIONS[activation]())
        self.net = nn.Sequential(*mods)
        low = action_low if action_low is not None else [-1.0] * act_dim
        high = action_high if action_high is not None else [1.0] * act_dim
        self.register_buffer("action_low", torch.tensor(low, dtype=torch.float32))
        self.register_buffer("action_high", torch.tensor(high, dtype=torch.float32))

    def forward(self, z: torch.Tensor, action: torch.Tensor | None = None) -> torch.Tensor:
        """Normalised observations (and actions in env units) -> Q-values.

        :param z: normalised observation batch.
        :param action: action batch (``state_action`` networks only).
        """
        if self.kind == "state":
            return self.net(z)
        if action is None:
            raise ValueError("a state_action Q-network needs the action")
        a = action.to(z.dtype)
        if self.action_input == "scaled":
            a = 2.0 * (a - self.action_low) / (self.action_high - self.action_low) - 1.0
        return self.net(torch.cat([z, a], dim=-1)).squeeze(-1)

    @classmethod
    def from_entry(cls, entry: Any, obs_dim: int, act_dim: int, origin: str = "q_nets") -> QNet:
        """Build from one item of a native ``"q_nets"`` entry (see :meth:`to_entry`).

        :param entry: the item.
        :param obs_dim: the policy's observation size.
        :param act_dim: the policy's action size or count.
        :param origin: file name for error messages.
        """
        if not isinstance(entry, dict) or not isinstance(entry.get("state_dict"), dict):
            raise CompressorError(f"{origin}: malformed Q-network entry")
        hidden = entry.get("hidden")
        if not isinstance(hidden, list) or not all(type(h) is int and h > 0 for h in hidden):
            raise CompressorError(f"{origin}: Q-network entry has malformed hidden sizes")
        if entry.get("input", "normalized_obs") != "normalized_obs":
            raise CompressorError(f"{origin}: Q-network input is not the normalised observation")
        kind, action_input = entry.get("kind"), entry.get("action_input", "scaled")
        fields = (kind, entry.get("role", "critic"), action_input, entry.get("activation", "relu"))
        if not all(isinstance(f, str) for f in fields):
            raise CompressorError(f"{origin}: Q-network entry has malformed kind, role or input")
        if mlp_parameters([obs_dim + act_dim, *hidden, act_dim]) > MAX_PARAMETERS:
            raise CompressorError(f"{origin}: Q-network entry describes an implausibly large net")
        bounds = [entry.get("action_low"), entry.get("action_high")]
        for b in bounds:
            if b is not None and not (
                isinstance(b, list) and len(b) == act_dim and all(type(x) is float for x in b)
            ):
                raise CompressorError(f"{origin}: Q-network entry has malformed action bounds")
        net = cls(obs_dim, act_dim, hidden, fields[3], str(kind), fields[1], action_input, *bounds)
        _load_checked(net, entry, f"{origin}: Q-network")
        return net

    def to_entry(self) -> dict[str, Any]:
        """One item of the native ``"q_nets"`` entry (loads with ``weights_only=True``)."""
        return {
            "kind": self.kind,
            "role": self.role,
            "hidden": list(self.hidden),
            "activation": self.activation,
            "input": "normalized_obs",
            "action_input": self.action_input,
            "action_low": [float(x) for x in self.action_low],
            "action_high": [float(x) for x in self.action_high],
            "state_dict": {k: v.detach().clone() for k, v in self.net.state_dict().items()},
        }


def _load_checked(net: ValueNet | QNet, entry: dict[str, Any], what: str) -> None:
    """Load ``entry["state_dict"]`` into ``net.net`` exactly, refusing non-finite tensors.

    :param what: names the network in the one-line error (``"FILE: critic"``).
    :raises CompressorError: missing, misshapen or NaN/inf weights.
    """
    try:
        net.net.load_state_dict(entry["state_dict"], strict=True)
    except (RuntimeError, TypeError, KeyError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else "shape mismatch"
        raise CompressorError(f"{what} weights do not match ({first})") from None
    for name, t in net.state_dict().items():
        if not torch.isfinite(t).all():
            raise CompressorError(f"{what} tensor {name!r} contains NaN or inf")
