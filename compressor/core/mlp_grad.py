"""The input gradient of a policy's (or value net's) MLP written out by hand, for PGD.

PGD takes ten gradient steps per attacked env step. Eager autograd builds and walks a graph of
a few dozen tiny ops for each, and on a CPU that bookkeeping, not the arithmetic, is the cost.
The vector-Jacobian product of ``normalise → (Linear, activation)* → Linear`` is a handful of
matmuls, so :class:`MLPGrad` does the forward pass keeping what the backward needs and then the
backward pass, calling the same kernels autograd would (``addmm``, ``mm``, ``tanh_backward``,
``threshold_backward``, ``elu_backward``, clamp's mask): the gradients equal autograd's to float
rounding, and in practice bit for bit.

An objective that is a function of the network's output — MAD's divergence, RS's ``-Q(s, μ)``,
the critic's ``-V`` — is a :class:`OutputObjective`: the net's output goes through the
caller's function under autograd (a tensor of a few numbers per row), the rest by hand.
Anything this module does not recognise (another activation, a subclass that overrides the
forward, a forward whose output differs from what the layers give) falls back to the plain
autograd objective, and :mod:`compressor.core.objectives` checks the hand-written forward
against the policy's own on every new set of weights.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

if TYPE_CHECKING:
    from compressor.policy.model import Policy

#: Activations whose backward is written out here (module type -> name).
_ACTIVATIONS: dict[type[nn.Module], str] = {nn.Tanh: "tanh", nn.ReLU: "relu", nn.ELU: "elu"}


# the kernels autograd's backward nodes call (resolved once: each lookup costs a few µs)
_TANH_BACKWARD = torch.ops.aten.tanh_backward.default
_THRESHOLD_BACKWARD = torch.ops.aten.threshold_backward.default
_ELU_BACKWARD = torch.ops.aten.elu_backward.default


def _activate(name: str, h: torch.Tensor) -> torch.Tensor:
    if name == "tanh":
        return torch.tanh(h)
    if name == "relu":
        return torch.relu(h)
    return nn.functional.elu(h)


def _activation_backward(
    name: str, g: torch.Tensor, pre: torch.Tensor, post: torch.Tensor
) -> torch.Tensor:
    """``g · act'(pre)`` exactly as autograd computes it (the same ATen kernels)."""
    if name == "tanh":
        return _TANH_BACKWARD(g, post)
    if name == "relu":
        return _THRESHOLD_BACKWARD(g, post, 0)
    return _ELU_BACKWARD(g, 1.0, 1.0, 1.0, False, pre)


@dataclass(frozen=True)
class MLPGrad:
    """``x ↦ MLP(clip((x - shift) / div))`` with its input gradient.

    :param weights: effective weight of each Linear layer (``W ⊙ M``), shape (out, in).
    :param biases: bias of each layer.
    :param activation: ``"tanh"``, ``"relu"`` or ``"elu"`` (after every layer but the last).
    :param shift: normalisation mean, or None (no normalisation).
    :param div: normalisation scale ``sqrt(var + eps)`` (with ``shift``), or None.
    :param clip: clip of the normalised input, or None.
    """

    weights: tuple[torch.Tensor, ...]
    biases: tuple[torch.Tensor, ...]
    activation: str
    shift: torch.Tensor | None = None
    div: torch.Tensor | None = None
    clip: float | None = None
    transposed: tuple[torch.Tensor, ...] = field(init=False, repr=False, compare=False)
    _zero: torch.Tensor = field(init=False, repr=False, compare=False)
    _clip: torch.Tensor = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # the forward multiplies by Wᵀ: MKL takes a contiguous copy 20-40% faster than the
        # strided view at these sizes (256², batch 16-64), with the same numbers
        wt = tuple(w.t().contiguous() for w in self.weights)
        object.__setattr__(self, "transposed", wt)
        # 0-dim tensors instead of Python numbers: the same arithmetic, less wrapping per op
        like = self.weights[0]
        object.__setattr__(self, "_zero", torch.zeros((), dtype=like.dtype, device=like.device))
        object.__setattr__(self, "_clip", torch.tensor(self.clip or 0.0).to(like))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The network's output at ``x`` (batch, in) and what :meth:`input_grad` needs."""
        z = x if x.dtype == torch.float32 else x.to(torch.float32)
        if self.shift is not None and self.div is not None:
            z = (z - self.shift) / self.div
        saved = [z]
        if self.clip is not None:
            z = z.clamp(-self.clip, self.clip)
        h = z
        last = len(self.weights) - 1
        for i, (wt, b) in enumerate(zip(self.transposed, self.biases)):
            h = torch.addmm(b, h, wt)
            if i < last:
                saved.append(h)
                h = _activate(self.activation, h)
                saved.append(h)
        return h, saved

    def input_grad(self, saved: list[torch.Tensor], g_out: torch.Tensor) -> torch.Tensor:
        """``(∂out/∂x)ᵀ g_out`` per row: the gradient at ``x`` of ``Σ g_out · out``.

        :param saved: the second value :meth:`forward` returned at that ``x``.
        :param g_out: gradient with respect to the output, shape (batch, out).
        """
        g = g_out
        for i in range(len(self.weights) - 1, -1, -1):
            g = g.mm(self.weights[i])
            if i > 0:
                g = _activation_backward(self.activation, g, saved[2 * i - 1], saved[2 * i])
        if self.clip is not None:  # clamp passes the gradient where -clip ≤ z ≤ clip
            g = torch.where(saved[0].abs() <= self._clip, g, self._zero)
        if self.div is not None:
            g = g / self.div
        return g

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward(x)[0]


#: ``out -> (objective per row, its gradient with respect to out)``, without autograd.
HeadGrad = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class OutputObjective:
    """``x ↦ head(net(x))``: a PGD objective through a hand-differentiated MLP.

    Calling it evaluates the objective with ordinary torch ops (autograd works through it);
    :func:`compressor.core.pgd.pgd` instead uses :meth:`value_and_grad`.

    :param net: the network (input: raw observations).
    :param head: maps the network's output (batch, out) to one value per row, differentiably.
    :param head_grad: the same value with its gradient written out, or None (autograd on the
        output: a graph of a few ops on a tensor of a few numbers per row).
    """

    net: MLPGrad
    head: Callable[[torch.Tensor], torch.Tensor]
    head_grad: HeadGrad | None = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.net(x))

    def value_and_grad(
        self, x: torch.Tensor, need_grad: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Objective per row at ``x`` and its gradient with respect to ``x`` (None without
        ``need_grad``). Call it with gradients off (``torch.no_grad``, as PGD does)."""
        val, grad, _ = self.value_grad_output(x, need_grad)
        return val, grad

    def value_grad_output(
        self, x: torch.Tensor, need_grad: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """:meth:`value_and_grad` and the network's output at ``x`` (batch, out)."""
        out, saved = self.net.forward(x)
        if not need_grad:
            return self.head(out).detach(), None, out
        if self.head_grad is not None:
            val, g_out = self.head_grad(out)
            return val, self.net.input_grad(saved, g_out), out
        leaf = out.detach().requires_grad_(True)
        with torch.enable_grad():
            val = self.head(leaf)
            (g_out,) = torch.autograd.grad(val.sum(), leaf, allow_unused=True)
        if g_out is None:  # the head ignores the output: a flat objective
            g_out = torch.zeros_like(out)
        return val.detach(), self.net.input_grad(saved, g_out), out


def _normalisation(policy: Policy) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    if not policy.spec.obs_norm:
        return None, None
    # float32, as Policy.normalize computes for the float32 observations attacks work on (the
    # float64 statistics serve only float64 observations)
    return policy.obs_mean.detach().to(torch.float32), policy.obs_scale().detach()


def _probe(x: torch.Tensor, shift: torch.Tensor | None, div: torch.Tensor | None) -> torch.Tensor:
    """``x`` and two far-out rows (beyond any clip), to check a hand-written forward on."""
    x = x.detach().to(torch.float32)
    centre = shift if shift is not None else torch.zeros_like(x[0])
    unit = div if div is not None else torch.ones_like(x[0])
    signs = torch.ones_like(x[0])
    signs[::2] = -1.0
    far = torch.stack([centre + 50 * unit * signs, centre - 50 * unit * signs])
    return torch.cat([x, far.to(x)])


def _agrees(a: torch.Tensor, b: Any) -> bool:
    return (
        isinstance(b, torch.Tensor)
        and a.shape == b.shape
        and bool(torch.allclose(a, b.detach().to(a.dtype), rtol=1e-5, atol=1e-6))
    )


def mlp_of_policy(policy: Policy, probe: torch.Tensor) -> MLPGrad | None:
    """The policy's forward as an :class:`MLPGrad`, or None where it is not recognised.

    :param policy: the policy (its weights are read, never changed).
    :param probe: raw observations (batch, obs) on which the hand-written forward must agree
        with ``policy(probe)``.
    """
    from compressor.policy.model import Policy

    cls = type(policy)
    same_forward = all(
        getattr(cls, name, None) is getattr(Policy, name, None)
        for name in ("forward", "trunk_forward", "normalize", "__call__")
    )
    act_fn = getattr(policy, "act_fn", None)
    if not same_forward or not isinstance(act_fn, nn.Module) or not _default_activation(act_fn):
        return None
    act = _ACTIVATIONS[type(act_fn)]
    try:
        with torch.no_grad():
            shift, div = _normalisation(policy)
            net = MLPGrad(
                weights=tuple(w.detach() for w in policy.effective_weights()),
                biases=tuple(layer.bias.detach() for layer in policy.layers),
                activation=act,
                shift=shift,
                div=div,
                clip=policy.spec.obs_clip,
            )
            x = _probe(probe, shift, div)
            return net if _agrees(net(x), policy(x)) else None
    except (AttributeError, RuntimeError, TypeError):  # a policy laid out otherwise
        return None


def mlp_of_sequential(
    seq: nn.Module, policy: Policy, probe: torch.Tensor, reference: Callable[[torch.Tensor], Any]
) -> MLPGrad | None:
    """An ``nn.Sequential`` of Linear layers and one activation, on the policy's normalised
    observation (a :class:`~compressor.policy.value.ValueNet`'s ``net``), or None.

    :param seq: the sequential network. :param policy: whose normalisation feeds it.
    :param probe: raw observations to check the hand-written forward on.
    :param reference: the caller's own map from raw observations to ``seq``'s output.
    """
    if type(seq) is not nn.Sequential:
        return None
    mods = list(seq)
    linears, acts = cast(list[nn.Linear], mods[0::2]), mods[1::2]
    kinds = {type(a) for a in acts}
    if (
        not linears
        or any(type(m) is not nn.Linear or m.bias is None for m in linears)
        or len(acts) != len(linears) - 1
        or len(kinds) > 1
        or not all(_default_activation(a) for a in acts)
    ):
        return None
    act = _ACTIVATIONS.get(next(iter(kinds)), None) if kinds else "tanh"
    if act is None:
        return None
    try:
        with torch.no_grad():
            shift, div = _normalisation(policy)
            net = MLPGrad(
                weights=tuple(m.weight.detach() for m in linears),
                biases=tuple(m.bias.detach() for m in linears),
                activation=act,
                shift=shift,
                div=div,
                clip=policy.spec.obs_clip,
            )
            x = _probe(probe, shift, div)
            return net if _agrees(net(x), reference(x)) else None
    except (AttributeError, RuntimeError, TypeError):
        return None


def _default_activation(mod: nn.Module) -> bool:
    if type(mod) not in _ACTIVATIONS:
        return False
    return not isinstance(mod, nn.ELU) or (float(mod.alpha) == 1.0 and not mod.inplace)
