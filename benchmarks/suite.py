"""Where the time goes: throughput ratios, executor speedups, per-stage shares and peak memory,
all measured in one run of this script (ratios, so a shared machine's load hits both sides).

    python benchmarks/suite.py                       # everything (about 15 min on 2 cores)
    python benchmarks/suite.py --skip-runs           # without the two `compress run` jobs
    python benchmarks/suite.py --json suite.json     # also write the numbers as JSON

1. Throughput, same env count: clean evaluation / raw simulator (goal ≥ 0.7) and MAD-attacked
   evaluation / raw simulator (goal ≥ 0.25). Raw: the rollout engine's vector env stepped with
   random actions, measured before and after the evaluations and averaged.
2. Executors: the same batch of MAD-attacked evaluation jobs (``evaluate_suite``'s job, one per
   block of seeds) on ``local`` with 1 and 2 workers and on a private local Ray instance with 1
   and 2 CPUs; speedup = time(1) / time(2). Pools are warmed up first (start-up is excluded and
   printed apart); every executor must return the same numbers.
3. ``compress run`` on the reference policy (default ``hopper``) with ``--workers 1`` and with
   ``--workers 2``: end-to-end speedup, the share of each stage (from report.json's
   ``performance`` block), peak memory (the report's bound and the largest process's maximum
   resident set, from the OS), goal under 2 GiB; both runs must choose the same sparsity.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from compressor.core.executor import Executor, make_executor
from compressor.core.threat import ThreatModel
from compressor.evaluate import _suite_job, evaluate, evaluate_attack
from compressor.policy.loading import load_policy
from compressor.report.performance import raw_steps_per_s

REPO = Path(__file__).resolve().parents[1]


def throughput(policy_path: str, env_id: str, eps: float, num_envs: int, episodes: int) -> dict:
    """Clean and MAD evaluation throughput over raw simulator throughput, same env count."""
    policy = load_policy(policy_path).policy.eval()
    seeds = list(range(episodes))
    raw_steps = 20 * num_envs * 50
    before = raw_steps_per_s(env_id, num_envs, raw_steps)
    clean, _ = evaluate(policy, env_id, {}, seeds, num_envs=num_envs)
    mad = evaluate_attack(policy, env_id, {}, seeds, "mad", ThreatModel(eps), num_envs=num_envs)
    after = raw_steps_per_s(env_id, num_envs, raw_steps, seed=1)
    raw = (before + after) / 2
    return {
        "num_envs": num_envs,
        "raw_steps_per_s": round(raw, 1),
        "clean_steps_per_s": round(clean.steps / clean.wall_s, 1),
        "mad_steps_per_s": round(mad.steps / mad.wall_s, 1),
        "clean_over_raw": round(clean.steps / clean.wall_s / raw, 3),
        "mad_over_raw": round(mad.steps / mad.wall_s / raw, 3),
    }


def _timed_map(ex: Executor, jobs: list[tuple[Any, ...]]) -> tuple[float, float, list[Any]]:
    """(start-up seconds, seconds for the jobs, results); start-up = a first tiny map."""
    t0 = time.perf_counter()
    ex.map(abs, [(-1,)] * ex.workers)  # start the pool / Ray and its workers
    t1 = time.perf_counter()
    out = ex.map(_suite_job, jobs)
    return t1 - t0, time.perf_counter() - t1, out


def executor_speedups(
    policy_path: str, env_id: str, eps: float, num_envs: int, jobs_n: int, per_job: int
) -> dict:
    """Time the same evaluation jobs on local 1/2 workers and Ray 1/2 CPUs."""
    policy = load_policy(policy_path).policy.eval()
    threat = ThreatModel(eps)
    jobs = [
        (policy, env_id, {}, list(range(k * per_job, (k + 1) * per_job)), "mad", threat, 0,
         num_envs, None)
        for k in range(jobs_n)
    ]  # fmt: skip
    out: dict[str, Any] = {"jobs": jobs_n, "episodes_per_job": per_job}
    reference = None
    kinds = [("local", "local")]
    try:
        import ray  # noqa: F401

        kinds.append(("ray", "local"))
    except ImportError:
        out["ray"] = "not installed (pip install '.[ray]')"
    for kind, address in kinds:
        times = {}
        for workers in (1, 2):
            ex = make_executor(kind, workers, address)
            try:
                startup, secs, res = _timed_map(ex, jobs)
            finally:
                ex.close()
            numbers = [(r.stats.mean, r.steps, r.mean_tv) for r in res]
            reference = reference or numbers
            if numbers != reference:
                raise SystemExit(f"{kind} with {workers} workers gave other numbers: {numbers}")
            times[workers] = secs
            out[f"{kind}_{workers}_s"] = round(secs, 2)
            out[f"{kind}_{workers}_startup_s"] = round(startup, 2)
        out[f"{kind}_speedup_2_over_1"] = round(times[1] / times[2], 3)
    return out


def compress_runs(source: str, out_dir: Path) -> dict:
    """`compress run SOURCE` with 1 and 2 workers: times, stage shares, memory."""
    out: dict[str, Any] = {"source": source}
    chosen = {}
    for workers in (1, 2):
        before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        t0 = time.perf_counter()
        r = subprocess.run(
            [sys.executable, "-m", "compressor.cli", "run", source, "--out", str(out_dir),
             "--name", f"workers-{workers}", "--workers", str(workers), "--json"],
            capture_output=True, text=True,
        )  # fmt: skip
        wall = time.perf_counter() - t0
        if r.returncode not in (0, 4):
            raise SystemExit(f"compress run failed: {r.stderr.strip().splitlines()[-1]}")
        rep = json.loads(r.stdout)
        perf = rep["performance"]
        maxrss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        chosen[workers] = rep["verdict"]["chosen_sparsity"]
        out[f"workers_{workers}"] = {
            "wall_s": round(wall, 1),
            "chosen_sparsity": chosen[workers],
            "stages": {s["stage"]: s["share"] for s in perf["stages"]},
            "peak_memory_mib": perf["peak_memory_mib"],
            # the largest single process of this run (the OS's count; 0 if not above earlier runs)
            "largest_process_mib": round(max(maxrss, before) / 1024, 1),
        }
    out["end_to_end_speedup_2_over_1"] = round(
        out["workers_1"]["wall_s"] / out["workers_2"]["wall_s"], 3
    )
    out["same_choice"] = chosen[1] == chosen[2]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--policy", default=str(REPO / "profiles" / "hopper.pt"))
    ap.add_argument("--env", default="Hopper-v5")
    ap.add_argument("--eps", type=float, default=0.075)
    ap.add_argument("--num-envs", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--episodes", type=int, default=64)
    ap.add_argument("--jobs", type=int, default=4)
    ap.add_argument("--episodes-per-job", type=int, default=8)
    ap.add_argument("--run-source", default="hopper", help="policy or profile for compress run")
    ap.add_argument("--skip-runs", action="store_true", help="skip the compress run jobs")
    ap.add_argument(
        "--only", choices=["throughput", "executors", "runs"], help="run one section only"
    )
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()
    torch.set_num_threads(1)
    results: dict[str, Any] = {"throughput": []}

    def wanted(section: str) -> bool:
        return args.only in (None, section)

    if wanted("throughput"):
        print(f"== throughput ({args.env}, {Path(args.policy).name}, ε {args.eps}) ==")
    for n in args.num_envs if wanted("throughput") else []:
        t = throughput(args.policy, args.env, args.eps, n, args.episodes)
        results["throughput"].append(t)
        print(
            f"{n:3d} envs: raw {t['raw_steps_per_s']:8.0f}/s  clean {t['clean_steps_per_s']:8.0f}/s"
            f"  MAD {t['mad_steps_per_s']:8.0f}/s  clean/raw {t['clean_over_raw']:.3f} (≥ 0.7)"
            f"  MAD/raw {t['mad_over_raw']:.3f} (≥ 0.25)"
        )

    if not wanted("executors"):
        e: dict[str, Any] = {}
    else:
        print(
            f"== executors ({args.jobs} MAD evaluation jobs of {args.episodes_per_job} episodes) =="
        )
        e = executor_speedups(
            args.policy, args.env, args.eps, args.num_envs[0], args.jobs, args.episodes_per_job
        )
        results["executors"] = e
    for kind in ("local", "ray"):
        if f"{kind}_1_s" in e:
            print(
                f"{kind:5s}: 1 worker {e[f'{kind}_1_s']:7.2f} s, 2 workers {e[f'{kind}_2_s']:7.2f}"
                f" s → speedup {e[f'{kind}_speedup_2_over_1']:.2f}× (start-up "
                f"{e[f'{kind}_1_startup_s']:.1f} / {e[f'{kind}_2_startup_s']:.1f} s, excluded)"
            )
        elif kind in e:
            print(f"{kind}: {e[kind]}")

    if wanted("runs") and not args.skip_runs:
        print(f"== compress run {args.run_source} (--workers 1 vs 2) ==")
        with tempfile.TemporaryDirectory() as tmp:
            c = compress_runs(args.run_source, Path(tmp))
        results["compress_run"] = c
        for w in (1, 2):
            r = c[f"workers_{w}"]
            mem = r["peak_memory_mib"]
            worker = mem["worker"] or 0
            print(
                f"workers {w}: {r['wall_s']:.1f} s, chosen {r['chosen_sparsity']}, peak memory "
                f"≤ {mem['bound']:.0f} MiB (main {mem['main']:.0f}, worker {worker:.0f};"
                f" largest process {r['largest_process_mib']:.0f} MiB; goal < 2048)"
            )
            shares = ", ".join(f"{k} {v:.1%}" for k, v in r["stages"].items() if v is not None)
            print(f"  stage shares: {shares}")
        print(
            f"end to end: {c['end_to_end_speedup_2_over_1']:.2f}× faster with 2 workers; same "
            f"chosen sparsity: {c['same_choice']}"
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
