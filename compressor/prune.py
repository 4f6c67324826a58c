"""Pruning: *which* weights (a criterion's scores) and *how* to cut (masks from scores).

Criteria score every prunable weight (Linear weights; never biases, the normalisation or
log_std); mask makers turn scores into 0/1 masks at a target sparsity. Pruning is
``W ↦ M ⊙ W``, so every absolute-value-monotone certificate can only tighten (design.md).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from compressor.errors import CompressorError
from compressor.policy import Policy

METHODS = ("magnitude", "random")
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
    :param method: ``magnitude`` or ``random``.
    :param scope: ``global`` (one threshold over all layers) or ``layer``.
    :param seed: seed for the random criterion.
    """
    if not 0.0 <= sparsity < 1.0:
        raise CompressorError(f"sparsity must be in [0, 1), got {sparsity}")
    if method not in METHODS:
        raise CompressorError(f"unknown pruning method {method!r}; expected one of {METHODS}")
    if scope not in SCOPES:
        raise CompressorError(f"unknown pruning scope {scope!r}; expected one of {SCOPES}")
    scores = magnitude_scores(policy) if method == "magnitude" else random_scores(policy, seed)
    masks = MASK_MAKERS[scope](scores, sparsity)
    # never revive weights that were already pruned
    masks = [m * old for m, old in zip(masks, policy.masks())]
    out = policy.clone()
    out.set_masks(masks)
    return out
