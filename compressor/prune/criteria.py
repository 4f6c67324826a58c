"""Pruning: *which* weights (a criterion's scores) and *how* to cut (masks from scores).

Criteria score every prunable weight (Linear weights; never biases, the normalisation or
log_std), or every hidden neuron for structured pruning; mask makers turn scores into 0/1
masks at a target sparsity. *When* to cut (one shot, or micro-pruning's many small steps) is
:mod:`compressor.prune.schedule`'s job. Pruning is ``W ↦ M ⊙ W``, so every absolute-value-monotone
certificate can only tighten (design.md).

Structured pruning removes whole hidden neurons: the neuron's row of ``W_i`` *and* its column
of ``W_{i+1}``. Zeroing the outgoing column matters: a neuron with only its incoming row cut
would still output the constant ``act(b_j)`` and feed it forward. With both cut, its bias (not
pruned, as everywhere) reaches nothing, and export's compaction (:mod:`compressor.deploy.compact`)
removes the neuron from the graph with the same outputs.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from compressor.core.errors import CompressorError
from compressor.policy.model import Policy

#: one-shot criteria that :func:`prune` applies
METHODS = ("magnitude", "structured", "random")
#: every method a profile or ``--method`` may name (``micro`` = magnitude on a schedule)
PRUNE_METHODS = ("magnitude", "micro", "structured", "random")
SCOPES = ("global", "layer")


def magnitude_scores(policy: Policy) -> list[torch.Tensor]:
    """``|W ⊙ M|``: pruned weights score 0 and so stay pruned."""
    return [w.detach().abs() for w in policy.effective_weights()]


def random_scores(policy: Policy, seed: int = 0) -> list[torch.Tensor]:
    """Uniform random scores (a baseline); already-pruned weights score -1 so stay pruned."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for w, m in zip(policy.effective_weights(), policy.masks()):
        s = torch.rand(w.shape, generator=g)
        out.append(torch.where(m > 0, s, torch.full_like(s, -1.0)))
    return out


def neuron_scores(policy: Policy) -> list[torch.Tensor]:
    """Importance of each hidden neuron: ``‖W_i[j, :]‖₂ · ‖W_{i+1}[:, j]‖₂``.

    The product of the incoming and outgoing norms bounds how much the neuron can move the
    next layer's pre-activations per unit of input; a removed neuron scores 0.
    One tensor per hidden layer (all layers but the last), of the layer's width.
    """
    ws = [w.detach() for w in policy.effective_weights()]
    return [ws[i].norm(dim=1) * ws[i + 1].norm(dim=0) for i in range(len(ws) - 1)]


def neuron_masks(
    policy: Policy, scores: list[torch.Tensor], sparsity: float, scope: str = "global"
) -> list[torch.Tensor]:
    """Weight masks that remove whole hidden neurons, lowest score first, until at least
    ``sparsity`` of the Linear weights are zero (so it overshoots by less than one neuron).

    ``global`` ranks neurons by their score divided by their layer's mean score (raw scores
    of different layers are not comparable); ``layer`` removes the same fraction from each
    hidden layer. Every hidden layer keeps at least one neuron. Existing masks are kept.
    """
    masks = [m.detach().clone() for m in policy.masks()]
    total = sum(m.numel() for m in masks)
    need = round(sparsity * total)
    zeros = total - int(sum(float(m.sum()) for m in masks))
    order: list[tuple[float, int, int]] = []
    for i, sc in enumerate(scores):
        if scope == "layer":
            ranks = torch.empty(len(sc))
            ranks[torch.argsort(sc, stable=True)] = torch.arange(len(sc), dtype=torch.float32)
            keys = (ranks + 1) / len(sc)
        else:
            keys = sc / sc.mean().clamp_min(1e-12)
        order += [(float(k), i, j) for j, k in enumerate(keys)]
    alive = [len(sc) for sc in scores]
    for _, i, j in sorted(order):
        if zeros >= need:
            break
        if alive[i] <= 1:
            continue
        row, col = masks[i][j, :], masks[i + 1][:, j]
        zeros += int(row.sum()) + int(col.sum())
        row.zero_()
        col.zero_()
        alive[i] -= 1
    return masks


def _keep_top(scores: torch.Tensor, n_keep: int) -> torch.Tensor:
    mask = torch.zeros(scores.numel())
    if n_keep > 0:
        mask[torch.topk(scores.flatten(), n_keep, sorted=False).indices] = 1.0
    return mask.view_as(scores)


def global_masks(scores: list[torch.Tensor], sparsity: float) -> list[torch.Tensor]:
    """Keep the highest-scoring ``1 - sparsity`` fraction of all weights, pooled over layers.

    Every layer keeps at least one weight, so that no layer is cut off entirely.
    """
    flat = torch.cat([s.flatten() for s in scores])
    n_keep = max(len(scores), round((1.0 - sparsity) * flat.numel()))
    keep = _keep_top(flat, n_keep)
    masks, i = [], 0
    for s in scores:
        m = keep[i : i + s.numel()].view_as(s).clone()
        if m.sum() == 0:  # a layer with no weight left would disconnect the network
            m.view(-1)[s.flatten().argmax()] = 1.0
        masks.append(m)
        i += s.numel()
    return masks


def layer_masks(scores: list[torch.Tensor], sparsity: float) -> list[torch.Tensor]:
    """Keep the highest-scoring ``1 - sparsity`` fraction of each layer separately."""
    return [_keep_top(s, max(1, round((1.0 - sparsity) * s.numel()))) for s in scores]


MASK_MAKERS: dict[str, Callable[[list[torch.Tensor], float], list[torch.Tensor]]] = {
    "global": global_masks,
    "layer": layer_masks,
}


def prune(
    policy: Policy, sparsity: float, method: str = "magnitude", scope: str = "global", seed: int = 0
) -> Policy:
    """A pruned copy of ``policy`` at ``sparsity`` (fraction of Linear weights set to zero).

    :param policy: the policy to prune (unchanged).
    :param sparsity: target fraction in [0, 1).
    :param method: ``magnitude``, ``structured`` (whole hidden neurons) or ``random``
        (``micro`` is magnitude on a schedule:
        :func:`~compressor.prune.schedule.prune_and_finetune`).
    :param scope: ``global`` (one threshold over all layers) or ``layer``.
    :param seed: seed for the random criterion.
    """
    if not 0.0 <= sparsity < 1.0:
        raise CompressorError(f"sparsity must be in [0, 1), got {sparsity}")
    if method == "micro":
        raise CompressorError(
            "micro-pruning interleaves cuts with fine-tuning: use "
            "compressor.prune.schedule.prune_and_finetune (or compress prune --method micro)"
        )
    if method not in METHODS:
        raise CompressorError(f"unknown pruning method {method!r}; expected one of {METHODS}")
    if scope not in SCOPES:
        raise CompressorError(f"unknown pruning scope {scope!r}; expected one of {SCOPES}")
    if method == "structured":
        masks = neuron_masks(policy, neuron_scores(policy), sparsity, scope)
    else:
        scores = magnitude_scores(policy) if method == "magnitude" else random_scores(policy, seed)
        masks = MASK_MAKERS[scope](scores, sparsity)
    # never revive weights that were already pruned
    masks = [m * old for m, old in zip(masks, policy.masks())]
    out = policy.clone()
    out.set_masks(masks)
    return out
