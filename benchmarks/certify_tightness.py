"""Tightness and speed of the certificates: certified / empirical TV, global vs local.

For a policy (default: the shared SB3 PPO Hopper, else the shipped reference) and a magnitude-
pruned copy of it, at ε = 0.075 (ℓ∞, normalised space): the median over visited states of
certified / empirical (PGD) TV and shift for the global absolute-product bound and the local
IBP and CROWN bounds, and the time to certify 10,000 states. Run:

    python benchmarks/certify_tightness.py [POLICY] [--states 10000] [--sparsity 0.775]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from compressor.certify.empirical import empirical_search
from compressor.certify.global_bound import certify_global
from compressor.certify.local import certify_local
from compressor.core.threat import ThreatModel
from compressor.evaluate import evaluate
from compressor.policy.loading import load_policy
from compressor.policy.model import Policy
from compressor.prune.criteria import prune

ROOT = Path(__file__).resolve().parents[1]
SHARED_HOPPER = ROOT.parent / "shared" / "policies" / "sb3-ppo-Hopper-v3" / "model.zip"


def measure(name: str, pol: Policy, states: np.ndarray, threat: ThreatModel, n_emp: int) -> None:
    emp = empirical_search(pol, states[:n_emp], threat, generator=torch.Generator().manual_seed(0))
    g = certify_global(pol, threat)
    rows = [("global", np.full(n_emp, g.shift_bound), np.full(n_emp, g.tv_bound or 1.0), 0.0)]
    for method in ("ibp", "crown"):
        t0 = time.perf_counter()
        loc = certify_local(pol, states, threat, method=method)
        secs = time.perf_counter() - t0
        assert loc.tv_bound is not None
        rows.append((method, loc.shift_bound[:n_emp], loc.tv_bound[:n_emp], secs))
    ok = emp.tv > 1e-12
    for label, shift, tv, secs in rows:
        r_tv = float(np.median(np.asarray(tv)[ok] / emp.tv[ok]))
        r_sh = float(np.median(np.asarray(shift)[ok] / emp.shift[ok]))
        timing = f"{secs:7.2f} s for {len(states)} states" if secs else "   (state-independent)"
        print(
            f"{name:>16} {label:>6}  TV ratio {r_tv:7.2f}  shift ratio {r_sh:9.2f}  "
            f"median certified TV {float(np.median(tv)):.4f}  {timing}"
        )
    print(
        f"{name:>16}  empirical (PGD, 50 steps × 2 restarts, {n_emp} states): "
        f"median TV {float(np.median(emp.tv)):.4f}, median shift {float(np.median(emp.shift)):.3f}"
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("policy", nargs="?", default=None)
    ap.add_argument("--states", type=int, default=10_000)
    ap.add_argument("--empirical", type=int, default=500)
    ap.add_argument("--sparsity", type=float, default=0.775)
    ap.add_argument("--eps", type=float, default=0.075)
    args = ap.parse_args()
    torch.set_num_threads(1)
    src = args.policy or (SHARED_HOPPER if SHARED_HOPPER.exists() else ROOT / "profiles/hopper.pt")
    pol = load_policy(src).policy.eval()
    threat = ThreatModel(args.eps)
    _, roll = evaluate(pol, "Hopper-v5", {}, list(range(30_000, 30_012)), record_states=True)
    assert roll.states is not None
    idx = np.random.default_rng(0).permutation(len(roll.states))[: args.states]
    states = roll.states[idx]
    print(f"policy {src}, ε = {args.eps} (ℓ∞, normalised), {len(states)} visited states")
    measure("dense", pol, states, threat, args.empirical)
    measure(
        f"pruned {args.sparsity:.1%}", prune(pol, args.sparsity), states, threat, args.empirical
    )


if __name__ == "__main__":
    main()
