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

from compressor.core.naming import CERT_NAME, cert_unit, sparsity_text

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


def _tail_of(p: dict[str, Any], name: str | None) -> dict[str, Any] | None:
    return (p.get("tail") or {}).get(name or "")


def _returns_panel(ax: Any, r: dict[str, Any], pts: list[dict[str, Any]]) -> None:
    """Clean and robust return vs sparsity with every 95% CI, worst-decile means, floors,
    the deployed level and the sweet spot; the y-axis holds every interval drawn."""
    dense, b = r["dense"], r["budget"]
    dce = dense["evaluation"]["clean"]["return"]
    worst = dense["strongest_attack"]
    dro = dense["evaluation"]["attacks"].get(worst or "", {}).get("return")
    x = [100.0 * dense["sparsity"], *_pct(pts)]
    clean = [dense["clean_return"], *(p["clean_return"] for p in pts)]
    c_lo = [dce["ci_low"], *(p["clean_ci"][0] for p in pts)]
    c_hi = [dce["ci_high"], *(p["clean_ci"][1] for p in pts)]
    robust = [dense["robust_return"], *(p["robust_return"] for p in pts)]
    rci = [p.get("robust_ci") for p in pts]
    ax.axhspan(b["clean_floor"], b["dense_clean"], color=CLEAN, alpha=0.10, lw=0)
    ax.axhline(b["clean_floor"], color=CLEAN, ls="--", lw=1.3, label="clean floor (budget)")
    ax.axhspan(b["robust_floor"], b["dense_robust"], color=ROBUST, alpha=0.10, lw=0)
    ax.axhline(b["robust_floor"], color=ROBUST, ls="--", lw=1.3, label="robust floor (budget)")
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
    shown = [*c_lo, *c_hi, *clean, *robust, b["robust_floor"], b["clean_floor"]]
    r_err = None
    if dro is not None and all(c is not None for c in rci):
        r_lo = [dro["ci_low"], *(c[0] for c in rci)]  # type: ignore[index]
        r_hi = [dro["ci_high"], *(c[1] for c in rci)]  # type: ignore[index]
        r_err = [[m - lo for m, lo in zip(robust, r_lo)], [hi - m for m, hi in zip(robust, r_hi)]]
        shown += [*r_lo, *r_hi]
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
    rows = [dense, *pts]
    worsts = [worst, *(p["strongest_attack"] for p in pts)]
    cv_clean = [_tail_of(p, "clean") for p in rows]
    cv_robust = [_tail_of(p, w) for p, w in zip(rows, worsts)]
    if all(cv_clean) and all(cv_robust):
        yc = [t["cvar10"] for t in cv_clean]  # type: ignore[index]
        yr = [t["cvar10"] for t in cv_robust]  # type: ignore[index]
        ax.plot(x, yc, ":", color=CLEAN, lw=1.8, marker=".", label="clean, worst-decile mean")
        ax.plot(x, yr, ":", color=ROBUST, lw=1.8, marker=".", label="robust, worst-decile mean")
        shown += [*yc, *yr]
    failed = [(100 * p["sparsity"], p["clean_return"]) for p in pts if not p["passed"]]
    if failed:
        ax.plot(*zip(*failed), "x", color="black", ms=9, mew=2, zorder=5, label="did not pass")
    c, sw = r.get("chosen"), (r.get("derived") or {}).get("sweet_spot")
    at = {round(p["sparsity"], 9): p for p in pts}
    if c:  # the deployed level, where the search measured it (its final numbers: final check)
        row = at.get(round(c["sparsity"], 9), c)
        _mark(ax, 100 * c["sparsity"], row["clean_return"], "chosen", "deployed")
        _mark(ax, 100 * c["sparsity"], row["robust_return"], "chosen", "_")
    if sw:
        _mark(ax, 100 * sw["sparsity"], sw["clean_return"], "sweet", "sweet spot (not deployed)")
        _mark(ax, 100 * sw["sparsity"], sw["robust_return"], "sweet", "_")
    lo, top = min(shown), max(shown)
    span = max(top - lo, 1e-9)
    ax.set_ylim(lo - 0.06 * span, top + 0.08 * span)
    ax.text(0, dense["clean_return"], "  dense", va="bottom", fontsize=11, color=CLEAN)
    ax.set_ylabel("episode return")
    ax.set_title("Frontier: return vs sparsity")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)


def _falls_panel(ax: Any, r: dict[str, Any], pts: list[dict[str, Any]]) -> bool:
    """Share of episodes that fell, clean and under the worst attack, per level."""
    dense = r["dense"]
    rows = [dense, *pts]
    worsts = [dense["strongest_attack"], *(p["strongest_attack"] for p in pts)]
    clean = [_tail_of(p, "clean") for p in rows]
    robust = [_tail_of(p, w) for p, w in zip(rows, worsts)]
    if not all(clean) or not all(robust):
        return False
    x = [100.0 * p["sparsity"] for p in rows]
    w = max(0.8, 0.012 * (max(x) - min(x) + 1))
    fc = [100 * t["falls"] / max(t["n"], 1) for t in clean]  # type: ignore[index]
    fr = [100 * t["falls"] / max(t["n"], 1) for t in robust]  # type: ignore[index]
    ax.bar([v - w / 2 for v in x], fc, w, color=CLEAN, label="clean")
    ax.bar([v + w / 2 for v in x], fr, w, color=ROBUST, label="worst attack")
    last = None
    for v, a, b_, tc, tr in zip(x, fc, fr, clean, robust):
        if last is not None and v - last < 0.03 * (max(x) - min(x) + 1):
            continue  # too close to the previous label to read: the table has the counts
        last = v
        label = f"{tc['falls']}/{tc['n']}; {tr['falls']}/{tr['n']}"  # type: ignore[index]
        ax.text(v, max(a, b_) + 4, label, ha="center", va="bottom", fontsize=8, rotation=90)
    ax.set_ylim(0, 175)
    ax.set_yticks([0, 50, 100])
    ax.set_ylabel("falls (% of episodes)")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    return True


def frontier(r: dict[str, Any]) -> bytes | None:
    """Clean and robust return vs sparsity (95% CIs, worst-decile means, floors, deployed level,
    sweet spot) above the share of episodes that fell."""
    fig = frontier_figure(r)
    return None if fig is None else _png(fig)


def frontier_figure(r: dict[str, Any]) -> Figure | None:
    """The figure of :func:`frontier` (None: nothing to draw)."""
    pts = sorted(r["frontier"], key=lambda f: f["sparsity"])
    if not pts:
        return None
    has_falls = all(p.get("tail") for p in [r["dense"], *pts])
    if has_falls:
        fig, (ax, axf) = plt.subplots(
            2, 1, figsize=(12, 6.4), sharex=True, gridspec_kw={"height_ratios": [3.2, 1]}
        )
    else:
        fig, ax = plt.subplots(figsize=(12, 4.9))
        axf = None
    _returns_panel(ax, r, pts)
    last = ax
    if axf is not None and _falls_panel(axf, r, pts):
        last = axf
    last.set_xlabel("sparsity (% of weights pruned)")
    last.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(_sparsity_tick))
    x = [0.0, *_pct(pts)]
    ax.set_xlim(-3, max(x) + 5)
    fig.tight_layout()
    return fig


def _sparsity_tick(v: float, _: Any = None) -> str:
    """Axis ticks in the tables' format (``50.0%``)."""
    return sparsity_text(v / 100.0)


def certificate(r: dict[str, Any]) -> bytes | None:
    """The certified bound (global) and local certified vs empirical TV, vs sparsity."""
    pts = sorted(r["frontier"], key=lambda f: f["sparsity"])
    if not pts:
        return None
    norm = r["threat"]["norm"]
    dense, c = r["dense"], r.get("chosen")
    dcert = dense["certificates"][norm]
    x = [100.0 * dense["sparsity"], *_pct(pts)]
    has_tv = dcert.get("tv_bound") is not None  # no TV: deterministic, argmax, state-σ heads
    fig, axes = plt.subplots(1, 2 if has_tv else 1, figsize=(13 if has_tv else 6.5, 4.6))
    ax1 = axes[0] if has_tv else axes
    lip = [dcert["lipschitz"], *(p["lipschitz"] for p in pts)]
    ax1.plot(x, lip, "-o", color=CERT, lw=2.2, ms=6, label=f"{CERT_NAME} (global)")
    ax1.axhline(dcert["lipschitz"], color=GREY, ls="--", lw=1.3, label="dense = budget ceiling")
    if c:
        lip_c = c["certificates"][norm]["lipschitz"]
        _mark(ax1, 100 * c["sparsity"], lip_c, "chosen", "deployed")
    ax1.set_yscale("log")
    ax1.yaxis.set_major_locator(matplotlib.ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax1.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax1.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax1.set_title(f"{CERT_NAME}: {cert_unit(dcert.get('shift_name'))}", fontsize=13)
    ax1.set_xlabel("sparsity (% of weights pruned)")
    ax1.set_ylabel(f"{CERT_NAME} (log, lower = tighter)")
    ax1.legend(frameon=False)
    if has_tv:
        _tv_panel(axes[1], r, pts, x)
    ax1.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(_sparsity_tick))
    fig.tight_layout()
    return _png(fig)


def _tv_panel(ax2: Any, r: dict[str, Any], pts: list[dict[str, Any]], x: list[float]) -> None:
    """Local certified vs empirical TV and the global bound's TV, vs sparsity."""
    dense, c = r["dense"], r.get("chosen")
    dcert = dense["certificates"][r["threat"]["norm"]]
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
        label=f"certified (from the {CERT_NAME})",
    )
    if c and c.get("local_certificate"):
        _mark(ax2, 100 * c["sparsity"], c["local_certificate"]["local"]["tv_median"], "chosen", "_")
    ax2.set_ylim(0, 1.05)
    ax2.set_title(f"TV distance at ε = {r['threat']['eps']}, median state")
    ax2.set_xlabel("sparsity (% of weights pruned)")
    ax2.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(_sparsity_tick))
    ax2.set_ylabel("TV(π(s), π(ŝ))")
    ax2.legend(frameon=False)


def attacks(r: dict[str, Any]) -> bytes | None:
    """Return per condition (clean and each attack), dense vs the deployed policy, measured the
    same way (both ONNX when the report has a final check), with 95% CIs and falls."""
    dense, c = r["dense"], r.get("chosen")
    fc = r.get("final_check")
    dense_ev = fc["dense"]["evaluation"] if fc else dense["evaluation"]
    dense_tail = (fc["dense"].get("tail") if fc else dense.get("tail")) or {}
    names = ["clean", *dense_ev["attacks"]]

    def stats(ev: dict[str, Any], n: str) -> dict[str, Any] | None:
        e = ev["clean"] if n == "clean" else ev["attacks"].get(n)
        return e["return"] if e else None

    label = "dense (ONNX)" if fc else "dense"
    series = [(label, dense_ev, dense_tail, "#95a5a6")]
    if c:
        series.append(
            (
                f"deployed ({sparsity_text(c['sparsity'])})",
                c["evaluation"],
                c.get("tail") or {},
                CLEAN,
            )
        )
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    width = 0.8 / len(series)
    top = [r["budget"]["robust_floor"]]
    bottom = [0.0, r["budget"]["robust_floor"]]
    for i, (lab, ev, tl, colour) in enumerate(series):
        xs: list[float] = []
        ys: list[float] = []
        err: list[list[float]] = [[], []]
        for j, n in enumerate(names):
            s = stats(ev, n)
            if s is None:
                continue
            xj = j + (i - (len(series) - 1) / 2) * width
            xs.append(xj)
            ys.append(s["mean"])
            err[0].append(max(s["mean"] - s["ci_low"], 0.0))
            err[1].append(max(s["ci_high"] - s["mean"], 0.0))
            top.append(s["ci_high"])
            bottom.append(s["ci_low"])
            t = tl.get(n)
            if t:
                ax.text(
                    xj,
                    s["ci_high"],
                    f"{t['falls']}/{t['n']}",
                    ha="center",
                    va="bottom",
                    fontsize=8.5,
                )
        ax.bar(xs, ys, width, yerr=err, color=colour, label=lab, capsize=4, ec="black", lw=0.5)
    ax.axhline(r["budget"]["robust_floor"], color=ROBUST, ls="--", lw=1.3, label="robust floor")
    span = max(max(top) - min(bottom), 1e-9)
    ax.set_ylim(min(bottom) - 0.02 * span, max(top) + 0.12 * span)
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel("episode return (95% CI)")
    ax.set_title("Return under each attack (labels: falls)")
    ax.legend(frameon=False, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=3)
    return _png(fig)


def regret(r: dict[str, Any]) -> bytes | None:
    """Total regret per level as a waterfall of clean regret, pruning loss and attack gap: each
    term starts where the previous one ends (a negative one goes down), so the last ends at the
    total, marked."""
    fig = regret_figure(r)
    return None if fig is None else _png(fig)


def regret_figure(r: dict[str, Any]) -> Figure | None:
    """The figure of :func:`regret` (None: nothing to draw)."""
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
    level = [0.0] * len(rows)
    for key, label, colour in parts:
        vals = [row[key] for row in rows]
        ax.bar(x, vals, 0.6, bottom=level, color=colour, label=label, ec="black", lw=0.5)
        level = [b + v for b, v in zip(level, vals)]
    ax.plot(x, [row["total"] for row in rows], "D", color="black", ms=7, label="total regret")
    ax.axhline(0, color="black", lw=0.8)
    labels = [
        "dense" if row["label"] == "dense" else sparsity_text(row["sparsity"]) for row in rows
    ]
    ax.set_xticks(x, labels, rotation=30 if len(rows) > 5 else 0)
    ax.set_xlabel("sparsity")
    ax.set_ylabel("return lost")
    ax.set_title("Regret decomposition (bars sum to the total)")
    ax.legend(frameon=False, fontsize=9.5, loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=2)
    return fig


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
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(_sparsity_tick))
    ax.set_xlabel("weights pruned")
    ax.set_title("Per-layer sparsity (deployed)")
    ax.grid(False)
    return _png(fig)


def _deployed_block(p: dict[str, Any] | None) -> dict[str, Any] | None:
    d = ((p or {}).get("local_certificate") or {}).get("deployed")
    return d if d and d.get("n_states") and "deviation" in d else None


def deployed_certificate(r: dict[str, Any]) -> bytes | None:
    """:func:`deployed_certificate_figure` as PNG."""
    fig = deployed_certificate_figure(r)
    return None if fig is None else _png(fig)


def deployed_certificate_figure(r: dict[str, Any]) -> Figure | None:
    """The deployed action's certified max |Δa| at ε (median and p95 over the visited states,
    per action dimension, as a fraction of the range) beside PGD's, dense and deployed."""
    blocks = [
        (n, b)
        for n, b in (
            ("dense", _deployed_block(r.get("dense"))),
            ("deployed", _deployed_block(r.get("chosen"))),
        )
        if b
    ]
    if not blocks:
        return None
    fig, ax = plt.subplots(figsize=(13, 4.2))
    k = len(blocks[0][1]["deviation"]["median"])
    frac = "deviation_frac_range" in blocks[0][1]
    width = 0.8 / (2 * len(blocks))
    for j, (name, b) in enumerate(blocks):
        span = [1.0] * k if not frac else b["action_range"]
        for m, (stat, alpha) in enumerate((("median", 1.0), ("p95", 0.45))):
            xs = [i + (2 * j + m) * width for i in range(k)]
            ys = [v / s for v, s in zip(b["deviation"][stat], span)]
            ax.bar(
                xs,
                ys,
                width,
                color=CERT if name == "dense" else CHOSEN,
                alpha=alpha,
                edgecolor="black",
                lw=0.6,
                label=f"{name}: certified ({b['method']}), {stat}",
            )
            emp = b.get("empirical_deviation")
            if emp and stat == "median":
                ye = [v / s for v, s in zip(emp["median"], span)]
                ax.plot(
                    xs, ye, "D", color=EMPIRICAL, mec="black", ms=7, label=f"{name}: PGD, median"
                )
    tol = blocks[0][1]["tolerance"]
    span0 = blocks[0][1]["action_range"] if frac else [1.0] * k
    ax.axhline(tol[0] / span0[0], color=GREY, ls="--", lw=1.3, label="tolerance δ")
    ax.set_xticks([i + 0.4 - width / 2 for i in range(k)], [f"action {i}" for i in range(k)])
    unit = "fraction of the action range" if frac else "action units"
    ax.set_ylabel(f"max |a(ŝ) − a(s)| ({unit})")
    cert = ", ".join(f"{n} {100 * b['frac_certified_at_eps']:.1f}%" for n, b in blocks)
    ax.set_title(
        f"Deployed action: certified deviation at ε = {r['threat']['eps']} "
        f"(states within δ: {cert})",
        fontsize=13,
    )
    ax.legend(frameon=False, fontsize=9, ncol=2)
    fig.tight_layout()
    return fig


FIGURES: dict[str, tuple[str, Callable[[dict[str, Any]], bytes | None]]] = {
    "frontier": ("Frontier: clean and robust return vs sparsity", frontier),
    "deployed_certificate": (
        "Deployed action: certified max |Δa| at ε per dimension, vs PGD",
        deployed_certificate,
    ),
    "certificate": ("Certificates vs sparsity", certificate),
    "attacks": ("Return under each attack, dense vs deployed", attacks),
    "regret": ("Regret decomposition", regret),
    "layers": ("Per-layer sparsity of the deployed policy", layers),
}


def draw_all(r: dict[str, Any]) -> dict[str, bytes]:
    """Every figure the report holds data for, by name (``frontier``, ``certificate``…)."""
    out = {}
    for name, (_, fn) in FIGURES.items():
        png = fn(r)
        if png is not None:
            out[name] = png
    return out
