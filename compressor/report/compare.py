"""``compress compare RUN_A RUN_B``: two run reports side by side, read from their JSON only."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from compressor.report.build import load_report


def _get(r: dict[str, Any], *path: str | int) -> Any:
    cur: Any = r
    for p in path:
        if isinstance(cur, dict):
            cur = cur.get(p)  # type: ignore[call-overload]
        elif isinstance(cur, list) and isinstance(p, int) and -len(cur) <= p < len(cur):
            cur = cur[p]
        else:
            return None
    return cur


def _rows(r: dict[str, Any]) -> list[tuple[str, Any]]:
    """(metric, value) pairs of one report, in display order."""
    norm = r["threat"]["norm"]
    c: Callable[..., Any] = lambda *p: _get(r, "chosen", *p)  # noqa: E731
    rows: list[tuple[str, Any]] = [
        ("verdict", r["verdict"].get("status") or ("pass" if r["verdict"]["passed"] else "fail")),
        ("source", Path(r["source"]["file"]).name),
        ("source sha256", (r["source"].get("sha256") or "")[:12] or None),
        ("environment", _get(r, "profile", "env", "id")),
        ("profile", _get(r, "profile", "name")),
        ("target", _get(r, "target", "name")),
        ("threat", f"{norm} ε={r['threat']['eps']} ({r['threat']['space']})"),
        ("budget", r["budget"]["budget"]),
        ("episodes", len(r["seeds"]["evaluation"])),
        ("candidates evaluated", len(r["frontier"])),
        ("dense clean return", r["dense"]["clean_return"]),
        ("dense robust return", r["dense"]["robust_return"]),
        ("dense certified bound", _get(r, "dense", "certificates", norm, "lipschitz")),
        ("chosen sparsity", c("sparsity")),
        ("chosen non-zero params", c("params_nonzero")),
        ("chosen clean return", c("clean_return")),
        ("chosen robust return", c("robust_return")),
        ("chosen worst attack", c("strongest_attack")),
    ]
    attacks = _get(r, "chosen", "evaluation", "attacks") or {}
    rows += [(f"chosen return under {k}", v["return"]["mean"]) for k, v in attacks.items()]
    rows += [
        ("chosen certified bound", c("certificates", norm, "lipschitz")),
        ("chosen certified radius", c("certificates", norm, "certified_radius")),
        ("chosen falls, clean", c("tail", "clean", "falls")),
        ("decision episodes spent", _get(r, "verdict", "episodes")),
        ("chosen local certified TV, median", c("local_certificate", "local", "tv_median")),
        ("chosen empirical TV, median", c("local_certificate", "empirical", "tv_median")),
        ("policy.onnx bytes", c("onnx", "file_bytes")),
        ("sweet spot sparsity", _get(r, "derived", "sweet_spot", "sparsity")),
        ("total seconds", _get(r, "timings_s", "total")),
    ]
    return rows


def compare_reports(a: dict[str, Any], b: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per metric: ``{"metric", "a", "b", "delta"}`` (delta = b − a for numbers)."""
    ra, rb = dict(_rows(a)), dict(_rows(b))
    names = list(dict.fromkeys([*ra, *rb]))
    out = []
    for m in names:
        va, vb = ra.get(m), rb.get(m)
        delta = None
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (va, vb)):
            delta = vb - va  # type: ignore[operator]
        out.append({"metric": m, "a": va, "b": vb, "delta": delta})
    return out


def compare_runs(run_a: Path, run_b: Path) -> dict[str, Any]:
    """Load two run directories' reports and compare them.

    :param run_a: first run directory (or its ``report.json``).
    :param run_b: second run directory.
    """
    a, b = load_report(run_a), load_report(run_b)
    return {"a": str(run_a), "b": str(run_b), "rows": compare_reports(a, b)}


def fmt(v: Any) -> str:
    """A compact display of one cell."""
    if v is None:
        return "—"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        return f"{v:,.4g}" if abs(v) < 1e4 else f"{v:,.1f}"
    return str(v)
