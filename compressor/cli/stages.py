"""Single stages: ``evaluate``, ``attack``, ``certify``, ``prune``. Each parses its options,
calls one function of :mod:`compressor.api`, and prints the result."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from compressor.cli.common import (
    PANEL_STAGES,
    AddressOpt,
    EnvOpt,
    EpsOpt,
    ExecutorOpt,
    JsonOpt,
    NormOpt,
    ProfileOpt,
    SpaceOpt,
    SrcArg,
    WorkersOpt,
    app,
    emit,
    note,
    reporter,
    setup_torch,
)

EpisodesOpt = Annotated[
    int | None, typer.Option(help="Episodes (default: the profile's evaluation.episodes).")
]
SeedOpt = Annotated[int | None, typer.Option(help="First episode seed (default: the profile's).")]


@app.command(rich_help_panel=PANEL_STAGES)
def evaluate(
    src: SrcArg,
    episodes: EpisodesOpt = None,
    seed: SeedOpt = None,
    profile: ProfileOpt = None,
    env: EnvOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Clean return with deterministic actions: mean, std and 95% bootstrap CI."""
    from compressor.api import evaluate_policy

    setup_torch()
    ev = evaluate_policy(src, episodes=episodes, seed=seed, env_id=env, profile=profile, note=note)
    s = ev.result.stats
    t = Table("env", "episodes", "mean", "std", "95% CI")
    t.add_row(
        ev.env_id, str(s.n), f"{s.mean:.1f}", f"{s.std:.1f}", f"{s.ci_low:.1f} – {s.ci_high:.1f}"
    )
    emit(ev.to_dict(), as_json, t)


@app.command(rich_help_panel=PANEL_STAGES)
def attack(
    src: SrcArg,
    attack_name: Annotated[
        str, typer.Option("--attack", help="Attack name, comma-separated names, or 'all'.")
    ] = "all",
    eps: EpsOpt = None,
    norm: NormOpt = None,
    space: SpaceOpt = None,
    episodes: EpisodesOpt = None,
    seed: SeedOpt = None,
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
    attack_time: Annotated[
        str | None,
        typer.Option(
            "--attack-time",
            help="Time budget per learned adversary: seconds or e.g. '10m' (default: profile "
            "[attacks] learned_time); training stops at it or at the step count, first.",
        ),
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
    from compressor.api import attack_policy
    from compressor.core.executor import default_workers, make_executor

    setup_torch()
    ex = make_executor(executor, default_workers() if workers is None else workers, address)
    try:
        with reporter().stage("attacks") as progress:
            rep = attack_policy(
                src,
                attacks=attack_name,
                eps=eps,
                norm=norm,
                space=space,
                episodes=episodes,
                seed=seed,
                save=save,
                warm_start=warm_start,
                train_steps=train_steps,
                attack_time=attack_time,
                profile=profile,
                env_id=env,
                executor=ex,
                progress=progress,
                note=note,
            )
    finally:
        ex.close()
    for name, why in rep.skipped.items():
        note(f"{name} skipped: {why}")
    t = Table("attack", "mean return", "95% CI", "mean TV reached", "training")
    suite, threat = rep.suite, rep.threat
    for r in [suite.clean, *suite.attacks.values()]:
        s = r.stats
        tv = "—" if r.mean_tv is None else f"{r.mean_tv:.3f}"
        bad = suite.failed(r.attack) if r.attack in suite.attacks else None
        ret, ci = (
            (f"failed: {bad}", "—")
            if bad
            else (f"{s.mean:.1f}", f"{s.ci_low:.1f} – {s.ci_high:.1f}")
        )
        t.add_row(r.attack, ret, ci, tv, r.training_summary())
    n = suite.clean.stats.n
    t.caption = f"{rep.env_id}, ε = {threat.eps} ({threat.norm}, {threat.space}), {n} ep."
    emit(rep.to_dict(), as_json, t)


@app.command(rich_help_panel=PANEL_STAGES)
def certify(
    src: SrcArg,
    eps: EpsOpt = None,
    norm: NormOpt = None,
    space: SpaceOpt = None,
    tau: Annotated[float, typer.Option(help="TV threshold of the certified radius.")] = 0.1,
    states: Annotated[
        int,
        typer.Option(
            help="Visited states for the deployed-action and local certificates and PGD; 0: none."
        ),
    ] = 0,
    tolerance: Annotated[
        float | None,
        typer.Option(
            help="Deployed action's tolerance δ (default: the profile's, 0.05 of the range)."
        ),
    ] = None,
    tolerance_units: Annotated[
        str | None, typer.Option(help="δ's units: 'range' (fraction) or 'action'.")
    ] = None,
    profile: ProfileOpt = None,
    env: EnvOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Certified robustness: the deployed action at visited states (with --states), the global
    absolute-product bound (worst case over all states), and the TV bounds."""
    from compressor.api import certify_policy

    setup_torch()
    rep = certify_policy(
        src,
        eps=eps,
        norm=norm,
        space=space,
        tau=tau,
        states=states,
        profile=profile,
        env_id=env,
        note=note,
        tolerance=tolerance,
        tolerance_units=tolerance_units,
    )
    cert, threat = rep.certificate, rep.threat
    t = Table("quantity", "value")
    t.add_row(
        "threat", f"ℓ{'∞' if threat.norm == 'inf' else '2'}, ε = {threat.eps} ({threat.space})"
    )
    for method, dc in rep.deployed.items():
        deployed_rows(t, method, dc)
    w = "worst case over all states"
    t.add_row(f"global: certified {cert.shift_name} per unit ε ({w})", f"{cert.lipschitz:.4g}")
    t.add_row(f"global: certified shift at ε ({w})", f"{cert.shift_bound:.4g}")
    tv = "n/a" if cert.tv_bound is None else f"{cert.tv_bound:.4f}"
    t.add_row(f"global: certified TV at ε ({w})", tv)
    t.add_row(f"global: certified radius ε*(τ={tau}) ({w})", f"{cert.certified_radius}")
    for k, v in cert.comparison.items():
        t.add_row(f"{k} ({'monotone' if v['monotone'] else 'NOT monotone'})", f"{v['value']:.4g}")
    for method, sc in rep.local.items():
        _local_rows(t, method, sc)
    emit(rep.to_dict(), as_json, t)


def _vec(v: list[float]) -> str:
    return "[" + ", ".join(f"{x:.3g}" for x in v) + "]"


def deployed_rows(t: Table, method: str, dc: Any) -> None:
    """Rows of the deployed-action certificate (:class:`DeployedCertificate`)."""
    s = dc.summary()
    m = method.upper()
    n = s["n_states"]
    if n == 0:
        return
    if dc.argmax_certified is None:
        dev = s["deviation"]
        t.add_row(
            f"deployed action: {m} certified max|Δa| at ε over {n} states, per dim, "
            "median / p95 (action units)",
            f"{_vec(dev['median'])} / {_vec(dev['p95'])}",
        )
        if "deviation_frac_range" in s:
            fr = s["deviation_frac_range"]
            t.add_row(
                f"deployed action: {m} certified max|Δa| / action range, median / p95",
                f"{_vec(fr['median'])} / {_vec(fr['p95'])}",
            )
        if "empirical_deviation" in s:
            e = s["empirical_deviation"]
            t.add_row(
                f"deployed action: PGD max|Δa| over {s['n_empirical_states']} states, median / max",
                f"{_vec(e['median'])} / {_vec(e['max'])}",
            )
        what = f"within δ = {_vec(list(dc.tolerance))}"
    else:
        what = "argmax cannot change"
        if "empirical_frac_flipped" in s:
            t.add_row(
                f"deployed action: PGD flipped the action at (of {s['n_empirical_states']})",
                f"{100 * s['empirical_frac_flipped']:.1f}%",
            )
    t.add_row(
        f"deployed action: {m} states certified at ε ({what})",
        f"{100 * s['frac_certified_at_eps']:.1f}%",
    )
    r = s["radius"]
    t.add_row(
        f"deployed action: {m} certified radius ({what}), median / p95 / max",
        f"{r['median']:.4g} / {r['p95']:.4g} / {r['max']:.4g} (cap {dc.radius_cap:.4g})",
    )
    if dc.sound is not None:
        t.add_row(
            "deployed action: certified ≥ PGD at every state",
            "yes" if dc.sound else "VIOLATED (a bug: please report)",
        )


def _local_rows(t: Table, method: str, sc: dict[str, Any]) -> None:
    loc = sc["local"]
    t.add_row(
        f"local {method.upper()} certified TV over {loc['n_states']} visited states: median / p95",
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


@app.command(rich_help_panel=PANEL_STAGES)
def prune(
    src: SrcArg,
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
    from compressor.api import prune_policy

    setup_torch()
    rep = prune_policy(
        src,
        sparsity,
        output=output,
        method=method,
        scope=scope,
        finetune=finetune,
        profile=profile,
        env_id=env,
        note=note,
    )
    emit(rep.to_dict(), as_json)
