"""The one in-memory policy representation shared by every stage, and its native `.pt` format.

A policy is: observation preprocessing (float32 cast, affine normalisation, clip), an MLP trunk
of Linear layers with a 1-Lipschitz activation, a head (gaussian, categorical, squashed_gaussian,
deterministic), action post-processing (clip or tanh-rescale to the bounds) and metadata.

Pruning masks live beside the weights as buffers and are applied in ``forward`` as ``W * M``, so
no optimiser step can revive a pruned weight: its effective value is always zero.
"""

from __future__ import annotations

import contextlib
import copy
import math
import numbers
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import nn

from compressor.core.errors import CompressorError

HEADS = ("gaussian", "categorical", "squashed_gaussian", "deterministic")
ACTIVATIONS: dict[str, type[nn.Module]] = {"tanh": nn.Tanh, "relu": nn.ReLU, "elu": nn.ELU}
#: Largest MLP a spec may describe (weights + biases). Edge policies are far smaller; this stops a
#: corrupt or hostile spec from making us allocate gigabytes before its weights are checked.
MAX_PARAMETERS = 1 << 27


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_real(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def mlp_parameters(sizes: list[int]) -> int:
    """Weights and biases of an MLP with layer sizes ``sizes`` (input first)."""
    return sum((int(a) + 1) * int(b) for a, b in zip(sizes[:-1], sizes[1:]))


@dataclass
class PolicySpec:
    """Everything about a policy except its weights.

    :param obs_dim: observation size.
    :param act_dim: action size (continuous) or number of actions (categorical).
    :param hidden: widths of the hidden layers.
    :param activation: one of ``ACTIVATIONS`` (all 1-Lipschitz with derivative in [0, 1]).
    :param head: one of ``HEADS``.
    :param obs_norm: whether ``(obs - mean) / sqrt(var + eps)`` is applied.
    :param obs_clip: clip of the normalised observation, or None.
    :param obs_eps: the epsilon in the normalisation.
    :param action_low: lower action bounds (continuous heads), or None.
    :param action_high: upper action bounds (continuous heads), or None.
    :param env_id: gymnasium id of the environment the policy acts in.
    :param env_kwargs: keyword arguments for ``gymnasium.make``.
    :param source: provenance: format, file name, sha256, training command, etc.
    """

    obs_dim: int
    act_dim: int
    hidden: list[int]
    activation: str = "tanh"
    head: str = "gaussian"
    obs_norm: bool = False
    obs_clip: float | None = None
    obs_eps: float = 1e-8
    action_low: list[float] | None = None
    action_high: list[float] | None = None
    env_id: str = ""
    env_kwargs: dict[str, Any] = field(default_factory=dict)
    source: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        """Raise :class:`CompressorError` if the spec is inconsistent (or mistyped, as a spec read
        from a corrupt file can be)."""
        hidden = self.hidden
        if not (_is_int(self.obs_dim) and _is_int(self.act_dim)) or not (
            isinstance(hidden, list) and all(_is_int(h) for h in hidden)
        ):
            raise CompressorError("policy spec layer sizes must be integers")
        if not (isinstance(self.head, str) and isinstance(self.activation, str)):
            raise CompressorError("policy spec head and activation must be strings")
        if not isinstance(self.obs_norm, bool) or not _is_real(self.obs_eps) or self.obs_eps < 0:
            raise CompressorError("policy spec has a malformed obs_norm or obs_eps")
        if self.obs_clip is not None and not (_is_real(self.obs_clip) and self.obs_clip > 0):
            raise CompressorError("policy spec obs_clip must be a positive number or None")
        kwargs = self.env_kwargs
        if not (isinstance(kwargs, dict) and all(isinstance(k, str) for k in kwargs)):
            raise CompressorError("policy spec env_kwargs must be a table with string keys")
        if not (isinstance(self.env_id, str) and isinstance(self.source, dict)):
            raise CompressorError("policy spec env_id must be a string and source a table")
        for name, b in (("action_low", self.action_low), ("action_high", self.action_high)):
            if b is not None and not (isinstance(b, list) and all(_is_real(x) for x in b)):
                raise CompressorError(f"policy spec {name} must be a list of numbers")
        if self.head not in HEADS:
            raise CompressorError(f"unknown policy head {self.head!r}; expected one of {HEADS}")
        if self.activation not in ACTIVATIONS:
            raise CompressorError(
                f"unsupported activation {self.activation!r}; expected one of {list(ACTIVATIONS)}"
            )
        if self.obs_dim <= 0 or self.act_dim <= 0 or any(h <= 0 for h in self.hidden):
            raise CompressorError("policy spec has a non-positive layer size")
        if mlp_parameters([self.obs_dim, *hidden, self.act_dim]) > MAX_PARAMETERS:
            raise CompressorError(
                f"policy spec describes more than {MAX_PARAMETERS} parameters (corrupt file?)"
            )
        if self.head != "categorical":
            for name, b in (("action_low", self.action_low), ("action_high", self.action_high)):
                if b is not None and len(b) != self.act_dim:
                    raise CompressorError(f"{name} has {len(b)} entries, expected {self.act_dim}")


class LinearList(nn.ModuleList):
    """A ``ModuleList`` of ``nn.Linear`` (typed, so callers get ``Linear`` back)."""

    def __iter__(self) -> Iterator[nn.Linear]:
        return cast(Iterator[nn.Linear], super().__iter__())

    def __getitem__(self, idx: int) -> nn.Linear:  # type: ignore[override]
        return cast(nn.Linear, super().__getitem__(idx))


class Policy(nn.Module):
    """An MLP policy with normalisation, head and action post-processing.

    :param spec: the architecture and metadata.
    """

    obs_mean: torch.Tensor
    obs_var: torch.Tensor
    action_low: torch.Tensor
    action_high: torch.Tensor

    def __init__(self, spec: PolicySpec) -> None:
        super().__init__()
        spec.validate()
        self.spec = spec
        sizes = [spec.obs_dim, *spec.hidden, spec.act_dim]
        self.layers = LinearList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))
        self.act_fn = ACTIVATIONS[spec.activation]()
        for i, layer in enumerate(self.layers):
            self.register_buffer(f"mask{i}", torch.ones_like(layer.weight))
        self.register_buffer("obs_mean", torch.zeros(spec.obs_dim))
        self.register_buffer("obs_var", torch.ones(spec.obs_dim))
        if spec.head in ("gaussian", "squashed_gaussian"):
            self.log_std = nn.Parameter(torch.zeros(spec.act_dim))
        low = spec.action_low if spec.action_low is not None else [-math.inf] * spec.act_dim
        high = spec.action_high if spec.action_high is not None else [math.inf] * spec.act_dim
        self.register_buffer("action_low", torch.tensor(low, dtype=torch.float32))
        self.register_buffer("action_high", torch.tensor(high, dtype=torch.float32))

    # ---- masks -------------------------------------------------------------------------------
    def masks(self) -> list[torch.Tensor]:
        """The pruning mask of each Linear layer (1 = kept), in layer order."""
        return [self.get_buffer(f"mask{i}") for i in range(len(self.layers))]

    def set_masks(self, masks: list[torch.Tensor]) -> None:
        """Install masks (one per layer, same shape as its weight) and zero the pruned weights."""
        if len(masks) != len(self.layers):
            raise ValueError(f"expected {len(self.layers)} masks, got {len(masks)}")
        with torch.no_grad():
            for i, (layer, m) in enumerate(zip(self.layers, masks)):
                if m.shape != layer.weight.shape:
                    raise ValueError(f"mask {i} shape {tuple(m.shape)} != weight shape")
                self.get_buffer(f"mask{i}").copy_(m.to(layer.weight.dtype))
                layer.weight.mul_(self.get_buffer(f"mask{i}"))

    def effective_weights(self) -> list[torch.Tensor]:
        """``W * M`` for every layer: the weights the policy actually uses."""
        return [layer.weight * m for layer, m in zip(self.layers, self.masks())]

    def sparsity(self) -> float:
        """Fraction of prunable weights (all Linear weights, not biases) that are zero."""
        total = sum(w.numel() for w in self.effective_weights())
        zeros = sum(int((w == 0).sum()) for w in self.effective_weights())
        return zeros / max(total, 1)

    def num_parameters(self, nonzero_only: bool = False) -> int:
        """Number of weights and biases (optionally only the non-zero ones)."""
        n = 0
        for w, layer in zip(self.effective_weights(), self.layers):
            n += int((w != 0).sum()) if nonzero_only else w.numel()
            n += layer.bias.numel()
        return n

    # ---- forward -----------------------------------------------------------------------------
    def obs_scale(self) -> torch.Tensor:
        """``sqrt(var + eps)``: one normalised unit in raw observation units (1 if no norm)."""
        if not self.spec.obs_norm:
            return torch.ones_like(self.obs_var)
        return torch.sqrt(self.obs_var + self.spec.obs_eps)

    def normalize(self, obs: torch.Tensor) -> torch.Tensor:
        """Raw observation batch -> the network's input (normalised and clipped)."""
        z = obs.to(torch.float32)
        if self.spec.obs_norm:
            z = (z - self.obs_mean) / self.obs_scale()
        if self.spec.obs_clip is not None:
            z = z.clamp(-self.spec.obs_clip, self.spec.obs_clip)
        return z

    def trunk_forward(self, z: torch.Tensor) -> torch.Tensor:
        """Normalised input -> head pre-activation (Gaussian mean, logits, or raw action)."""
        h = z
        last = len(self.layers) - 1
        frozen = getattr(self, "_frozen", None)
        for i, (layer, m) in enumerate(zip(self.layers, self.masks())):
            w = frozen[i] if frozen is not None else layer.weight * m
            h = nn.functional.linear(h, w, layer.bias)
            if i < last:
                h = self.act_fn(h)
        return h

    @contextlib.contextmanager
    def frozen(self) -> Iterator[Policy]:
        """Within this block the weights are only read: ``W ⊙ M`` is computed once, outside
        autograd, instead of at every forward pass (attacks run many passes per env step).
        Gradients still flow to the input; none reach the weights. The same numbers as the
        unfrozen forward, bit for bit. Re-entrant; never use it while training the policy."""
        if getattr(self, "_frozen", None) is not None:
            yield self
            return
        with torch.no_grad():
            weights = [layer.weight * m for layer, m in zip(self.layers, self.masks())]
        self._frozen: list[torch.Tensor] | None = weights
        try:
            yield self
        finally:
            self._frozen = None

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        """Raw observation batch -> head output (Gaussian mean, or categorical logits)."""
        return self.trunk_forward(self.normalize(obs))

    def postprocess(self, out: torch.Tensor) -> torch.Tensor:
        """Head output -> deterministic action in the env's action space."""
        head = self.spec.head
        if head == "categorical":
            return out.argmax(dim=-1)
        if head == "squashed_gaussian":
            low, high = self.action_low, self.action_high
            return low + (torch.tanh(out) + 1.0) * 0.5 * (high - low)
        return torch.maximum(torch.minimum(out, self.action_high), self.action_low)

    def act(self, obs: torch.Tensor) -> torch.Tensor:
        """Deterministic action (mean / argmax / tanh-rescale, then clipped to the bounds)."""
        return self.postprocess(self.forward(obs))

    def sample(self, obs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Stochastic action from the policy's distribution (post-processed)."""
        out = self.forward(obs)
        if self.spec.head == "categorical":
            return torch.multinomial(torch.softmax(out, -1), 1, generator=generator).squeeze(-1)
        if self.spec.head == "deterministic":
            return self.postprocess(out)
        noise = torch.randn(out.shape, generator=generator, dtype=out.dtype)
        return self.postprocess(out + noise * self.log_std.exp())

    # ---- divergences between two head outputs ------------------------------------------------
    def divergence(self, out_a: torch.Tensor, out_b: torch.Tensor) -> torch.Tensor:
        """Per-row divergence used by MAD and distillation (differentiable).

        Gaussian heads: squared Mahalanobis shift ``‖Σ^{-1/2}(μ_a - μ_b)‖²`` (2·KL for equal Σ);
        categorical: ``KL(softmax a ‖ softmax b)``; deterministic: squared action distance.
        """
        if self.spec.head == "categorical":
            la, lb = torch.log_softmax(out_a, -1), torch.log_softmax(out_b, -1)
            return (la.exp() * (la - lb)).sum(-1)
        if self.spec.head in ("gaussian", "squashed_gaussian"):
            return (((out_a - out_b) / self.log_std.exp()) ** 2).sum(-1)
        return ((out_a - out_b) ** 2).sum(-1)

    def total_variation(self, out_a: torch.Tensor, out_b: torch.Tensor) -> torch.Tensor:
        """Per-row TV distance between the action distributions of two head outputs.

        Gaussian (same Σ): ``2Φ(Δ/2) - 1`` with ``Δ`` the Mahalanobis shift (exact);
        categorical: ``½‖p - q‖₁``. Deterministic heads return the action distance instead.
        """
        if self.spec.head == "categorical":
            return 0.5 * (torch.softmax(out_a, -1) - torch.softmax(out_b, -1)).abs().sum(-1)
        if self.spec.head in ("gaussian", "squashed_gaussian"):
            delta = torch.sqrt(self.divergence(out_a, out_b).clamp_min(0.0))
            return torch.erf(delta / (2.0 * math.sqrt(2.0)))
        return torch.sqrt(self.divergence(out_a, out_b))

    def clone(self) -> Policy:
        """A deep copy (weights, masks, spec)."""
        return copy.deepcopy(self)


def check_finite(policy: Policy, origin: str = "policy") -> None:
    """Raise if any weight, bias or normalisation statistic is NaN or infinite."""
    for name, t in policy.state_dict().items():
        if name.startswith("action_"):
            continue  # infinite action bounds are legitimate (unbounded action space)
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise CompressorError(f"{origin}: tensor {name!r} contains NaN or inf values")
    if policy.spec.obs_norm and bool((policy.obs_var < 0).any()):
        raise CompressorError(f"{origin}: normalisation variance is negative")
