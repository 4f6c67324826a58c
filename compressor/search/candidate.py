"""One candidate of the search: prune to a sparsity, fine-tune with the mask fixed, evaluate on the
shared seeds under the screening attacks, certify, and decide it against the dense policy
(paired, sequential: :mod:`compressor.search.sequential`).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from compressor.attacks import TRAINED
from compressor.attacks.base import AttackContext
from compressor.certify.at_states import certify_states
from compressor.certify.deployed import certify_deployed
from compressor.certify.global_bound import GlobalCertificate, certify_global
from compressor.core.config import FinetuneConfig, Profile
from compressor.core.errors import CompressorError
from compressor.core.executor import Executor
from compressor.core.progress import Progress, no_progress, shifted
from compressor.core.stats import summarize_returns
from compressor.core.threat import ThreatModel
from compressor.evaluate import (
    EvalResult,
    SuiteResult,
    evaluate,
    evaluate_attack,
    evaluate_suite,
)
from compressor.finetune import (
    FinetuneInputs,
    FinetuneStats,
    finetune_candidate,
    finetune_total_steps,
)
from compressor.policy.model import Policy
from compressor.policy.value import ValueNet
from compressor.prune.schedule import MicroSchedule, prune_and_finetune
from compressor.rl.noise import ObservationNoise
from compressor.rl.rollout import Actor
from compressor.search.budget import Budget
from compressor.search.sequential import (
    FAIL,
    PASS,
    Decision,
    Evaluator,
    Plan,
    ReferenceSeries,
    decide,
)


@dataclass
class Candidate:
    """One evaluated sparsity level (pruned, fine-tuned, evaluated, certified).

    :param target_sparsity: the level asked for. :param sparsity: the level reached.
    :param suite: clean and attacked evaluation on the shared seeds.
    :param certificate: the global certificate under the run's threat model.
    :param finetune: fine-tuning statistics. :param params_nonzero: non-zero parameters.
    :param reasons: why it fails the budget (empty: it passes). :param wall_s: seconds.
    :param local: local (per-state) certificate vs PGD at the dense policy's visited states.
    :param policy: the candidate policy itself (not serialised).
    :param decision: the paired sequential decision (None: only the first look's point
        estimates were checked, as in older journals).
    """

    target_sparsity: float
    sparsity: float
    suite: SuiteResult
    certificate: GlobalCertificate
    finetune: FinetuneStats | None
    params_nonzero: int
    reasons: list[str]
    wall_s: float
    local: dict[str, Any] | None = None
    policy: Policy | None = field(default=None, repr=False)
    decision: Decision | None = None

    @property
    def passed(self) -> bool:
        """Whether the candidate meets the budget."""
        return not self.reasons

    @property
    def status(self) -> str:
        """``pass``, ``fail`` or ``undecided`` (too close to call within the episode cap)."""
        if self.decision is not None and not self.passed:
            return self.decision.status if self.decision.status != PASS else FAIL
        return PASS if self.passed else FAIL

    @classmethod
    def from_dict(cls, d: dict[str, Any], policy: Policy | None = None) -> Candidate:
        """Inverse of :meth:`to_dict` (the policy is stored beside the journal)."""
        return cls(
            target_sparsity=d["target_sparsity"],
            sparsity=d["sparsity"],
            suite=SuiteResult.from_dict(d["evaluation"]),
            certificate=GlobalCertificate.from_dict(d["certificate"]),
            finetune=FinetuneStats(**d["finetune"]) if d.get("finetune") else None,
            params_nonzero=d["params_nonzero"],
            reasons=list(d["reasons"]),
            wall_s=d["wall_s"],
            local=d.get("local_certificate"),
            policy=policy,
            decision=Decision.from_dict(d["decision"]) if d.get("decision") else None,
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (without the policy)."""
        return {
            "target_sparsity": self.target_sparsity,
            "sparsity": self.sparsity,
            "passed": self.passed,
            "status": self.status,
            "reasons": self.reasons,
            "evaluation": self.suite.to_dict(),
            "certificate": self.certificate.to_dict(),
            "finetune": self.finetune.to_dict() if self.finetune else None,
            "params_nonzero": self.params_nonzero,
            "local_certificate": self.local,
            "decision": self.decision.to_dict() if self.decision else None,
            "wall_s": round(self.wall_s, 3),
        }


@dataclass(frozen=True)
class CandidateJob:
    """What building one candidate needs, as plain data, so any executor's worker can run it.

    :param dense: the dense policy. :param prof: the run's resolved profile (its ``[env]``
        names the environment). :param threat: the threat model. :param rule: the budget rule.
    :param states: the dense policy's visited states (distillation).
    :param cert_states: the fixed sample of them for local certificates.
    :param seeds: the first look's episode seeds, shared by every candidate.
    :param attack_ctx: the attack context (critic, budgets) of the run.
    :param noise: the observation noise of every evaluation episode (None: none).
    """

    dense: Policy
    prof: Profile
    threat: ThreatModel
    rule: Budget
    states: np.ndarray
    cert_states: np.ndarray
    seeds: list[int]
    attack_ctx: AttackContext
    noise: ObservationNoise | None = None


def build_candidate(
    job: CandidateJob, sparsity: float, progress: Progress = no_progress
) -> Candidate:
    """Prune to ``sparsity``, fine-tune with the mask fixed, evaluate on the first look's seeds
    under the screening attacks, certify, and apply the budget rule to the point estimates (an
    executor job: its result depends only on ``job`` and ``sparsity``). The paired sequential
    decision follows in :func:`decide_candidate`, where the dense policy's episodes are.

    :param progress: told the sub-steps done: pruning and fine-tuning, then each evaluation.
    """
    prof, threat = job.prof, job.threat
    steps = len(prof.attacks.screen) + 2
    t0 = time.perf_counter()
    progress(0, steps, "pruning and fine-tuning")
    collect = student_state_collector(prof, threat)
    critic = job.attack_ctx.critic
    cand, ft = prune_candidate(
        job.dense,
        sparsity,
        prof,
        job.states,
        threat,
        collect,
        critic=critic if isinstance(critic, ValueNet) else None,
    )
    suite = evaluate_suite(
        cand,
        prof.env.id,
        prof.env.kwargs,
        job.seeds,
        prof.attacks.screen,
        threat,
        attack_seed=prof.attacks.seed,
        num_envs=prof.evaluation.num_envs,
        progress=shifted(progress, 1, steps),
        context=job.attack_ctx.for_policy(cand),
        noise=job.noise,
    )
    cert = certify_global(cand, threat, prof.certificate.tau)
    return Candidate(
        target_sparsity=sparsity,
        sparsity=cand.sparsity(),
        suite=suite,
        certificate=cert,
        finetune=ft,
        params_nonzero=cand.num_parameters(nonzero_only=True),
        reasons=job.rule.check(suite, cert),
        wall_s=time.perf_counter() - t0,
        local=certify_at_states(cand, job.cert_states, threat, prof),
        policy=cand,
    )


def decide_candidate(
    job: CandidateJob,
    cand: Candidate,
    reference: ReferenceSeries,
    executor: Executor | None = None,
    progress: Progress = no_progress,
) -> Candidate:
    """The paired sequential decision of a built candidate against the dense policy: more
    episodes (candidate and dense, the next decision seeds) while a condition's bounds straddle
    its floor, up to ``[evaluation] max_episodes``.

    :param reference: the dense policy's evaluations on the decision seeds (shared).
    :param executor: runs the extra evaluations side by side. :param progress: told the looks.
    """
    pol = cand.policy
    assert pol is not None
    prof = job.prof
    more = suite_evaluator(
        pol,
        prof,
        job.threat,
        job.attack_ctx.for_policy(pol),
        noise=job.noise,
        executor=executor,
    )
    first = {"clean": cand.suite.clean, **cand.suite.attacks}
    decision, results = decide(
        first,
        more,
        reference,
        job.rule.paired(),
        Plan.from_section(prof.evaluation),
        prof.decision_seeds(),
        blocking=job.rule.certificate_reasons(cand.certificate),
        progress=progress,
    )
    suite = SuiteResult(
        results["clean"], {k: v for k, v in results.items() if k != "clean"}, cand.suite.threat
    )
    return dataclasses.replace(cand, suite=suite, reasons=list(decision.reasons), decision=decision)


#: stands in for a clean evaluation :func:`evaluate_suite` is told not to run
_NO_CLEAN = EvalResult("clean", summarize_returns(np.zeros(1)), None, 0, 0.0)


def suite_evaluator(
    actor: Actor,
    prof: Profile,
    threat: ThreatModel,
    context: AttackContext,
    *,
    noise: ObservationNoise | None = None,
    surrogate: Policy | None = None,
    executor: Executor | None = None,
) -> Evaluator:
    """Evaluates ``actor`` under named conditions (``clean`` and attacks) on given seeds, with
    the run's settings: what a sequential decision calls for more episodes.

    Suites with trained attacks run in this process, so the adversaries trained on the first
    call (``context.trained``) serve every later one instead of being trained again.

    :param actor: the policy, or an onnxruntime model (with ``surrogate``).
    :param context: the attacks' context for this victim (kept across calls).
    """

    def run(names: list[str], seeds: list[int]) -> dict[str, EvalResult]:
        attacks = [n for n in names if n != "clean"]
        suite = evaluate_suite(
            actor,
            prof.env.id,
            prof.env.kwargs,
            seeds,
            attacks,
            threat,
            attack_seed=prof.attacks.seed,
            num_envs=prof.evaluation.num_envs,
            clean=None if "clean" in names else _NO_CLEAN,
            executor=None if any(a in TRAINED for a in attacks) else executor,
            context=context,
            surrogate=surrogate,
            noise=noise,
        )
        out = {"clean": suite.clean} if "clean" in names else {}
        return out | suite.attacks

    return run


def certify_at_states(
    policy: Policy, states: np.ndarray, threat: ThreatModel, prof: Profile
) -> dict[str, Any]:
    """The local certificate (and PGD's empirical shift) at the run's fixed sample of states,
    with the deployed action's certificate (and PGD's deviation) under ``"deployed"``."""
    c = prof.certificate
    out = certify_states(
        policy,
        states,
        threat,
        tau=c.tau,
        method=c.local_method,
        empirical_states=c.empirical_states,
        seed=prof.attacks.seed,
    )
    deployed = certify_deployed(
        policy,
        states,
        threat,
        method=c.local_method,
        tolerance=c.deployed_tolerance,
        tolerance_units=c.deployed_tolerance_units,
        empirical_states=c.empirical_states,
        radius_states=c.empirical_states,  # the bisection's cost, on the states PGD also sees
        seed=prof.attacks.seed,
    )
    return {"deployed": deployed.to_dict(), **out}


def certify_all(policy: Policy, threat: ThreatModel, prof: Profile) -> dict[str, GlobalCertificate]:
    """Global certificates for the run's norm and every norm the profile lists, same ε/space."""
    norms = list(dict.fromkeys([threat.norm, *prof.certificate.norms]))
    return {
        n: certify_global(policy, ThreatModel(threat.eps, n, threat.space), prof.certificate.tau)
        for n in norms
    }


def finetune_config(prof: Profile) -> FinetuneConfig:
    """The fine-tuning settings of a profile (every ``[finetune]`` key FinetuneConfig has)."""
    section = dataclasses.asdict(prof.finetune)
    names = {f.name for f in dataclasses.fields(FinetuneConfig)}
    return FinetuneConfig(**{k: v for k, v in section.items() if k in names})


def prune_candidate(
    dense: Policy,
    sparsity: float,
    prof: Profile,
    states: np.ndarray,
    threat: ThreatModel,
    collect: Callable[[Policy], np.ndarray],
    cfg: FinetuneConfig | None = None,
    critic: ValueNet | None = None,
) -> tuple[Policy, FinetuneStats]:
    """Prune ``dense`` with the profile's method and fine-tune it with the mask fixed, by the
    profile's ``[finetune] method`` (distillation + DAgger, PPO from the file's critic or a
    learned one, or both); micro-pruning cuts on its schedule during the fine-tuning.

    :param prof: a resolved profile (its ``[env]`` names the environment fine-tuning uses).
    :param states: the dense policy's visited states. :param collect: rolls out a student.
    :param cfg: fine-tuning settings (default: the profile's). :param critic: a value net.
    """
    ft_cfg = cfg or finetune_config(prof)
    env_id, env_kwargs, seed = prof.env.id, dict(prof.env.kwargs), prof.finetune.state_seed
    inputs = FinetuneInputs(
        dense,
        states,
        threat,
        collect,
        critic,
        env_id,
        env_kwargs,
        seed=seed,
        select=selection_evaluator(prof, ft_cfg.select_episodes, threat, ft_cfg.select_attacks),
        fall_fraction=prof.evaluation.fall_fraction,
    )

    def tune(pol: Policy, hook: Callable[[int], None] | None) -> FinetuneStats:
        return finetune_candidate(pol, inputs, ft_cfg, on_step=hook)

    return prune_and_finetune(
        dense,
        sparsity,
        prof.prune.method,
        tune,
        finetune_total_steps(ft_cfg),
        scope=prof.prune.scope,
        seed=prof.attacks.seed,
        schedule=MicroSchedule(prof.prune.micro_steps, prof.prune.micro_end),
    )


def dense_states(
    dense: Policy, prof: Profile, progress: Progress = no_progress
) -> tuple[np.ndarray, int]:
    """The states the dense policy visits on the profile's fine-tuning seeds (apart from the
    evaluation's), and the env steps that cost.

    :param prof: a resolved profile. :param progress: told the finished episodes.
    """
    f = prof.finetune
    seeds = list(range(f.state_seed, f.state_seed + f.state_episodes))
    _, res = evaluate(
        dense,
        prof.env.id,
        prof.env.kwargs,
        seeds,
        num_envs=prof.evaluation.num_envs,
        record_states=True,
        progress=progress,
    )
    assert res.states is not None
    return res.states, res.steps


def student_state_collector(
    prof: Profile, threat: ThreatModel | None = None
) -> Callable[[Policy], np.ndarray]:
    """Rolls out a student on the profile's DAgger seeds and returns the states it visits;
    with ``threat`` and ``[finetune] dagger_perturbed_episodes`` > 0, also that many episodes
    (the same seeds from the first) under uniform observation noise of the full ε (the true
    states a perturbed student visits)."""
    f = prof.finetune
    start = f.state_seed + f.state_episodes
    seeds = list(range(start, start + f.dagger_episodes))
    noisy = list(range(start, start + f.dagger_perturbed_episodes)) if threat else []
    num_envs = prof.evaluation.num_envs

    def collect(pol: Policy) -> np.ndarray:
        _, res = evaluate(
            pol, prof.env.id, prof.env.kwargs, seeds, num_envs=num_envs, record_states=True
        )
        assert res.states is not None
        if not noisy or threat is None:
            return res.states
        noise = ObservationNoise(1.0, threat, tuple(threat.scale(pol).tolist()))
        _, res2 = evaluate(
            pol,
            prof.env.id,
            prof.env.kwargs,
            noisy,
            num_envs=num_envs,
            record_states=True,
            noise=noise,
        )
        assert res2.states is not None
        return np.concatenate([res.states, res2.states])

    return collect


def selection_seeds(prof: Profile, episodes: int) -> list[int]:
    """Checkpoint selection's episode seeds: after the dense states' and DAgger's (all at or
    above ``state_seed`` ≥ 10000, apart from the verdict's)."""
    f = prof.finetune
    start = f.state_seed + f.state_episodes + max(f.dagger_episodes, f.dagger_perturbed_episodes)
    return list(range(start, start + episodes))


def selection_evaluator(
    prof: Profile,
    episodes: int,
    threat: ThreatModel | None = None,
    attacks: Sequence[str] = (),
) -> Callable[[Policy], tuple[dict[str, np.ndarray], int]] | None:
    """Evaluates a policy's clean return on :func:`selection_seeds`, and its return under each
    of ``attacks`` (``[finetune] select_attacks``; needs ``threat``) on the same seeds, with
    the verdict's tiny observation noise (``[evaluation] obs_noise``, with ``threat``); None:
    ``episodes`` = 0."""
    if episodes <= 0:
        return None
    if attacks and threat is None:
        raise CompressorError("finetune.select_attacks needs a threat model")
    seeds, ev_cfg = selection_seeds(prof, episodes), prof.evaluation
    env_id, kwargs, n_envs = prof.env.id, prof.env.kwargs, ev_cfg.num_envs

    def run(pol: Policy) -> tuple[dict[str, np.ndarray], int]:
        noise = None
        if threat is not None and ev_cfg.obs_noise > 0:
            noise = ObservationNoise(ev_cfg.obs_noise, threat, tuple(threat.scale(pol).tolist()))
        ev, res = evaluate(pol, env_id, kwargs, seeds, num_envs=n_envs, noise=noise)
        out = {"clean": np.asarray(ev.stats.returns, dtype=float)}
        steps = res.steps
        for name in attacks:
            assert threat is not None
            got = evaluate_attack(
                pol, env_id, kwargs, seeds, name, threat,
                attack_seed=prof.attacks.seed, num_envs=n_envs, noise=noise,
            )  # fmt: skip
            out[name] = np.asarray(got.stats.returns, dtype=float)
            steps += int(got.steps)
        return out, steps

    return run
