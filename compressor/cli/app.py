"""The ``compress`` command line. Results go to stdout (``--json``: one JSON document),
progress bars and notes to stderr. Exit codes: 0 ok, 2 usage, 3 bad input, 4 budget not met.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from compressor.core.errors import EXIT_BUDGET_NOT_MET, CompressorError

app = typer.Typer(
    name="compress",
    help="Compress a trained RL policy into a smaller ONNX model that is no less robust.",
    rich_markup_mode="rich",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
out = Console()
err = Console(stderr=True)

PANEL_MAIN = "Main job"
PANEL_STAGES = "Single stages"
PANEL_POLICIES = "Policies"

JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout.")]
EpsOpt = Annotated[
    float | None, typer.Option("--eps", help="Attack radius ε (default: the profile's).")
]
NormOpt = Annotated[str | None, typer.Option("--norm", help="Ball norm: inf or 2.")]
SpaceOpt = Annotated[
    str | None, typer.Option("--space", help="ε units: normalized (default) or raw.")
]
ProfileOpt = Annotated[
    str | None, typer.Option("--profile", help="Profile name or TOML file (default: by env).")
]
EnvOpt = Annotated[str | None, typer.Option("--env", help="Gymnasium env id (overrides).")]
ExecutorOpt = Annotated[
    str,
    typer.Option(
        "--executor", help="Where evaluations and candidates run: local (process pool) or ray."
    ),
]
WorkersOpt = Annotated[
    int | None,
    typer.Option(
        "--workers",
        help="Parallel workers (default: the cores; 1 runs everything in this process). With "
        "ray and --address local: the CPUs of a private Ray instance.",
    ),
]
AddressOpt = Annotated[
    str,
    typer.Option("--address", help="Ray cluster: auto, HOST:PORT, or local (a private one)."),
]


def _emit(data: Any, as_json: bool, table: Table | None = None) -> None:
    if as_json:
        sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
    elif table is not None:
        out.print(table)
    else:
        out.print_json(json.dumps(data, default=str))


def resolve_source(src: str) -> Path:
    """A policy path, or the name of a shipped profile whose reference policy is used."""
    p = Path(src)
    if p.exists():
        return p
    from compressor.core.config import list_shipped, load_profile, profile_policy_path

    if src in list_shipped("profiles"):
        ref = profile_policy_path(load_profile(src))
        if ref is not None and ref.is_file():
            return ref
    raise CompressorError(f"{src}: file not found (nor a shipped profile with a policy)")


def _load(src: str, env: str | None = None, vecnormalize: str | None = None) -> Any:
    from compressor.policy.loading import load_policy

    loaded = load_policy(resolve_source(src), env_id=env, vecnormalize=vecnormalize)
    for w in loaded.warnings:
        err.print(f"[yellow]warning:[/yellow] {escape(w)}")
    return loaded


def _settings(
    loaded: Any,
    profile: str | None,
    env: str | None,
    eps: float | None,
    norm: str | None,
    space: str | None,
) -> tuple[Any, Any]:
    """(profile, threat) for a single-stage command: explicit options override the profile."""
    from compressor.core.config import Profile, load_profile, profile_for_env
    from compressor.core.threat import ThreatModel

    env_id = env or loaded.policy.spec.env_id
    prof = load_profile(profile) if profile else (profile_for_env(env_id) if env_id else None)
    prof = prof or Profile()
    prof.env.id = env or prof.env.id or env_id
    if not prof.env.id:
        raise CompressorError("the policy names no environment: pass --env")
    if eps is None and prof.name == "default":
        err.print(f"[yellow]no profile for {prof.env.id}: using ε = {prof.threat.eps}[/yellow]")
    threat = ThreatModel(
        eps if eps is not None else prof.threat.eps,
        norm or prof.threat.norm,
        space or prof.threat.space,
    )
    return prof, threat


def _setup_torch() -> None:
    import torch

    torch.set_num_threads(1)


# ---- main job ---------------------------------------------------------------------------------
@app.command(rich_help_panel=PANEL_MAIN)
def run(
    sources: Annotated[
        list[str],
        typer.Argument(
            help="Policy file(s) (.pt, SB3 .zip, CleanRL), profile name(s), or folder(s) of "
            "policies: several make a batch, one run directory each and a summary table.",
            show_default=False,
        ),
    ],
    budget: Annotated[
        float, typer.Option(help="Fraction of the return scale that may be lost.")
    ] = 0.05,
    profile: ProfileOpt = None,
    target: Annotated[str, typer.Option(help="Deployment target name or TOML file.")] = "cpu-x86",
    out_dir: Annotated[Path, typer.Option("--out", help="Folder that receives the run.")] = Path(
        "runs"
    ),
    name: Annotated[str | None, typer.Option(help="Run name (default: the policy's stem).")] = None,
    prune_method: Annotated[
        str | None,
        typer.Option(
            "--prune-method",
            help="magnitude, micro, structured or random (default: the profile's prune.method).",
        ),
    ] = None,
    executor: ExecutorOpt = "local",
    workers: WorkersOpt = None,
    address: AddressOpt = "local",
    as_json: JsonOpt = False,
) -> None:
    """Measure, prune, fine-tune, certify and export: the whole compression job."""
    from compressor.core.config import load_target
    from compressor.core.executor import default_workers, make_executor
    from compressor.core.progress import Reporter
    from compressor.run.batch import BatchRow, expand_sources, run_batch
    from compressor.run.pipeline import run_pipeline

    if not sources:
        raise CompressorError("give a policy file, a profile name or a folder of policies")
    tgt = load_target(target)
    single = len(sources) == 1 and not Path(sources[0]).is_dir()
    paths = [resolve_source(sources[0])] if single else expand_sources(sources, resolve_source)
    if name is not None and not single:
        raise CompressorError("--name names one run; in a batch each run is named after its policy")
    ex = make_executor(executor, default_workers() if workers is None else workers, address)
    try:

        def run_one(path: Path, run_name: str | None) -> Any:
            return run_pipeline(
                path,
                budget=budget,
                profile=profile,
                target=tgt,
                out_root=out_dir,
                name=run_name,
                command=["compress", *sys.argv[1:]],
                reporter=Reporter(enabled=True),
                prune_method=prune_method,
                executor=ex,
            )

        if single:
            src = sources[0]
            result = run_one(paths[0], name or (src if not Path(src).exists() else None))
        else:

            def batch_one(path: Path, run_name: str) -> tuple[dict[str, Any], Path]:
                err.print(f"[bold]── {path} → {out_dir / run_name}[/bold]")
                res = run_one(path, run_name)
                return res.report, res.run_dir

            def show(row: BatchRow) -> None:
                if row.status == "error":
                    msg = f"{row.source}: {row.error}"
                    err.print(f"[red]error[/red] {escape(msg)}", highlight=False)

            rows = run_batch(paths, out_dir, batch_one, on_row=show)
    finally:
        ex.close()
    if not single:
        _batch_summary(rows, out_dir, as_json)
        if any(r.status == "error" for r in rows):
            raise typer.Exit(3)
        if any(r.status == "fail" for r in rows):
            raise typer.Exit(EXIT_BUDGET_NOT_MET)
        return
    r = result.report
    if as_json:
        _emit({"run_dir": str(result.run_dir), **r}, True)
    else:
        v = r["verdict"]
        colour = "green" if v["passed"] else "red"
        out.print(f"[bold {colour}]{'PASS' if v['passed'] else 'FAIL'}[/]: {v['summary']}")
        from compressor.report.render import noise_warning

        warn = noise_warning((r.get("derived") or {}).get("resolution"))
        if warn:
            out.print(f"[yellow]{escape(warn)}[/yellow]", highlight=False)
        out.print(f"run directory: {result.run_dir}")
        out.print(f"total time: {r['timings_s'].get('total', 0):.1f} s")
    if not result.passed:
        raise typer.Exit(EXIT_BUDGET_NOT_MET)


def _batch_summary(rows: list[Any], out_dir: Path, as_json: bool) -> None:
    from dataclasses import asdict

    from compressor.run.batch import SUMMARY_FILE

    if as_json:
        _emit({"runs": [asdict(r) for r in rows]}, True)
        return

    def num(x: float | None, spec: str = ".1f") -> str:
        return "–" if x is None else format(x, spec)

    t = Table(
        "policy",
        "env",
        "result",
        "sparsity",
        "clean",
        "robust",
        "Lipschitz",
        "ONNX B",
        "time s",
        title=f"batch summary (dense → chosen; {out_dir / SUMMARY_FILE})",
    )
    for r in rows:
        t.add_row(
            r.run_name,
            r.env_id or "–",
            r.status,
            num(r.chosen_sparsity, ".1%"),
            f"{num(r.dense_clean)} → {num(r.chosen_clean)}",
            f"{num(r.dense_robust)} → {num(r.chosen_robust)}",
            f"{num(r.dense_lipschitz, '.4g')} → {num(r.chosen_lipschitz, '.4g')}",
            num(r.onnx_bytes, "d"),
            num(r.wall_s),
        )
    wide = Console(width=max(out.width, 150)) if not out.is_terminal else out
    wide.print(t)
    for r in rows:
        if r.status == "error":
            wide.print(f"[red]error[/red] {r.run_name}: {escape(r.error or '')}", highlight=False)


@app.command(rich_help_panel=PANEL_MAIN)
def report(
    run_dir: Annotated[Path, typer.Argument(help="Run directory holding report.json.")],
) -> None:
    """Re-render report.md, report.html and plots/ from a run's report.json (no recomputation)."""
    from compressor.report.build import rerender, validate

    r = rerender(run_dir)
    for problem in validate(r):
        err.print(f"[yellow]schema:[/yellow] {escape(problem)}", highlight=False)
    for name in ("report.json", "report.md", "report.html"):
        out.print(f"wrote {run_dir / name}")


@app.command(rich_help_panel=PANEL_MAIN)
def compare(
    run_a: Annotated[Path, typer.Argument(help="First run directory.")],
    run_b: Annotated[Path, typer.Argument(help="Second run directory.")],
    as_json: JsonOpt = False,
) -> None:
    """Two runs side by side: verdict, returns, certificates, sizes (delta = B − A)."""
    from compressor.report.compare import compare_runs, fmt

    data = compare_runs(run_a, run_b)
    t = Table("metric", str(run_a), str(run_b), "B − A")
    for row in data["rows"]:
        t.add_row(row["metric"], fmt(row["a"]), fmt(row["b"]), fmt(row["delta"]))
    _emit(data, as_json, t)


# ---- single stages ----------------------------------------------------------------------------
@app.command(rich_help_panel=PANEL_STAGES)
def evaluate(
    src: Annotated[str, typer.Argument(help="Policy file.")],
    episodes: Annotated[int, typer.Option(help="Episodes (seeds seed..seed+N-1).")] = 10,
    seed: Annotated[int, typer.Option(help="First episode seed.")] = 0,
    env: EnvOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Clean return with deterministic actions: mean, std and 95% bootstrap CI."""
    from compressor.evaluate import evaluate as run_eval

    _setup_torch()
    if episodes < 1:
        raise CompressorError("--episodes must be at least 1")
    loaded = _load(src, env)
    env_id = env or loaded.policy.spec.env_id
    if not env_id:
        raise CompressorError("the policy names no environment: pass --env")
    res, _ = run_eval(
        loaded.policy.eval(),
        env_id,
        loaded.policy.spec.env_kwargs,
        list(range(seed, seed + episodes)),
    )
    s = res.stats
    t = Table("env", "episodes", "mean", "std", "95% CI")
    t.add_row(
        env_id, str(s.n), f"{s.mean:.1f}", f"{s.std:.1f}", f"{s.ci_low:.1f} – {s.ci_high:.1f}"
    )
    _emit({"env_id": env_id, **res.to_dict()}, as_json, t)


@app.command(rich_help_panel=PANEL_STAGES)
def attack(
    src: Annotated[str, typer.Argument(help="Policy file.")],
    attack_name: Annotated[
        str, typer.Option("--attack", help="Attack name, comma-separated names, or 'all'.")
    ] = "all",
    eps: EpsOpt = None,
    norm: NormOpt = None,
    space: SpaceOpt = None,
    episodes: Annotated[int, typer.Option(help="Episodes.")] = 10,
    seed: Annotated[int, typer.Option(help="First episode seed.")] = 0,
    save: Annotated[
        Path | None,
        typer.Option("--save", help="Folder for the learned adversaries' and RS's weights."),
    ] = None,
    warm_start: Annotated[
        Path | None,
        typer.Option("--warm-start", help="Folder of another policy's saved adversaries."),
    ] = None,
    train_steps: Annotated[
        int | None,
        typer.Option("--train-steps", help="Env steps per learned adversary (default: profile)."),
    ] = None,
    profile: ProfileOpt = None,
    env: EnvOpt = None,
    executor: ExecutorOpt = "local",
    workers: WorkersOpt = None,
    address: AddressOpt = "local",
    as_json: JsonOpt = False,
) -> None:
    """Return under observation attacks (policy-aware, in the ε-ball), with the TV reached.

    critic, rs, mad_rs, sa_rl and pa_ad train or need more than the policy: the critic attack
    needs the file's value function (skipped by 'all' when there is none); rs and mad_rs learn
    Q of the policy; sa_rl and pa_ad train a PPO adversary (budget: --train-steps or the
    profile's [attacks] learned_steps), saved under --save.
    """
    from compressor.attacks import ATTACKS, NEEDS_CRITIC, AttackBudget, AttackContext
    from compressor.core.executor import default_workers, make_executor
    from compressor.core.progress import Reporter
    from compressor.evaluate import evaluate_suite

    _setup_torch()
    if episodes < 1:
        raise CompressorError("--episodes must be at least 1")
    loaded = _load(src, env)
    prof, threat = _settings(loaded, profile, env, eps, norm, space)
    if attack_name == "all":
        names = [n for n in ATTACKS if loaded.critic is not None or n not in NEEDS_CRITIC]
        if loaded.critic is None:
            err.print("[yellow]no value function in this file: the critic attack is skipped")
    else:
        names = [n.strip() for n in attack_name.split(",") if n.strip()]
    for n in names:
        if n not in ATTACKS:
            raise CompressorError(f"unknown attack {n!r}; available: {', '.join(ATTACKS)}, all")
    budget = AttackBudget.from_section(prof.attacks)
    if train_steps is not None:
        budget.learned_steps = train_steps
    env_kwargs = dict(prof.env.kwargs or loaded.policy.spec.env_kwargs)
    ctx = AttackContext(
        loaded.policy.eval(),
        threat,
        prof.attacks.seed,
        critic=loaded.critic,
        env_id=prof.env.id,
        env_kwargs=env_kwargs,
        budget=budget,
        save_dir=save,
        warm_start=warm_start,
    )
    rep = Reporter()
    ex = make_executor(executor, default_workers() if workers is None else workers, address)
    with rep.stage("attacks", total=len(names) + 1) as upd:
        count = [0]

        def bump(_: str) -> None:
            upd(count[0])
            count[0] += 1

        try:
            suite = evaluate_suite(
                loaded.policy.eval(),
                prof.env.id,
                env_kwargs,
                list(range(seed, seed + episodes)),
                names,
                threat,
                attack_seed=prof.attacks.seed,
                on_stage=bump,
                executor=ex,
                context=ctx,
            )
        finally:
            ex.close()
    t = Table("attack", "mean return", "95% CI", "mean TV reached", "training")
    for r in [suite.clean, *suite.attacks.values()]:
        s = r.stats
        tv = "—" if r.mean_tv is None else f"{r.mean_tv:.3f}"
        t.add_row(
            r.attack, f"{s.mean:.1f}", f"{s.ci_low:.1f} – {s.ci_high:.1f}", tv, r.training_summary()
        )
    t.caption = f"{prof.env.id}, ε = {threat.eps} ({threat.norm}, {threat.space}), {episodes} ep."
    data = {"env_id": prof.env.id, "threat": vars(threat), **suite.to_dict()}
    _emit(data, as_json, t)


@app.command(rich_help_panel=PANEL_STAGES)
def certify(
    src: Annotated[str, typer.Argument(help="Policy file.")],
    eps: EpsOpt = None,
    norm: NormOpt = None,
    space: SpaceOpt = None,
    tau: Annotated[float, typer.Option(help="TV threshold of the certified radius.")] = 0.1,
    states: Annotated[
        int, typer.Option(help="Visited states for the empirical (PGD) TV; 0: none.")
    ] = 0,
    profile: ProfileOpt = None,
    env: EnvOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Certified robustness: the global absolute-product bound (and PGD's empirical TV)."""
    from compressor.certify.global_bound import certify_global
    from compressor.evaluate import evaluate as run_eval

    _setup_torch()
    loaded = _load(src, env)
    pol = loaded.policy.eval()
    prof, threat = _settings(loaded, profile, env, eps, norm, space)
    cert = certify_global(pol, threat, tau)
    data: dict[str, Any] = {"env_id": prof.env.id, "global": cert.to_dict()}
    t = Table("quantity", "value")
    t.add_row(
        "threat", f"ℓ{'∞' if threat.norm == 'inf' else '2'}, ε = {threat.eps} ({threat.space})"
    )
    t.add_row(f"certified {cert.shift_name} per unit ε", f"{cert.lipschitz:.4g}")
    t.add_row("certified shift at ε", f"{cert.shift_bound:.4g}")
    t.add_row("certified TV at ε", "n/a" if cert.tv_bound is None else f"{cert.tv_bound:.4f}")
    t.add_row(f"certified radius ε*(τ={tau})", f"{cert.certified_radius}")
    for k, v in cert.comparison.items():
        t.add_row(f"{k} ({'monotone' if v['monotone'] else 'NOT monotone'})", f"{v['value']:.4g}")
    if states > 0:
        import numpy as np

        from compressor.certify.at_states import certify_states

        n_eps = max(1, min(20, states // 200))
        _, roll = run_eval(
            pol,
            prof.env.id,
            dict(prof.env.kwargs or pol.spec.env_kwargs),
            list(range(20_000, 20_000 + n_eps)),
            record_states=True,
        )
        assert roll.states is not None
        idx = np.random.default_rng(0).permutation(len(roll.states))[:states]
        for method in ("crown", "ibp"):
            sc = certify_states(
                pol,
                roll.states[idx],
                threat,
                tau=tau,
                method=method,
                empirical_states=min(states, 200) if method == "crown" else 0,
            )
            data[f"local_{method}"] = sc
            loc = sc["local"]
            t.add_row(
                f"local {method.upper()} certified TV over {loc['n_states']} visited states: "
                "median / p95",
                f"{loc.get('tv_median', float('nan')):.4f} / "
                f"{loc.get('tv_p95', float('nan')):.4f} ({loc['seconds']:.2f} s)",
            )
            if "empirical" in sc:
                emp = sc["empirical"]
                t.add_row(
                    f"empirical (PGD) TV over {emp['n_states']} states: median / max",
                    f"{emp['tv_median']:.4f} / {emp['tv_max']:.4f}",
                )
                t.add_row(
                    "certified / empirical, median over states (TV; shift)",
                    f"{sc.get('ratio_tv_median', float('nan')):.2f}; "
                    f"{sc.get('ratio_shift_median', float('nan')):.2f}",
                )
    _emit(data, as_json, t)


@app.command(rich_help_panel=PANEL_STAGES)
def prune(
    src: Annotated[str, typer.Argument(help="Policy file.")],
    sparsity: Annotated[float, typer.Option(help="Fraction of weights to remove, in [0, 1).")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Output native .pt file.")],
    method: Annotated[
        str, typer.Option(help="magnitude, micro (needs fine-tuning), structured or random.")
    ] = "magnitude",
    scope: Annotated[str, typer.Option(help="global or layer.")] = "global",
    finetune: Annotated[bool, typer.Option(help="Distil from the dense policy afterwards.")] = True,
    profile: ProfileOpt = None,
    env: EnvOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Prune (masks kept through fine-tuning) and save the pruned policy."""
    import dataclasses

    from compressor.evaluate import evaluate as run_eval
    from compressor.policy.loading import save_loaded
    from compressor.prune.criteria import prune as do_prune
    from compressor.run.pipeline import prune_candidate, student_state_collector

    _setup_torch()
    loaded = _load(src, env)
    dense = loaded.policy.eval()
    info: dict[str, Any] = {}
    if finetune:
        prof, threat = _settings(loaded, profile, env, None, None, None)
        prof = dataclasses.replace(
            prof, prune=dataclasses.replace(prof.prune, method=method, scope=scope)
        )
        f = prof.finetune
        env_kwargs = dict(prof.env.kwargs or dense.spec.env_kwargs)
        _, roll = run_eval(
            dense,
            prof.env.id,
            env_kwargs,
            list(range(f.state_seed, f.state_seed + f.state_episodes)),
            record_states=True,
        )
        assert roll.states is not None
        collect = student_state_collector(prof, env_kwargs, prof.evaluation.num_envs)
        pruned, stats = prune_candidate(
            dense,
            sparsity,
            prof,
            roll.states,
            threat,
            collect,
            critic=loaded.critic,
            env_kwargs=env_kwargs,
        )
        info["finetune"] = stats.to_dict()
    elif method == "micro":
        raise CompressorError("--method micro cuts while fine-tuning: drop --no-finetune")
    else:
        pruned = do_prune(dense, sparsity, method, scope)
    info = {"sparsity": pruned.sparsity(), "output": str(output), **info}
    loaded.policy = pruned
    save_loaded(loaded, output)
    _emit(info, as_json)


@app.command(rich_help_panel=PANEL_STAGES)
def export(
    src: Annotated[str, typer.Argument(help="Policy file.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Output .onnx file.")],
    target: Annotated[str, typer.Option(help="Deployment target name or TOML file.")] = "cpu-x86",
    sparse_storage: Annotated[
        bool | None,
        typer.Option(
            "--sparse-storage/--dense-storage",
            help="Store sparse weights as bitmask + values (default: the target's setting).",
        ),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Export one ONNX graph (normalise, clip, MLP, deterministic action, action clip)."""
    import dataclasses

    from compressor.core.config import load_target
    from compressor.deploy.export import export_onnx

    loaded = _load(src)
    tgt = load_target(target)
    res = export_onnx(
        loaded.policy.eval(),
        output,
        metadata={"target": tgt.name},
        opset=tgt.opset,
        sparse_storage=tgt.sparse_storage if sparse_storage is None else sparse_storage,
    )
    data = {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(res).items()}
    data["weight_storage_note"] = res.weight_storage_note
    _emit(data, as_json, None)


# ---- policies ---------------------------------------------------------------------------------
@app.command(rich_help_panel=PANEL_STAGES)
def bench(
    model: Annotated[Path, typer.Argument(help="Exported .onnx model (fp32 or quantised).")],
    target: Annotated[str, typer.Option(help="Deployment target name or TOML file.")] = "cpu-x86",
    policy: Annotated[
        str | None, typer.Option("--policy", help="Torch policy to time beside it (eager act).")
    ] = None,
    iters: Annotated[int, typer.Option(help="Timed calls per batch size.")] = 2000,
    warmup: Annotated[int, typer.Option(help="Untimed calls per batch size first.")] = 200,
    allow_fallback: Annotated[
        bool,
        typer.Option(
            "--allow-fallback",
            help="Run without a provider the target names but onnxruntime lacks (recorded).",
        ),
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Latency percentiles at batch 1 and the target's batch, providers used, params, FLOPs."""
    from compressor.deploy.bench import bench_model

    pol = _load(policy).policy.eval() if policy else None
    res = bench_model(model, target, pol, warmup=warmup, iters=iters, allow_fallback=allow_fallback)
    if res.fallback:
        err.print(f"[yellow]fallback:[/yellow] {escape(str(res.fallback))}")
    t = Table("batch", "p50 ms", "p95 ms", "p99 ms", "torch p50 ms", "onnx ÷ torch")
    for b, s in res.onnx.items():
        ts = res.torch.get(b)
        ratio = res.ratio_to_torch(b)
        t.add_row(
            str(b),
            f"{s.p50_ms:.4f}",
            f"{s.p95_ms:.4f}",
            f"{s.p99_ms:.4f}",
            f"{ts.p50_ms:.4f}" if ts else "–",
            f"{ratio:.2f}" if ratio is not None else "–",
        )
    t.caption = (
        f"{res.model}: {res.file_bytes} bytes, {res.params} params "
        f"({res.params_nonzero} non-zero), {res.flops} FLOPs/obs, weights "
        f"{'/'.join(res.weight_storage)}; target {res.target}, providers used "
        f"{', '.join(res.providers_used)}, {res.threads} thread(s)"
    )
    _emit(res.to_dict(), as_json, t)


@app.command(rich_help_panel=PANEL_STAGES)
def quantize(
    src: Annotated[str, typer.Argument(help="Policy file the model is exported from.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Output quantised .onnx file.")],
    mode: Annotated[
        str, typer.Option(help="int8 (dynamic), qdq (static, calibrated), fp16 or int8w.")
    ] = "int8",
    fp32: Annotated[
        Path | None, typer.Option("--fp32", help="fp32 export to start from (default: export SRC).")
    ] = None,
    target: Annotated[str, typer.Option(help="Deployment target name or TOML file.")] = "cpu-x86",
    episodes: Annotated[
        int, typer.Option(help="Episodes re-evaluated through onnxruntime (0: skip).")
    ] = 3,
    attack_name: Annotated[
        str, typer.Option("--attack", help="Transfer attack name, 'all' or 'none'.")
    ] = "all",
    first_layer: Annotated[
        bool, typer.Option("--first-layer", help="Also quantise the observation (int8, qdq).")
    ] = False,
    eps: EpsOpt = None,
    norm: NormOpt = None,
    space: SpaceOpt = None,
    profile: ProfileOpt = None,
    env: EnvOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Quantise an export, re-certify it on its own weights, re-evaluate it in onnxruntime."""
    from compressor.core.threat import ThreatModel
    from compressor.deploy.quantize import quantize_policy, transfer_attacks

    _setup_torch()
    if episodes < 0:
        raise CompressorError("--episodes must be 0 or more")
    names = transfer_attacks(attack_name)
    loaded = _load(src, env)
    pol = loaded.policy.eval()
    if episodes > 0 or mode == "qdq" or eps is None:
        prof, threat = _settings(loaded, profile, env, eps, norm, space)
    else:  # certificate only, at the given ε: no environment needed
        prof, threat = None, ThreatModel(eps, norm or "inf", space or "normalized")
    env_run: dict[str, Any] = {}
    if prof is not None:
        ev, state_seed = prof.evaluation, prof.finetune.state_seed
        env_run = {
            "env_id": prof.env.id,
            "env_kwargs": dict(prof.env.kwargs or pol.spec.env_kwargs),
            "eval_seeds": range(ev.seed, ev.seed + episodes),
            "num_envs": ev.num_envs,
            # qdq calibrates on states the policy visits, on seeds apart from the evaluation's
            "calibration_seeds": range(state_seed, state_seed + max(episodes, 3))
            if mode == "qdq"
            else (),
        }
    report = quantize_policy(
        pol,
        output,
        mode,
        threat=threat,
        fp32=fp32,
        target=target,
        attacks=names,
        quantize_first_layer=first_layer,
        **env_run,
    )
    t = Table("", "quantised", "fp32")
    for row in report.summary_rows():
        t.add_row(*row)
    _emit(report.to_dict(), as_json, t)


@app.command(rich_help_panel=PANEL_POLICIES)
def inspect(
    src: Annotated[str, typer.Argument(help="Policy file.")],
    env: EnvOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Show what was found in a policy file: kind, layers, activation, normalisation, env."""
    from compressor.policy.loading import describe

    d = describe(_load(src, env))
    t = Table("field", "value", show_header=False)
    for k, v in d.items():
        t.add_row(k, json.dumps(v, default=str) if isinstance(v, (dict, list)) else str(v))
    _emit(d, as_json, t)


@app.command(name="import", rich_help_panel=PANEL_POLICIES)
def import_(
    src: Annotated[str, typer.Argument(help="SB3 zip, CleanRL model, or state dict + spec.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Output native .pt file.")],
    vecnormalize: Annotated[str | None, typer.Option(help="vecnormalize.pkl / stats file.")] = None,
    env: EnvOpt = None,
) -> None:
    """Convert a policy to the native format (loads with torch.load(weights_only=True))."""
    from compressor.policy.loading import save_loaded

    loaded = _load(src, env, vecnormalize)
    save_loaded(loaded, output)
    out.print(f"wrote {output} ({loaded.format} → native)")


@app.command(rich_help_panel=PANEL_POLICIES)
def train(
    env_id: Annotated[str, typer.Argument(help="Gymnasium env id, e.g. Hopper-v5.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Output native .pt file.")],
    steps: Annotated[int, typer.Option(help="Total env steps.")] = 1_000_000,
    seed: Annotated[int, typer.Option(help="Training seed.")] = 1,
    hidden: Annotated[str, typer.Option(help="Hidden widths, comma-separated.")] = "64,64",
    activation: Annotated[str, typer.Option(help="tanh, relu or elu.")] = "tanh",
    num_envs: Annotated[int, typer.Option(help="Parallel envs.")] = 8,
    num_steps: Annotated[int, typer.Option(help="Steps per env per update.")] = 256,
    lr: Annotated[float, typer.Option(help="Adam learning rate.")] = 3e-4,
    minibatches: Annotated[int, typer.Option(help="Minibatches per epoch.")] = 32,
    epochs: Annotated[int, typer.Option(help="Epochs per update.")] = 10,
    ent_coef: Annotated[float, typer.Option(help="Entropy bonus.")] = 0.0,
    norm_reward: Annotated[bool, typer.Option(help="Scale rewards by return std.")] = True,
    eval_episodes: Annotated[int, typer.Option(help="Deterministic evaluation episodes.")] = 10,
    env_kwargs: Annotated[
        str | None,
        typer.Option(
            "--env-kwargs",
            help='JSON object of gymnasium.make kwargs, e.g. \'{"include_cfrc_ext_in_observation": '
            "false}'; recorded in the policy's spec.",
        ),
    ] = None,
) -> None:
    """Train a dense reference policy with PPO (Gaussian or categorical, by action space)."""
    from compressor.core.progress import Reporter
    from compressor.evaluate import evaluate as run_eval
    from compressor.rl.ppo import PPOConfig, check_config, save_trained, train_ppo

    _setup_torch()
    try:
        widths = [int(h) for h in hidden.split(",") if h.strip()]
    except ValueError:
        raise CompressorError(
            f"--hidden must be comma-separated integers, got {hidden!r}"
        ) from None
    try:
        kwargs = json.loads(env_kwargs) if env_kwargs else {}
    except json.JSONDecodeError as exc:
        raise CompressorError(f"--env-kwargs is not valid JSON: {exc.msg}") from None
    if not isinstance(kwargs, dict):
        raise CompressorError("--env-kwargs must be a JSON object")
    cfg = PPOConfig(
        env_id=env_id,
        env_kwargs=kwargs,
        total_steps=steps,
        seed=seed,
        hidden=widths,
        activation=activation,
        num_envs=num_envs,
        num_steps=num_steps,
        lr=lr,
        minibatches=minibatches,
        epochs=epochs,
        ent_coef=ent_coef,
        norm_reward=norm_reward,
        eval_episodes=eval_episodes,
    )
    check_config(cfg)
    rep = Reporter()
    with rep.stage("train", total=steps) as upd:
        pol, critic, stats = train_ppo(cfg, lambda s, _r: upd(s))
    seeds = list(range(cfg.eval_seed, cfg.eval_seed + eval_episodes))
    res, _ = run_eval(pol, env_id, kwargs, seeds)
    stats["eval"] = res.to_dict()["return"]
    stats["command"] = ["compress", *sys.argv[1:]]
    save_trained(pol, critic, cfg, stats, output)
    out.print(
        f"wrote {output}: deterministic return {res.stats.mean:.1f} over {eval_episodes} "
        f"episodes (seeds {cfg.eval_seed}–{cfg.eval_seed + eval_episodes - 1})"
    )


def main() -> None:
    """Console entry point: user errors become one line on stderr and a distinct exit code."""
    # torch warns about the pickle protocol of files it then reads fine or refuses cleanly
    warnings.filterwarnings("ignore", message="Detected pickle protocol")
    try:
        app()
    except CompressorError as exc:
        message = escape(str(exc))
        err.print(f"[bold red]error:[/bold red] {message}", highlight=False, soft_wrap=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
