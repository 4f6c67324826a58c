"""The stages of ``compress run``, each a function from the values of the stages before it to a
frozen value (compressor/run/results.py): set-up, dense measurement, search, final check.
The report (compressor/report/build.py) is made from those values alone.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np
from rich.markup import escape

from compressor.attacks import NEEDS_CRITIC
from compressor.attacks.base import AttackBudget, AttackContext
from compressor.core import atomic
from compressor.core.config import CHOOSE, Target
from compressor.core.errors import CompressorError
from compressor.core.executor import Executor
from compressor.core.naming import sparsity_text
from compressor.core.progress import Progress, Reporter
from compressor.deploy.export import ExportResult, export_onnx
from compressor.deploy.onnx_actor import OnnxActor
from compressor.evaluate import SuiteResult, evaluate_suite, random_action_return
from compressor.policy.loading import load_policy
from compressor.policy.model import DISCRETE_HEADS, Policy
from compressor.policy.native import save_policy
from compressor.prune.criteria import PRUNE_METHODS
from compressor.rl.envs import check_policy_fits_env
from compressor.run.journal import Journal, open_run_dir
from compressor.run.ledger import CandidateLedger
from compressor.run.results import (
    ChosenPolicy,
    DenseMeasurement,
    FinalAttempt,
    FinalCheck,
    RunSetup,
)
from compressor.run.settings import resolve_settings, without_critic_attacks
from compressor.search.budget import Budget
from compressor.search.candidate import (
    Candidate,
    CandidateJob,
    certify_all,
    certify_at_states,
    dense_states,
    suite_evaluator,
)
from compressor.search.sequential import Evaluator, Plan, ReferenceSeries, decide
from compressor.search.sparsity import SearchResult, search_sparsity


def set_up(
    src: str | Path,
    *,
    budget: float,
    profile: str | None,
    target: Target | None,
    out_root: Path,
    name: str | None,
    command: list[str],
    prune_method: str | None,
    reporter: Reporter,
    env: str | None = None,
) -> RunSetup:
    """Load the policy, resolve its settings, check it fits its environment, and open the run
    directory (resuming the same configuration, refusing another)."""
    if not 0.0 < budget < 1.0:
        raise CompressorError(f"--budget must be in (0, 1), got {budget}")
    if prune_method is not None and prune_method not in PRUNE_METHODS:
        methods = ", ".join(PRUNE_METHODS)
        raise CompressorError(f"--prune-method {prune_method!r} is not one of {methods}")
    loaded = load_policy(src, env_id=env)
    for w in loaded.warnings:
        reporter.note(f"warning: {w}")
    loaded.policy.eval()
    settings = resolve_settings(loaded.policy, profile, note=reporter.note)
    prof = settings.profile
    if prune_method is not None:
        prof = dataclasses.replace(prof, prune=dataclasses.replace(prof.prune, method=prune_method))
    if loaded.critic is None:
        if any(a in NEEDS_CRITIC for a in prof.attacks.final):
            reporter.note("warning: no value function in the file: no critic attack")
        prof = without_critic_attacks(prof)
    spec, tgt = loaded.policy.spec, target or Target()
    discrete = spec.head in DISCRETE_HEADS
    check_policy_fits_env(
        spec.obs_dim, spec.act_dim, discrete, prof.env.id, prof.env.kwargs, spec.env_wrappers
    )
    run_config = {
        "source_sha256": loaded.sha256,
        "budget": budget,
        "profile": {k: v for k, v in prof.to_dict().items() if k != "path"},
        "target": {k: v for k, v in tgt.to_dict().items() if k != "path"},
    }
    run_dir, resumed = open_run_dir(out_root, name or Path(src).stem, run_config)
    threat = settings.threat
    return RunSetup(loaded, prof, threat, tgt, budget, run_dir, resumed, tuple(command))


def measure_dense(setup: RunSetup, ex: Executor, rep: Reporter) -> DenseMeasurement:
    """Clean return and every attack of the suite on the first look's seeds (with the run's
    observation noise), the random-action floor, the dense policy's own states (distillation),
    its certificates, and the budget rule they fix."""
    prof, dense = setup.profile, setup.dense
    attacks = list(dict.fromkeys(prof.attacks.screen + prof.attacks.final))
    # learned adversaries and RS's Q are trained on the dense policy and saved; the chosen
    # policy's start from them (warm start)
    ctx = AttackContext(
        dense,
        setup.threat,
        prof.attacks.seed,
        critic=setup.loaded.critic,
        env_id=setup.env_id,
        env_kwargs=setup.env_kwargs,
        budget=AttackBudget.from_section(prof.attacks),
    )
    # the dense policy's adversaries are saved; the context shares its cache (ctx.trained)
    dctx = dataclasses.replace(ctx, save_dir=_adversaries(setup, "dense"))
    with rep.stage("evaluate dense", total=len(attacks) + 1) as progress:
        suite = _suite(setup, attacks, ex, dctx, progress=progress)
        rand = random_action_return(
            setup.env_id, setup.env_kwargs, setup.seeds, prof.evaluation.num_envs
        )
    with rep.stage("collect states", total=prof.finetune.state_episodes) as progress:
        states, state_steps = dense_states(dense, prof, progress)
    # one fixed sample of the dense policy's states for every local certificate
    pick = np.random.default_rng(0).permutation(len(states))[: prof.certificate.states]
    with rep.stage("certify dense"):
        certs = certify_all(dense, setup.threat, prof)
        local = certify_at_states(dense, states[pick], setup.threat, prof)
    screen = SuiteResult(
        suite.clean, {k: v for k, v in suite.attacks.items() if k in prof.attacks.screen}
    )
    ev = prof.evaluation
    median = float(np.median(suite.clean.stats.returns))
    rule = Budget(
        budget=setup.budget,
        dense_clean=suite.clean.stats.mean,
        dense_robust=screen.robust_return,
        random_return=rand,
        dense_lipschitz=certs[setup.threat.norm].lipschitz,
        max_tv=prof.search.max_tv,
        reference_attack=screen.strongest_attack,
        fall_below=rand + ev.fall_fraction * (median - rand) if ev.fall_fraction > 0 else None,
        fall_on_termination=ev.fall_on_termination,
    )
    # the dense episodes every candidate is paired with, extended when a decision needs more
    more = suite_evaluator(dense, prof, setup.threat, dctx, noise=setup.noise, executor=ex)
    looks = Plan.from_section(ev).looks
    reference = ReferenceSeries(more, {"clean": screen.clean, **screen.attacks}, looks)
    return DenseMeasurement(
        suite, rand, states, state_steps, states[pick], certs, local, rule, ctx, reference
    )


def _suite(
    setup: RunSetup,
    attacks: list[str],
    ex: Executor,
    ctx: AttackContext,
    **kw: object,
) -> SuiteResult:
    """``ctx.policy`` under ``attacks`` on the first look's seeds, with the run's noise."""
    prof = setup.profile
    return evaluate_suite(
        ctx.policy,
        setup.env_id,
        setup.env_kwargs,
        setup.seeds,
        attacks,
        setup.threat,
        attack_seed=prof.attacks.seed,
        num_envs=prof.evaluation.num_envs,
        executor=ex,
        context=ctx,
        noise=setup.noise,
        **kw,  # type: ignore[arg-type]
    )


def search(
    setup: RunSetup, dense: DenseMeasurement, ex: Executor, rep: Reporter
) -> tuple[SearchResult, list[SuiteResult]]:
    """The sparsity search (grid, then bisection) over candidates built and decided by a
    :class:`CandidateLedger`; also the suites evaluated in this invocation (for the run's
    performance block: a resumed run reuses the journal's)."""
    prof = setup.profile
    job = CandidateJob(
        dense=setup.dense,
        prof=prof,
        threat=setup.threat,
        rule=dense.rule,
        states=dense.states,
        cert_states=dense.cert_states,
        seeds=setup.seeds,
        attack_ctx=dense.attack_ctx,
        noise=setup.noise,
    )
    assert dense.reference is not None
    ledger = CandidateLedger(Journal(setup.run_dir), job, ex, rep, dense.reference)
    if setup.resumed:
        rep.info(f"resuming {setup.run_dir}: {len(ledger.finished)} candidate(s) already finished")
    t0 = time.perf_counter()
    result = search_sparsity(
        ledger.evaluate, prof.search.grid, prof.search.refine, dense.rule, width=ex.workers
    )
    rep.timings["search"] = time.perf_counter() - t0  # the candidates' own stages included
    return result, ledger.suites


def _adversaries(setup: RunSetup, who: str) -> Path:
    """Where the adversaries trained on ``who`` are saved."""
    return setup.run_dir / "adversaries" / who


def finish_chosen(
    setup: RunSetup,
    dense: DenseMeasurement,
    result: SearchResult,
    ex: Executor,
    rep: Reporter,
    choose: str | None = None,
) -> FinalCheck:
    """The final check: the search's passing levels in turn (the sparsest first, or the best
    scored with ``choose="sweet-spot"``), each exported and judged as its ONNX model in
    onnxruntime at the target's batch size on the whole final suite, paired with the dense
    policy's ONNX model on the same seeds and noise, until one passes: that one is certified and
    written as ``policy.onnx`` and ``policy.pt``.

    :param choose: ``max-sparsity`` or ``sweet-spot`` (default: the profile's ``[search]``).
    """
    prof = setup.profile
    how = choose or prof.search.choose
    if how not in CHOOSE:
        raise CompressorError(f"--choose must be one of {', '.join(CHOOSE)}, got {how!r}")
    order = _final_order(result, dense.rule, how)
    if not order:
        return FinalCheck(None, (), how)
    names = ["clean", *dict.fromkeys(prof.attacks.screen + prof.attacks.final)]
    with rep.stage("final check: dense ONNX model", total=len(names)) as progress:
        dense_export = _export(setup, setup.dense, setup.run_dir / "final" / "dense.onnx", None)
        ctx = dataclasses.replace(dense.attack_ctx, save_dir=_adversaries(setup, "dense"))
        more = _onnx_evaluator(setup, dense_export.path, setup.dense, ctx, ex)
        reference = ReferenceSeries(more, looks=Plan.from_section(prof.evaluation).looks)
        first = reference.get(names, setup.seeds)
        progress(len(names), len(names))
    strongest = SuiteResult(first["clean"], {k: v for k, v in first.items() if k != "clean"})
    rule = dataclasses.replace(
        dense.rule,
        dense_robust=strongest.robust_return,
        reference_attack=strongest.strongest_attack,
    )
    attempts: list[FinalAttempt] = []
    for cand in order:
        label = f"final check: sparsity {sparsity_text(cand.sparsity)}"
        with rep.stage(label, total=None) as progress:
            attempt = _final_attempt(setup, dense, cand, reference, rule, ex, progress)
        attempts.append(attempt)
        rep.info(f"  {label}: {_attempt_line(attempt)}")
        if attempt.decision.passed:
            chosen = _adopt(setup, attempt)
            return FinalCheck(
                chosen,
                tuple(attempts),
                how,
                _merged(reference),
                dense_export,
                rule.paired(),
                setup.target.batch_size,
            )
    return FinalCheck(
        None,
        tuple(attempts),
        how,
        _merged(reference),
        dense_export,
        rule.paired(),
        setup.target.batch_size,
    )


def _final_order(result: SearchResult, rule: Budget, how: str) -> list[Candidate]:
    """The passing levels in the order the final check tries them."""
    passing = [c for c in result.candidates if c.passed and c.policy is not None]
    if how == "sweet-spot":

        def score(c: Candidate) -> float:
            clean = (c.suite.clean.stats.mean - rule.random_return) / rule.scale
            robust = (c.suite.robust_return - rule.random_return) / rule.scale
            return (clean + robust) / 2

        return sorted(passing, key=lambda c: (score(c), c.sparsity), reverse=True)
    return sorted(passing, key=lambda c: c.sparsity, reverse=True)


def _merged(reference: ReferenceSeries) -> SuiteResult:
    """The reference series as one suite (each condition with every episode it ran)."""
    r = reference.results
    return SuiteResult(r["clean"], {k: v for k, v in r.items() if k != "clean"})


def _onnx_evaluator(
    setup: RunSetup, path: Path, surrogate: Policy, ctx: AttackContext, ex: Executor
) -> Evaluator:
    """Evaluates the ONNX model at ``path`` in onnxruntime, as the target runs it (its
    providers, threads and batch size), attacked through ``surrogate``."""
    t = setup.target
    actor = OnnxActor(path, providers=t.providers, threads=t.threads, batch_size=t.batch_size)
    return suite_evaluator(
        actor,
        setup.profile,
        setup.threat,
        ctx,
        noise=setup.noise,
        surrogate=surrogate,
        executor=ex,
    )


def _final_attempt(
    setup: RunSetup,
    dense: DenseMeasurement,
    cand: Candidate,
    reference: ReferenceSeries,
    rule: Budget,
    ex: Executor,
    progress: Progress,
) -> FinalAttempt:
    """One passing level: exported, measured as its ONNX model, decided against the dense one."""
    pol = cand.policy
    assert pol is not None
    prof = setup.profile
    key = Journal.key(cand.target_sparsity)
    exported = _export(setup, pol, setup.run_dir / "final" / f"sparsity-{key}.onnx", cand)
    ctx = dense.attack_ctx.for_policy(
        pol, warm_start=_adversaries(setup, "dense"), save_dir=_adversaries(setup, f"final-{key}")
    )
    more = _onnx_evaluator(setup, exported.path, pol, ctx, ex)
    names = list(reference.results)
    decision, results = decide(
        more(names, setup.seeds),
        more,
        reference,
        rule.paired(),
        Plan.from_section(prof.evaluation),
        prof.decision_seeds(),
        blocking=rule.certificate_reasons(cand.certificate),
        progress=progress,
    )
    suite = SuiteResult(
        results["clean"], {k: v for k, v in results.items() if k != "clean"}, setup.threat
    )
    return FinalAttempt(cand, suite, decision, exported)


def _attempt_line(a: FinalAttempt) -> str:
    d = a.decision
    why = f": {escape('; '.join(d.reasons))}" if d.reasons else ""
    colour = {"pass": "green", "fail": "red"}.get(d.status, "yellow")
    return f"[{colour}]{d.status}[/{colour}] after {d.episodes} episodes{why}"


def _export(setup: RunSetup, pol: Policy, path: Path, cand: Candidate | None) -> ExportResult:
    """``pol`` as ONNX at ``path``, with the run's metadata (the candidate's, when given)."""
    meta = {
        "eps": str(setup.threat.eps),
        "eps_space": setup.threat.space,
        "norm": setup.threat.norm,
        "source_sha256": setup.loaded.sha256 or "",
        "profile": setup.profile.name,
    }
    if cand is not None:
        meta |= {
            "budget": str(setup.budget),
            "sparsity": f"{cand.sparsity:.6f}",
            "certificate": json.dumps(cand.certificate.to_dict()),
        }
    return export_onnx(
        pol,
        path,
        metadata=meta,
        opset=setup.target.opset,
        sparse_storage=setup.target.sparse_storage,
    )


def _adopt(setup: RunSetup, attempt: FinalAttempt) -> ChosenPolicy:
    """The level that passed: certified, and written as ``policy.onnx`` (the very file that was
    measured) and ``policy.pt``."""
    cand, pol = attempt.candidate, attempt.candidate.policy
    assert pol is not None
    prof = setup.profile
    certs = certify_all(pol, setup.threat, prof)
    pol.spec.source = {**setup.dense.spec.source, "compressed_from": setup.loaded.sha256}
    save_policy(pol, setup.run_dir / "policy.pt")
    target = setup.run_dir / "policy.onnx"
    atomic.write_bytes(target, attempt.export.path.read_bytes())
    exported = dataclasses.replace(attempt.export, path=target)
    return ChosenPolicy(cand, attempt.suite, attempt.suite, certs, exported, attempt.decision)
