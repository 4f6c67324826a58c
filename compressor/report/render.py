"""Render ``report.md`` and ``report.html`` from the report dict alone.

Both formats show the same content: :func:`view` turns the JSON into headings, table rows and
notes (formatted strings, nothing computed that the JSON does not hold), and two jinja2
templates lay it out, one as Markdown with the plots as PNG files beside it, one as a single
self-contained HTML file with the plots embedded as base64 PNG.
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import jinja2
import markupsafe

from compressor.report.plots import FIGURES

#: top-level report fields this module renders explicitly; any other block is shown generically
KNOWN = {
    "schema",
    "schema_version",
    "verdict",
    "source",
    "threat",
    "budget",
    "seeds",
    "attacks",
    "dense",
    "chosen",
    "frontier",
    "frontier_analysis",
    "timings_s",
    "performance",
    "profile",
    "target",
    "reproducibility",
    "derived",
}
KNOWN_POLICY = {
    "clean_return",
    "robust_return",
    "strongest_attack",
    "evaluation",
    "certificates",
    "sparsity",
    "params",
    "params_nonzero",
    "layers",
    "file_bytes",
    "local_certificate",
    "finetune",
    "final_check",
    "onnx",
}
LATENCY_KEYS = ("latency", "bench")


def num(v: Any, d: int = 1) -> str:
    """``1,234.5``; ``n/a`` for missing values."""
    return "n/a" if v is None else f"{v:,.{d}f}"


def pct(v: Any) -> str:
    """A fraction as a percentage with one decimal."""
    return "n/a" if v is None else f"{100 * v:.1f}%"


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


def _norm(n: str) -> str:
    return "ℓ∞" if n == "inf" else f"ℓ{n}"


def _table(head: list[str], rows: list[list[str]], align: str | None = None) -> dict[str, Any]:
    return {"head": head, "rows": rows, "align": align or "l" + "r" * (len(head) - 1)}


def _flatten(d: Any, prefix: str = "") -> list[list[str]]:
    """Nested dicts as ``[dotted.key, value]`` rows (lists of scalars joined)."""
    if isinstance(d, dict):
        rows = []
        for k, v in d.items():
            rows += _flatten(v, f"{prefix}.{k}" if prefix else str(k))
        return rows
    if isinstance(d, list) and any(isinstance(x, (dict, list)) for x in d):
        rows = []
        for i, x in enumerate(d):
            rows += _flatten(x, f"{prefix}[{i}]")
        return rows
    return [[prefix or "value", scalar(d)]]


def generic_block(title: str, value: Any) -> dict[str, Any]:
    """A block the renderer does not know: key/value rows, plus a table per list of records."""

    def records(v: Any) -> bool:
        return isinstance(v, list) and bool(v) and all(isinstance(x, dict) for x in v)

    def as_table(v: list[dict[str, Any]]) -> dict[str, Any]:
        keys = list(dict.fromkeys(k for x in v for k in x))
        rows = [
            [
                scalar(x.get(k))
                if not isinstance(x.get(k), dict)
                else "; ".join(f"{a} {scalar(b)}" for a, b in x[k].items())
                for k in keys
            ]
            for x in v
        ]
        return _table(keys, rows, "l" * len(keys))

    if records(value):
        return {"title": title, "tables": [as_table(value)]}
    if not isinstance(value, dict):
        return {"title": title, "tables": [_table(["field", "value"], _flatten(value), "ll")]}
    plain = {k: v for k, v in value.items() if not records(v)}
    tables = [_table(["field", "value"], _flatten(plain), "ll")] if plain else []
    tables += [as_table(v) for v in value.values() if records(v)]
    return {"title": title, "tables": tables}


def _latency(r: dict[str, Any]) -> tuple[str, Any] | None:
    c = r.get("chosen") or {}
    for where, block in (("chosen", c), ("chosen.onnx", c.get("onnx") or {}), ("", r)):
        for k in LATENCY_KEYS:
            if block.get(k) is not None:
                return (f"{where}.{k}" if where else k), block[k]
    return None


def _verdict(r: dict[str, Any]) -> dict[str, Any]:
    b, c, dv = r["budget"], r.get("chosen"), r.get("derived") or {}
    norm = r["threat"]["norm"]
    out: dict[str, Any] = {"passed": r["verdict"]["passed"], "summary": r["verdict"]["summary"]}
    checks: list[dict[str, Any]] = []
    if c is not None:
        out["headline"] = f"PASS: sparsity {pct(c['sparsity'])} meets budget {b['budget']}"
        lip = c["certificates"][norm]["lipschitz"]
        checks = [
            {
                "ok": c["clean_return"] >= b["clean_floor"],
                "text": f"clean return {num(c['clean_return'])} ≥ floor {num(b['clean_floor'])}",
            },
            {
                "ok": c["robust_return"] >= b["robust_floor"],
                "text": f"robust return {num(c['robust_return'])} ({c['strongest_attack']}) "
                f"≥ floor {num(b['robust_floor'])}",
            },
            {
                "ok": not any("certificate" in x for x in c.get("final_check", [])),
                "text": f"certified bound {sci(lip)} ≤ dense {sci(b['dense_lipschitz'])}",
            },
        ]
        checks += [{"ok": False, "text": x} for x in c.get("final_check", [])]
        lim = dv.get("limit")
        out["limit"] = (
            f"Why not sparser: {pct(lim['sparsity'])} was tried and failed: "
            + "; ".join(lim["reasons"])
            if lim
            else "No higher sparsity failed: the search grid's top was reached."
        )
    else:
        out["headline"] = f"FAIL: no sparsity met budget {b['budget']}"
        checks = [
            {"ok": False, "text": f"{pct(f['sparsity'])}: " + "; ".join(f["reasons"])}
            for f in sorted(r["frontier"], key=lambda f: f["sparsity"])
        ]
        out["limit"] = "Nothing was exported. Per candidate, the checks that failed are above."
    out["checks"] = checks
    noise = noise_warning(dv.get("resolution"))
    if noise:
        out["noise"] = noise
    sw = dv.get("sweet_spot")
    if sw:
        out["sweet"] = (
            f"Sweet spot (highest mean of normalised clean and robust score): "
            f"{pct(sw['sparsity'])}, score {num(sw['score'], 3)} "
            f"(clean {num(sw['clean_score'], 3)}, robust {num(sw['robust_score'], 3)}; "
            "dense clean = 1), "
            + (
                "the dense policy: no pruned level scored higher"
                if sw.get("label") == "dense"
                else ("meets the budget" if sw["passed"] else "fails the budget")
            )
        )
    return out


def noise_warning(res: dict[str, Any] | None) -> str:
    """One sentence when the evaluation cannot resolve the budget ("" when it can)."""
    if not res or res.get("resolved", True):
        return ""
    return (
        f"Noise: the budget allows a loss of {num(res['allowed_loss'])}, but two means over "
        f"{res['episodes']} episodes differ by up to ±{num(res['difference_ci_halfwidth'])} by "
        "chance (95%), so a verdict near the floors can flip with the seeds; about "
        f"{res['episodes_needed']} episodes per evaluation would resolve it ([evaluation] "
        "episodes), or a policy whose returns vary less."
    )


def _dense_vs_chosen(r: dict[str, Any]) -> dict[str, Any]:
    d, c = r["dense"], r.get("chosen")

    def both(f: Any) -> list[str]:
        return [f(d), f(c) if c else "—"]

    def ret(block: dict[str, Any], e: dict[str, Any] | None) -> str:
        if e is None:
            return "—"
        s = e["return"]
        return f"{num(s['mean'])} ({num(s['ci_low'])} to {num(s['ci_high'])})"

    rows = [
        ["sparsity", *both(lambda p: pct(p["sparsity"]))],
        [
            "parameters, non-zero / total",
            *both(lambda p: f"{p['params_nonzero']:,} / {p['params']:,}"),
        ],
        [
            "clean return (95% CI)",
            *both(lambda p: ret(p, p["evaluation"]["clean"])),
        ],
    ]
    for name, a in d["evaluation"]["attacks"].items():
        rows.append(
            [
                f"return under {name} (95% CI); mean TV reached",
                f"{ret(d, a)}; {num(a['mean_tv'], 3)}",
                (
                    f"{ret(c, c['evaluation']['attacks'][name])}; "
                    f"{num(c['evaluation']['attacks'][name]['mean_tv'], 3)}"
                )
                if c and name in c["evaluation"]["attacks"]
                else "—",
            ]
        )
    rows.append(["robust return (min over attacks)", *both(lambda p: num(p["robust_return"]))])
    for norm, cert in d["certificates"].items():
        n = _norm(norm)
        cc = c["certificates"].get(norm) if c else None
        what = "logit change" if cert["shift_name"] == "logit_oscillation" else "Mahalanobis shift"
        rows += [
            [
                f"certified {what} per unit ε, {n} (global)",
                sci(cert["lipschitz"]),
                sci(cc and cc["lipschitz"]) if c else "—",
            ],
            [
                f"certified TV at ε, {n} (global)",
                num(cert["tv_bound"], 4),
                num(cc and cc["tv_bound"], 4) if c else "—",
            ],
            [
                f"certified radius ε*(τ = {cert['tau']}), {n}",
                sci(cert["certified_radius"]),
                sci(cc and cc["certified_radius"]) if c else "—",
            ],
        ]
    dl, cl = d.get("local_certificate"), (c or {}).get("local_certificate")
    if dl:
        loc, emp = dl["local"], dl["empirical"]

        def lc(f: Any) -> list[str]:
            return [f(dl), f(cl) if cl else "—"]

        rows += [
            [
                f"certified TV at ε (local, {loc['method']}), median / p95 over "
                f"{loc['n_states']:,} states",
                *lc(
                    lambda x: f"{num(x['local']['tv_median'], 4)} / {num(x['local']['tv_p95'], 4)}"
                ),
            ],
            [
                f"states certified TV ≤ τ = {loc['tau']}",
                *lc(lambda x: pct(x["local"]["frac_tv_le_tau"])),
            ],
        ]
        if "frac_argmax_certified" in loc:
            rows.append(
                [
                    "states whose action provably cannot change",
                    *lc(lambda x: pct(x["local"].get("frac_argmax_certified"))),
                ]
            )
        rows += [
            [
                f"empirical TV at ε (PGD), median over {emp['n_states']:,} states",
                *lc(lambda x: num(x["empirical"]["tv_median"], 4)),
            ],
            [
                "certified ÷ empirical, median (TV; shift)",
                *lc(lambda x: f"{num(x['ratio_tv_median'], 2)}; {num(x['ratio_shift_median'], 2)}"),
            ],
        ]
    return _table(["", "dense", "chosen"], rows)


def _frontier(r: dict[str, Any]) -> dict[str, Any]:
    front = sorted(r["frontier"], key=lambda f: f["sparsity"])
    scores = (r.get("derived") or {}).get("scores", {}).get("frontier") or [{}] * len(front)
    rows = [
        [
            pct(f["sparsity"]),
            f"{num(f['clean_return'])} ({num(f['clean_ci'][0])} to {num(f['clean_ci'][1])})",
            num(f["robust_return"])
            + (
                f" ({num(f['robust_ci'][0])} to {num(f['robust_ci'][1])})"
                if f.get("robust_ci")
                else ""
            ),
            str(f["strongest_attack"]),
            sci(f["lipschitz"]),
            num(f.get("local_tv_median"), 4),
            num(f.get("empirical_tv_median"), 4),
            f"{f['params_nonzero']:,}",
            num(s.get("score"), 3),
            "pass" if f["passed"] else "fail: " + "; ".join(f["reasons"]),
        ]
        for f, s in zip(front, scores)
    ]
    head = [
        "sparsity",
        "clean return (95% CI)",
        "robust return (95% CI)",
        "worst attack",
        "certified bound (global)",
        "certified TV, local median",
        "empirical TV, median",
        "non-zero params",
        "score",
        "verdict",
    ]
    return _table(head, rows, "lrrlrrrrrl")


def _regret(r: dict[str, Any]) -> dict[str, Any] | None:
    rg = (r.get("derived") or {}).get("regret")
    if not rg:
        return None
    rows = list(rg["rows"]) + ([rg["chosen"]] if rg.get("chosen") else [])
    return {
        "note": f"J(π*) = {num(rg['best_known_return'])}: {rg['best_known_source']}.",
        "table": _table(
            ["policy", "sparsity", "clean regret", "pruning loss", "attack gap", "total regret"],
            [
                [
                    x["label"],
                    pct(x["sparsity"]),
                    num(x["clean_regret"]),
                    num(x["pruning_loss"]),
                    num(x["attack_gap"]),
                    num(x["total"]),
                ]
                for x in rows
            ],
        ),
    }


def _frontier_analysis(r: dict[str, Any]) -> dict[str, Any] | None:
    """The ``frontier_analysis`` block (schema v3): one row per evaluated sparsity with its
    regret split, the sweet spot and the budget's choice marked; None when the report has none."""
    fa = r.get("frontier_analysis")
    if not fa:
        return None
    sw, ch = fa["sweet_spot"], fa.get("budget_choice")
    pts = [fa["dense"], *fa["points"]]
    # the row the sweet spot names: same sparsity and score (dense and a 0% candidate can tie)
    sweet_row = next(
        (p for p in pts if p["sparsity"] == sw["sparsity"] and p["score"] == sw["score"]),
        next((p for p in pts if p["sparsity"] == sw["sparsity"]), None),
    )
    chosen_row = next(
        (p for p in fa["points"] if ch is not None and p["sparsity"] == ch["sparsity"]), None
    )
    rows = []
    for p in pts:
        marks = [
            m for m, row in (("sweet spot", sweet_row), ("budget's choice", chosen_row)) if p is row
        ]
        g = p["regret"]
        rows.append(
            [
                "dense" if p["label"] == "dense" else pct(p["sparsity"]),
                num(p["clean_return"]),
                num(p["robust_return"])
                + (f" ({p['strongest_attack']})" if p["strongest_attack"] else ""),
                sci(p["lipschitz"]),
                sci(p["certified_radius"]),
                num(g["clean_regret"]),
                num(g["pruning_loss"]),
                num(g["attack_gap"]),
                num(g["total"]),
                num(p["score"], 3),
                "—" if p["passed"] is None else "pass" if p["passed"] else "fail",
                ", ".join(marks),
            ]
        )
    head = [
        "sparsity",
        "clean return",
        "robust return (worst attack)",
        "certified bound (global)",
        "certified radius",
        "clean regret",
        "pruning loss",
        "attack gap",
        "total regret",
        "score",
        "budget",
        "mark",
    ]
    where = "the dense policy" if sweet_row is fa["dense"] else f"sparsity {pct(sw['sparsity'])}"
    if ch is None:
        choice = "nothing met the budget"
    elif chosen_row is not None and chosen_row is sweet_row:
        choice = "the budget chose the same sparsity"
    else:
        choice = f"the budget chose {pct(ch['sparsity'])} (score {num(ch['score'], 3)})"
    return {
        "note": f"Sweet spot: {where} (score {num(sw['score'], 3)}); {choice}; regret is "
        f"measured against J(π*) = {num(fa['best_known_return'])}: {fa['best_known_source']}.",
        "score": f"Score: {fa['score_definition']}.",
        "table": _table(head, rows, "lrrrrrrrrrll"),
    }


def _layers(r: dict[str, Any]) -> dict[str, Any] | None:
    d, c = r["dense"], r.get("chosen")
    src = (c or d).get("layers")
    if not src:
        return None
    dl = {la["index"]: la for la in d.get("layers") or []}
    rows = []
    for la in src:
        dd = dl.get(la["index"])
        rows.append(
            [
                str(la["index"]),
                f"{la['shape'][1]} → {la['shape'][0]}",
                f"{la['weights']:,}",
                f"{dd['nonzero']:,}" if dd else "n/a",
                f"{la['nonzero']:,}" if c else "—",
                pct(la["sparsity"]) if c else "—",
                f"{la['zero_rows']:,} / {la['zero_cols']:,}" if c else "—",
            ]
        )
    head = [
        "layer",
        "inputs → outputs",
        "weights",
        "non-zero, dense",
        "non-zero, chosen",
        "pruned, chosen",
        "all-zero rows / columns",
    ]
    return _table(head, rows)


def _deployment(r: dict[str, Any]) -> dict[str, Any]:
    d, c, t = r["dense"], r.get("chosen"), r["target"]
    fb = d.get("file_bytes")
    rows = [
        [
            "target",
            f"{t['name']}: {', '.join(t['providers'])}, {t['precision']}, threads {t['threads']}",
        ],
        ["source policy file", f"{fb:,} bytes" if fb is not None else "n/a"],
    ]
    if c:
        o = c["onnx"]
        red = (r.get("derived") or {}).get("reduction") or {}
        rows += [
            ["policy.pt (chosen)", f"{c['file_bytes']:,} bytes" if c.get("file_bytes") else "n/a"],
            [
                "policy.onnx (chosen)",
                f"{o['file_bytes']:,} bytes "
                f"({pct(red.get('onnx_vs_source_bytes'))} of the source file)",
            ],
            [
                "parameters in the ONNX graph",
                f"{o['params_exported']:,} after removing {o['removed_neurons']:,} dead neurons",
            ],
            ["non-zero parameters kept", pct(red.get("nonzero_params_kept"))],
            [
                "ONNX vs torch parity",
                f"max |Δ| = {sci(o['parity_max_abs_err'])} at batch sizes "
                + ", ".join(str(x) for x in o["parity_batches"]),
            ],
            ["opset / IR version", f"{o['opset']} / {o['ir_version']}"],
        ]
    lat = _latency(r)
    if lat is None:
        rows.append(["latency on the target", "not measured in this run (compress bench MODEL)"])
    else:
        key, val = lat
        if isinstance(val, dict) and isinstance(val.get("onnx"), dict):
            for batch, s in val["onnx"].items():
                rows.append(
                    [
                        f"latency, batch {batch} (onnxruntime)",
                        f"p50 {num(s.get('p50_ms'), 4)} ms, p99 {num(s.get('p99_ms'), 4)} ms",
                    ]
                )
            for batch, s in (val.get("torch") or {}).items():
                rows.append(
                    [
                        f"latency, batch {batch} (torch eager)",
                        f"p50 {num(s.get('p50_ms'), 4)} ms, p99 {num(s.get('p99_ms'), 4)} ms",
                    ]
                )
            if val.get("latency_budget_ms") is not None:
                rows.append(
                    [
                        "latency budget",
                        f"{val['latency_budget_ms']} ms: "
                        + ("met" if val.get("within_budget") else "not met"),
                    ]
                )
        else:
            rows += [[f"{key}.{k}", v] for k, v in _flatten(val)]
    return _table(["", "value"], rows, "ll")


def _reproducibility(r: dict[str, Any]) -> list[dict[str, Any]]:
    rp, s = r["reproducibility"], r["seeds"]
    ev = s["evaluation"]
    items = [
        {"label": "command", "value": " ".join(rp["command"]) or "n/a", "code": True},
        {
            "label": "source",
            "value": f"{r['source']['file']} ({r['source']['format']}), "
            f"sha256 {r['source']['sha256']}",
            "code": True,
        },
        {
            "label": "profile",
            "value": f"{r['profile']['name']} ({r['profile'].get('path') or 'built in'})",
            "code": False,
        },
        {
            "label": "target",
            "value": f"{r['target']['name']} ({r['target'].get('path') or 'built in'})",
            "code": False,
        },
        {
            "label": "seeds",
            "value": f"evaluation {ev[0]}–{ev[-1]} ({len(ev)} episodes), attack "
            f"{s['attack_seed']}, fine-tuning states "
            f"{s['finetune_state_seeds'][0]}–{s['finetune_state_seeds'][1]}",
            "code": False,
        },
    ]
    env = rp.get("environment")
    if env:
        items.append(
            {
                "label": "environment",
                "value": ", ".join(f"{k} {scalar(v)}" for k, v in env.items()),
                "code": False,
            }
        )
    items.append(
        {
            "label": "versions",
            "value": "; ".join(f"{k} {v}" for k, v in rp["versions"].items()),
            "code": False,
        }
    )
    if rp.get("cpu"):
        items.append(
            {
                "label": "machine",
                "value": ", ".join(f"{k} {scalar(v)}" for k, v in rp["cpu"].items()),
                "code": False,
            }
        )
    code = rp.get("code") or {}
    if code:
        items.append(
            {
                "label": "code",
                "value": f"package sha256 {code.get('package_sha256')}, git commit "
                f"{code.get('git_commit') or 'n/a'}",
                "code": True,
            }
        )
    for name, h in (rp.get("outputs_sha256") or {}).items():
        items.append({"label": name, "value": f"sha256 {h or 'absent'}", "code": True})
    return items


def view(r: dict[str, Any], figures: dict[str, Any]) -> dict[str, Any]:
    """Everything both templates show, as formatted strings taken from the report dict."""
    src, th, b, d = r["source"], r["threat"], r["budget"], r["dense"]
    c = r.get("chosen")
    norm = th["norm"]
    ev = r["seeds"]["evaluation"]
    facts: list[list[str]] = [
        ["environment", str(r["profile"]["env"]["id"])],
        [
            "policy",
            f"{src['head']} head, layers {' → '.join(str(x) for x in src['layer_sizes'])}, "
            f"{src['activation']}",
        ],
        [
            "threat model",
            f"{_norm(norm)} ball, ε = {th['eps']} in {th['space']} observation units",
            th["space"],
        ],
        [
            "budget",
            f"b = {b['budget']}; scale = dense clean − random-action return = "
            f"{num(b['dense_clean'])} − {num(b['random_return'])} = {num(b['scale'])}",
        ],
        [
            "floors",
            f"clean ≥ {num(b['clean_floor'])}, robust ≥ {num(b['robust_floor'])}, certified "
            f"bound ≤ {sci(b['dense_lipschitz'])}"
            + (f", certified TV ≤ {b['max_tv']}" if b.get("max_tv") is not None else ""),
        ],
        [
            "episodes",
            f"{len(ev)} per evaluation, seeds {ev[0]}–{ev[-1]}, the same for every candidate",
        ],
        [
            "attacks",
            f"screening {', '.join(r['attacks']['screen'])}; "
            f"final {', '.join(r['attacks']['final'])}",
        ],
    ]
    facts = [f if len(f) == 3 else [*f, ""] for f in facts]
    cards = [
        ["chosen sparsity", pct(c["sparsity"]) if c else "none", "of weights pruned"],
        [
            "non-zero parameters",
            f"{c['params_nonzero']:,}" if c else "—",
            f"dense {d['params_nonzero']:,}",
        ],
        ["clean return", num(c["clean_return"]) if c else "—", f"dense {num(d['clean_return'])}"],
        [
            "robust return",
            num(c["robust_return"]) if c else "—",
            f"dense {num(d['robust_return'])}",
        ],
        [
            "certified bound",
            sci(c["certificates"][norm]["lipschitz"]) if c else "—",
            f"dense {sci(d['certificates'][norm]['lipschitz'])}",
        ],
        [
            "policy.onnx",
            f"{c['onnx']['file_bytes']:,} B" if c else "—",
            f"source {d['file_bytes']:,} B" if d.get("file_bytes") is not None else "",
        ],
    ]
    products = None
    if c:
        rows = [
            [
                k,
                sci(v["value"]),
                sci(c["certificates"][norm]["comparison"][k]["value"]),
                "yes" if v["monotone"] else "NO",
            ]
            for k, v in d["certificates"][norm]["comparison"].items()
        ]
        products = _table(["product", "dense", "chosen", "monotone under pruning"], rows, "lrrl")
    extras = [generic_block(k.replace("_", " "), v) for k, v in r.items() if k not in KNOWN]
    for which in ("dense", "chosen"):
        for k, v in (r.get(which) or {}).items():
            if k not in KNOWN_POLICY and k not in LATENCY_KEYS:
                extras.append(generic_block(f"{which}: {k.replace('_', ' ')}", v))
    timings, perf_note = _performance(r)
    figs = [
        {"name": n, "title": FIGURES[n][0], "data": figures[n]} for n in FIGURES if n in figures
    ]
    return {
        "title": f"Deployment review: {Path(src['file']).name}",
        "facts": facts,
        "verdict": _verdict(r),
        "cards": cards,
        "figures": {f["name"]: f for f in figs},
        "dense_vs_chosen": _dense_vs_chosen(r),
        "products": products,
        "frontier": _frontier(r),
        "regret": _regret(r),
        "frontier_analysis": _frontier_analysis(r),
        "layers": _layers(r),
        "deployment": _deployment(r),
        "timings": timings,
        "perf_note": perf_note,
        "extras": extras,
        "repro": _reproducibility(r),
        "schema": f"{r['schema']} v{r['schema_version']}",
        "finetune": (c or {}).get("finetune"),
    }


def _performance(r: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """Stage times (with share and throughput when the report has a ``performance`` block) and
    a line on the executor and peak memory."""
    perf = r.get("performance")
    if not perf:
        rows = [[k, num(v, 2)] for k, v in r.get("timings_s", {}).items()]
        return _table(["stage", "seconds"], rows), ""
    rows = [
        [
            s["stage"],
            num(s["wall_s"], 2),
            pct(s["share"]) if s.get("share") is not None else "n/a",
            f"{s['env_steps']:,}" if s.get("env_steps") else "",
            num(s.get("env_steps_per_s"), 0) if s.get("env_steps") else "",
        ]
        for s in perf["stages"]
    ]
    rows.append(["total", num(perf["total_wall_s"], 2), "", "", ""])
    table = _table(["stage", "seconds", "share", "env steps", "env steps/s"], rows)
    ex, mem = perf["executor"], perf["peak_memory_mib"]
    workers = f"{ex['workers']} worker{'s' if ex['workers'] != 1 else ''}"
    note = f"Executor: {ex['name']}, {workers}. Peak memory: {num(mem['main'], 0)} MiB main process"
    if mem.get("worker"):
        note += f", {num(mem['worker'], 0)} MiB per worker (at most {num(mem['bound'], 0)} MiB)"
    return table, note + "."


def _env(autoescape: bool) -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("compressor.report", "templates"),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        autoescape=autoescape,
    )
    env.filters["cell"] = lambda s: str(s).replace("|", "\\|").replace("\n", " ")
    env.filters["b64"] = lambda b: base64.b64encode(b).decode("ascii")
    env.filters["emph"] = _emph_html if autoescape else _emph_md
    return env


def _emph_md(text: str, strong: str) -> str:
    """``text`` with its first ``strong`` in bold (Markdown)."""
    return text.replace(strong, f"**{strong}**", 1) if strong else text


def _emph_html(text: str, strong: str) -> markupsafe.Markup:
    """``text`` escaped, with its first ``strong`` in ``<strong>`` (HTML)."""
    esc = markupsafe.escape(text)
    if not strong:
        return esc
    s = markupsafe.escape(strong)
    return markupsafe.Markup(esc.replace(s, markupsafe.Markup(f"<strong>{s}</strong>"), 1))


def render_markdown(r: dict[str, Any], figures: dict[str, bytes]) -> str:
    """``report.md``: the review for a code review, plots referenced as ``plots/NAME.png``."""
    return _env(False).get_template("report.md.j2").render(v=view(r, figures))


def render_html(r: dict[str, Any], figures: dict[str, bytes]) -> str:
    """``report.html``: one self-contained file (inline CSS, plots as base64 PNG)."""
    return _env(True).get_template("report.html.j2").render(v=view(r, figures))
