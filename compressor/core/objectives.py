"""PGD objectives through a policy's (or its critic's) network, with the gradient by hand where
the network is recognised (:mod:`compressor.core.mlp_grad`) and by autograd where it is not.

Attacks build their objective at every env step while the weights stay put, so the recognised
network (and whether the hand-written divergence gradient agrees with ``policy.divergence``)
is remembered per module until one of its tensors changes.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from compressor.core.mlp_grad import (
    HeadGrad,
    MLPGrad,
    OutputObjective,
    mlp_of_policy,
    mlp_of_sequential,
)

if TYPE_CHECKING:
    from compressor.policy.model import Policy

Objective = Callable[[torch.Tensor], torch.Tensor]
#: the kernel autograd's ``log_softmax`` backward calls (the same numbers)
_LOG_SOFTMAX_BACKWARD = torch.ops.aten._log_softmax_backward_data.default


@dataclass
class _Entry:
    signature: tuple[Any, ...]
    net: MLPGrad | None
    checked: dict[str, bool] = field(default_factory=dict)  # hand-written heads that agree


# A memo, not state: a miss rebuilds the same thing. Valid while every parameter and buffer of
# the modules is the same tensor at the same version (an optimiser step or ``copy_`` bumps it);
# the entry holds those tensors, so a freed one's id cannot be reused under it.
_MEMO: weakref.WeakKeyDictionary[nn.Module, _Entry] = weakref.WeakKeyDictionary()


def _signature(policy: Policy, *others: nn.Module) -> tuple[Any, ...]:
    tensors = [t for m in (policy, *others) for t in (*m.parameters(), *m.buffers())]
    spec = policy.spec
    fields = (spec.obs_norm, spec.obs_clip, spec.obs_eps, spec.activation, spec.head)
    return (fields, tensors, [t._version for t in tensors])


def _same(a: tuple[Any, ...], b: tuple[Any, ...]) -> bool:
    return (
        a[0] == b[0]
        and len(a[1]) == len(b[1])
        and all(x is y for x, y in zip(a[1], b[1]))
        and a[2] == b[2]
    )


def _entry(key: nn.Module, sig: tuple[Any, ...], build: Callable[[], MLPGrad | None]) -> _Entry:
    hit = _MEMO.get(key)
    if hit is not None and _same(hit.signature, sig):
        return hit
    entry = _Entry(sig, build())
    _MEMO[key] = entry
    return entry


def policy_objective(policy: Policy, head: Objective, probe: torch.Tensor) -> Objective:
    """``x ↦ head(policy(x))``, as an :class:`OutputObjective` where the policy's network is
    recognised, else the plain closure (autograd through the policy).

    :param policy: the policy (weights read only).
    :param head: function of the policy's output (batch, out), one value per row.
    :param probe: raw observations (the attacked batch) to check the recognition on.
    """
    entry = _entry(policy, _signature(policy), lambda: mlp_of_policy(policy, probe))
    if entry.net is None:
        return lambda x: head(policy(x))
    return OutputObjective(entry.net, head)


def divergence_objective(
    policy: Policy, clean: torch.Tensor | None, probe: torch.Tensor
) -> Objective:
    """``x ↦ policy.divergence(clean, policy(x))`` (MAD's objective), its gradient written out
    for the heads :func:`_divergence_grad` knows once it has agreed with autograd on this
    policy.

    :param policy: the policy. :param clean: its output at the true observations, or None
        (computed here, at ``probe``).
    :param probe: raw observations (the attacked batch) to check the recognition on.
    """
    return divergence_objective_and_ref(policy, clean, probe)[0]


def divergence_objective_and_ref(
    policy: Policy, clean: torch.Tensor | None, probe: torch.Tensor
) -> tuple[Objective, torch.Tensor]:
    """:func:`divergence_objective` and the reference output it measures from (``clean``, or
    the one computed at ``probe``)."""
    entry = _entry(policy, _signature(policy), lambda: mlp_of_policy(policy, probe))
    with torch.no_grad():
        ref = clean if clean is not None else (entry.net or policy)(probe)

    def head(out: torch.Tensor) -> torch.Tensor:
        return policy.divergence(ref, out)

    if entry.net is None:
        return (lambda x: head(policy(x))), ref
    if "divergence" not in entry.checked:
        entry.checked["divergence"] = _divergence_agrees(policy, entry.net, probe)
    grad = _divergence_grad(policy, ref) if entry.checked["divergence"] else None
    return OutputObjective(entry.net, head, grad), ref


def value_objective(
    policy: Policy, critic: Callable[[torch.Tensor], torch.Tensor], probe: torch.Tensor
) -> Objective:
    """``x ↦ -critic(policy.normalize(x))`` (the critic attack's objective), by hand where
    ``critic`` is a :class:`~compressor.policy.value.ValueNet` of a recognised shape.

    :param policy: whose normalisation feeds the critic. :param critic: ``V`` on normalised
        observations, one value per row. :param probe: raw observations to check on.
    """
    from compressor.policy.value import ValueNet

    def plain(x: torch.Tensor) -> torch.Tensor:
        return -critic(policy.normalize(x))

    if type(critic) is not ValueNet:
        return plain
    seq = critic.net

    def build() -> MLPGrad | None:
        return mlp_of_sequential(seq, policy, probe, lambda x: seq(policy.normalize(x)))

    entry = _entry(critic, _signature(policy, critic), build)
    if entry.net is None:
        return plain

    def head(out: torch.Tensor) -> torch.Tensor:
        return -out.squeeze(-1)

    def head_grad(out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return -out.squeeze(-1), torch.full_like(out, -1.0)

    return OutputObjective(entry.net, head, head_grad)


def _divergence_grad(policy: Policy, clean: torch.Tensor) -> HeadGrad | None:
    """``out ↦ (policy.divergence(clean, out), its gradient)`` with the operations autograd
    would run backwards (so the same numbers), for the heads whose divergence is known."""
    kind = policy.spec.head
    # d/dout of ((clean - out) / σ)² is -(2u)/σ; (u · -2)/σ is that, bit for bit, in one op less
    minus_two = torch.tensor(-2.0, dtype=clean.dtype)
    if kind in ("gaussian", "squashed_gaussian"):
        sigma = policy.log_std.detach().exp()

        def gaussian(out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            u = (clean - out) / sigma
            return (u**2).sum(-1), (u * minus_two) / sigma

        return gaussian
    if kind == "categorical":
        la = torch.log_softmax(clean, -1)
        pa = la.exp()

        def categorical(out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            lb = torch.log_softmax(out, -1)
            g = _LOG_SOFTMAX_BACKWARD(-pa, lb, -1, lb.dtype)
            return (pa * (la - lb)).sum(-1), g

        return categorical
    if kind == "deterministic":

        def squared(out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            u = clean - out
            return (u**2).sum(-1), u * minus_two

        return squared
    return None


def _divergence_agrees(policy: Policy, net: MLPGrad, probe: torch.Tensor) -> bool:
    """Whether :func:`_divergence_grad` gives ``policy.divergence``'s value and autograd
    gradient on outputs near ``net(probe)`` (a changed divergence falls back to autograd)."""
    with torch.inference_mode(False):  # a caller's inference mode would forbid the autograd
        return _divergence_check(policy, net, probe.clone())


def _divergence_check(policy: Policy, net: MLPGrad, probe: torch.Tensor) -> bool:
    with torch.no_grad():
        clean = net(probe)
        gen = torch.Generator().manual_seed(0)
        out = clean + 0.5 * torch.randn(clean.shape, generator=gen, dtype=clean.dtype)
    try:
        by_hand = _divergence_grad(policy, clean)
        if by_hand is None:
            return False
        leaf = out.clone().requires_grad_(True)
        with torch.enable_grad():
            val = policy.divergence(clean, leaf)
            (g,) = torch.autograd.grad(val.sum(), leaf, allow_unused=True)
        with torch.no_grad():
            v2, g2 = by_hand(out)
    except (AttributeError, RuntimeError, TypeError):  # a head this module does not know
        return False
    return (
        g is not None
        and val.shape == v2.shape
        and bool(torch.allclose(val.detach(), v2, rtol=1e-5, atol=1e-7))
        and bool(torch.allclose(g, g2, rtol=1e-5, atol=1e-7))
    )
