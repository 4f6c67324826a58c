"""The ``compress`` command line. Results go to stdout (``--json``: one JSON document),
progress bars and notes to stderr. Exit codes: 0 ok, 2 usage, 3 bad input, 4 budget not met.

The commands live beside this file by panel (run.py, stages.py, policies.py; deployment here);
each parses its options, calls one function of the package, and prints.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from compressor.cli import policies, run, stages  # noqa: F401  (registers their commands)
from compressor.cli.common import (
    PANEL_STAGES,
    EnvOpt,
    EpsOpt,
    JsonOpt,
    NormOpt,
    ProfileOpt,
    SpaceOpt,
    app,
    emit,
    err,
    note,
    setup_torch,
)
from compressor.core.errors import CompressorError


def _load(src: str, env: str | None = None) -> Any:
    from compressor.api import load

    return load(src, env_id=env, note=note)


def _settings(
    loaded: Any,
    profile: str | None,
    env: str | None,
    eps: float | None,
    norm: str | None,
    space: str | None,
) -> tuple[Any, Any]:
    """(profile, threat) for a deployment command: explicit options override the profile."""
    from compressor.run.settings import resolve_settings

    s = resolve_settings(
        loaded.policy, profile, env_id=env, eps=eps, norm=norm, space=space, note=note
    )
    return s.profile, s.threat


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
    emit(data, as_json, None)


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
    emit(res.to_dict(), as_json, t)


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
    import tempfile

    from compressor.attacks import ATTACKS, NEEDS_CRITIC, TRAINED
    from compressor.core.config import load_target
    from compressor.core.threat import ThreatModel
    from compressor.deploy.export import export_onnx
    from compressor.deploy.quantize import OnnxActor, evaluate_onnx, quantize_model
    from compressor.rl.rollout import rollout

    setup_torch()
    if episodes < 0:
        raise CompressorError("--episodes must be 0 or more")
    cheap = [n for n in ATTACKS if n not in (*TRAINED, *NEEDS_CRITIC)]
    names = [] if attack_name == "none" else cheap if attack_name == "all" else [attack_name]
    for n in names:
        if n not in cheap:
            raise CompressorError(
                f"unknown transfer attack {n!r}; available: {', '.join(cheap)}, all, none"
            )
    loaded = _load(src, env)
    pol = loaded.policy.eval()
    tgt = load_target(target)
    with tempfile.TemporaryDirectory(prefix="compress-quantize-") as tmp:
        needs_env = episodes > 0 or mode == "qdq"
        if needs_env or eps is None:
            prof, threat = _settings(loaded, profile, env, eps, norm, space)
        else:  # certificate only, at the given ε: no environment needed
            prof, threat = None, ThreatModel(eps, norm or "inf", space or "normalized")
        fp32_path = fp32
        if fp32_path is None:
            meta = {
                "target": tgt.name,
                "eps": str(threat.eps),
                "norm": threat.norm,
                "eps_space": threat.space,
            }
            fp32_path = export_onnx(
                pol, Path(tmp) / "fp32.onnx", metadata=meta, opset=tgt.opset
            ).path
        calib = None
        env_kwargs: dict[str, Any] = {}
        if prof is not None:
            env_kwargs = dict(prof.env.kwargs or pol.spec.env_kwargs)
            if mode == "qdq":
                # calibrate on states the policy visits, on seeds apart from the evaluation's
                f = prof.finetune
                seeds = list(range(f.state_seed, f.state_seed + max(episodes, 3)))
                calib = rollout(pol, prof.env.id, env_kwargs, seeds, record_states=True).states
        res = quantize_model(
            pol, fp32_path, output, mode, calib, threat=threat, quantize_first_layer=first_layer
        )
        data: dict[str, Any] = res.to_dict()
        evals: dict[str, Any] = {}
        if episodes > 0 and prof is not None:
            seeds = list(range(prof.evaluation.seed, prof.evaluation.seed + episodes))
            kw = dict(attacks=names, threat=threat, num_envs=prof.evaluation.num_envs)
            evals["quantized"] = evaluate_onnx(
                OnnxActor(output), prof.env.id, env_kwargs, seeds, surrogate=res.dequantized, **kw
            )
            evals["fp32"] = evaluate_onnx(
                OnnxActor(fp32_path), prof.env.id, env_kwargs, seeds, surrogate=pol, **kw
            )
            data["evaluation"] = {k: v.to_dict() for k, v in evals.items()}
    cert = res.certificate
    fp = cert.get("fp32_for_comparison", {})
    t = Table("", "quantised", "fp32")
    t.add_row(
        "mode / file bytes", f"{res.mode} / {res.file_bytes}", f"fp32 / {res.fp32_file_bytes}"
    )
    t.add_row("max |Δaction| vs torch fp32 (batch 1)", f"{res.parity_max_abs_err:.2e}", "–")
    t.add_row(
        f"certified shift per ε ({cert['shift_name']})",
        f"{cert['lipschitz']:.4g}",
        f"{fp.get('lipschitz', float('nan')):.4g}",
    )
    t.add_row("additive shift from activation rounding", f"{cert['additive']:.4g}", "0")

    def radius(c: dict[str, Any]) -> str:
        if c.get("radius_unbounded"):
            return "unbounded"
        return "–" if c.get("certified_radius") is None else f"{c['certified_radius']:.4g}"

    t.add_row(f"certified radius (TV ≤ {cert['tau']})", radius(cert), radius(fp))
    for name in (["clean"] + names) if evals else []:
        q, f_ = (
            evals[k].clean if name == "clean" else evals[k].attacks[name]
            for k in ("quantized", "fp32")
        )
        t.add_row(
            f"return, {name}{' (transfer)' if name != 'clean' else ''}, {episodes} ep",
            f"{q.stats.mean:.1f}",
            f"{f_.stats.mean:.1f}",
        )
    emit(data, as_json, t)


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
