"""The value function a policy file may ship beside its actor (SB3, compress train): used by the
critic attack and by PPO fine-tuning."""

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
        try:
            net.net.load_state_dict(entry["state_dict"], strict=True)
        except (RuntimeError, TypeError, KeyError) as exc:
            first = str(exc).splitlines()[0] if str(exc) else "shape mismatch"
            raise CompressorError(f"{origin}: critic weights do not match ({first})") from None
        for name, t in net.state_dict().items():
            if not torch.isfinite(t).all():
                raise CompressorError(f"{origin}: critic tensor {name!r} contains NaN or inf")
        return net

    def to_entry(self) -> dict[str, Any]:
        """The native ``"critic"`` entry (loads with ``weights_only=True``)."""
        return {
            "hidden": list(self.hidden),
            "activation": self.activation,
            "input": "normalized_obs",
            "state_dict": {k: v.detach().clone() for k, v in self.net.state_dict().items()},
        }
