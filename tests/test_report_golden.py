"""The same command on the same seeds gives the same ``report.json`` numbers, commit after commit.

A tiny CartPole ``compress run`` is compared with a stored report (``tests/data/``) field by
field, timings, paths, hashes of the code and versions aside. It guards refactors: a change
that is meant to change the numbers regenerates the stored report on purpose with
``UPDATE_GOLDEN=1 pytest tests/test_report_golden.py`` and says why in its commit.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from conftest import REPO

GOLDEN = REPO / "tests" / "data" / "golden_cartpole_report.json"
PROFILE = """
name = "golden-cartpole"
[env]
id = "CartPole-v1"
[threat]
eps = 0.1
[evaluation]
episodes = 3
num_envs = 3
[finetune]
steps = 150
state_episodes = 2
dagger_episodes = 2
[certificate]
states = 200
empirical_states = 20
[search]
grid = [0.5, 0.7, 0.9]
refine = 1
"""
#: measured times, memory, paths, and hashes of files that record them or of the code itself
VOLATILE = {
    "wall_s",
    "seconds",
    "timings_s",
    "run_dir",
    "command",
    "path",
    "eval_wall_s",
    "performance",
    "reproducibility",
    "training",
    "file",
}
#: the exported file's bytes record float32 weights and metadata, whose last bits differ
#: between CPUs (below); their returns and certificates are compared instead
MACHINE_BYTES = {"onnx_sha256", "file_bytes", "onnx_vs_source_bytes"}
#: float32 kernels (matmul, reductions) round differently on different CPUs (AVX2, AVX-512,
#: AMD and Intel): ~1e-7 relative. A change of behaviour moves these numbers far more.
REL_TOL = 1e-5


def _stable(obj: Any) -> Any:
    if isinstance(obj, dict):
        drop = VOLATILE | MACHINE_BYTES | ({"sha256"} if "file_bytes" in obj else set())
        return {k: _stable(v) for k, v in obj.items() if k not in drop}
    if isinstance(obj, list):
        return [_stable(v) for v in obj]
    return obj


def _differences(a: Any, b: Any, where: str = "") -> list[str]:
    """Every place where ``a`` and ``b`` differ (numbers to ``REL_TOL`` relative)."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = [f"{where}.{k}: only in one" for k in sorted(set(a) ^ set(b))]
        for k in sorted(set(a) & set(b)):
            out += _differences(a[k], b[k], f"{where}.{k}")
        return out
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"{where}: {len(a)} vs {len(b)} items"]
        return [
            d for i, (x, y) in enumerate(zip(a, b)) for d in _differences(x, y, f"{where}[{i}]")
        ]
    numeric = (int, float)
    if isinstance(a, numeric) and isinstance(b, numeric) and not isinstance(a, bool):
        same = math.isclose(a, b, rel_tol=REL_TOL, abs_tol=1e-9) or (
            math.isnan(a) and math.isnan(b)
        )
        return [] if same else [f"{where}: {a!r} vs {b!r}"]
    return [] if a == b else [f"{where}: {a!r} vs {b!r}"]


def test_report_numbers_equal_the_stored_report(tmp_path: Path) -> None:
    prof = tmp_path / "golden.toml"
    prof.write_text(PROFILE)
    cmd = [
        sys.executable,
        "-m",
        "compressor.cli",
        "run",
        str(REPO / "profiles" / "cartpole.pt"),
        "--profile",
        str(prof),
        "--out",
        str(tmp_path),
        "--name",
        "golden",
        "--workers",
        "1",
        "--json",
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    report = _stable(json.loads(r.stdout))
    if os.environ.get("UPDATE_GOLDEN"):
        GOLDEN.write_text(json.dumps(report, indent=1, sort_keys=True) + "\n")
    stored = _stable(json.loads(GOLDEN.read_text()))
    diffs = _differences(stored, report)
    assert not diffs, "report.json differs from tests/data/:\n" + "\n".join(diffs[:40])
