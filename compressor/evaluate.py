"""Clean and attacked evaluation of any actor on explicit episode seeds: the one suite runner.

Every candidate of a search is evaluated here, on the same seeds (common random numbers), and
the robust return is the *minimum* mean return over the attack suite.

The actor may be a torch :class:`~compressor.policy.model.Policy` or anything else that acts,
e.g. an exported model run by onnxruntime (:class:`compressor.deploy.onnx_actor.OnnxActor`).
Attacks differentiate a torch policy: the actor itself by default, or a ``surrogate`` (for an
ONNX model, the torch policy with the file's own weights). With a surrogate the attack is a
*transfer* attack: it perturbs using the surrogate's gradients and the actor acts on what the
attack returns. A white-box attack on the actor could do better, so the attacked return is an
upper bound on the worst case, like every empirical attack. ``mean_tv`` is measured on the
actor's own action distribution, so it is None for an actor that is not a torch policy.

Every evaluation keeps its episodes (seed, length, whether it terminated before its time limit,
from the rollout's transition reports), so decisions can pair episodes across policies and
count falls; with ``noise`` (:mod:`compressor.rl.noise`) each episode sees its own seeded
observation noise.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from compressor.attacks import AttackContext, make_attack
from compressor.core.errors import CompressorError
from compressor.core.executor import Executor
from compressor.core.progress import Progress, no_progress
from compressor.core.stats import ReturnStats, cvar, summarize_returns
from compressor.core.threat import ThreatModel
from compressor.policy.model import Policy
from compressor.rl.noise import EpisodeNoise, ObservationNoise, episode_limit
from compressor.rl.rollout import Actor, ObsTransform, RolloutResult, rollout

#: Attacks that fail when they end above the clean return (they are built to lower it: a
#: learned adversary that helps, or a critic whose value does not rank states as the return
#: does); their return is then reported as failed, never counted as the worst attack.
FAILABLE_ATTACKS = ("sa_rl", "pa_ad", "critic")
FAILED_ABOVE_CLEAN = "return above clean"


@dataclass
class EvalResult:
    """One evaluation: return statistics under one condition (clean or one attack).

    :param attack: ``"clean"`` or the attack's name.
    :param stats: return statistics over the episodes.
    :param mean_tv: mean TV between the policy's distribution at the true and at the attacked
        observation over all visited states (None for clean runs).
    :param steps: env steps. :param wall_s: seconds.
    :param training: what building the attack cost (learned attacks: training steps, seconds,
        choices made), or None.
    :param seeds: each episode's reset seed (None: not recorded, an older result).
    :param lengths: each episode's steps. :param terminated: whether each episode ended by the
        environment's termination (a fall, for a walker) rather than its time limit.
    """

    attack: str
    stats: ReturnStats
    mean_tv: float | None
    steps: int
    wall_s: float
    training: dict[str, Any] | None = None
    seeds: list[int] | None = None
    lengths: list[int] | None = None
    terminated: list[bool] | None = None

    @property
    def cvar10(self) -> float:
        """Mean return of the worst 10% of the episodes (at least one)."""
        return cvar(self.stats.returns)

    def falls(self, below: float | None, on_termination: bool = True) -> list[bool]:
        """Per episode: whether it is a fall, i.e. it terminated before its time limit (when
        ``on_termination``) or its return is below ``below``.

        :param below: the return under which an episode counts as a fall (None: no such rule).
        :param on_termination: whether the environment's termination is a fall (for a walker;
            not for a task whose termination is success).
        """
        term = self.terminated or [False] * self.stats.n
        return [
            bool((on_termination and t) or (below is not None and r < below))
            for t, r in zip(term, self.stats.returns)
        ]

    def merged(self, more: EvalResult) -> EvalResult:
        """This evaluation followed by ``more`` (other seeds, same condition), as one."""
        steps = self.steps + more.steps
        tv = None
        if self.mean_tv is not None and more.mean_tv is not None:
            tv = (self.mean_tv * self.steps + more.mean_tv * more.steps) / max(steps, 1)

        def cat(a: list[Any] | None, b: list[Any] | None) -> list[Any] | None:
            return None if a is None or b is None else [*a, *b]

        return EvalResult(
            self.attack,
            summarize_returns(np.array([*self.stats.returns, *more.stats.returns])),
            tv,
            steps,
            self.wall_s + more.wall_s,
            self.training,
            cat(self.seeds, more.seeds),
            cat(self.lengths, more.lengths),
            cat(self.terminated, more.terminated),
        )

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EvalResult:
        """Inverse of :meth:`to_dict` (JSON floats round-trip exactly)."""
        ep = d.get("episodes") or {}
        return cls(
            d["attack"],
            ReturnStats(**d["return"]),
            d["mean_tv"],
            d["steps"],
            d["wall_s"],
            d.get("training"),
            ep.get("seeds"),
            ep.get("lengths"),
            ep.get("terminated"),
        )

    def training_summary(self) -> str:
        """One line saying what building the attack cost ("" for attacks that train nothing)."""
        info = self.training or {}
        if "env_steps" in info:
            warm = ", warm-started" if info.get("warm_start") else ""
            planned = info.get("planned_steps")
            cut = ""
            if info.get("stopped") == "time":
                cut = f" of {planned} (time limit {info.get('time_limit_s'):.0f} s)"
            return f"PPO {info['env_steps']}{cut} env steps, {info['wall_s']:.0f} s{warm}"
        if "transitions" in info:
            return (
                f"Q from {info['transitions']} transitions, λ = {info['reg']} "
                f"(scan {info.get('reg_scan') or '-'}), {info['wall_s']:.0f} s"
            )
        if "q" in info:
            return f"rs's Q, MAD weight {info.get('ratio')}"
        return ""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        out: dict[str, Any] = {
            "attack": self.attack,
            "return": self.stats.to_dict(),
            "mean_tv": self.mean_tv,
            "steps": self.steps,
            "wall_s": round(self.wall_s, 3),
            "cvar10": self.cvar10,
        }
        if self.seeds is not None:
            out["episodes"] = {
                "seeds": self.seeds,
                "lengths": self.lengths,
                "terminated": self.terminated,
            }
        if self.training:
            out["training"] = self.training
        return out


@dataclass
class SuiteResult:
    """Clean evaluation plus one evaluation per attack, on the same seeds.

    :param clean: the unattacked evaluation.
    :param attacks: per-attack evaluations, by name.
    :param threat: the threat model used.
    """

    clean: EvalResult
    attacks: dict[str, EvalResult] = field(default_factory=dict)
    threat: ThreatModel | None = None

    def failed(self, name: str) -> str | None:
        """Why attack ``name`` failed (``"return above clean"``: a learned or critic attack
        that raised the return did not do an attack's job), or None."""
        r = self.attacks[name]
        if name in FAILABLE_ATTACKS and r.stats.mean > self.clean.stats.mean:
            return FAILED_ABOVE_CLEAN
        return None

    @property
    def counted(self) -> dict[str, EvalResult]:
        """The attacks that did not fail (those the robust return is taken over)."""
        return {k: v for k, v in self.attacks.items() if self.failed(k) is None}

    @property
    def robust_return(self) -> float:
        """Minimum mean return over the attacks that did not fail (the clean return if there
        are none)."""
        if not self.counted:
            return self.clean.stats.mean
        return min(r.stats.mean for r in self.counted.values())

    @property
    def strongest_attack(self) -> str | None:
        """Name of the attack (among those that did not fail) that reached the lowest
        return."""
        counted = self.counted
        if not counted:
            return None
        return min(counted, key=lambda k: counted[k].stats.mean)

    @classmethod
    def from_dict(cls, d: dict[str, Any], threat: ThreatModel | None = None) -> SuiteResult:
        """Inverse of :meth:`to_dict`."""
        attacks = {k: EvalResult.from_dict(v) for k, v in d["attacks"].items()}
        return cls(EvalResult.from_dict(d["clean"]), attacks, threat)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return {
            "clean": self.clean.to_dict(),
            "attacks": {k: self._attack_dict(k) for k in self.attacks},
            "robust_return": self.robust_return,
            "strongest_attack": self.strongest_attack,
        }

    def _attack_dict(self, name: str) -> dict[str, Any]:
        out = self.attacks[name].to_dict()
        why = self.failed(name)
        if why is not None:
            out["failed"] = why
        return out


#: ``obs -> (attacked obs, policy output at obs, policy output there or None)``
Measured = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]


class _TVMeter:
    """Wraps an attack to record the TV it causes at every visited state.

    ``measured`` (an attack's ``perturb_measured``, when the policy sees the true observation
    attacked, without noise): the attack returns the policy's outputs at the true and at the
    attacked observation as its ascent computed them, so the meter runs no forward pass of its
    own where it has them (the same network on the same inputs, equal to float rounding).
    """

    def __init__(
        self,
        policy: Policy,
        perturb: Callable[[torch.Tensor], torch.Tensor],
        measured: Measured | None = None,
    ) -> None:
        self.policy, self.perturb, self.measured = policy, perturb, measured
        self.tv_sum, self.count = 0.0, 0

    def __call__(self, obs: torch.Tensor) -> torch.Tensor:
        if self.measured is None:
            adv = self.perturb(obs)
            clean, out = None, None
        else:
            adv, clean, out = self.measured(obs)
        with torch.no_grad():
            clean = self.policy(obs) if clean is None else clean
            out = self.policy(adv) if out is None else out
            tv = self.policy.total_variation(clean, out)
        self.tv_sum += float(tv.sum())
        self.count += tv.numel()
        return adv


class _Episodes:
    """The rollout's transition hook for one evaluation: which episodes terminated (before
    their time limit), and the observation noise's episode tracking when there is noise."""

    def __init__(
        self,
        seeds: list[int],
        num_envs: int,
        noise: ObservationNoise | None,
        env_id: str,
        env_kwargs: dict,
        max_steps: int | None,
    ) -> None:
        self.terminated = np.zeros(len(seeds), dtype=bool)
        self.noise: EpisodeNoise | None = None
        if noise is not None and noise.fraction > 0:
            limit = episode_limit(env_id, env_kwargs, max_steps)
            self.noise = noise.session(seeds, num_envs, limit)

    def perturb(self, attack: ObsTransform | None) -> ObsTransform | None:
        """What the policy sees: the noisy observation, attacked when there is an attack."""
        if self.noise is None:
            return attack
        return self.noise.perturb if attack is None else self.noise.around(attack)

    def __call__(
        self,
        ep: np.ndarray,
        obs: np.ndarray,
        act: np.ndarray,
        rew: np.ndarray,
        next_obs: np.ndarray,
        term: np.ndarray,
    ) -> None:
        self.terminated[ep[np.asarray(term, dtype=bool)]] = True
        if self.noise is not None:
            self.noise.on_transition(ep, obs, act, rew, next_obs, term)

    def result(
        self,
        name: str,
        res: RolloutResult,
        mean_tv: float | None = None,
        training: dict[str, Any] | None = None,
    ) -> EvalResult:
        """The evaluation of one condition, per-episode records included."""
        return EvalResult(
            name,
            summarize_returns(res.returns),
            mean_tv,
            res.steps,
            res.wall_s,
            training,
            [int(x) for x in res.seeds],
            [int(x) for x in res.lengths],
            [bool(x) for x in self.terminated],
        )


def evaluate(
    policy: Actor,
    env_id: str,
    env_kwargs: dict,
    seeds: list[int],
    *,
    num_envs: int = 16,
    record_states: bool = False,
    progress: Progress | None = None,
    max_steps: int | None = None,
    noise: ObservationNoise | None = None,
) -> tuple[EvalResult, RolloutResult]:
    """Clean evaluation with deterministic actions.

    :param policy: the policy (or any :class:`~compressor.rl.rollout.Actor`).
    :param env_id: gymnasium id. :param env_kwargs: kwargs for ``gymnasium.make``.
    :param seeds: one reset seed per episode.
    :param num_envs: parallel sub-envs.
    :param record_states: also return the visited (true) states.
    :param progress: told the finished episode count.
    :param max_steps: truncate episodes after this many steps (None: the env's own limit).
    :param noise: tiny seeded observation noise per episode (:mod:`compressor.rl.noise`), or
        None for the bare numerical path.
    """
    hook = _Episodes(seeds, num_envs, noise, env_id, env_kwargs, max_steps)
    res = rollout(
        policy,
        env_id,
        env_kwargs,
        seeds,
        num_envs=num_envs,
        perturb=hook.perturb(None),
        record_states=record_states,
        max_steps=max_steps,
        progress=progress,
        on_transition=hook,
    )
    return hook.result("clean", res), res


def _victim(policy: Actor, surrogate: Policy | None) -> Policy:
    """The torch policy an attack differentiates: the surrogate, else the actor itself."""
    if surrogate is not None:
        return surrogate
    if not isinstance(policy, Policy):
        raise CompressorError(
            f"attacking a {type(policy).__name__} needs a torch surrogate policy to compute "
            "the perturbations on: pass surrogate= (for an ONNX model, its dequantised policy)"
        )
    return policy


def evaluate_attack(
    policy: Actor,
    env_id: str,
    env_kwargs: dict,
    seeds: list[int],
    attack_name: str,
    threat: ThreatModel,
    *,
    attack_seed: int = 0,
    num_envs: int = 16,
    progress: Progress | None = None,
    context: AttackContext | None = None,
    surrogate: Policy | None = None,
    max_steps: int | None = None,
    noise: ObservationNoise | None = None,
) -> EvalResult:
    """Evaluation under one attack (deterministic actions, true dynamics and rewards).

    :param policy: the actor evaluated: a torch policy, or any
        :class:`~compressor.rl.rollout.Actor` when ``surrogate`` is given.
    :param attack_name: a name from :data:`compressor.attacks.ATTACKS`.
    :param threat: ε, norm and space of the attack.
    :param attack_seed: seed of the attack's own randomness.
    :param context: what the attack may use beyond policy, threat and seed (critic, training
        budget, save and warm-start folders); default: just those three.
    :param surrogate: torch policy the attack differentiates instead of ``policy`` (a transfer
        attack; see the module docstring).
    :param max_steps: truncate episodes after this many steps (None: the env's own limit).
    :param noise: tiny seeded observation noise per episode, applied before the attack (the
        attacked observation stays in the ε-ball around the true one).
    :raises CompressorError: ``policy`` is not a torch policy and no surrogate is given.
    """
    ctx = context or AttackContext(_victim(policy, surrogate), threat, attack_seed)
    if not ctx.env_id:
        ctx = dataclasses.replace(ctx, env_id=env_id, env_kwargs=dict(env_kwargs))
    attack = make_attack(attack_name, ctx)
    hook = _Episodes(seeds, num_envs, noise, env_id, env_kwargs, max_steps)
    seen = hook.perturb(attack.perturb)
    assert seen is not None
    # TV is a property of the actor's own action distribution: none without one
    # the attack's own outputs serve the meter only when they are the evaluated policy's, at
    # the observation the policy sees attacked (no surrogate, no noise)
    own = noise is None and ctx.policy is policy
    measured = getattr(attack, "perturb_measured", None) if own else None
    meter = _TVMeter(policy, seen, measured) if isinstance(policy, Policy) else None
    res = rollout(
        policy,
        env_id,
        env_kwargs,
        seeds,
        num_envs=num_envs,
        perturb=seen if meter is None else meter,
        max_steps=max_steps,
        progress=progress,
        on_transition=hook,
    )
    tv = None if meter is None else meter.tv_sum / max(meter.count, 1)
    info = dict(getattr(attack, "info", {}) or {})
    return hook.result(attack_name, res, tv, info or None)


def evaluate_suite(
    policy: Actor,
    env_id: str,
    env_kwargs: dict,
    seeds: list[int],
    attacks: list[str],
    threat: ThreatModel,
    *,
    attack_seed: int = 0,
    num_envs: int = 16,
    clean: EvalResult | None = None,
    progress: Progress | None = None,
    executor: Executor | None = None,
    context: AttackContext | None = None,
    surrogate: Policy | None = None,
    max_steps: int | None = None,
    noise: ObservationNoise | None = None,
) -> SuiteResult:
    """Clean evaluation plus every attack of the suite, all on the same seeds.

    :param policy: the actor evaluated: a torch policy, or any
        :class:`~compressor.rl.rollout.Actor` (an onnxruntime model) when ``surrogate`` is
        given or ``attacks`` is empty.
    :param clean: a clean evaluation already made on these seeds (reused, not recomputed).
    :param progress: told how many of the suite's evaluations are done, naming the next.
    :param executor: runs the evaluations side by side (one job per attack, each with its own
        seeds, so the numbers are those of the serial run); None or one worker: in turn.
    :param context: critic, training budget, save and warm-start folders for the attacks (its
        ``trained`` cache is common to a serial suite: MAD+RS reuses RS's ``Q``).
    :param surrogate: torch policy the attacks differentiate instead of ``policy`` (transfer
        attacks; see the module docstring).
    :param max_steps: truncate episodes after this many steps (None: the env's own limit).
    :param noise: tiny seeded observation noise per episode, the same for every condition.
    :raises CompressorError: attacks on an actor that is not a torch policy, without surrogate.
    """
    base = context
    if base is None and attacks:
        base = AttackContext(_victim(policy, surrogate), threat, attack_seed, env_id=env_id)
    names = list(attacks) if clean is not None else ["clean", *attacks]
    report = progress or no_progress
    done: dict[str, EvalResult] = {}
    if executor is not None and executor.workers > 1 and len(names) > 1:
        report(0, len(names), f"{', '.join(names)} on {executor.workers} workers")
        args = (threat, attack_seed, num_envs, base, surrogate, max_steps, noise)
        jobs = [(policy, env_id, env_kwargs, seeds, n, *args) for n in names]
        done = dict(zip(names, executor.map(_suite_job, jobs), strict=True))
    else:
        for i, n in enumerate(names):
            report(i, len(names), n)
            done[n] = _suite_job(
                policy,
                env_id,
                env_kwargs,
                seeds,
                n,
                threat,
                attack_seed,
                num_envs,
                base,  # one suite's attacks share base.trained
                surrogate,
                max_steps,
                noise,
                progress=_episodes(report, i, len(names), n),
            )
    report(len(names), len(names))
    out = SuiteResult(clean=clean or done.pop("clean"), threat=threat)
    out.attacks = {n: done[n] for n in attacks}
    return out


def _episodes(report: Progress, i: int, count: int, name: str) -> Progress:
    """The episodes of the ``i``-th of a suite's ``count`` evaluations, as its ``detail``."""

    def episode(done: int, total: int | None = None, detail: str = "") -> None:
        report(i, count, f"{name} episode {done}/{total}")

    return episode


def _suite_job(
    policy: Actor,
    env_id: str,
    env_kwargs: dict,
    seeds: list[int],
    name: str,
    threat: ThreatModel,
    attack_seed: int,
    num_envs: int,
    context: AttackContext | None = None,
    surrogate: Policy | None = None,
    max_steps: int | None = None,
    noise: ObservationNoise | None = None,
    progress: Progress | None = None,
) -> EvalResult:
    """One evaluation of a suite, as an executor job (top level, so it pickles).

    :param progress: told the finished episodes.
    """
    if name == "clean":
        clean, _ = evaluate(
            policy,
            env_id,
            env_kwargs,
            seeds,
            num_envs=num_envs,
            max_steps=max_steps,
            noise=noise,
            progress=progress,
        )
        return clean
    return evaluate_attack(
        policy,
        env_id,
        env_kwargs,
        seeds,
        name,
        threat,
        attack_seed=attack_seed,
        num_envs=num_envs,
        context=context,
        surrogate=surrogate,
        max_steps=max_steps,
        noise=noise,
        progress=progress,
    )


def random_action_return(
    env_id: str, env_kwargs: dict, seeds: list[int], num_envs: int = 16
) -> float:
    """Mean return of uniformly random actions on ``seeds`` (the budget's scale floor)."""
    from compressor.rl.rollout import RandomActor

    res = rollout(
        RandomActor(env_id, env_kwargs, seed=0), env_id, env_kwargs, seeds, num_envs=num_envs
    )
    return float(np.mean(res.returns))
