"""Policies: ``inspect`` a file, ``import`` it into the native format, ``train`` a reference."""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from compressor.cli.common import (
    PANEL_POLICIES,
    EnvOpt,
    JsonOpt,
    SrcArg,
    app,
    command_line,
    emit,
    note,
    out,
    reporter,
    setup_torch,
    source,
)
from compressor.core.errors import CompressorError


@app.command(rich_help_panel=PANEL_POLICIES)
def inspect(
    src: SrcArg,
    env: EnvOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Show what was found in a policy file: kind, layers, activation, normalisation, env."""
    from compressor.api import load
    from compressor.policy.loading import describe

    d = describe(load(src, env_id=env, note=note))
    t = Table("field", "value", show_header=False)
    for k, v in d.items():
        if k != "warnings":  # already printed as notes
            _field_rows(t, k, v)
    emit(d, as_json, t)


#: a list of more values than this is shown by its first few and its length
LIST_SHOWN = 8


def _text(key: str, value: Any) -> str:
    """One value as a person reads it: ``–`` for none, a command line as typed, lists joined."""
    if value is None or value == []:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list):
        if key == "command" and all(isinstance(v, str) for v in value):
            return shlex.join(value)
        shown = ", ".join(str(v) for v in value[:LIST_SHOWN])
        return shown if len(value) <= LIST_SHOWN else f"{shown}, … ({len(value)} values)"
    return str(value)


def _field_rows(t: Table, key: str, value: Any, depth: int = 0) -> None:
    """``key``'s row, a nested dict's keys as indented rows under it (a list of dicts too)."""
    label = "  " * depth + key
    if isinstance(value, dict) and value:
        t.add_row(label, "")
        for k, v in value.items():
            _field_rows(t, str(k), v, depth + 1)
    elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        t.add_row(label, "")
        for i, v in enumerate(value, 1):
            _field_rows(t, f"{key} {i}", v, depth + 1)
    else:
        t.add_row(label, _text(key, value))


@app.command(name="import", rich_help_panel=PANEL_POLICIES)
def import_(
    src: Annotated[
        str,
        typer.Argument(
            metavar="SRC",
            help="SB3 zip, CleanRL model, or state dict + spec.",
            callback=source,
        ),
    ],
    output: Annotated[Path, typer.Option("-o", "--output", help="Output native .pt file.")],
    vecnormalize: Annotated[str | None, typer.Option(help="vecnormalize.pkl / stats file.")] = None,
    env: EnvOpt = None,
) -> None:
    """Convert a policy to the native format (loads with torch.load(weights_only=True))."""
    from compressor.api import load
    from compressor.policy.loading import save_loaded

    loaded = load(src, env_id=env, vecnormalize=vecnormalize, note=note)
    save_loaded(loaded, output)
    out.print(f"wrote {output} ({loaded.format} → native)")


@app.command(rich_help_panel=PANEL_POLICIES)
def train(
    env_id: Annotated[
        str, typer.Argument(metavar="ENV_ID", help="Gymnasium env id, e.g. Hopper-v5.")
    ],
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
    from compressor.api import train_policy
    from compressor.rl.ppo import PPOConfig

    setup_torch()
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
    with reporter().stage("train", total=steps) as progress:
        rep = train_policy(cfg, output, command=command_line(), progress=progress)
    last = cfg.eval_seed + eval_episodes - 1
    out.print(
        f"wrote {output}: deterministic return {rep.evaluation.stats.mean:.1f} over "
        f"{eval_episodes} episodes (seeds {cfg.eval_seed}–{last})"
    )
