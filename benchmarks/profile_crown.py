"""Where CROWN's time goes on the reference policy: cProfile of ``output_bounds`` on visited
states (one thread), per function of ``compressor/certify/local.py``.

    python benchmarks/profile_crown.py [--states 2000] [--policy profiles/hopper.pt]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import suite  # noqa: E402

from compressor.certify.local import output_bounds  # noqa: E402
from compressor.core.threat import ThreatModel  # noqa: E402
from compressor.policy.loading import load_policy  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--policy", default=str(suite.REPO / "profiles" / "hopper.pt"))
    ap.add_argument("--env", default="Hopper-v5")
    ap.add_argument("--eps", type=float, default=0.075)
    ap.add_argument("--states", type=int, default=2000)
    args = ap.parse_args()
    torch.set_num_threads(1)
    policy = load_policy(args.policy).policy.eval()
    states = suite._states(policy, args.env, args.states)
    threat = ThreatModel(args.eps)
    output_bounds(policy, states[:64], threat)  # first-use costs apart
    prof = cProfile.Profile()
    prof.enable()
    output_bounds(policy, states, threat)
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


if __name__ == "__main__":
    main()
