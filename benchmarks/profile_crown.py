"""Where CROWN's time goes on the reference policy: cProfile of ``output_bounds`` on visited
states (one thread), per function of ``compressor/certify/local.py``.

    python benchmarks/profile_crown.py [--states 2000] [--policy profiles/hopper.pt] [--wall]

``--wall``: instead of cProfile, the wall time inside each of the module's main functions
(``perf_counter`` around each call, inclusive; no per-call profiler overhead).
"""

from __future__ import annotations

import argparse
import collections
import cProfile
import pstats
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import suite  # noqa: E402

import compressor.certify.local as local  # noqa: E402
from compressor.core.threat import ThreatModel  # noqa: E402
from compressor.policy.loading import load_policy  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--policy", default=str(suite.REPO / "profiles" / "hopper.pt"))
    ap.add_argument("--env", default="Hopper-v5")
    ap.add_argument("--eps", type=float, default=0.075)
    ap.add_argument("--states", type=int, default=2000)
    ap.add_argument("--wall", action="store_true", help="per-function wall time, no cProfile")
    args = ap.parse_args()
    torch.set_num_threads(1)
    policy = load_policy(args.policy).policy.eval()
    states = suite._states(policy, args.env, args.states)
    threat = ThreatModel(args.eps)
    local.output_bounds(policy, states[:64], threat)  # first-use costs apart
    if args.wall:
        _wall(policy, states, threat)
        return
    prof = cProfile.Profile()
    prof.enable()
    local.output_bounds(policy, states, threat)
    prof.disable()
    stats = pstats.Stats(prof)
    total = sum(v[2] for v in stats.stats.values())  # type: ignore[attr-defined]
    print(f"{args.states} states, {total:.3f} s of profiled time (cProfile's own overhead in)")
    rows = [
        (v[3], k[2])
        for k, v in stats.stats.items()  # type: ignore[attr-defined]
        if k[0].endswith("certify/local.py")
    ]
    for cum, name in sorted(rows, reverse=True)[:12]:
        print(f"  {name:24s} {cum:7.3f} s cumulative ({cum / total:5.1%})")


_TIMED = ("_input_crown32", "_relax", "_first_step32", "_step_pair", "_touching_tangent", "_act")


def _wall(policy: object, states: object, threat: ThreatModel) -> None:
    spent: collections.Counter[str] = collections.Counter()
    saved = {name: getattr(local, name) for name in _TIMED}

    def timed(name: str, f):  # type: ignore[no-untyped-def]
        def g(*a, **k):  # type: ignore[no-untyped-def]
            t0 = time.perf_counter()
            out = f(*a, **k)
            spent[name] += time.perf_counter() - t0
            return out

        return g

    for name, f in saved.items():
        setattr(local, name, timed(name, f))
    try:
        t0 = time.perf_counter()
        local.output_bounds(policy, states, threat)  # type: ignore[arg-type]
        total = time.perf_counter() - t0
    finally:
        for name, f in saved.items():
            setattr(local, name, f)
    print(f"{len(states)} states, {total:.3f} s wall (per function, inclusive):")  # type: ignore[arg-type]
    for name, sec in spent.most_common():
        print(f"  {name:24s} {sec:7.3f} s ({sec / total:5.1%})")


if __name__ == "__main__":
    main()
