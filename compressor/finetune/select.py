"""Checkpoint selection by evaluated return: fine-tuning optimises a proxy (the divergence from
the dense policy on the states it was shown), the budget checks the return. A student can
match the teacher on the teacher's states and still fall now and then on its own; the proxy
does not see it, the return does.

So every checkpoint of a fine-tuning run (the pruned policy before any training, the end of
every distillation phase, the end of PPO) is evaluated on episodes of its own, on seeds apart
from the verdict's (the profile's fine-tuning seeds are ≥ 10000, the verdict's below), and the
one with the best mean return is kept. The verdict then measures the kept policy on its own
seeds, so selecting on these does not bias it.

The budget checks more than the clean return: each condition's floor is the dense policy's
return there minus the same margin. With ``[finetune] select_attacks`` (e.g. ``["mad"]``) every
checkpoint is also evaluated under those attacks on the same seeds, and the score that picks
the best is the worse of the conditions' differences from the dense policy's
(``min_c mean_c − dense_c``): the checkpoint closest to failing its tightest floor loses. A
student that copies the teacher's clean return but falls more often under attack is not kept
over one a little below on clean and level under attack. On few episodes of a policy that
falls the scores are noisy (docs/pruning.md, "Checkpoint selection").

The same evaluations drive two early stops:
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

#: evaluates a policy on the selection seeds: its per-episode returns (an array: clean only; or
#: condition name -> returns, ``"clean"`` first, then each attack) and the env steps spent
SelectFn = Callable[[Policy], tuple["np.ndarray | dict[str, np.ndarray]", int]]


def _conditions(returns: np.ndarray | dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    if isinstance(returns, dict):
        return {k: np.asarray(v, dtype=float) for k, v in returns.items()}
    return {"clean": np.asarray(returns, dtype=float)}


@dataclass(frozen=True)
class Checkpoint:
    """One evaluated checkpoint.

    :param label: where it was taken (``pruned``, ``phase 0``, ..., ``ppo``).
    :param mean: mean clean return on the selection seeds. :param falls: clean episodes below
        the fall line. :param sparsity: the policy's sparsity then (only checkpoints at the
        final mask can be kept: micro-pruning cuts during fine-tuning).
    :param score: what the selection maximises: the worst condition's mean minus the dense
        policy's (clean only: ``mean`` minus the dense mean).
    :param attacked: mean return under each of the selection's attacks (none: empty).
    """

    label: str
    mean: float
    falls: int
    sparsity: float
    score: float = 0.0
    attacked: tuple[tuple[str, float], ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        out: dict[str, Any] = {
            "label": self.label,
            "mean": round(self.mean, 3),
            "falls": self.falls,
            "sparsity": self.sparsity,
            "score": round(self.score, 3),
        }
        if self.attacked:
            out["attacked"] = {k: round(v, 3) for k, v in self.attacked}
        return out


@dataclass
class CheckpointSelector:
    """Evaluates checkpoints of one fine-tuning run and keeps the best one's weights.

    :param evaluate: the selection evaluation (:data:`SelectFn`).
    :param reference: the dense policy's returns on the same seeds (as ``evaluate`` gives them:
        an array, or one per condition).
    :param fall_fraction: an episode below ``fall_fraction ·`` the dense median return is a
        fall (for positive medians; none are counted otherwise).
    :param lost_fraction: :meth:`clearly_lost`'s share (0: never lost).
    """

    evaluate: SelectFn
    reference: np.ndarray | dict[str, np.ndarray]
    fall_fraction: float = 0.5
    lost_fraction: float = 0.0
    history: list[Checkpoint] = field(default_factory=list)
    env_steps: int = 0
    stopped: str = ""
    _best: dict[float, tuple[Checkpoint, dict[str, Any]]] = field(default_factory=dict)
    _ref: dict[str, np.ndarray] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._ref = _conditions(self.reference)  # condition -> the dense policy's returns

    @classmethod
    def for_dense(cls, evaluate: SelectFn, dense: Policy, **kw: Any) -> CheckpointSelector:
        """A selector whose reference is ``dense`` evaluated on the selection seeds."""
        ref, steps = evaluate(dense)
        sel = cls(evaluate, ref, **kw)
        sel.env_steps += steps
        return sel

    @property
    def reference_mean(self) -> float:
        """The dense policy's mean clean return on the selection seeds."""
        return float(np.mean(self._ref["clean"]))

    def _fall_line(self) -> float | None:
        med = float(np.median(self._ref["clean"]))
        return self.fall_fraction * med if med > 0 else None

    def offer(self, policy: Policy, label: str) -> bool:
        """Evaluate ``policy`` now; keep a copy of its weights if it has the best score so far
        at its sparsity. Returns whether it has (ties keep the earlier, less trained one)."""
        got, steps = self.evaluate(policy)
        self.env_steps += steps
        runs, ref = _conditions(got), self._ref
        line = self._fall_line()
        clean = runs["clean"]
        falls = 0 if line is None else int(np.sum(clean < line))
        score = min(float(np.mean(r)) - float(np.mean(ref[c])) for c, r in runs.items())
        attacked = tuple((c, float(np.mean(r))) for c, r in runs.items() if c != "clean")
        sparsity = round(policy.sparsity(), 6)
        ck = Checkpoint(label, float(np.mean(clean)), falls, sparsity, score, attacked)
        self.history.append(ck)
        best = self._best.get(ck.sparsity)
        if best is not None and best[0].score >= ck.score:
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
        out: dict[str, Any] = {
            "episodes": len(self._ref["clean"]),
            "reference_mean": round(self.reference_mean, 3),
            "checkpoints": [c.to_dict() for c in self.history],
            "chosen": chosen.label if chosen else None,
            "stopped": self.stopped or None,
            "env_steps": self.env_steps,
        }
        attacked = {c: round(float(np.mean(r)), 3) for c, r in self._ref.items() if c != "clean"}
        if attacked:
            out["reference_attacked"] = attacked
        return out
