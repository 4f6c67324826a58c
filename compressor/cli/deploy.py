"""Deployment: ``export`` one ONNX graph, ``bench`` it on a target, ``quantize`` it (and
re-certify and re-evaluate the quantised file)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from compressor.cli.checks import check_path
from compressor.cli.common import (
    PANEL_STAGES,
    EnvOpt,
    EpsOpt,
    JsonOpt,
    NormOpt,
    ProfileOpt,
    SpaceOpt,
    SrcArg,
    TargetOpt,
    app,
    emit,
    err,
    note,
    out,
    setup_torch,
    source,
)


def _load(src: str, env: str | None = None) -> Any:
    from compressor.api import load

    return load(src, env_id=env, note=note)


@app.command(rich_help_panel=PANEL_STAGES)
def export(
    src: SrcArg,
    output: Annotated[Path, typer.Option("-o", "--output", help="Output .onnx file.")],
    target: TargetOpt = "cpu-x86",
    sparse_storage: Annotated[
        bool | None,
        typer.Option(
            "--sparse-storage/--dense-storage",
            help="Store sparse weights as bitmask + values (default: the target's setting).",
        ),
    ] = None,
    env: EnvOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Export one ONNX graph (normalise, clip, MLP, deterministic action, action clip)."""
    import dataclasses

    from compressor.core.config import load_target
    from compressor.deploy.export import export_onnx

    loaded = _load(src, env)
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
    model: Annotated[
        Path, typer.Argument(metavar="MODEL", help="Exported .onnx model (fp32 or quantised).")
    ],
    target: TargetOpt = "cpu-x86",
    policy: Annotated[
        str | None,
        typer.Option(
            "--policy",
            help="Torch policy to time beside it (eager act).",
            callback=lambda v: None if v is None else source(v),
        ),
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
    env: EnvOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Latency percentiles at batch 1 and the target's batch, providers used, params, FLOPs."""
    from compressor.deploy.bench import bench_model

    check_path(model, "ONNX model", ".onnx")
    pol = _load(policy, env).policy.eval() if policy else None
    res = bench_model(model, target, pol, warmup=warmup, iters=iters, allow_fallback=allow_fallback)
    if res.fallback:
        err.print(f"[yellow]fallback:[/yellow] {escape(str(res.fallback))}")
    if as_json:
        emit(res.to_dict(), True)
        return
    t = Table("batch", "p50 ms", "p95 ms", "p99 ms", "torch p50 ms", "onnxruntime vs torch")
    for b, s in res.onnx.items():
        ts = res.torch.get(b)
        t.add_row(
            str(b),
            f"{s.p50_ms:.4f}",
            f"{s.p95_ms:.4f}",
            f"{s.p99_ms:.4f}",
            f"{ts.p50_ms:.4f}" if ts else "–",
            _speedup(res.ratio_to_torch(b)),
        )
    out.print(t)
    # one line per fact, below the table (a caption wraps to the table's width mid-phrase)
    for line in (
        f"model: {res.model}, {res.file_bytes} bytes",
        f"parameters: {res.params} ({res.params_nonzero} non-zero), {res.flops} FLOPs per "
        f"observation, weights stored {'/'.join(res.weight_storage)}",
        f"target: {res.target}, providers used {', '.join(res.providers_used)}, "
        f"{res.threads} thread(s)",
    ):
        out.print(escape(line), highlight=False)


def _speedup(ratio: float | None) -> str:
    """onnxruntime p50 ÷ torch p50 as a person says it ("11× faster", "1.3× slower")."""
    if ratio is None or ratio <= 0:
        return "–"
    if ratio == 1:
        return "as fast"
    factor = 1 / ratio if ratio < 1 else ratio
    times = f"{factor:.0f}×" if factor >= 10 else f"{factor:.1f}×"
    return f"{times} {'faster' if ratio < 1 else 'slower'}"


@app.command(rich_help_panel=PANEL_STAGES)
def quantize(
    src: Annotated[
        str,
        typer.Argument(
            metavar="SRC",
            help="Policy file the model is exported from.",
            callback=source,
        ),
    ],
    output: Annotated[Path, typer.Option("-o", "--output", help="Output quantised .onnx file.")],
    mode: Annotated[
        str, typer.Option(help="int8 (dynamic), qdq (static, calibrated), fp16 or int8w.")
    ] = "int8",
    fp32: Annotated[
        Path | None, typer.Option("--fp32", help="fp32 export to start from (default: export SRC).")
    ] = None,
    target: TargetOpt = "cpu-x86",
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
    from compressor.api import quantize as run_quantize

    setup_torch()
    report = run_quantize(
        src,
        output,
        mode,
        fp32=fp32,
        target=target,
        episodes=episodes,
        attacks=attack_name,
        first_layer=first_layer,
        eps=eps,
        norm=norm,
        space=space,
        profile=profile,
        env_id=env,
        note=note,
    )
    t = Table("", "quantised", "fp32")
    for row in report.summary_rows():
        t.add_row(*row)
    emit(report.to_dict(), as_json, t)
