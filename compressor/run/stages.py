"""The stages of ``compress run``, each a function from the values of the stages before it to a
frozen value (compressor/run/results.py): set-up, dense measurement, search, chosen policy.
The report (compressor/report/build.py) is made from those values alone.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np

from compressor.attacks import NEEDS_CRITIC
from compressor.attacks.base import AttackBudget, AttackContext
from compressor.core.config import Target
from compressor.core.errors import CompressorError
from compressor.core.executor import Executor
from compressor.core.progress import Reporter
from compressor.deploy.export import export_onnx
from compressor.evaluate import SuiteResult, evaluate_suite, random_action_return
from compressor.policy.loading import load_policy
from compressor.policy.model import DISCRETE_HEADS
from compressor.policy.native import save_policy
from compressor.prune.criteria import PRUNE_METHODS
from compressor.rl.envs import check_policy_fits_env
from compressor.run.journal import Journal, open_run_dir
from compressor.run.ledger import CandidateLedger
from compressor.run.results import ChosenPolicy, DenseMeasurement, RunSetup
from compressor.run.settings import resolve_settings, without_critic_attacks
from compressor.search.budget import Budget
from compressor.search.candidate import CandidateJob, certify_all, certify_at_states, dense_states
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
) -> RunSetup:
    """Load the policy, resolve its settings, check it fits its environment, and open the run
    directory (resuming the same configuration, refusing another)."""
    if not 0.0 < budget < 1.0:
        raise CompressorError(f"--budget must be in (0, 1), got {budget}")
    if prune_method is not None and prune_method not in PRUNE_METHODS:
        methods = ", ".join(PRUNE_METHODS)
        raise CompressorError(f"--prune-method {prune_method!r} is not one of {methods}")
    loaded = load_policy(src)
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
    """Clean return and every attack of the suite on the evaluation seeds, the random-action
    floor, the dense policy's own states (distillation), its certificates, and the budget rule
    they fix."""
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
    with rep.stage("evaluate dense", total=len(attacks) + 1) as progress:
        suite = _suite(setup, attacks, ex, ctx, "dense", progress=progress)
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
    rule = Budget(
        budget=setup.budget,
        dense_clean=suite.clean.stats.mean,
        dense_robust=screen.robust_return,
        random_return=rand,
        dense_lipschitz=certs[setup.threat.norm].lipschitz,
        max_tv=prof.search.max_tv,
    )
    return DenseMeasurement(suite, rand, states, state_steps, states[pick], certs, local, rule, ctx)


def _suite(
    setup: RunSetup,
    attacks: list[str],
    ex: Executor,
    ctx: AttackContext,
    who: str,
    **kw: object,
) -> SuiteResult:
    """``ctx.policy`` under ``attacks`` on the run's seeds; trained adversaries saved under
    ``adversaries/<who>/``."""
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
        context=dataclasses.replace(ctx, save_dir=setup.run_dir / "adversaries" / who),
        **kw,  # type: ignore[arg-type]
    )


def search(
    setup: RunSetup, dense: DenseMeasurement, ex: Executor, rep: Reporter
) -> tuple[SearchResult, list[SuiteResult]]:
    """The sparsity search (grid, then bisection) over candidates built by a
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
    )
    ledger = CandidateLedger(Journal(setup.run_dir), job, ex, rep)
    if setup.resumed:
        rep.info(f"resuming {setup.run_dir}: {len(ledger.finished)} candidate(s) already finished")
    t0 = time.perf_counter()
    result = search_sparsity(
        ledger.evaluate, prof.search.grid, prof.search.refine, dense.rule, width=ex.workers
    )
    rep.timings["search"] = time.perf_counter() - t0  # the candidates' own stages included
    return result, ledger.suites


def finish_chosen(
    setup: RunSetup, dense: DenseMeasurement, result: SearchResult, ex: Executor, rep: Reporter
) -> ChosenPolicy | None:
    """The chosen candidate under the final attacks it was not screened with (the learned ones
    warm-started from the dense policy's), its certificates, and its export."""
    chosen = result.chosen
    if chosen is None or chosen.policy is None:
        return None
    prof, pol = setup.profile, chosen.policy
    extra = [a for a in prof.attacks.final if a not in prof.attacks.screen]
    ctx = dense.attack_ctx.for_policy(pol, warm_start=setup.run_dir / "adversaries" / "dense")
    with rep.stage("evaluate chosen (final attacks)", total=max(len(extra), 1)) as progress:
        final_only = _suite(
            setup, extra, ex, ctx, "chosen", clean=chosen.suite.clean, progress=progress
        )
    suite = SuiteResult(
        chosen.suite.clean, {**chosen.suite.attacks, **final_only.attacks}, final_only.threat
    )
    with rep.stage("certify chosen"):
        certs = certify_all(pol, setup.threat, prof)
    with rep.stage("export"):
        pol.spec.source = {**setup.dense.spec.source, "compressed_from": setup.loaded.sha256}
        save_policy(pol, setup.run_dir / "policy.pt")
        meta = {
            "eps": str(setup.threat.eps),
            "eps_space": setup.threat.space,
            "norm": setup.threat.norm,
            "budget": str(setup.budget),
            "sparsity": f"{chosen.sparsity:.6f}",
            "certificate": json.dumps(certs[setup.threat.norm].to_dict()),
            "source_sha256": setup.loaded.sha256 or "",
            "profile": prof.name,
        }
        exported = export_onnx(
            pol,
            setup.run_dir / "policy.onnx",
            metadata=meta,
            opset=setup.target.opset,
            sparse_storage=setup.target.sparse_storage,
        )
    return ChosenPolicy(chosen, suite, final_only, certs, exported)
