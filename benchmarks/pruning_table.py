"""Pruning methods side by side: ``compress run`` for each policy × method at one budget.

Prints a markdown table (chosen sparsity; dense vs chosen clean and robust return; certified
Lipschitz bound; wall time) and appends one JSON line per run to ``--results``, so runs made
separately (e.g. one method at a time in the background) can be tabulated together::

    python benchmarks/pruning_table.py profiles/cartpole.pt --methods magnitude micro structured
    python benchmarks/pruning_table.py --table-only --results /tmp/pruning.jsonl

Each run uses the policy's shipped profile with only ``[prune] method`` changed, and its own
run directory ``OUT/<policy>-<method>`` (a re-run resumes from the journal: delete it first
for a fresh time).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch


def run_one(
    src: str, method: str, budget: float, out: Path, profile: str | None, workers: int = 1
) -> dict[str, Any]:
    """One ``compress run`` with ``--prune-method method``; the row of the table."""
    from compressor.core.executor import make_executor
    from compressor.run.pipeline import run_pipeline

    name = f"{Path(src).parent.name if Path(src).stem == 'model' else Path(src).stem}-{method}"
    t0 = time.perf_counter()
    ex = make_executor("local", workers)
    try:
        res = run_pipeline(
            src,
            budget=budget,
            profile=profile,
            out_root=out,
            name=name,
            prune_method=method,
            executor=ex,
        )
    finally:
        ex.close()
    wall = time.perf_counter() - t0
    r = res.report
    d, c, norm = r["dense"], r["chosen"], r["threat"]["norm"]
    return {
        "policy": src,
        "env": r["source"].get("env_id"),
        "method": method,
        "budget": budget,
        "eps": r["threat"]["eps"],
        "chosen_sparsity": c["sparsity"] if c else None,
        "evaluated": [round(f["sparsity"], 3) for f in r["frontier"]],
        "dense_clean": d["clean_return"],
        "dense_robust": d["robust_return"],
        "chosen_clean": c["clean_return"] if c else None,
        "chosen_robust": c["robust_return"] if c else None,
        "dense_lipschitz": d["certificates"][norm]["lipschitz"],
        "chosen_lipschitz": c["certificates"][norm]["lipschitz"] if c else None,
        "removed_neurons": c["onnx"]["removed_neurons"] if c else None,
        "sweet_spot": (r.get("frontier_analysis") or {}).get("sweet_spot"),
        "wall_s": wall,
        "workers": workers,
        "dense_falls": _falls(d),
        "chosen_falls": _falls(c) if c else None,
        "finetune": _finetune(c) if c else None,
        "timings_s": r.get("timings_s") or (r.get("run") or {}).get("timings_s"),
    }


def _falls(block: dict[str, Any]) -> str:
    """Falls per evaluation, ``condition falls/episodes`` (the report's tails)."""
    tail = block.get("tail") or {}
    return ", ".join(f"{k} {v['falls']}/{v['n']}" for k, v in tail.items())


def _finetune(block: dict[str, Any]) -> dict[str, Any] | None:
    """Which fine-tuning ran on the chosen policy and what it cost (steps, env steps, s)."""
    ft = block.get("finetune")
    if not ft:
        return None
    sel = ft.get("selection") or {}
    return {
        "method": ft["method"] + (" + selection" if sel else ""),
        "steps": ft["steps"],
        "dagger_rounds_run": ft.get("dagger_rounds_run"),
        "chosen_checkpoint": sel.get("chosen"),
        "select_env_steps": sel.get("env_steps"),
        "wall_s": round(ft["wall_s"], 1),
    }


def _f(x: float | None, fmt: str = "{:.1f}") -> str:
    return "—" if x is None else fmt.format(x)


def table(rows: list[dict[str, Any]]) -> str:
    """The markdown table of the rows."""
    head = (
        "| policy | method | chosen sparsity | clean dense → chosen | robust dense → chosen "
        "| Lipschitz dense → chosen | neurons removed | falls dense → chosen | fine-tuning "
        "| wall time |\n"
        "|---|---|---:|---:|---:|---:|---:|---|---|---:|\n"
    )
    lines = []
    for r in rows:
        ft = r.get("finetune") or {}
        ft_text = (
            f"{ft['method']}, {ft['steps']} steps, kept {ft.get('chosen_checkpoint')}, "
            f"{ft['wall_s']:.0f} s"
            if ft
            else "—"
        )
        lines.append(
            f"| {r['env']} ({Path(r['policy']).name}) | {r['method']} "
            f"| {_f(r['chosen_sparsity'], '{:.1%}')} "
            f"| {r['dense_clean']:.1f} → {_f(r['chosen_clean'])} "
            f"| {r['dense_robust']:.1f} → {_f(r['chosen_robust'])} "
            f"| {r['dense_lipschitz']:.4g} → {_f(r['chosen_lipschitz'], '{:.4g}')} "
            f"| {_f(r['removed_neurons'], '{:d}')} "
            f"| {r.get('dense_falls', '—')} → {r.get('chosen_falls') or '—'} | {ft_text} "
            f"| {r['wall_s'] / 60:.1f} min |"
        )
    return head + "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("policies", nargs="*", help="policy files (native .pt or SB3 .zip)")
    ap.add_argument("--methods", nargs="+", default=["magnitude", "micro", "structured"])
    ap.add_argument("--budget", type=float, default=0.05)
    ap.add_argument("--profile", default=None, help="profile for every policy (default: shipped)")
    ap.add_argument("--out", type=Path, default=Path("runs/pruning_table"))
    ap.add_argument("--results", type=Path, default=Path("runs/pruning_table/results.jsonl"))
    ap.add_argument("--workers", type=int, default=1, help="local executor workers per run")
    ap.add_argument("--table-only", action="store_true", help="tabulate --results, run nothing")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if not args.table_only:
        args.results.parent.mkdir(parents=True, exist_ok=True)
        for src in args.policies:
            for method in args.methods:
                row = run_one(src, method, args.budget, args.out, args.profile, args.workers)
                with open(args.results, "a") as fh:
                    fh.write(json.dumps(row) + "\n")
                print(table([row]).splitlines()[-1], flush=True)
    rows = [json.loads(x) for x in args.results.read_text().splitlines() if x.strip()]
    print(table(rows))


if __name__ == "__main__":
    main()
