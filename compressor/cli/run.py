"""The main job: ``compress run`` (one policy or a batch), ``report`` and ``compare``."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from compressor.cli.checks import check_path
from compressor.cli.common import (
    PANEL_MAIN,
    AddressOpt,
    BudgetOpt,
    EnvOpt,
    ExecutorOpt,
    JsonOpt,
    ProfileOpt,
    SourcesArg,
    TargetOpt,
    WorkersOpt,
    app,
    command_line,
    emit,
    err,
    out,
    reporter,
)
from compressor.core.errors import EXIT_BUDGET_NOT_MET, CompressorError
from compressor.core.naming import CERT_NAME

EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports it


@app.command(rich_help_panel=PANEL_MAIN)
def run(
    sources: SourcesArg,
    budget: BudgetOpt = 0.05,
    profile: ProfileOpt = None,
    target: TargetOpt = "cpu-x86",
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
    choose: Annotated[
        str | None,
        typer.Option(
            "--choose",
            help="Which passing level to deploy: max-sparsity (the sparsest) or sweet-spot "
            "(the best mean of clean and robust score); default: the profile's search.choose.",
        ),
    ] = None,
    env: EnvOpt = None,
    executor: ExecutorOpt = "local",
    workers: WorkersOpt = None,
    address: AddressOpt = "local",
    as_json: JsonOpt = False,
) -> None:
    """Measure, prune, fine-tune, certify and export: the whole compression job.

    Running the same command again resumes an interrupted run from its journal (Ctrl-C, a kill,
    a full disk); a second run into the same run directory at the same time is refused.
    """
    from compressor.api import compress, resolve_source
    from compressor.core.config import load_target
    from compressor.core.executor import default_workers, make_executor
    from compressor.run.batch import BatchRow, expand_sources, run_batch

    if not sources:
        raise CompressorError("give a policy file, a profile name or a folder of policies")
    tgt = load_target(target)
    single = len(sources) == 1 and not Path(sources[0]).is_dir()
    paths = [resolve_source(sources[0])] if single else expand_sources(sources, resolve_source)
    if name is not None and not single:
        raise CompressorError("--name names one run; in a batch each run is named after its policy")
    ex = make_executor(executor, default_workers() if workers is None else workers, address)
    options: dict[str, Any] = dict(
        budget=budget,
        profile=profile,
        target=tgt,
        out_root=out_dir,
        command=command_line(),
        prune_method=prune_method,
        executor=ex,
        choose=choose,
        env=env,
    )
    try:
        if single:
            result = compress(sources[0], name=name, reporter=reporter(), **options)
        else:

            def batch_one(path: Path, run_name: str) -> tuple[dict[str, Any], Path]:
                err.print(f"[bold]── {path} → {out_dir / run_name}[/bold]")
                res = compress(path, name=run_name, reporter=reporter(), **options)
                return res.report, res.run_dir

            def show(row: BatchRow) -> None:
                if row.status == "error":
                    err.print(f"[red]error[/red] {escape(f'{row.source}: {row.error}')}")

            rows = run_batch(paths, out_dir, batch_one, on_row=show)
    except KeyboardInterrupt as exc:  # Typer would exit 130 in silence: say what was kept
        ex.close()
        err.print(escape(str(exc) or "interrupted"), highlight=False)
        raise typer.Exit(EXIT_INTERRUPTED) from None
    finally:
        ex.close()
    if not single:
        _batch_summary(rows, out_dir, as_json)
        if any(r.status == "error" for r in rows):
            raise typer.Exit(3)
        if any(r.status in ("fail", "undecided") for r in rows):
            raise typer.Exit(EXIT_BUDGET_NOT_MET)
        return
    _show_run(result.report, result.run_dir, as_json)
    if not result.passed:
        raise typer.Exit(EXIT_BUDGET_NOT_MET)


def _show_run(r: dict[str, Any], run_dir: Path, as_json: bool) -> None:
    if as_json:
        emit({"run_dir": str(run_dir), **r}, True)
        return
    from compressor.report.render import noise_warning

    v = r["verdict"]
    status = v.get("status") or ("pass" if v["passed"] else "fail")  # undecided: never a pass
    colour = {"pass": "green", "undecided": "yellow"}.get(status, "red")
    out.print(f"[bold {colour}]{status.upper()}[/]: {escape(v['summary'])}")
    warn = noise_warning((r.get("derived") or {}).get("resolution"))
    if warn:
        out.print(f"[yellow]{escape(warn)}[/yellow]", highlight=False)
    out.print(f"run directory: {run_dir}")
    runs = (r.get("performance") or {}).get("invocations") or []
    over = f" over {len(runs)} invocations (resumed)" if len(runs) > 1 else ""
    out.print(f"total time: {r['timings_s'].get('total', 0):.1f} s{over}")


def _batch_summary(rows: list[Any], out_dir: Path, as_json: bool) -> None:
    from compressor.run.batch import SUMMARY_FILE

    if as_json:
        emit({"runs": [asdict(r) for r in rows]}, True)
        return

    def num(x: float | None, spec: str = ".1f") -> str:
        return "–" if x is None else format(x, spec)

    columns = ("policy", "env", "result", "sparsity", "clean", "robust", CERT_NAME, "ONNX B")
    t = Table(*columns, "time s", title=f"batch summary (dense → chosen; {out_dir / SUMMARY_FILE})")
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
    out.print(t)
    for r in rows:
        if r.status == "error":
            out.print(f"[red]error[/red] {r.run_name}: {escape(r.error or '')}", highlight=False)


def _run_dir(path: Path) -> Path:
    """A run directory given as itself or as its ``report.json``."""
    if path.is_file() and path.name == "report.json":
        return path.parent
    if not path.exists():
        check_path(path, "run directory")
    return path


@app.command(rich_help_panel=PANEL_MAIN)
def report(
    run_dir: Annotated[
        Path, typer.Argument(metavar="RUN_DIR", help="Run directory (or its report.json).")
    ],
) -> None:
    """Re-render report.md, report.html and plots/ from a run's report.json (no recomputation)."""
    from compressor.report.build import rerender, validate

    run_dir = _run_dir(run_dir)
    r = rerender(run_dir)
    for problem in validate(r):
        err.print(f"[yellow]schema:[/yellow] {escape(problem)}", highlight=False)
    for name in ("report.json", "report.md", "report.html"):
        out.print(f"wrote {run_dir / name}")


@app.command(rich_help_panel=PANEL_MAIN)
def compare(
    run_a: Annotated[
        Path, typer.Argument(metavar="RUN_A", help="First run directory (or its report.json).")
    ],
    run_b: Annotated[
        Path, typer.Argument(metavar="RUN_B", help="Second run directory (or its report.json).")
    ],
    as_json: JsonOpt = False,
) -> None:
    """Two runs side by side: verdict, returns, certificates, sizes (delta = B − A)."""
    from compressor.report.compare import compare_runs, fmt

    run_a, run_b = _run_dir(run_a), _run_dir(run_b)
    data = compare_runs(run_a, run_b)
    t = Table("metric", str(run_a), str(run_b), "B − A")
    for row in data["rows"]:
        t.add_row(row["metric"], fmt(row["a"]), fmt(row["b"]), fmt(row["delta"]))
    emit(data, as_json, t)
