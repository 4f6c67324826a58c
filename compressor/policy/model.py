"""The one in-memory policy representation shared by every stage.

A policy is: observation preprocessing (float32 cast, affine normalisation, clip), an MLP trunk
of Linear layers with a 1-Lipschitz activation, a head, action post-processing and metadata.

Heads (``PolicySpec.head``) and the deployed (deterministic) action each one computes:

- ``gaussian`` (PPO, A2C, rsl_rl): mean, clipped to the bounds; state-independent ``log_std``;
- ``categorical`` (PPO, A2C on discrete actions): argmax of the logits;
- ``squashed_gaussian`` (SAC, TQC): ``low + (tanh(μ) + 1) / 2 · (high - low)``; ``log σ`` is a
  parameter (``state_dependent_std=False``) or, as SAC/TQC have it, a second Linear layer on the
  last hidden activation, clipped (SB3: to [-20, 2]) or tanh-squashed (CleanRL) into bounds;
- ``deterministic`` (TD3, DDPG): the trunk's output, tanh-rescaled to the bounds when
  ``squash`` is set (SB3's and CleanRL's actors end in tanh), clipped otherwise;
- ``q_greedy`` (DQN, QR-DQN with its quantiles folded into their mean): the trunk outputs
  Q-values; the action is their argmax.

``Policy.layers`` is the deployed path: exactly the Linear layers the deployed action uses, in
order; masks cover each of them. A state-dependent ``log_std_layer`` is *not* on that path (the
deployed action never uses σ): it is not pruned, not counted in ``num_parameters`` or
``sparsity``, and not exported; it serves sampling (fine-tuning, stochastic attacks) only.

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

HEADS = ("gaussian", "categorical", "squashed_gaussian", "deterministic", "q_greedy")
#: Heads whose action is an index (argmax); the others output a vector in the action bounds.
DISCRETE_HEADS = ("categorical", "q_greedy")
ACTIVATIONS: dict[str, type[nn.Module]] = {"tanh": nn.Tanh, "relu": nn.ReLU, "elu": nn.ELU}
#: How a state-dependent ``log σ`` is brought into ``log_std_bounds``: SB3 clips, CleanRL
#: maps ``tanh`` of the raw output onto the interval.
LOG_STD_TRANSFORMS = ("clip", "tanh")
#: Largest batch :meth:`Policy.act` computes row by row (rollouts step at most a few dozen
#: envs; larger batches, e.g. of stored states, take the batched matmul).
ROWWISE_MAX_BATCH = 256
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

    :param obs_dim: observation size (what the environment, wrappers included, gives).
    :param act_dim: action size (continuous) or number of actions (categorical, q_greedy).
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
    :param state_dependent_std: squashed_gaussian: ``log σ`` comes from a Linear layer on the
        last hidden activation (SAC, TQC) instead of a parameter.
    :param log_std_bounds: ``[lo, hi]`` the state-dependent ``log σ`` is brought into, or None.
    :param log_std_transform: ``clip`` (SB3) or ``tanh`` (CleanRL SAC), see
        :data:`LOG_STD_TRANSFORMS`.
    :param squash: deterministic head: tanh then rescale to the bounds (TD3, DDPG) instead of
        clipping (squashed_gaussian heads always squash).
    :param exploration: how :meth:`Policy.sample` explores where the head has no distribution of
        its own: deterministic heads add Gaussian noise of this std, in units of half the action
        range (TD3: 0.1); q_greedy heads act uniformly at random with this probability
        (ε-greedy; SB3 DQN: its final exploration rate). 0: :meth:`Policy.sample` is greedy.
    :param env_wrappers: wrappers every environment the tool builds for this policy applies, in
        order, e.g. ``[{"name": "TimeFeatureWrapper", "max_steps": 1000}]`` (see
        ``compressor.rl.wrappers``).
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
    state_dependent_std: bool = False
    log_std_bounds: list[float] | None = None
    log_std_transform: str = "clip"
    squash: bool = False
    exploration: float = 0.0
    env_wrappers: list[dict[str, Any]] = field(default_factory=list)

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
        if self.head not in DISCRETE_HEADS:
            for name, b in (("action_low", self.action_low), ("action_high", self.action_high)):
                if b is not None and len(b) != self.act_dim:
                    raise CompressorError(f"{name} has {len(b)} entries, expected {self.act_dim}")
        self._validate_head_options()

    def _validate_head_options(self) -> None:
        """The fields version 2 of the native format added (defaults keep version 1 valid)."""
        if not all(isinstance(v, bool) for v in (self.state_dependent_std, self.squash)):
            raise CompressorError("policy spec state_dependent_std and squash must be booleans")
        if self.state_dependent_std and self.head != "squashed_gaussian":
            raise CompressorError("state_dependent_std is only defined for squashed_gaussian heads")
        if self.squash and self.head != "deterministic":
            raise CompressorError("squash is only defined for deterministic heads")
        bounds = self.log_std_bounds
        if bounds is not None and not (
            isinstance(bounds, list)
            and len(bounds) == 2
            and all(_is_real(b) and math.isfinite(b) for b in bounds)
            and bounds[0] < bounds[1]
        ):
            raise CompressorError("policy spec log_std_bounds must be [low, high] with low < high")
        if self.log_std_transform not in LOG_STD_TRANSFORMS:
            raise CompressorError(
                f"unknown log_std_transform {self.log_std_transform!r}; "
                f"expected one of {LOG_STD_TRANSFORMS}"
            )
        if self.log_std_transform == "tanh" and bounds is None:
            raise CompressorError("log_std_transform 'tanh' needs log_std_bounds")
        if not (_is_real(self.exploration) and 0.0 <= self.exploration < math.inf):
            raise CompressorError("policy spec exploration must be a non-negative number")
        if self.head == "q_greedy" and self.exploration > 1.0:
            raise CompressorError("a q_greedy head's exploration is a probability (at most 1)")
        if self.squash:
            bounds_given = [b for b in (self.action_low, self.action_high) if b is not None]
            if len(bounds_given) != 2 or not all(math.isfinite(x) for b in bounds_given for x in b):
                raise CompressorError("a squashed deterministic head needs finite action bounds")
        wrappers = self.env_wrappers
        if not (
            isinstance(wrappers, list)
            and all(isinstance(w, dict) and isinstance(w.get("name"), str) for w in wrappers)
        ):
            raise CompressorError("policy spec env_wrappers must be a list of tables with a name")


class LinearList(nn.ModuleList):
    """A ``ModuleList`` of ``nn.Linear`` (typed, so callers get ``Linear`` back)."""

    def __iter__(self) -> Iterator[nn.Linear]:
        return cast(Iterator[nn.Linear], super().__iter__())

    def __getitem__(self, idx: int) -> nn.Linear:  # type: ignore[override]
        return cast(nn.Linear, super().__getitem__(idx))


class Policy(nn.Module):
    """An MLP policy with normalisation, head and action post-processing.

    What a bound propagation needs: :meth:`normalize` (and :meth:`obs_scale`, ``spec.obs_clip``),
    :attr:`layers` with :meth:`effective_weights` (the deployed path), :attr:`act_fn` between
    them, and :meth:`postprocess` of kind :attr:`action_map` (``clip``, ``tanh_rescale`` or
    ``argmax``).

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
        # float64, as SB3's VecNormalize keeps them: see :meth:`normalize`
        self.register_buffer("obs_mean", torch.zeros(spec.obs_dim, dtype=torch.float64))
        self.register_buffer("obs_var", torch.ones(spec.obs_dim, dtype=torch.float64))
        if self.std_kind == "parameter":
            self.log_std = nn.Parameter(torch.zeros(spec.act_dim))
        elif self.std_kind == "state":
            self.log_std_layer = nn.Linear(sizes[-2], spec.act_dim)
        low = spec.action_low if spec.action_low is not None else [-math.inf] * spec.act_dim
        high = spec.action_high if spec.action_high is not None else [math.inf] * spec.act_dim
        self.register_buffer("action_low", torch.tensor(low, dtype=torch.float32))
        self.register_buffer("action_high", torch.tensor(high, dtype=torch.float32))

    # ---- what the head is --------------------------------------------------------------------
    @property
    def std_kind(self) -> str | None:
        """``parameter`` (state-independent ``log_std``), ``state`` (``log_std_layer``) or None
        (heads without a Gaussian)."""
        head = self.spec.head
        if head == "squashed_gaussian":
            return "state" if self.spec.state_dependent_std else "parameter"
        return "parameter" if head == "gaussian" else None

    @property
    def action_map(self) -> str:
        """What :meth:`postprocess` does: ``argmax``, ``tanh_rescale`` or ``clip``."""
        if self.spec.head in DISCRETE_HEADS:
            return "argmax"
        if self.spec.head == "squashed_gaussian" or self.spec.squash:
            return "tanh_rescale"
        return "clip"

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
        """Fraction of prunable weights (the deployed path's Linear weights) that are zero."""
        total = sum(w.numel() for w in self.effective_weights())
        zeros = sum(int((w == 0).sum()) for w in self.effective_weights())
        return zeros / max(total, 1)

    def layer_sparsity(self) -> list[float]:
        """Fraction of each Linear layer's weights that are zero, input layer first (how a
        global threshold spread its cuts)."""
        with torch.no_grad():
            return [float((w == 0).float().mean()) for w in self.effective_weights()]

    def num_parameters(self, nonzero_only: bool = False) -> int:
        """Weights and biases of the deployed path (optionally only the non-zero ones)."""
        n = 0
        for w, layer in zip(self.effective_weights(), self.layers):
            n += int((w != 0).sum()) if nonzero_only else w.numel()
            n += layer.bias.numel()
        return n

    # ---- forward -----------------------------------------------------------------------------
    def obs_scale(self) -> torch.Tensor:
        """``sqrt(var + eps)`` (float32): one normalised unit in raw observation units (1 if no
        norm)."""
        if not self.spec.obs_norm:
            return torch.ones_like(self.obs_var, dtype=torch.float32)
        return torch.sqrt(self.obs_var.to(torch.float32) + self.spec.obs_eps)

    def normalize(self, obs: torch.Tensor) -> torch.Tensor:
        """Raw observation batch -> the network's input (normalised and clipped, float32).

        float64 observations (MuJoCo's) are normalised in float64 with the float64 statistics,
        then cast, as SB3's VecNormalize does: the network then sees bit for bit what it saw in
        SB3 (chaotic tasks such as Walker2d turn a 1e-7 difference into a different episode).
        Any other dtype is cast to float32 first and normalised in float32 (the exported graph's
        arithmetic).
        """
        if self.spec.obs_norm and obs.dtype == torch.float64:
            z = (obs - self.obs_mean) / torch.sqrt(self.obs_var + self.spec.obs_eps)
        else:
            z = obs.to(torch.float32)
            if self.spec.obs_norm:
                z = (z - self.obs_mean.to(torch.float32)) / self.obs_scale()
        if self.spec.obs_clip is not None:
            z = z.clamp(-self.spec.obs_clip, self.spec.obs_clip)
        return z.to(torch.float32)

    def _weights(self) -> list[torch.Tensor]:
        frozen = getattr(self, "_frozen", None)
        return frozen if frozen is not None else self.effective_weights()

    @staticmethod
    def _linear(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor, rowwise: bool) -> torch.Tensor:
        if rowwise and h.dim() == 2 and 1 < h.shape[0] <= ROWWISE_MAX_BATCH:
            # every row as a batch of one (``nn.Linear`` on one row is this matrix-vector
            # product): the same kernel, hence the same float32 rounding, whatever else is in
            # the batch; a batched matmul sums in another order
            return torch.stack([torch.addmv(b, w, row) for row in h])
        return nn.functional.linear(h, w, b)

    def hidden_forward(self, z: torch.Tensor, rowwise: bool = False) -> torch.Tensor:
        """Normalised input -> the input of the last layer (the last hidden activation; ``z``
        itself without hidden layers). The state-dependent ``log_std_layer`` reads it too.

        :param z: normalised input batch.
        :param rowwise: compute each row exactly as a batch of one (see :meth:`act`).
        """
        h = z
        weights = self._weights()
        for w, layer in zip(weights[:-1], list(self.layers)[:-1]):
            h = self.act_fn(self._linear(h, w, layer.bias, rowwise))
        return h

    def trunk_forward(self, z: torch.Tensor, rowwise: bool = False) -> torch.Tensor:
        """Normalised input -> head pre-activation (mean, logits, Q-values or raw action).

        :param z: normalised input batch.
        :param rowwise: compute each row exactly as a batch of one (see :meth:`act`).
        """
        last = self.layers[len(self.layers) - 1]
        h = self.hidden_forward(z, rowwise)
        return self._linear(h, self._weights()[-1], last.bias, rowwise)

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
        """Raw observation batch -> head output (mean, logits, Q-values or raw action)."""
        return self.trunk_forward(self.normalize(obs))

    def bound_log_std(self, raw: torch.Tensor) -> torch.Tensor:
        """A state-dependent ``log σ`` layer's output brought into ``spec.log_std_bounds``."""
        bounds = self.spec.log_std_bounds
        if bounds is None:
            return raw
        lo, hi = float(bounds[0]), float(bounds[1])
        if self.spec.log_std_transform == "tanh":
            return lo + 0.5 * (hi - lo) * (torch.tanh(raw) + 1.0)
        return raw.clamp(lo, hi)

    def distribution_params(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(μ, log σ)`` of a Gaussian head at raw observations, both shaped (batch, act_dim).

        :param obs: raw observation batch.
        """
        if self.std_kind is None:
            raise CompressorError(f"a {self.spec.head} head has no Gaussian distribution")
        h = self.hidden_forward(self.normalize(obs))
        last = self.layers[len(self.layers) - 1]
        mean = nn.functional.linear(h, self._weights()[-1], last.bias)
        if self.std_kind == "state":
            return mean, self.bound_log_std(self.log_std_layer(h))
        return mean, self.log_std.expand_as(mean)

    def postprocess(self, out: torch.Tensor) -> torch.Tensor:
        """Head output -> deterministic action in the env's action space (see
        :attr:`action_map`)."""
        kind = self.action_map
        if kind == "argmax":
            return out.argmax(dim=-1)
        if kind == "tanh_rescale":
            low, high = self.action_low, self.action_high
            return low + (torch.tanh(out) + 1.0) * 0.5 * (high - low)
        return torch.maximum(torch.minimum(out, self.action_high), self.action_low)

    def act(self, obs: torch.Tensor) -> torch.Tensor:
        """Deterministic action (mean / argmax / tanh-rescale, then clipped to the bounds).

        Batch-invariant (up to :data:`ROWWISE_MAX_BATCH` rows): each row is computed as a batch
        of one, so an episode's actions do not depend on which episodes run beside it (a batched
        matmul rounds differently, and chaotic tasks such as Walker2d turn that 1e-7 into
        another episode), and they are bit for bit those the source library's own ``predict``
        computes for one observation. Attacks and training use the batched :meth:`forward`.
        """
        return self.postprocess(self.trunk_forward(self.normalize(obs), rowwise=True))

    def sample(self, obs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Stochastic action from the policy's behaviour distribution (post-processed).

        categorical: softmax of the logits; gaussian / squashed_gaussian: ``μ + σ·ξ`` then the
        clip or tanh-rescale; deterministic: the action plus Gaussian noise of
        ``exploration · (high - low) / 2``, clipped to the bounds; q_greedy: ε-greedy with
        ``ε = exploration``.
        """
        head = self.spec.head
        if head == "categorical":
            out = self.forward(obs)
            return torch.multinomial(torch.softmax(out, -1), 1, generator=generator).squeeze(-1)
        if head == "q_greedy":
            return self._epsilon_greedy(self.forward(obs), generator)
        if head == "deterministic":
            return self._noisy_action(self.act(obs), generator)
        if self.std_kind == "state":
            mean, log_std = self.distribution_params(obs)
        else:
            mean = self.forward(obs)
            log_std = self.log_std
        noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype)
        return self.postprocess(mean + noise * log_std.exp())

    def _epsilon_greedy(self, q: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        greedy = q.argmax(dim=-1)
        eps = float(self.spec.exploration)
        if eps <= 0.0:
            return greedy
        explore = torch.rand(greedy.shape, generator=generator) < eps
        random = torch.randint(0, q.shape[-1], greedy.shape, generator=generator)
        return torch.where(explore, random, greedy)

    def _noisy_action(
        self, action: torch.Tensor, generator: torch.Generator | None
    ) -> torch.Tensor:
        if self.spec.exploration <= 0.0:
            return action
        span = self.action_high - self.action_low
        std = torch.where(torch.isfinite(span), 0.5 * span, torch.ones_like(span))
        noise = torch.randn(action.shape, generator=generator, dtype=action.dtype)
        noisy = action + noise * std * float(self.spec.exploration)
        return torch.maximum(torch.minimum(noisy, self.action_high), self.action_low)

    # ---- divergences between two head outputs ------------------------------------------------
    def divergence(self, out_a: torch.Tensor, out_b: torch.Tensor) -> torch.Tensor:
        """Per-row distance between two head outputs, zero when they are equal (differentiable):
        the distillation loss, the smoothness regulariser and, except for q_greedy heads, MAD's
        objective (:meth:`attack_objective`).

        - gaussian, squashed_gaussian with a parameter σ: squared Mahalanobis shift
          ``‖Σ^{-1/2}(μ_a - μ_b)‖²`` (2·KL for equal Σ; tanh is a bijection, so the same for
          the squashed distribution);
        - categorical: ``KL(softmax a ‖ softmax b)``;
        - squashed_gaussian with a state-dependent σ, and deterministic heads that squash: the
          squared distance of the deployed actions (after tanh-rescale), in action units. What
          the robot executes is the deterministic action; a KL would also reward moving σ,
          which the deployed action never uses, and the tanh-rescaled distance does not keep
          pushing dimensions that tanh has saturated;
        - deterministic heads that clip: squared distance of the outputs before the clip (it
          bounds the deployed distance, and the clip has no gradient where it binds);
        - q_greedy: squared distance of the Q-values centred on their mean (what the argmax
          depends on are the differences of the Q-values, not their common level).
        """
        head = self.spec.head
        if head == "categorical":
            la, lb = torch.log_softmax(out_a, -1), torch.log_softmax(out_b, -1)
            return (la.exp() * (la - lb)).sum(-1)
        if self.std_kind == "parameter":
            return (((out_a - out_b) / self.log_std.exp()) ** 2).sum(-1)
        if head == "q_greedy":
            ca = out_a - out_a.mean(-1, keepdim=True)
            cb = out_b - out_b.mean(-1, keepdim=True)
            return ((ca - cb) ** 2).sum(-1)
        if self.action_map == "tanh_rescale":
            return ((self.postprocess(out_a) - self.postprocess(out_b)) ** 2).sum(-1)
        return ((out_a - out_b) ** 2).sum(-1)

    def attack_objective(self, ref: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """What MAD maximises, per row, between the head output at the true observation
        (``ref``) and at the perturbed one (``out``).

        q_greedy: the margin ``max_{j ≠ a*} Q_j(ŝ) - Q_{a*}(ŝ)`` with ``a* = argmax Q(s)``, which
        is positive exactly when the greedy action has changed (Carlini–Wagner's margin: a
        divergence of the Q-values can grow without the argmax moving). Every other head:
        :meth:`divergence`.
        """
        if self.spec.head != "q_greedy":
            return self.divergence(ref, out)
        best = ref.argmax(dim=-1, keepdim=True)
        q_best = out.gather(-1, best).squeeze(-1)
        others = out.scatter(-1, best, -math.inf)
        return others.max(dim=-1).values - q_best

    def total_variation(self, out_a: torch.Tensor, out_b: torch.Tensor) -> torch.Tensor:
        """Per-row TV distance between the action distributions of two head outputs.

        Gaussian (same Σ; squashed too: tanh is a bijection): ``2Φ(Δ/2) - 1`` with ``Δ`` the
        Mahalanobis shift (exact); categorical: ``½‖p - q‖₁``; q_greedy: 1 where the greedy
        action differs, else 0 (the exact TV of the two greedy policies). Deterministic heads and
        squashed heads with a state-dependent σ return the distance of :meth:`divergence`
        instead (the deployed action's, in action units).
        """
        head = self.spec.head
        if head == "categorical":
            return 0.5 * (torch.softmax(out_a, -1) - torch.softmax(out_b, -1)).abs().sum(-1)
        if self.std_kind == "parameter":
            delta = torch.sqrt(self.divergence(out_a, out_b).clamp_min(0.0))
            return torch.erf(delta / (2.0 * math.sqrt(2.0)))
        if head == "q_greedy":
            return (out_a.argmax(-1) != out_b.argmax(-1)).to(out_a.dtype)
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
