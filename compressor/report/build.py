"""The run report: ``report.json`` (versioned schema) and, rendered from it only, ``report.md``,
``report.html`` and ``plots/*.png``.

The JSON is built from the stages' dataclasses; the templates and plots read nothing but the
JSON, so every number a reviewer sees is one the code computed and recorded. Values derived
from other fields (the sweet spot, the regret decomposition) are computed once, stored in the
JSON's ``derived`` block, and rendered from there.

Schema (``compressor/schema/report.schema.json``) is append-only: version 2 adds optional
fields to version 1 and removes none; version 3 adds the optional ``frontier_analysis`` block
(:mod:`compressor.report.frontier`); version 4 adds the paired sequential decision
(``evaluation_method``, ``final_check``, per-episode records, falls and worst-decile means,
``verdict.status``/``deploy``; :mod:`compressor.report.verdict`), the chosen policy's numbers
then being those of ``policy.onnx`` in onnxruntime. ``compress report RUN_DIR`` re-renders a
run without recomputing; a version-1 report is completed from the files beside it (the
journal, the chosen ``policy.pt``) where they exist, and an older report without a block is
rendered without its section.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import math
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from compressor.core import atomic
from compressor.core.errors import CompressorError
from compressor.core.naming import sparsity_text

if TYPE_CHECKING:  # the renderers need none of the pipeline's modules at run time
    from compressor.certify.global_bound import GlobalCertificate
    from compressor.evaluate import SuiteResult
    from compressor.policy.model import Policy
    from compressor.run.results import ChosenPolicy, DenseMeasurement, FinalCheck, RunSetup
    from compressor.search.budget import Budget
    from compressor.search.candidate import Candidate
    from compressor.search.sparsity import SearchResult

SCHEMA = "edge-policy-compressor/report"
SCHEMA_VERSION = 4
SCHEMA_FILE = Path(__file__).parent / "schema" / "report.schema.json"
PACKAGES = (
    "edge-policy-compressor",
    "torch",
    "numpy",
    "gymnasium",
    "mujoco",
    "onnx",
    "onnxruntime",
    "matplotlib",
    "jinja2",
)
OUTPUTS = ("policy.pt", "policy.onnx", "config.json", "journal.jsonl")


def package_versions() -> dict[str, str]:
    """Versions of Python and the packages that determine the numbers."""
    out = {"python": sys.version.split()[0], "platform": platform.platform()}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def code_digest() -> dict[str, Any]:
    """SHA-256 over the package's own source files, and the git commit when in a checkout."""
    root = Path(__file__).resolve().parents[1]  # the compressor package
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.suffix in (".py", ".j2", ".json", ".toml"):
            h.update(p.relative_to(root).as_posix().encode() + b"\0" + p.read_bytes())
    commit = None
    try:
        res = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
        )
        commit = (res.stdout.strip() or None) if res.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        pass
    return {"package_sha256": h.hexdigest(), "git_commit": commit}


def env_description(env_id: str) -> dict[str, Any]:
    """The registered Gymnasium spec of ``env_id`` (version, step limit, entry point)."""
    try:
        import gymnasium as gym

        spec = gym.spec(env_id)
    except Exception:  # an unregistered env is reported, not fatal for the report
        return {"id": env_id, "registered": False}
    return {
        "id": env_id,
        "registered": True,
        "version": spec.version,
        "max_episode_steps": spec.max_episode_steps,
        "entry_point": str(spec.entry_point),
    }


def layer_table(policy: Policy) -> list[dict[str, Any]]:
    """Per Linear layer: shape, weights, non-zero weights, sparsity and all-zero rows/columns."""
    import torch

    rows = []
    with torch.no_grad():
        for i, w in enumerate(policy.effective_weights()):
            nz = w != 0
            rows.append(
                {
                    "index": i + 1,
                    "shape": [int(w.shape[0]), int(w.shape[1])],
                    "weights": int(w.numel()),
                    "nonzero": int(nz.sum()),
                    "sparsity": float(1.0 - nz.float().mean()),
                    "zero_rows": int((~nz.any(1)).sum()),
                    "zero_cols": int((~nz.any(0)).sum()),
                }
            )
    return rows


def output_hashes(run_dir: Path) -> dict[str, str | None]:
    """SHA-256 of the run's outputs (None for those that do not exist)."""
    from compressor.policy.native import sha256_file

    return {n: sha256_file(run_dir / n) if (run_dir / n).is_file() else None for n in OUTPUTS}


def _ci(suite: SuiteResult, name: str | None) -> list[float] | None:
    e = suite.attacks.get(name or "")
    return [e.stats.ci_low, e.stats.ci_high] if e else None


def attack_runs(
    dense: SuiteResult,
    candidates: list[Any],
    chosen: SuiteResult | None,
    screen: list[str],
    final: list[tuple[str, SuiteResult]] | None = None,
) -> list[dict[str, Any]]:
    """Which attack ran on which policy, on how many episodes, what it reached and what it cost;
    one row per (policy, attack).

    :param dense: the dense policy's suite (screen and final attacks).
    :param candidates: the search's candidates (screen attacks).
    :param chosen: the chosen policy's suite, for reports without a final check (its final
        attacks are the ones not in ``screen``).
    :param final: the final check's suites by label (ONNX models), in the order run.
    """
    rows: list[dict[str, Any]] = []

    def add(label: str, suite: SuiteResult, skip: list[str]) -> None:
        for name, e in suite.attacks.items():
            if name in skip:
                continue
            rows.append(
                {
                    "policy": label,
                    "attack": name,
                    "episodes": e.stats.n,
                    "return": round(e.stats.mean, 2),
                    "ci": f"{e.stats.ci_low:.1f} – {e.stats.ci_high:.1f}",
                    "mean_tv": None if e.mean_tv is None else round(e.mean_tv, 4),
                    "eval_wall_s": round(e.wall_s, 1),
                    "training": e.training_summary(),
                    **({"failed": why} if (why := suite.failed(name)) else {}),
                }
            )

    add("dense (torch)", dense, [])
    for c in candidates:
        add(f"sparsity {sparsity_text(c.sparsity)} (torch)", c.suite, [])
    if final:
        for label, suite in final:
            add(label, suite, [])
    elif chosen is not None:
        add("chosen", chosen, screen)
    return rows


def _policy_block(
    suite: SuiteResult,
    certs: dict[str, GlobalCertificate],
    policy: Policy,
    rule: Budget,
) -> dict[str, Any]:
    from compressor.report.verdict import tails

    return {
        "clean_return": suite.clean.stats.mean,
        "robust_return": suite.robust_return,
        "strongest_attack": suite.strongest_attack,
        "evaluation": suite.to_dict(),
        "tail": tails(suite, rule),
        "certificates": {k: v.to_dict() for k, v in certs.items()},
        "sparsity": policy.sparsity(),
        "params": policy.num_parameters(),
        "params_nonzero": policy.num_parameters(nonzero_only=True),
        "layers": layer_table(policy),
    }


def _chosen_block(setup: RunSetup, rule: Budget, chosen: ChosenPolicy) -> dict[str, Any]:
    block = _policy_block(chosen.suite, chosen.certificates, chosen.policy, rule)
    cand, exp = chosen.candidate, chosen.export
    block["finetune"] = cand.finetune.to_dict() if cand.finetune else None
    block["local_certificate"] = cand.local
    if chosen.decision is not None:
        block["decision"] = chosen.decision.to_dict()
        block["final_check"] = list(chosen.decision.reasons)
        block["measured_on"] = (
            f"policy.onnx in onnxruntime, batch {setup.target.batch_size}, "
            f"{', '.join(setup.target.providers)}"
        )
    else:
        block["final_check"] = rule.check(chosen.suite, chosen.certificates[setup.threat.norm])
    pt = setup.run_dir / "policy.pt"
    block["file_bytes"] = pt.stat().st_size if pt.exists() else None
    block["onnx"] = {
        "path": "policy.onnx",
        "file_bytes": exp.file_bytes,
        "sha256": exp.sha256,
        "opset": exp.opset,
        "ir_version": exp.ir_version,
        "params_exported": exp.params_exported,
        "removed_neurons": exp.removed_neurons,
        "parity_max_abs_err": exp.parity_max_abs_err,
        "parity_batches": exp.parity_batches,
    }
    return block


def _frontier_row(c: Candidate, rule: Budget) -> dict[str, Any]:
    from compressor.report.verdict import tails

    return {
        "target_sparsity": c.target_sparsity,
        "sparsity": c.sparsity,
        "clean_return": c.suite.clean.stats.mean,
        "clean_ci": [c.suite.clean.stats.ci_low, c.suite.clean.stats.ci_high],
        "robust_return": c.suite.robust_return,
        "robust_ci": _ci(c.suite, c.suite.strongest_attack),
        "strongest_attack": c.suite.strongest_attack,
        "attack_returns": {k: v.stats.mean for k, v in c.suite.attacks.items()},
        "attack_ci": {k: _ci(c.suite, k) for k in c.suite.attacks},
        "lipschitz": c.certificate.lipschitz,
        "tv_bound": c.certificate.tv_bound,
        "certified_radius": c.certificate.to_dict()["certified_radius"],
        "params_nonzero": c.params_nonzero,
        "local_tv_median": (c.local or {}).get("local", {}).get("tv_median"),
        "empirical_tv_median": (c.local or {}).get("empirical", {}).get("tv_median"),
        "passed": c.passed,
        "reasons": c.reasons,
        "wall_s": round(c.wall_s, 2),
        "status": c.status,
        "episodes": c.decision.episodes if c.decision else None,
        "tail": tails(c.suite, rule),
        "decision": c.decision.to_dict() if c.decision else None,
    }


def _reproducibility(setup: RunSetup) -> dict[str, Any]:
    return {
        "command": list(setup.command),
        "versions": package_versions(),
        "environment": env_description(setup.env_id),
        "code": code_digest(),
        "source_sha256": setup.loaded.sha256,
        "outputs_sha256": output_hashes(setup.run_dir),
        "cpu": {"machine": platform.machine(), "logical_cores": os.cpu_count()},
    }


def build_report(
    setup: RunSetup,
    dense: DenseMeasurement,
    search: SearchResult,
    final: FinalCheck | ChosenPolicy | None,
    timings: dict[str, float],
) -> dict[str, Any]:
    """Assemble the report dict (the content of ``report.json``) from the stages' values.

    :param setup: the run's set-up. :param dense: the dense measurement.
    :param search: the search's candidates and choice.
    :param final: the final check (a bare chosen policy or None stands for a check that tried
        only that one). :param timings: seconds per stage.
    """
    from compressor.policy.loading import describe
    from compressor.report.frontier import frontier_analysis
    from compressor.report.verdict import evaluation_method, final_check_block, verdict
    from compressor.run.results import FinalCheck

    if not isinstance(final, FinalCheck):
        final = FinalCheck(final)
    chosen = final.chosen
    prof, rule = setup.profile, dense.rule
    src_file = Path(setup.loaded.path)
    dense_block = _policy_block(dense.suite, dense.certificates, setup.dense, rule)
    dense_block["file_bytes"] = src_file.stat().st_size if src_file.exists() else None
    dense_block["local_certificate"] = dense.local
    chosen_block = _chosen_block(setup, rule, chosen) if chosen is not None else None
    f = prof.finetune
    screen = dense.screen_suite(prof.attacks.screen)
    checked = [("dense (ONNX, final check)", final.dense_suite)] if final.dense_suite else []
    checked += [
        (f"sparsity {sparsity_text(a.candidate.sparsity)} (ONNX, final check)", a.suite)
        for a in final.attempts
    ]
    report = {
        "schema": SCHEMA,
        "schema_version": SCHEMA_VERSION,
        "verdict": verdict(setup, rule, final, search.candidates),
        "source": describe(setup.loaded),
        "threat": {"eps": setup.threat.eps, "norm": setup.threat.norm, "space": setup.threat.space},
        "budget": rule.to_dict(),
        "seeds": {
            "evaluation": setup.seeds,
            "decisions": [prof.decision_seeds()[0], prof.decision_seeds()[-1]],
            "attack_seed": prof.attacks.seed,
            "finetune_state_seeds": [f.state_seed, f.state_seed + f.state_episodes - 1],
        },
        "attacks": {"screen": prof.attacks.screen, "final": prof.attacks.final},
        "attack_runs": attack_runs(
            dense.suite,
            search.candidates,
            chosen.suite if chosen is not None else None,
            prof.attacks.screen,
            [(k, v) for k, v in checked if v is not None],
        ),
        "evaluation_method": evaluation_method(setup, rule),
        "final_check": final_check_block(final, rule, search.candidates),
        "dense": dense_block,
        "chosen": chosen_block,
        "frontier": [_frontier_row(c, rule) for c in search.candidates],
        "timings_s": {k: round(v, 2) for k, v in timings.items()},
        "profile": prof.to_dict(),
        "target": setup.target.to_dict(),
        "reproducibility": _reproducibility(setup),
        "frontier_analysis": frontier_analysis(
            rule,
            rule.dense_clean,
            rule.dense_robust,
            screen.strongest_attack,
            dense.certificates[setup.threat.norm].to_dict()["certified_radius"],
            search.candidates,
            chosen.candidate if chosen is not None else None,
            prof.reference.best_return,
            prof.reference.source,
        ),
    }
    report["derived"] = derive(report)
    return report


# ---- values derived from the report alone ---------------------------------------------------
def resolution(budget: dict[str, Any], dense: dict[str, Any]) -> dict[str, Any] | None:
    """Whether the evaluation can tell a pass from a fail: the budget's allowed loss against
    the chance difference of two means over this many episodes.

    A candidate's mean is compared with the dense policy's; with equal spread, the 95% CI of
    their difference is about √2 times the dense CI's half-width. When that exceeds the allowed
    loss (``budget × scale``), a verdict can flip with the episode seeds; CI half-widths shrink
    as 1/√n, so ``episodes_needed`` = n·(half-width of the difference / allowed loss)².
    """
    ev = dense.get("evaluation") or {}
    runs = [ev.get("clean"), (ev.get("attacks") or {}).get(dense.get("strongest_attack") or "")]
    widths = []
    n = None
    for run in runs:
        ret = (run or {}).get("return") or {}
        if ret.get("ci_low") is None or ret.get("ci_high") is None:
            continue
        widths.append((ret["ci_high"] - ret["ci_low"]) / 2)
        n = ret.get("n", n)
    margin = budget["budget"] * budget["scale"]
    if not widths or not n or margin <= 0:
        return None
    diff = math.sqrt(2) * max(widths)
    return {
        "allowed_loss": margin,
        "clean_ci_halfwidth": widths[0],
        "robust_ci_halfwidth": widths[1] if len(widths) > 1 else None,
        "difference_ci_halfwidth": diff,
        "episodes": n,
        "episodes_needed": max(n, math.ceil(n * (diff / margin) ** 2)),
        "resolved": diff <= margin,
    }


def derive(r: dict[str, Any]) -> dict[str, Any]:
    """Sweet spot, normalised scores, why no higher sparsity passed, and the regret split.

    Scores normalise a return by the budget's scale: ``(J - J_random) / (J_dense - J_random)``,
    so the dense policy's clean score is 1. The sweet spot is the evaluated sparsity with the
    highest mean of its clean and robust scores (ties: the sparser). The regret decomposition
    follows background.md with J(π*) the best clean return known to the report:
    ``J(π*) − J̃(attacked) = [J(π*) − J(dense)] + [J(dense) − J(pruned)] + [J(pruned) − J̃]``.
    """
    b, dense, front = r["budget"], r["dense"], sorted(r["frontier"], key=lambda f: f["sparsity"])
    scale, rnd = b["scale"], b["random_return"]

    def score(p: dict[str, Any]) -> dict[str, Any]:
        cs = (p["clean_return"] - rnd) / scale
        rs = (p["robust_return"] - rnd) / scale
        return {
            "sparsity": p["sparsity"],
            "clean_score": cs,
            "robust_score": rs,
            "score": (cs + rs) / 2,
        }

    scores = [{**score(p), "passed": p["passed"]} for p in front]
    # the dense policy competes too: when no pruned level beats it, the sweet spot is dense
    pool = [({**score(dense), "passed": True}, dense, "dense")]
    pool += [(sc, p, "candidate") for sc, p in zip(scores, front)]
    sc, best, label = max(pool, key=lambda t: (t[0]["score"], t[1]["sparsity"]))
    sweet = {
        **sc,
        "label": label,
        "clean_return": best["clean_return"],
        "robust_return": best["robust_return"],
    }
    c = r.get("chosen")
    limit = None
    if c is not None:
        above = [p for p in front if p["sparsity"] > c["sparsity"] and not p["passed"]]
        if above:
            limit = {"sparsity": above[0]["sparsity"], "reasons": above[0]["reasons"]}
    reference = r.get(
        "reference_return", (r.get("frontier_analysis") or {}).get("reference_return")
    )
    best_known = max([dense["clean_return"], *(p["clean_return"] for p in front)])
    source = "best clean return measured in this run (dense and every candidate)"
    if isinstance(reference, (int, float)) and reference > best_known:
        best_known, source = float(reference), "reference_return given in the report"

    def split(p: dict[str, Any], label: str) -> dict[str, Any]:
        return {
            "label": label,
            "sparsity": p["sparsity"],
            "clean_regret": best_known - dense["clean_return"],
            "pruning_loss": dense["clean_return"] - p["clean_return"],
            "attack_gap": p["clean_return"] - p["robust_return"],
            "total": best_known - p["robust_return"],
        }

    rows = [split(dense, "dense")] + [split(p, "candidate") for p in front]
    # a report with sequential decisions states its own error rate; the old note does not apply
    sequential = r.get("evaluation_method") is not None
    return {
        "resolution": None if sequential else resolution(b, dense),
        "scores": {"dense": score(dense), "frontier": scores},
        "sweet_spot": sweet,
        "limit": limit,
        "regret": {
            "best_known_return": best_known,
            "best_known_source": source,
            "rows": rows,
            "chosen": split(c, "chosen") if c is not None else None,
        },
        "reduction": {
            "nonzero_params_kept": (
                c["params_nonzero"] / dense["params_nonzero"] if c is not None else None
            ),
            "onnx_vs_source_bytes": (
                c["onnx"]["file_bytes"] / dense["file_bytes"]
                if c is not None and c.get("onnx") and dense.get("file_bytes")
                else None
            ),
        },
    }


def complete(r: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """Fill the optional fields of an older report from the files beside it; no recomputation.

    Reads the journal (per-candidate confidence intervals) and the chosen ``policy.pt`` (its
    masks, for per-layer sparsity) when present, then adds ``derived`` if missing. Idempotent.
    """
    r = json.loads(json.dumps(r))  # a deep copy: the caller's dict stays as read
    journal = run_dir / "journal.jsonl"
    if any("robust_ci" not in f for f in r["frontier"]) and journal.is_file():
        by_sparsity = {}
        for line in journal.read_text().splitlines():
            if line.strip():
                j = json.loads(line)
                by_sparsity[round(j["sparsity"], 9)] = j["evaluation"]
        for f in r["frontier"]:
            ev = by_sparsity.get(round(f["sparsity"], 9))
            if ev is not None:
                ci = {
                    k: [a["return"]["ci_low"], a["return"]["ci_high"]]
                    for k, a in ev["attacks"].items()
                }
                f.setdefault("robust_ci", ci.get(ev.get("strongest_attack") or ""))
                f.setdefault("attack_ci", ci)
    c, pt = r.get("chosen"), run_dir / "policy.pt"
    if c is not None and "layers" not in c and pt.is_file():
        from compressor.policy.native import load_native

        c["layers"] = layer_table(load_native(pt))
    d = r["dense"]
    if "layers" not in d and d["sparsity"] == 0.0:  # dense: every weight is non-zero
        sizes = r["source"]["layer_sizes"]
        d["layers"] = [
            {
                "index": i + 1,
                "shape": [o, n],
                "weights": o * n,
                "nonzero": o * n,
                "sparsity": 0.0,
                "zero_rows": 0,
                "zero_cols": 0,
            }
            for i, (n, o) in enumerate(zip(sizes[:-1], sizes[1:]))
        ]
    rep = r.setdefault("reproducibility", {})
    if "outputs_sha256" not in rep:
        rep["outputs_sha256"] = output_hashes(run_dir)
        rep["completed_from_schema_version"] = r.get("schema_version")
    if "derived" not in r:
        r["derived"] = derive(r)
    elif "resolution" not in r["derived"]:  # added in schema version 3
        r["derived"]["resolution"] = resolution(r["budget"], r["dense"])
    r["schema_version"] = max(int(r.get("schema_version", 1)), SCHEMA_VERSION)
    return r


# ---- validation, writing, reading -----------------------------------------------------------
def schema() -> dict[str, Any]:
    """The JSON Schema of ``report.json`` shipped with the package."""
    with open(SCHEMA_FILE) as fh:
        data: dict[str, Any] = json.load(fh)
    return data


def validate(r: dict[str, Any]) -> list[str]:
    """Schema violations of a report dict, one line each (empty: valid)."""
    import jsonschema

    validator = jsonschema.Draft202012Validator(schema())
    return [
        f"{'/'.join(str(p) for p in e.absolute_path) or '(root)'}: {e.message}"
        for e in sorted(validator.iter_errors(r), key=lambda e: list(map(str, e.absolute_path)))
    ]


def write_report(report: dict[str, Any], run_dir: Path) -> None:
    """Write ``report.json``, then ``plots/*.png``, ``report.md`` and ``report.html`` from it."""
    from compressor.report import plots
    from compressor.report.render import render_html, render_markdown

    atomic.write_json(run_dir / "report.json", report)
    # render from what was written, so the renderings see exactly the JSON (no extra objects)
    r = load_report(run_dir)
    figures = plots.draw_all(r)
    for name, png in figures.items():
        atomic.write_bytes(run_dir / "plots" / f"{name}.png", png)
    atomic.write_text(run_dir / "report.md", render_markdown(r, figures))
    atomic.write_text(run_dir / "report.html", render_html(r, figures))


def rerender(run_dir: Path) -> dict[str, Any]:
    """``compress report``: re-render a run directory's report from its ``report.json``."""
    if not (run_dir / "report.json").is_file():
        raise CompressorError(f"{run_dir}: no report.json (is this a run directory?)")
    r = complete(load_report(run_dir), run_dir)
    write_report(r, run_dir)
    return r


def load_report(run_dir: Path) -> dict[str, Any]:
    """Read a run directory's ``report.json`` (or a path to the file itself)."""
    path = run_dir if run_dir.suffix == ".json" else run_dir / "report.json"
    try:
        with open(path) as fh:
            data: dict[str, Any] = json.load(fh)
    except FileNotFoundError:
        raise CompressorError(f"{path}: not found (is this a run directory?)") from None
    except json.JSONDecodeError as exc:
        raise CompressorError(f"{path}: not valid JSON ({exc})") from None
    if data.get("schema") != SCHEMA:
        raise CompressorError(f"{path}: not a compressor report (schema {data.get('schema')!r})")
    return data
