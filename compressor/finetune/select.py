"""Checkpoint selection by evaluated return: fine-tuning optimises a proxy (the divergence from
the dense policy on the states it was shown), the budget checks the return. A student can
match the teacher on the teacher's states and still fall now and then on its own; the proxy
does not see it, the return does.

So every checkpoint of a fine-tuning run (the pruned policy before any training, the end of
every distillation phase, the end of PPO) is evaluated on episodes of its own, on seeds apart
from the verdict's (the profile's fine-tuning seeds are ≥ 10000, the verdict's below), and the
one with the best mean return is kept. The verdict then measures the kept policy on its own
seeds, so selecting on these does not bias it. The same evaluations drive two early stops:
DAgger rounds end once ``dagger_patience`` rounds in a row did not improve the best return,
and fine-tuning ends once a round did not improve a best return that is below the dense one by
more than ``lost_fraction`` of its size (the level is clearly lost; the search's candidate then
fails on its own evaluation). The first phase alone never calls a level lost: on TQC
HalfCheetah at 80% it scored 2218 after 750 steps, and the full schedule 7726.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from compressor.policy.model import Policy

#: evaluates a policy on the selection seeds: its per-episode returns and the env steps spent
SelectFn = Callable[[Policy], tuple[np.ndarray, int]]


@dataclass(frozen=True)
class Checkpoint:
    """One evaluated checkpoint.

    :param label: where it was taken (``pruned``, ``phase 0``, ..., ``ppo``).
    :param mean: mean return on the selection seeds. :param falls: episodes below the fall
        line. :param sparsity: the policy's sparsity then (only checkpoints at the final mask
        can be kept: micro-pruning cuts during fine-tuning).
    """

    label: str
    mean: float
    falls: int
    sparsity: float

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return {
            "label": self.label,
            "mean": round(self.mean, 3),
            "falls": self.falls,
            "sparsity": self.sparsity,
        }


@dataclass
class CheckpointSelector:
    """Evaluates checkpoints of one fine-tuning run and keeps the best one's weights.

    :param evaluate: the selection evaluation (:data:`SelectFn`).
    :param reference: the dense policy's returns on the same seeds.
    :param fall_fraction: an episode below ``fall_fraction ·`` the dense median return is a
        fall (for positive medians; none are counted otherwise).
    :param lost_fraction: :meth:`clearly_lost`'s share (0: never lost).
    """

    evaluate: SelectFn
    reference: np.ndarray
    fall_fraction: float = 0.5
    lost_fraction: float = 0.0
    history: list[Checkpoint] = field(default_factory=list)
    env_steps: int = 0
    stopped: str = ""
    _best: dict[float, tuple[Checkpoint, dict[str, Any]]] = field(default_factory=dict)

    @classmethod
    def for_dense(cls, evaluate: SelectFn, dense: Policy, **kw: Any) -> CheckpointSelector:
        """A selector whose reference is ``dense`` evaluated on the selection seeds."""
        ref, steps = evaluate(dense)
        sel = cls(evaluate, np.asarray(ref, dtype=float), **kw)
        sel.env_steps += steps
        return sel

    @property
    def reference_mean(self) -> float:
        """The dense policy's mean return on the selection seeds."""
        return float(np.mean(self.reference))

    def _fall_line(self) -> float | None:
        med = float(np.median(self.reference))
        return self.fall_fraction * med if med > 0 else None

    def offer(self, policy: Policy, label: str) -> bool:
        """Evaluate ``policy`` now; keep a copy of its weights if it is the best so far at its
        sparsity. Returns whether it is (ties keep the earlier, less trained one)."""
        returns, steps = self.evaluate(policy)
        self.env_steps += steps
        line = self._fall_line()
        falls = 0 if line is None else int(np.sum(np.asarray(returns) < line))
        ck = Checkpoint(label, float(np.mean(returns)), falls, round(policy.sparsity(), 6))
        self.history.append(ck)
        best = self._best.get(ck.sparsity)
        if best is not None and best[0].mean >= ck.mean:
            return False
        self._best[ck.sparsity] = (ck, copy.deepcopy(policy.state_dict()))
        return True

    def best(self, sparsity: float) -> Checkpoint | None:
        """The best checkpoint at ``sparsity``, or None."""
        got = self._best.get(round(sparsity, 6))
        return got[0] if got else None

    def clearly_lost(self) -> bool:
        """Whether even the best checkpoint so far lost more than ``lost_fraction`` of the
        dense return's size (never with ``lost_fraction`` = 0)."""
        if self.lost_fraction <= 0 or not self._best:
            return False
        top = max(ck.mean for ck, _ in self._best.values())
        ref = self.reference_mean
        return ref - top > self.lost_fraction * max(abs(ref), 1e-9)

    def restore_best(self, policy: Policy) -> Checkpoint | None:
        """Load the best checkpoint at ``policy``'s current sparsity into it; returns it (None:
        none was taken at this mask, the policy is left as it is)."""
        got = self._best.get(round(policy.sparsity(), 6))
        if got is None:
            return None
        policy.load_state_dict(got[1])
        return got[0]

    def summary(self, chosen: Checkpoint | None) -> dict[str, Any]:
        """What the selection did, for :class:`~compressor.finetune.common.FinetuneStats`."""
        return {
            "episodes": len(self.reference),
            "reference_mean": round(self.reference_mean, 3),
            "checkpoints": [c.to_dict() for c in self.history],
            "chosen": chosen.label if chosen else None,
            "stopped": self.stopped or None,
            "env_steps": self.env_steps,
        }
