"""Edge benchmark on the shipped Hopper-v5 policy: size, latency, quantisation, in one run.

Variants of ``profiles/hopper.pt`` (11→256→256→3, tanh, Gaussian):

- ``dense``: the policy as shipped;
- ``unstructured``: magnitude pruning at 0.775 (``prune.criteria.prune``), no fine-tuning;
- ``structured``: 90 % of the weights cut as whole hidden neurons
  (``prune.criteria.prune(dense, 0.9, "structured")``, the Hopper profile's method and global
  scope), no fine-tuning: export removes the neurons physically;
- ``int8`` / ``qdq`` / ``fp16`` / ``int8w``: the dense export quantised
  (``compressor.deploy.quantize.quantize_model``; qdq calibrated on states the dense policy visits).

Fine-tuning is left out on purpose: it changes weights, not shapes, so size and latency are the
same with or without it, while the returns below show what pruning alone does. Every return is
measured through onnxruntime (``compressor.deploy.onnx_actor.OnnxActor``), on the same seeds.
The claims are the ratio columns; absolute microseconds depend on this machine and its load.

Usage: ``python benchmarks/edge_bench.py [--iters 2000] [--episodes 3] [--max-steps 1000]
[--target cpu-x86] [--json]``
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from compressor.certify.global_bound import certify_global
from compressor.core.config import load_target
from compressor.core.threat import ThreatModel
from compressor.deploy.bench import bench_model
from compressor.deploy.export import export_onnx
from compressor.deploy.onnx_actor import OnnxActor
from compressor.deploy.quantize import quantize_model
from compressor.policy.model import Policy
from compressor.policy.native import load_native
from compressor.prune.criteria import prune
from compressor.rl.rollout import rollout

REPO = Path(__file__).resolve().parents[1]
ENV_ID = "Hopper-v5"
THREAT = ThreatModel(0.075)  # the Hopper profile's ε (normalised units, ℓ∞)


def _clean_return(path: Path, seeds: list[int], max_steps: int) -> tuple[float, Any]:
    res = rollout(
        OnnxActor(path),
        ENV_ID,
        {},
        seeds,
        num_envs=len(seeds),
        max_steps=max_steps,
        record_states=True,
    )
    return float(res.returns.mean()), res.states


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print one table (or JSON).

    :param argv: command-line arguments (default: ``sys.argv[1:]``).
    """
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=2000, help="timed calls per batch size")
    ap.add_argument("--warmup", type=int, default=200, help="untimed calls first")
    ap.add_argument("--episodes", type=int, default=3, help="episodes per clean return")
    ap.add_argument("--max-steps", type=int, default=1000, help="episode cap")
    ap.add_argument("--batch", type=int, default=64, help="second batch size timed")
    ap.add_argument("--target", default="cpu-x86", help="deployment target name or TOML")
    ap.add_argument("--json", action="store_true", help="print JSON instead of the table")
    args = ap.parse_args(argv)

    torch.set_num_threads(1)
    target = load_target(args.target)
    dense = load_native(REPO / "profiles" / "hopper.pt").eval()
    seeds = list(range(args.episodes))
    t0 = time.perf_counter()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="edge-bench-") as tmp:
        d = Path(tmp)
        torch_policies: dict[str, Policy] = {
            "dense": dense,
            "unstructured": prune(dense, 0.775, "magnitude"),
            "structured": prune(dense, 0.9, "structured"),
        }
        files: dict[str, Path] = {}
        certs: dict[str, float | None] = {}
        for name, pol in torch_policies.items():
            files[name] = export_onnx(pol, d / f"{name}.onnx", opset=target.opset).path
            certs[name] = certify_global(pol, THREAT).certified_radius
        returns: dict[str, float] = {}
        returns["dense"], states = _clean_return(files["dense"], seeds, args.max_steps)
        for mode in ("int8", "qdq", "fp16", "int8w"):
            q = quantize_model(
                dense, files["dense"], d / f"{mode}.onnx", mode, states, threat=THREAT
            )
            files[mode] = q.path
            certs[mode] = q.certificate["certified_radius"]
            torch_policies[mode] = dense  # torch eager baseline: the fp32 policy
        batches = tuple(dict.fromkeys((1, args.batch)))
        for name, path in files.items():
            if name not in returns:
                returns[name] = _clean_return(path, seeds, args.max_steps)[0]
            b = bench_model(path, target, torch_policies[name], batches, args.warmup, args.iters)
            rows.append(
                {
                    "variant": name,
                    "file_bytes": b.file_bytes,
                    "params": b.params,
                    "params_nonzero": b.params_nonzero,
                    "p50_us": b.onnx[1].p50_ms * 1e3,
                    "p50_batch_us": b.onnx[args.batch].p50_ms * 1e3,
                    "onnx_to_torch_b1": b.ratio_to_torch(1),
                    "onnx_to_torch_batch": b.ratio_to_torch(args.batch),
                    "return": returns[name],
                    "certified_radius": certs[name],
                    "bench": b.to_dict(),
                }
            )
    ref = rows[0]
    for r in rows:
        r["size_vs_dense"] = r["file_bytes"] / ref["file_bytes"]
        r["p50_vs_dense_b1"] = r["p50_us"] / ref["p50_us"]
        r["p50_vs_dense_batch"] = r["p50_batch_us"] / ref["p50_batch_us"]
        r["return_vs_dense"] = r["return"] / ref["return"]
    wall = time.perf_counter() - t0
    if args.json:
        print(json.dumps({"rows": rows, "wall_s": wall, "threat": vars(THREAT)}, indent=2))
        return 0
    _print_table(rows, args, target.name, wall)
    return 0


def _print_table(rows: list[dict[str, Any]], args: argparse.Namespace, tgt: str, wall: float):
    b = args.batch
    head = (
        f"{'variant':<13}{'file KB':>9}{'size/dense':>11}{'params':>9}{'nonzero':>9}"
        f"{'p50 µs b1':>10}{'ORT/torch b1':>13}{'p50/dense b1':>13}"
        f"{f'p50/dense b{b}':>14}{'ORT/torch b' + str(b):>14}"
        f"{'return':>9}{'ret/dense':>10}{'cert radius':>12}"
    )
    print(
        f"Hopper-v5 edge benchmark — target {tgt}, {args.iters} timed calls per batch size, "
        f"{args.episodes} episodes (≤ {args.max_steps} steps) through onnxruntime, "
        f"certificate at ε = {THREAT.eps} ℓ∞ normalised, τ = 0.1"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        radius = r["certified_radius"]
        rad = "none" if radius is None else ("0" if radius == 0 else f"{radius:.3e}")
        print(
            f"{r['variant']:<13}{r['file_bytes'] / 1024:>9.1f}{r['size_vs_dense']:>11.2f}"
            f"{r['params']:>9}{r['params_nonzero']:>9}{r['p50_us']:>10.1f}"
            f"{r['onnx_to_torch_b1']:>13.2f}{r['p50_vs_dense_b1']:>13.2f}"
            f"{r['p50_vs_dense_batch']:>14.2f}{r['onnx_to_torch_batch']:>14.2f}"
            f"{r['return']:>9.0f}{r['return_vs_dense']:>10.2f}{rad:>12}"
        )
    print(f"(wall {wall:.0f} s; ratios < 1 mean smaller / faster than the reference column)")


if __name__ == "__main__":
    sys.exit(main())
