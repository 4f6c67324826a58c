"""The report's figures, drawn from ``report.json`` alone (matplotlib, headless Agg backend).

Every function takes the report dict and returns PNG bytes, or None when the report holds
nothing to draw. The PNGs carry no timestamp, so re-rendering a report gives identical files.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")  # headless: no display, no GUI toolkit
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

CLEAN = "#1f5fa8"
ROBUST = "#c0392b"
CERT = "#6c3483"
EMPIRICAL = "#d68910"
CHOSEN = "#f4d03f"
SWEET = "#1e8449"
GREY = "#7f8c8d"
DPI = 100

plt.rcParams.update(
    {
        "font.size": 12,
        "axes.titlesize": 14,
        "axes.titleweight": "bold",
        "axes.labelsize": 12,
        "legend.fontsize": 10.5,
        "axes.spines.top": False,
        "axes.spines.right": False,
        "axes.grid": True,
        "grid.alpha": 0.3,
        "svg.hashsalt": "report",
    }
)


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()


def _pct(points: list[dict[str, Any]]) -> list[float]:
    return [100.0 * p["sparsity"] for p in points]


def _mark(ax: Any, x: float, y: float, kind: str, label: str) -> None:
    """The chosen point (gold star) or the sweet spot (green diamond), annotated."""
    if kind == "chosen":
        ax.plot(x, y, "*", ms=22, mfc=CHOSEN, mec="black", mew=1.2, zorder=6, label=label)
    else:
        ax.plot(x, y, "D", ms=13, mfc="none", mec=SWEET, mew=2.5, zorder=7, label=label)


def frontier(r: dict[str, Any]) -> bytes | None:
    """Clean and robust return vs sparsity (95% CIs), the budget floors, chosen and sweet spot."""
    pts = sorted(r["frontier"], key=lambda f: f["sparsity"])
    if not pts:
        return None
    dense, b = r["dense"], r["budget"]
    dce = dense["evaluation"]["clean"]["return"]
    dro = dense["evaluation"]["attacks"].get(dense["strongest_attack"] or "", {}).get("return")
    x = [100.0 * dense["sparsity"], *_pct(pts)]
    clean = [dense["clean_return"], *(p["clean_return"] for p in pts)]
    c_lo = [dce["ci_low"], *(p["clean_ci"][0] for p in pts)]
    c_hi = [dce["ci_high"], *(p["clean_ci"][1] for p in pts)]
    robust = [dense["robust_return"], *(p["robust_return"] for p in pts)]
    rci = [p.get("robust_ci") for p in pts]
    fig, ax = plt.subplots(figsize=(12, 4.7))
    ax.axhspan(b["clean_floor"], b["dense_clean"], color=CLEAN, alpha=0.10, lw=0)
    ax.axhline(b["clean_floor"], color=CLEAN, ls="--", lw=1.3, label="clean floor (budget)")
    ax.axhspan(b["robust_floor"], b["dense_robust"], color=ROBUST, alpha=0.10, lw=0)
    ax.axhline(b["robust_floor"], color=ROBUST, ls="--", lw=1.3, label="robust floor (budget)")
    ax.plot([], [], "s", color="#d6dde6", ms=12, label="allowed loss (budget band)")
    ax.errorbar(
        x,
        clean,
        yerr=[[m - lo for m, lo in zip(clean, c_lo)], [hi - m for m, hi in zip(clean, c_hi)]],
        fmt="-o",
        color=CLEAN,
        lw=2.2,
        ms=6,
        capsize=4,
        label="clean return (95% CI)",
    )
    r_err = None
    if dro is not None and all(c is not None for c in rci):
        r_lo = [dro["ci_low"], *(c[0] for c in rci)]  # type: ignore[index]
        r_hi = [dro["ci_high"], *(c[1] for c in rci)]  # type: ignore[index]
        r_err = [[m - lo for m, lo in zip(robust, r_lo)], [hi - m for m, hi in zip(robust, r_hi)]]
    ax.errorbar(
        x,
        robust,
        yerr=r_err,
        fmt="-s",
        color=ROBUST,
        lw=2.2,
        ms=6,
        capsize=4,
        label="robust return, worst attack" + (" (95% CI)" if r_err else ""),
    )
    failed = [(100 * p["sparsity"], p["clean_return"]) for p in pts if not p["passed"]]
    if failed:
        ax.plot(*zip(*failed), "x", color="black", ms=9, mew=2, zorder=5, label="fails budget")
    a = r.get("derived") or {}
    c = r.get("chosen")
    if c:
        _mark(ax, 100 * c["sparsity"], c["clean_return"], "chosen", "chosen")
        _mark(ax, 100 * c["sparsity"], c["robust_return"], "chosen", "_")
    sw = a.get("sweet_spot")
    if sw:
        _mark(ax, 100 * sw["sparsity"], sw["clean_return"], "sweet", "sweet spot")
        _mark(ax, 100 * sw["sparsity"], sw["robust_return"], "sweet", "_")
    notes = []
    if c:
        notes.append((c["sparsity"], c["clean_return"], f"chosen {100 * c['sparsity']:.1f}%"))
    if sw and not (c and sw["sparsity"] == c["sparsity"]):
        what = " (dense)" if sw.get("label") == "dense" else ""
        notes.append(
            (sw["sparsity"], sw["clean_return"], f"sweet spot {100 * sw['sparsity']:.1f}%{what}")
        )
    elif sw:
        notes = [
            (sw["sparsity"], sw["clean_return"], f"chosen = sweet spot {100 * sw['sparsity']:.1f}%")
        ]
    lo, top = min(*robust, *clean, b["robust_floor"]), max(c_hi)
    span = top - lo
    ax.set_ylim(lo - 0.05 * span, top + (0.12 + 0.1 * len(notes)) * span)
    for i, (sx, sy, text) in enumerate(notes):
        ax.annotate(
            text,
            (100 * sx, sy),
            xytext=(100 * sx + (4 if sx < 0.4 else -4), top + (0.08 + 0.1 * i) * span),
            ha="left" if sx < 0.4 else "right",
            fontsize=12,
            fontweight="bold",
            arrowprops={"arrowstyle": "->", "color": "black", "lw": 1.2},
        )
    ax.text(0, dense["clean_return"], "  dense", va="bottom", fontsize=11, color=CLEAN)
    ax.set_xlabel("sparsity (% of weights pruned)")
    ax.set_ylabel("episode return")
    ax.set_title("Frontier: return vs sparsity")
    ax.set_xlim(-3, max(x) + 5)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.13), frameon=False, ncol=4)
    return _png(fig)


def certificate(r: dict[str, Any]) -> bytes | None:
    """Global certified Lipschitz bound and local certified vs empirical TV, vs sparsity."""
    pts = sorted(r["frontier"], key=lambda f: f["sparsity"])
    if not pts:
        return None
    norm = r["threat"]["norm"]
    dense, c = r["dense"], r.get("chosen")
    dcert = dense["certificates"][norm]
    x = [100.0 * dense["sparsity"], *_pct(pts)]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.6))
    lip = [dcert["lipschitz"], *(p["lipschitz"] for p in pts)]
    ax1.plot(x, lip, "-o", color=CERT, lw=2.2, ms=6, label="certified bound (global)")
    ax1.axhline(dcert["lipschitz"], color=GREY, ls="--", lw=1.3, label="dense = budget ceiling")
    if c:
        _mark(ax1, 100 * c["sparsity"], c["certificates"][norm]["lipschitz"], "chosen", "chosen")
    ax1.set_yscale("log")
    ax1.yaxis.set_major_locator(matplotlib.ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax1.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax1.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    name = "logit change" if dcert["shift_name"] == "logit_oscillation" else "Mahalanobis shift"
    ax1.set_title(f"Global certificate: {name} per unit ε")
    ax1.set_xlabel("sparsity (%)")
    ax1.set_ylabel("certified bound (log, lower = tighter)")
    ax1.legend(frameon=False)
    local = [p.get("local_tv_median") for p in pts]
    emp = [p.get("empirical_tv_median") for p in pts]
    dl = dense.get("local_certificate") or {}
    if all(v is not None for v in local) and dl:
        ax2.plot(
            x,
            [dl["local"]["tv_median"], *local],
            "-o",
            color=CERT,
            lw=2.2,
            ms=6,
            label=f"certified ({dl['local']['method']}, local)",
        )
        ax2.plot(
            x,
            [dl["empirical"]["tv_median"], *emp],
            "-s",
            color=EMPIRICAL,
            lw=2.2,
            ms=6,
            label="empirical (PGD attack)",
        )
    ax2.plot(
        x,
        [dcert["tv_bound"], *(p["tv_bound"] for p in pts)],
        ":",
        color=GREY,
        lw=2,
        label="certified (global bound)",
    )
    if c and c.get("local_certificate"):
        _mark(ax2, 100 * c["sparsity"], c["local_certificate"]["local"]["tv_median"], "chosen", "_")
    ax2.set_ylim(0, 1.05)
    ax2.set_title(f"TV distance at ε = {r['threat']['eps']}, median state")
    ax2.set_xlabel("sparsity (%)")
    ax2.set_ylabel("TV(π(s), π(ŝ))")
    ax2.legend(frameon=False)
    fig.tight_layout()
    return _png(fig)


def attacks(r: dict[str, Any]) -> bytes | None:
    """Return per condition (clean and each attack), dense vs the chosen policy, with 95% CIs."""
    dense, c = r["dense"], r.get("chosen")
    names = ["clean", *dense["evaluation"]["attacks"]]

    def stats(block: dict[str, Any], n: str) -> dict[str, Any] | None:
        ev = block["evaluation"]
        e = ev["clean"] if n == "clean" else ev["attacks"].get(n)
        return e["return"] if e else None

    series = [("dense", dense, "#95a5a6")]
    if c:
        series.append((f"chosen ({100 * c['sparsity']:.1f}%)", c, CLEAN))
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    width = 0.8 / len(series)
    for i, (label, block, colour) in enumerate(series):
        xs: list[float] = []
        ys: list[float] = []
        err: list[list[float]] = [[], []]
        for j, n in enumerate(names):
            s = stats(block, n)
            if s is None:
                continue
            xs.append(j + (i - (len(series) - 1) / 2) * width)
            ys.append(s["mean"])
            err[0].append(max(s["mean"] - s["ci_low"], 0.0))
            err[1].append(max(s["ci_high"] - s["mean"], 0.0))
        ax.bar(xs, ys, width, yerr=err, color=colour, label=label, capsize=4, ec="black", lw=0.5)
    ax.axhline(r["budget"]["robust_floor"], color=ROBUST, ls="--", lw=1.3, label="robust floor")
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel("episode return (95% CI)")
    ax.set_title("Return under each attack")
    ax.legend(frameon=False, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=3)
    return _png(fig)


def regret(r: dict[str, Any]) -> bytes | None:
    """Clean regret, pruning loss and attack gap per sparsity (they sum to the total regret)."""
    rg = (r.get("derived") or {}).get("regret")
    if not rg or not rg.get("rows"):
        return None
    rows = rg["rows"]
    x = list(range(len(rows)))
    parts = [
        ("clean_regret", "clean regret J(π*) − J(dense)", "#95a5a6"),
        ("pruning_loss", "pruning loss J(dense) − J(pruned)", CLEAN),
        ("attack_gap", "attack gap J(pruned) − J̃(attacked)", ROBUST),
    ]
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    pos = [0.0] * len(rows)
    neg = [0.0] * len(rows)
    for key, label, colour in parts:
        vals = [row[key] for row in rows]
        bottoms = [pos[i] if v >= 0 else neg[i] for i, v in enumerate(vals)]
        ax.bar(x, vals, 0.6, bottom=bottoms, color=colour, label=label, ec="black", lw=0.5)
        for i, v in enumerate(vals):
            if v >= 0:
                pos[i] += v
            else:
                neg[i] += v
    ax.plot(x, [row["total"] for row in rows], "D", color="black", ms=7, label="total regret")
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks(x, [f"{100 * row['sparsity']:.4g}%" for row in rows])
    ax.set_xlabel("sparsity")
    ax.set_ylabel("return lost")
    ax.set_title("Regret decomposition")
    ax.legend(frameon=False, fontsize=9.5, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2)
    return _png(fig)


def layers(r: dict[str, Any]) -> bytes | None:
    """Fraction of each layer's weights pruned in the chosen policy."""
    c = r.get("chosen")
    if not c or not c.get("layers"):
        return None
    ls = c["layers"]
    labels = [f"layer {la['index']}: {la['shape'][1]}→{la['shape'][0]}" for la in ls]
    vals = [100 * la["sparsity"] for la in ls]
    fig, ax = plt.subplots(figsize=(6.4, 0.7 * len(ls) + 1.6))
    y = list(range(len(ls)))[::-1]
    ax.barh(y, [100] * len(ls), color="#ecf0f1", ec="black", lw=0.5)
    ax.barh(y, vals, color=CLEAN, ec="black", lw=0.5)
    for yi, v in zip(y, vals):
        inside = v > 80
        ax.text(
            v - 1.5 if inside else v + 1.5,
            yi,
            f"{v:.1f}%",
            va="center",
            ha="right" if inside else "left",
            color="white" if inside else "black",
            fontsize=11,
            fontweight="bold",
        )
    ax.set_yticks(y, labels)
    ax.set_xlim(0, 100)
    ax.set_xlabel("weights pruned (%)")
    ax.set_title("Per-layer sparsity (chosen)")
    ax.grid(False)
    return _png(fig)


FIGURES: dict[str, tuple[str, Callable[[dict[str, Any]], bytes | None]]] = {
    "frontier": ("Frontier: clean and robust return vs sparsity", frontier),
    "certificate": ("Certificates vs sparsity", certificate),
    "attacks": ("Return under each attack, dense vs chosen", attacks),
    "regret": ("Regret decomposition", regret),
    "layers": ("Per-layer sparsity of the chosen policy", layers),
}


def draw_all(r: dict[str, Any]) -> dict[str, bytes]:
    """Every figure the report holds data for, by name (``frontier``, ``certificate``…)."""
    out = {}
    for name, (_, fn) in FIGURES.items():
        png = fn(r)
        if png is not None:
            out[name] = png
    return out
