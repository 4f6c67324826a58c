"""How the renderers write numbers and lay out tables: formatting only, nothing computed."""

from __future__ import annotations

from typing import Any

from compressor.core.naming import sparsity_text


def num(v: Any, d: int = 1) -> str:
    """``1,234.5``; ``n/a`` for missing values."""
    return "n/a" if v is None else f"{v:,.{d}f}"


def signed(v: Any, d: int = 1) -> str:
    """``+12.3`` / ``−4.5``; ``−∞``/``+∞`` for unbounded; ``n/a`` for missing values."""
    if v is None:
        return "n/a"
    if v in (float("inf"), float("-inf")):
        return "+∞" if v > 0 else "−∞"
    return f"{v:+,.{d}f}".replace("-", "−")


def pct(v: Any) -> str:
    """A fraction as a percentage with one decimal (every sparsity is written so)."""
    return sparsity_text(v)


def sci(v: Any) -> str:
    """Four significant digits (certificates span many orders of magnitude)."""
    return "n/a" if v is None else f"{v:.4g}"


def scalar(v: Any) -> str:
    """Any JSON scalar, for the generic blocks."""
    if v is None:
        return "n/a"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return sci(v)
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, list) and all(not isinstance(x, (dict, list)) for x in v):
        return ", ".join(scalar(x) for x in v)
    return str(v)


def norm_name(n: str) -> str:
    """``ℓ∞`` or ``ℓ2``."""
    return "ℓ∞" if n == "inf" else f"ℓ{n}"


def table(head: list[str], rows: list[list[str]], align: str | None = None) -> dict[str, Any]:
    """A table for the templates: header, rows of strings, per-column alignment (l/r)."""
    return {"head": head, "rows": rows, "align": align or "l" + "r" * (len(head) - 1)}


def falls_text(t: dict[str, Any] | None) -> str:
    """``2 of 16`` from a ``tail`` record; ``n/a`` when the report has none."""
    return "n/a" if not t else f"{t['falls']}\u00a0of\u00a0{t['n']}"


def flatten(d: Any, prefix: str = "") -> list[list[str]]:
    """Nested dicts as ``[dotted.key, value]`` rows (lists of scalars joined)."""
    if isinstance(d, dict):
        rows = []
        for k, v in d.items():
            rows += flatten(v, f"{prefix}.{k}" if prefix else str(k))
        return rows
    if isinstance(d, list) and any(isinstance(x, (dict, list)) for x in d):
        rows = []
        for i, x in enumerate(d):
            rows += flatten(x, f"{prefix}[{i}]")
        return rows
    return [[prefix or "value", scalar(d)]]
