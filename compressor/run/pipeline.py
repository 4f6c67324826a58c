"""``compress run``: load → evaluate and certify dense → search (prune, fine-tune, evaluate,
certify, budget check per candidate) → export the chosen policy → report.

Each stage passes plain dataclasses to the next; the run directory receives the resolved
config, a journal of finished candidates, the chosen ``policy.pt`` and ``policy.onnx``, and the
report. Every file is written atomically.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.markup import escape

from compressor.attacks import NEEDS_CRITIC, AttackBudget, AttackContext
from compressor.certify.at_states import certify_states
from compressor.certify.global_bound import GlobalCertificate, certify_global
from compressor.core.config import Profile, Target, load_profile, profile_for_env
from compressor.core.errors import CompressorError
from compressor.core.executor import Executor, SerialExecutor
from compressor.core.progress import Reporter
from compressor.core.threat import ThreatModel
from compressor.deploy.export import export_onnx
from compressor.evaluate import SuiteResult, evaluate, evaluate_suite, random_action_return
from compressor.finetune.distill import (
    FinetuneConfig,
    FinetuneStats,
    finetune_candidate,
    finetune_total_steps,
)
from compressor.policy.loading import LoadedPolicy, load_policy
from compressor.policy.model import DISCRETE_HEADS, Policy
from compressor.policy.native import save_policy
from compressor.policy.value import ValueNet
from compressor.prune.schedule import MicroSchedule, prune_and_finetune
from compressor.report.build import build_report, write_report
from compressor.report.frontier import frontier_analysis
from compressor.report.performance import performance_block, suite_steps, training_steps
from compressor.rl.envs import check_policy_fits_env
from compressor.run.journal import Journal, open_run_dir
from compressor.search.sparsity import Budget, Candidate, SearchResult, search_sparsity


@dataclass
class RunResult:
    """What ``compress run`` produced.

    :param run_dir: the run directory. :param report: the report dict (``report.json``).
    :param passed: whether a sparsity met the budget.
    """

    run_dir: Path
    report: dict[str, Any]
    passed: bool


def resolve_profile(loaded: LoadedPolicy, profile: str | None, reporter: Reporter) -> Profile:
    """The profile given by name/path, else the shipped one for the policy's env, else defaults."""
    if profile:
        prof = load_profile(profile)
    else:
        found = profile_for_env(loaded.policy.spec.env_id) if loaded.policy.spec.env_id else None
        if found is None:
            reporter.info(
                "[yellow]no shipped profile for this env: using default settings "
                f"(ε = {Profile().threat.eps}); pass --profile to choose[/yellow]"
            )
            prof = Profile(name="default")
        else:
            prof = found
    if not prof.env.id:
        prof.env.id = loaded.policy.spec.env_id
    if not prof.env.id:
        raise CompressorError("the policy names no environment: pass a --profile with [env] id")
    return prof


def _env_kwargs(prof: Profile, policy: Policy) -> dict[str, Any]:
    return dict(prof.env.kwargs or policy.spec.env_kwargs)


def run_pipeline(
    src: str | Path,
    *,
    budget: float = 0.05,
    profile: str | None = None,
    target: Target | None = None,
    out_root: str | Path = "runs",
    name: str | None = None,
    command: list[str] | None = None,
    reporter: Reporter | None = None,
    prune_method: str | None = None,
    executor: Executor | None = None,
) -> RunResult:
    """Compress ``src`` within ``budget`` and write the run directory.

    :param src: a policy file (native, SB3 zip, CleanRL…).
    :param budget: fraction of the return scale a candidate may lose, in (0, 1).
    :param profile: profile name or TOML path (default: the shipped one for the policy's env).
    :param target: deployment target (opset, providers); default ``cpu-x86`` settings.
    :param out_root: folder that receives ``<name>/``.
    :param name: run name (default: the policy file's stem).
    :param command: the command line, recorded in the report.
    :param reporter: progress display and stage timer.
    :param prune_method: overrides the profile's ``[prune] method``.
    :param executor: where the attack-suite evaluations and the search's candidates run
        (default: in this process); the numbers do not depend on it. The caller closes it.
    """
    if not 0.0 < budget < 1.0:
        raise CompressorError(f"--budget must be in (0, 1), got {budget}")
    rep = reporter or Reporter(enabled=False)
    ex = executor or SerialExecutor()
    t_start = time.perf_counter()
    torch.set_num_threads(1)  # tiny MLPs: threads only add overhead and oversubscribe cores
    loaded = load_policy(src)
    for w in loaded.warnings:
        rep.info(f"[yellow]warning:[/yellow] {escape(w)}")
    dense = loaded.policy.eval()
    prof = resolve_profile(loaded, profile, rep)
    if prune_method is not None:
        from compressor.prune.criteria import PRUNE_METHODS

        if prune_method not in PRUNE_METHODS:
            raise CompressorError(
                f"--prune-method {prune_method!r} is not one of {', '.join(PRUNE_METHODS)}"
            )
        prof.prune.method = prune_method
    tgt = target or Target()
    env_id, env_kwargs = prof.env.id, _env_kwargs(prof, dense)
    check_policy_fits_env(
        dense.spec.obs_dim,
        dense.spec.act_dim,
        dense.spec.head in DISCRETE_HEADS,
        env_id,
        env_kwargs,
        dense.spec.env_wrappers,
    )
    threat = ThreatModel(prof.threat.eps, prof.threat.norm, prof.threat.space)
    seeds = prof.seeds()
    n_envs = prof.evaluation.num_envs
    run_config = {
        "source_sha256": loaded.sha256,
        "budget": budget,
        "profile": {k: v for k, v in prof.to_dict().items() if k != "path"},
        "target": {k: v for k, v in tgt.to_dict().items() if k != "path"},
    }
    run_dir, resumed = open_run_dir(Path(out_root), name or Path(src).stem, run_config)
    journal = Journal(run_dir)
    finished = journal.load()
    if resumed:
        rep.info(f"resuming {run_dir}: {len(finished)} candidate(s) already finished")

    # ---- dense: evaluate (clean + every attack of the suite) and certify ---------------------
    if loaded.critic is None and any(a in NEEDS_CRITIC for a in prof.attacks.final):
        rep.info("[yellow]warning:[/yellow] no value function in the file: no critic attack")
    for names in (prof.attacks.screen, prof.attacks.final):
        names[:] = [a for a in names if loaded.critic is not None or a not in NEEDS_CRITIC]
    attacks_all = list(dict.fromkeys(prof.attacks.screen + prof.attacks.final))
    # learned adversaries and RS's Q: trained on the dense policy, saved, and the chosen
    # policy's start from them (warm start)
    adv_dir = run_dir / "adversaries"
    attack_ctx = AttackContext(
        dense,
        threat,
        prof.attacks.seed,
        critic=loaded.critic,
        env_id=env_id,
        env_kwargs=env_kwargs,
        budget=AttackBudget.from_section(prof.attacks),
    )
    with rep.stage("evaluate dense", total=len(attacks_all) + 2) as upd:
        done = [0]

        def bump(_: str) -> None:
            upd(done[0])
            done[0] += 1

        dense_suite = evaluate_suite(
            dense,
            env_id,
            env_kwargs,
            seeds,
            attacks_all,
            threat,
            attack_seed=prof.attacks.seed,
            num_envs=n_envs,
            on_stage=bump,
            executor=ex,
            context=dataclasses.replace(attack_ctx, save_dir=adv_dir / "dense"),
        )
        rand_ret = random_action_return(env_id, env_kwargs, seeds, n_envs)

    # ---- states for distillation: the dense policy's own rollouts, on separate seeds --------
    with rep.stage("collect states", total=prof.finetune.state_episodes) as upd:
        state_seeds = list(
            range(prof.finetune.state_seed, prof.finetune.state_seed + prof.finetune.state_episodes)
        )
        _, states_res = evaluate(
            dense,
            env_id,
            env_kwargs,
            state_seeds,
            num_envs=n_envs,
            record_states=True,
            on_episode=upd,
        )
    states = states_res.states
    assert states is not None
    # one fixed sample of the dense policy's states for every local certificate
    pick = np.random.default_rng(0).permutation(len(states))[: prof.certificate.states]
    cert_states = states[pick]

    with rep.stage("certify dense"):
        dense_certs = certify_all(dense, threat, prof)
        dense_local = certify_at_states(dense, cert_states, threat, prof)
    dense_cert = dense_certs[threat.norm]
    screen_dense = _subset(dense_suite, prof.attacks.screen)
    rule = Budget(
        budget=budget,
        dense_clean=dense_suite.clean.stats.mean,
        dense_robust=screen_dense.robust_return,
        random_return=rand_ret,
        dense_lipschitz=dense_cert.lipschitz,
        max_tv=prof.search.max_tv,
    )
    job = CandidateJob(
        dense=dense,
        prof=prof,
        threat=threat,
        rule=rule,
        states=states,
        cert_states=cert_states,
        seeds=seeds,
        env_kwargs=env_kwargs,
        attack_ctx=attack_ctx,
    )

    search_suites: list[SuiteResult] = []  # evaluated in this invocation (resumed ones are not)

    def evaluate_many(levels: list[float]) -> list[Candidate]:
        todo = [s for s in levels if Journal.key(s) not in finished]
        for s in levels:
            if Journal.key(s) in finished:
                c = finished[Journal.key(s)]
                verdict = "pass" if c.passed else "fail"
                rep.info(f"  sparsity {c.sparsity:.3f}: from the journal ({verdict})")
        built: list[Candidate] = []
        if ex.workers > 1 and len(todo) > 1:
            names = ", ".join(f"{s:.3f}" for s in todo)
            with rep.stage(f"search: sparsity {names} on {ex.workers} {ex.name} workers"):
                built = ex.map(build_candidate, [(job, s) for s in todo])
        else:
            for s in todo:
                steps = len(prof.attacks.screen) + 2
                with rep.stage(f"search: sparsity {s:.3f}", total=steps) as upd:
                    built.append(build_candidate(job, s, upd))
        for c in built:
            search_suites.append(c.suite)
            journal.record(c)
            finished[Journal.key(c.target_sparsity)] = c
            verdict = (
                "[green]pass[/green]"
                if c.passed
                else f"[red]fail[/red]: {escape('; '.join(c.reasons))}"
            )
            rep.info(
                f"  sparsity {c.sparsity:.3f}: clean {c.suite.clean.stats.mean:.1f}, robust "
                f"{c.suite.robust_return:.1f}, Lipschitz {c.certificate.lipschitz:.4g} → {verdict}"
            )
        return [finished[Journal.key(s)] for s in levels]

    t_search = time.perf_counter()
    result: SearchResult = search_sparsity(
        evaluate_many, prof.search.grid, prof.search.refine, rule, width=ex.workers
    )
    rep.timings["search"] = time.perf_counter() - t_search

    # ---- chosen: the rest of the attack suite, certificates, export --------------------------
    chosen = result.chosen
    chosen_block: dict[str, Any] | None = None
    final_suites: list[SuiteResult] = []
    if chosen is not None and chosen.policy is not None:
        pol = chosen.policy
        extra = [a for a in prof.attacks.final if a not in prof.attacks.screen]
        with rep.stage("evaluate chosen (final attacks)", total=max(len(extra), 1)):
            final_suite = evaluate_suite(
                pol,
                env_id,
                env_kwargs,
                seeds,
                extra,
                threat,
                attack_seed=prof.attacks.seed,
                num_envs=n_envs,
                clean=chosen.suite.clean,
                executor=ex,
                context=dataclasses.replace(
                    attack_ctx,
                    policy=pol,
                    save_dir=adv_dir / "chosen",
                    warm_start=adv_dir / "dense",
                    shared={},
                ),
            )
            final_suites.append(dataclasses.replace(final_suite, attacks=dict(final_suite.attacks)))
            final_suite.attacks = {**chosen.suite.attacks, **final_suite.attacks}
        with rep.stage("certify chosen"):
            chosen_certs = certify_all(pol, threat, prof)
        with rep.stage("export"):
            pol.spec.source = {**dense.spec.source, "compressed_from": loaded.sha256 or ""}
            save_policy(pol, run_dir / "policy.pt")
            meta = {
                "eps": str(threat.eps),
                "eps_space": threat.space,
                "norm": threat.norm,
                "budget": str(budget),
                "sparsity": f"{chosen.sparsity:.6f}",
                "certificate": json.dumps(chosen_certs[threat.norm].to_dict()),
                "source_sha256": loaded.sha256 or "",
                "profile": prof.name,
            }
            exported = export_onnx(
                pol,
                run_dir / "policy.onnx",
                metadata=meta,
                opset=tgt.opset,
                sparse_storage=tgt.sparse_storage,
            )
        chosen_block = {
            "policy": pol,
            "suite": final_suite,
            "certificates": chosen_certs,
            "candidate": chosen,
            "export": exported,
            "local": chosen.local,
        }
    rep.timings["total"] = time.perf_counter() - t_start
    report = build_report(
        loaded=loaded,
        profile=prof,
        target=tgt,
        threat=threat,
        rule=rule,
        dense_suite=dense_suite,
        dense_certs=dense_certs,
        dense_local=dense_local,
        search=result,
        chosen=chosen_block,
        timings=rep.timings,
        command=command or [],
        run_dir=run_dir,
        frontier_analysis=frontier_analysis(
            rule,
            rule.dense_clean,
            rule.dense_robust,
            screen_dense.strongest_attack,
            dense_cert.to_dict()["certified_radius"],
            result.candidates,
            chosen,
            prof.reference.best_return,
            prof.reference.source,
        ),
    )
    report["performance"] = performance_block(
        rep.timings,
        {
            "evaluate dense": suite_steps([dense_suite]),
            "collect states": states_res.steps,
            "search": suite_steps(search_suites),
            "evaluate chosen (final attacks)": suite_steps(final_suites, include_clean=False),
        },
        ex,
        {"attack_training_env_steps": training_steps([dense_suite, *search_suites, *final_suites])},
    )
    with rep.stage("report"):
        write_report(report, run_dir)
    return RunResult(run_dir, report, chosen is not None)


@dataclass
class CandidateJob:
    """What building one candidate needs, as plain data, so any executor's worker can run it.

    :param dense: the dense policy. :param prof: the run's profile.
    :param threat: the threat model. :param rule: the budget rule.
    :param states: the dense policy's visited states (distillation).
    :param cert_states: the fixed sample of them for local certificates.
    :param seeds: the evaluation episode seeds shared by every candidate.
    :param env_kwargs: kwargs for the environment.
    :param attack_ctx: the attack context (critic, budgets) of the run.
    """

    dense: Policy
    prof: Profile
    threat: ThreatModel
    rule: Budget
    states: np.ndarray
    cert_states: np.ndarray
    seeds: list[int]
    env_kwargs: dict[str, Any]
    attack_ctx: AttackContext


def build_candidate(
    job: CandidateJob, sparsity: float, on_progress: Callable[[int], None] | None = None
) -> Candidate:
    """Prune to ``sparsity``, fine-tune with the mask fixed, evaluate on the shared seeds under
    the screening attacks, certify, and apply the budget rule (an executor job: its result
    depends only on ``job`` and ``sparsity``).

    :param on_progress: called with the number of sub-steps done (pruned, then each evaluation).
    """
    prof, threat = job.prof, job.threat
    upd = on_progress or (lambda _n: None)
    t0 = time.perf_counter()
    upd(0)
    collect = student_state_collector(prof, job.env_kwargs, prof.evaluation.num_envs)
    critic = job.attack_ctx.critic
    cand, ft = prune_candidate(
        job.dense,
        sparsity,
        prof,
        job.states,
        threat,
        collect,
        critic=critic if isinstance(critic, ValueNet) else None,
        env_kwargs=job.env_kwargs,
    )
    upd(1)
    done = [1]

    def step(_: str) -> None:
        done[0] += 1
        upd(done[0])

    suite = evaluate_suite(
        cand,
        prof.env.id,
        job.env_kwargs,
        job.seeds,
        prof.attacks.screen,
        threat,
        attack_seed=prof.attacks.seed,
        num_envs=prof.evaluation.num_envs,
        on_stage=step,
        context=dataclasses.replace(job.attack_ctx, policy=cand, shared={}),
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


def certify_at_states(
    policy: Policy, states: np.ndarray, threat: ThreatModel, prof: Profile
) -> dict[str, Any]:
    """The local certificate (and PGD's empirical shift) at the run's fixed sample of states."""
    c = prof.certificate
    return certify_states(
        policy,
        states,
        threat,
        tau=c.tau,
        method=c.local_method,
        empirical_states=c.empirical_states,
        seed=prof.attacks.seed,
    )


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
    env_kwargs: dict[str, Any] | None = None,
) -> tuple[Policy, FinetuneStats]:
    """Prune ``dense`` with the profile's method and fine-tune it with the mask fixed, by the
    profile's ``[finetune] method`` (distillation + DAgger, PPO from the file's critic or a
    learned one, or both); micro-pruning cuts on its schedule during the fine-tuning."""
    ft_cfg = cfg or finetune_config(prof)
    kwargs = dict(env_kwargs if env_kwargs is not None else _env_kwargs(prof, dense))

    def tune(pol: Policy, hook: Callable[[int], None] | None) -> FinetuneStats:
        return finetune_candidate(
            pol,
            dense,
            states,
            threat,
            ft_cfg,
            collect,
            critic,
            prof.env.id,
            kwargs,
            seed=prof.finetune.state_seed,
            on_step=hook,
        )

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


def student_state_collector(
    prof: Profile, env_kwargs: dict[str, Any], num_envs: int
) -> Callable[[Policy], np.ndarray]:
    """Rolls out a student on the profile's DAgger seeds and returns the states it visits."""
    start = prof.finetune.state_seed + prof.finetune.state_episodes
    seeds = list(range(start, start + prof.finetune.dagger_episodes))

    def collect(pol: Policy) -> np.ndarray:
        _, res = evaluate(
            pol, prof.env.id, env_kwargs, seeds, num_envs=num_envs, record_states=True
        )
        assert res.states is not None
        return res.states

    return collect


def certify_all(policy: Policy, threat: ThreatModel, prof: Profile) -> dict[str, GlobalCertificate]:
    """Global certificates for the run's norm and every norm the profile lists, same ε/space."""
    norms = list(dict.fromkeys([threat.norm, *prof.certificate.norms]))
    return {
        n: certify_global(policy, ThreatModel(threat.eps, n, threat.space), prof.certificate.tau)
        for n in norms
    }


def _subset(suite: SuiteResult, names: list[str]) -> SuiteResult:
    """The same suite restricted to ``names`` (the screening attacks)."""
    return SuiteResult(
        suite.clean, {k: v for k, v in suite.attacks.items() if k in names}, suite.threat
    )
