"""What every ``compress`` command shares: the Typer app, the two consoles (results on stdout,
progress and notes on stderr), the common options, and printing."""

from __future__ import annotations

import json
import sys
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

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


def emit(data: Any, as_json: bool, table: Table | None = None) -> None:
    """Print a result: one JSON document with ``--json``, else the table (or pretty JSON)."""
    if as_json:
        sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
    elif table is not None:
        out.print(table)
    else:
        out.print_json(json.dumps(data, default=str))


def note(message: str) -> None:
    """A note for the user on stderr, printed literally."""
    err.print(f"[yellow]{escape(message)}[/yellow]", highlight=False)


def setup_torch() -> None:
    """Tiny MLPs: extra threads only add overhead and oversubscribe the cores."""
    import torch

    torch.set_num_threads(1)


def command_line() -> list[str]:
    """The command as typed, for reports."""
    return ["compress", *sys.argv[1:]]
