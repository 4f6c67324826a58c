"""What every ``compress`` command shares: the Typer app, the two consoles (results on stdout,
progress and notes on stderr), the common options, and printing."""

from __future__ import annotations

import json
import sys
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from typer.core import TyperCommand, TyperGroup

from compressor.cli.checks import check_budget, check_shipped, check_source, check_sources

if TYPE_CHECKING:
    from compressor.core.progress import Reporter

#: the width of a console that is not a terminal (a file, a pipe): lines are never wrapped
UNWRAPPED = 10_000


class _PlainFlags:
    """Help in which a flag shows no value: ``--json``, not ``--json <bool>``."""

    params: list[Any]

    def _plain_flags(self) -> None:
        for param in self.params:
            if getattr(param, "is_flag", False) and param.metavar is None:
                param.metavar = ""

    def get_help_option(self, ctx: Any) -> Any:
        option = super().get_help_option(ctx)  # type: ignore[misc]
        if option is not None:
            option.metavar = ""
        return option


class Command(_PlainFlags, TyperCommand):
    """A command whose help reads as a person expects: flags without a value, and a usage line
    that names its arguments in capitals (``SRC``, not ``{src}``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._plain_flags()

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if param.param_type_name != "argument":
                pieces.extend(param.get_usage_pieces(ctx))
                continue
            name = (param.metavar or param.name or "").upper()
            if param.nargs != 1 and not name.endswith("..."):
                name += "..."
            pieces.append(name if param.required else f"[{name}]")
        return pieces


class Group(_PlainFlags, TyperGroup):
    """The ``compress`` group, its flags (``--version``, ``-h``) shown without a value."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._plain_flags()


class App(typer.Typer):
    """The Typer app whose commands are :class:`Command` s."""

    def command(self, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        kwargs.setdefault("cls", Command)
        return super().command(*args, **kwargs)


app = App(
    cls=Group,
    name="compress",
    help="Compress a trained RL policy into a smaller ONNX model that is no less robust.",
    rich_markup_mode="rich",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _console(stderr: bool = False) -> Console:
    """A console for stdout or stderr; when that is not a terminal (a file, a pipe), lines are
    written whole: a number is never split across two lines."""
    console = Console(stderr=stderr)
    if console.is_terminal:
        return console
    return Console(stderr=stderr, soft_wrap=True, width=UNWRAPPED)


out = _console()
err = _console(stderr=True)


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            number = version("edge-policy-compressor")
        except PackageNotFoundError:  # run from a source tree that was never installed
            number = "unknown (not installed)"
        sys.stdout.write(f"compress {number}\n")
        raise typer.Exit()


@app.callback()
def _main(
    show_version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version, is_eager=True, help="Show the version and exit."
        ),
    ] = False,
) -> None:
    """Compress a trained RL policy into a smaller ONNX model that is no less robust."""


def reporter() -> Reporter:
    """Progress bars and notes on this CLI's stderr console (unwrapped when not a terminal)."""
    from compressor.core.progress import Reporter

    rep = Reporter()
    rep.console = err
    return rep


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
    str | None,
    typer.Option(
        "--profile",
        help="Profile name or TOML file (default: by env).",
        callback=lambda v: check_shipped("profile", v),
    ),
]
TargetOpt = Annotated[
    str,
    typer.Option(
        "--target",
        help="Deployment target name or TOML file.",
        callback=lambda v: check_shipped("target", v),
    ),
]


def source(value: str) -> str:
    """Option callback: a policy file or shipped profile name (see :func:`check_source`)."""
    return check_source(value)


SrcArg = Annotated[str, typer.Argument(metavar="SRC", help="Policy file.", callback=source)]
SourcesArg = Annotated[
    list[str],
    typer.Argument(
        metavar="SRC...",
        help="Policy file(s) (.pt, SB3 .zip, CleanRL), profile name(s), or folder(s) of "
        "policies: several make a batch, one run directory each and a summary table.",
        show_default=False,
        callback=check_sources,
    ),
]
BudgetOpt = Annotated[
    float,
    typer.Option(
        "--budget",
        help="Fraction of the return scale that may be lost (0.05: 5%).",
        callback=check_budget,
    ),
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
