"""Physically remove dead hidden neurons, so structured pruning actually shrinks the matmuls.

onnxruntime gains nothing from unstructured zeros: a pruned weight still costs a multiply-add.
A whole hidden neuron, though, can be cut out of the graph without changing the output:

* no outgoing weights (its column in the next layer is all zero): it influences nothing, so
  its row of ``W_i``, its entry of ``b_i`` and its column of ``W_{i+1}`` go;
* no incoming weights (its row of ``W_i`` is all zero): it always outputs ``act(b_j)``, a
  constant, so ``act(b_j) * W_{i+1}[:, j]`` is folded into ``b_{i+1}`` and the neuron goes.

Removing one neuron can empty a row or column elsewhere, so this repeats until nothing changes.
Input features and outputs are never removed: the graph's interface stays the policy's.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from compressor.policy.model import Policy

LayerWeights = list[tuple[np.ndarray, np.ndarray]]

_ACTIVATIONS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "tanh": np.tanh,
    "relu": lambda x: np.maximum(x, 0.0),
    "elu": lambda x: np.where(x > 0, x, np.expm1(np.minimum(x, 0.0))),
}


def effective_layers(policy: Policy) -> LayerWeights:
    """The effective ``(W ⊙ M, b)`` of every layer as float32 numpy arrays, nothing removed.

    :param policy: the policy to read.
    :returns: one ``(W, b)`` per layer, ``W`` of shape (out, in) like ``nn.Linear``.
    """
    with torch.no_grad():
        return [
            (
                w.detach().to("cpu", torch.float32).numpy().copy(),
                layer.bias.detach().to("cpu", torch.float32).numpy().copy(),
            )
            for w, layer in zip(policy.effective_weights(), policy.layers)
        ]


def compact_layers(policy: Policy) -> tuple[LayerWeights, int]:
    """Effective ``(W, b)`` per layer with dead hidden neurons removed, and how many were removed.

    The result computes exactly the same function as the policy's trunk (up to float rounding
    of the folded biases, which is done in float64 and then rounded once to float32).

    :param policy: the policy to compact (not modified).
    :returns: ``(layers, removed_neurons)``: float32 ``(W, b)`` per layer, ``W`` of shape
        (out, in); and the number of hidden neurons removed over all layers.
    """
    # float64 while folding so a constant neuron's contribution is rounded only once
    dense = effective_layers(policy)
    ws = [w.astype(np.float64) for w, _ in dense]
    bs = [b.astype(np.float64) for _, b in dense]
    act = _ACTIVATIONS[policy.spec.activation]
    removed = 0
    changed = True
    while changed:
        changed = False
        for i in range(len(ws) - 1):  # hidden layer i sits between W_i and W_{i+1}
            no_out = np.asarray((ws[i + 1] == 0).all(axis=0))
            no_in = np.asarray((ws[i] == 0).all(axis=1))
            dead = no_out | no_in
            if dead.all():
                # The whole layer is dead, so the output is constant; keep one neuron rather
                # than emit a zero-width matmul (some runtimes reject empty tensors).
                if len(dead) == 1:
                    continue
                dead[0] = False
            if not dead.any():
                continue
            const = np.where(no_in & dead, act(bs[i]), 0.0)
            bs[i + 1] = bs[i + 1] + ws[i + 1] @ const
            keep = ~dead
            ws[i], bs[i] = ws[i][keep], bs[i][keep]
            ws[i + 1] = ws[i + 1][:, keep]
            removed += int(dead.sum())
            changed = True
    return [(w.astype(np.float32), b.astype(np.float32)) for w, b in zip(ws, bs)], removed


def layer_widths(layers: LayerWeights) -> list[int]:
    """Hidden widths of compacted layers (the output sizes of all but the last layer).

    :param layers: as returned by :func:`compact_layers`.
    """
    return [int(w.shape[0]) for w, _ in layers[:-1]]
