"""The run report: ``report.json`` (versioned schema) and ``report.md`` rendered from it only.

The JSON is built from the stages' dataclasses; the Markdown template reads nothing but the
JSON, so every number a reviewer sees is one the code computed and recorded.
"""

from __future__ import annotations

import importlib.metadata
import json
import platform
import sys
from pathlib import Path
from typing import Any

import jinja2

from compressor import atomic
from compressor.certify import GlobalCertificate
from compressor.config import Profile, Target
from compressor.evaluate import SuiteResult
from compressor.loading import LoadedPolicy, describe
from compressor.search import Budget, SearchResult
from compressor.threat import ThreatModel

SCHEMA = "edge-policy-compressor/report"
SCHEMA_VERSION = 1
PACKAGES = (
    "edge-policy-compressor",
    "torch",
    "numpy",
    "gymnasium",
    "mujoco",
    "onnx",
    "onnxruntime",
)


def package_versions() -> dict[str, str]:
    """Versions of Python and the packages that determine the numbers."""
    out = {"python": sys.version.split()[0], "platform": platform.platform()}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def _policy_block(
    suite: SuiteResult,
    certs: dict[str, GlobalCertificate],
    sparsity: float,
    params: int,
    params_nonzero: int,
) -> dict[str, Any]:
    return {
        "clean_return": suite.clean.stats.mean,
        "robust_return": suite.robust_return,
        "strongest_attack": suite.strongest_attack,
        "evaluation": suite.to_dict(),
        "certificates": {k: v.to_dict() for k, v in certs.items()},
        "sparsity": sparsity,
        "params": params,
        "params_nonzero": params_nonzero,
    }


def build_report(
    *,
    loaded: LoadedPolicy,
    profile: Profile,
    target: Target,
    threat: ThreatModel,
    rule: Budget,
    dense_suite: SuiteResult,
    dense_certs: dict[str, GlobalCertificate],
    dense_local: dict[str, Any] | None,
    search: SearchResult,
    chosen: dict[str, Any] | None,
    timings: dict[str, float],
    command: list[str],
    run_dir: Path,
) -> dict[str, Any]:
    """Assemble the report dict (the content of ``report.json``)."""
    dense = loaded.policy
    src_file = Path(loaded.path)
    dense_block = _policy_block(
        dense_suite,
        dense_certs,
        dense.sparsity(),
        dense.num_parameters(),
        dense.num_parameters(nonzero_only=True),
    )
    dense_block["file_bytes"] = src_file.stat().st_size if src_file.exists() else None
    dense_block["local_certificate"] = dense_local
    chosen_block = None
    if chosen is not None:
        pol, exp = chosen["policy"], chosen["export"]
        cand = chosen["candidate"]
        chosen_block = _policy_block(
            chosen["suite"],
            chosen["certificates"],
            pol.sparsity(),
            pol.num_parameters(),
            pol.num_parameters(nonzero_only=True),
        )
        chosen_block["finetune"] = cand.finetune.to_dict() if cand.finetune else None
        chosen_block["local_certificate"] = chosen.get("local")
        chosen_block["final_check"] = rule.check(
            chosen["suite"], chosen["certificates"][threat.norm]
        )
        pt = run_dir / "policy.pt"
        chosen_block["file_bytes"] = pt.stat().st_size if pt.exists() else None
        chosen_block["onnx"] = {
            "path": "policy.onnx",
            "file_bytes": exp.file_bytes,
            "sha256": exp.sha256,
            "opset": exp.opset,
            "ir_version": exp.ir_version,
            "params_exported": exp.params_exported,
            "removed_neurons": exp.removed_neurons,
            "parity_max_abs_err": exp.parity_max_abs_err,
            "parity_batches": exp.parity_batches,
            "weight_storage": exp.weight_storage,
            "weight_storage_note": exp.weight_storage_note,
        }
    frontier = [
        {
            "target_sparsity": c.target_sparsity,
            "sparsity": c.sparsity,
            "clean_return": c.suite.clean.stats.mean,
            "clean_ci": [c.suite.clean.stats.ci_low, c.suite.clean.stats.ci_high],
            "robust_return": c.suite.robust_return,
            "strongest_attack": c.suite.strongest_attack,
            "attack_returns": {k: v.stats.mean for k, v in c.suite.attacks.items()},
            "lipschitz": c.certificate.lipschitz,
            "tv_bound": c.certificate.tv_bound,
            "certified_radius": c.certificate.to_dict()["certified_radius"],
            "params_nonzero": c.params_nonzero,
            "local_tv_median": (c.local or {}).get("local", {}).get("tv_median"),
            "empirical_tv_median": (c.local or {}).get("empirical", {}).get("tv_median"),
            "passed": c.passed,
            "reasons": c.reasons,
            "wall_s": round(c.wall_s, 2),
        }
        for c in search.candidates
    ]
    if chosen_block is not None:
        verdict = {
            "passed": True,
            "chosen_sparsity": chosen_block["sparsity"],
            "summary": (
                f"sparsity {chosen_block['sparsity']:.1%} meets budget {rule.budget}: clean "
                f"{chosen_block['clean_return']:.1f} ≥ {rule.clean_floor:.1f}, robust "
                f"{chosen_block['robust_return']:.1f} ≥ {rule.robust_floor:.1f}, certificate "
                "no looser than dense"
            ),
        }
    else:
        verdict = {
            "passed": False,
            "chosen_sparsity": None,
            "summary": f"no evaluated sparsity met budget {rule.budget}; nothing was exported",
        }
    return {
        "schema": SCHEMA,
        "schema_version": SCHEMA_VERSION,
        "verdict": verdict,
        "source": describe(loaded),
        "threat": {"eps": threat.eps, "norm": threat.norm, "space": threat.space},
        "budget": rule.to_dict(),
        "seeds": {
            "evaluation": profile.seeds(),
            "attack_seed": profile.attacks.seed,
            "finetune_state_seeds": [
                profile.finetune.state_seed,
                profile.finetune.state_seed + profile.finetune.state_episodes - 1,
            ],
        },
        "attacks": {"screen": profile.attacks.screen, "final": profile.attacks.final},
        "dense": dense_block,
        "chosen": chosen_block,
        "frontier": frontier,
        "timings_s": {k: round(v, 2) for k, v in timings.items()},
        "profile": profile.to_dict(),
        "target": target.to_dict(),
        "reproducibility": {"command": command, "versions": package_versions()},
    }


def render_markdown(report: dict[str, Any]) -> str:
    """Render ``report.md`` from the report dict alone."""
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("compressor", "templates"),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.filters["num"] = lambda v, d=1: "n/a" if v is None else f"{v:,.{d}f}"
    env.filters["pct"] = lambda v: "n/a" if v is None else f"{100 * v:.1f}%"
    env.filters["sci"] = lambda v: "n/a" if v is None else f"{v:.4g}"
    return env.get_template("report.md.j2").render(r=report)


def write_report(report: dict[str, Any], run_dir: Path) -> None:
    """Write ``report.json`` and ``report.md`` atomically into ``run_dir``."""
    atomic.write_json(run_dir / "report.json", report)
    atomic.write_text(run_dir / "report.md", render_markdown(report))


def load_report(run_dir: Path) -> dict[str, Any]:
    """Read a run directory's ``report.json``."""
    with open(run_dir / "report.json") as fh:
        data: dict[str, Any] = json.load(fh)
    return data
