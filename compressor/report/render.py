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

from compressor.report import headline, tables
from compressor.report.fmt import flatten, num, pct, scalar, sci, table
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
    "attack_runs",
    "evaluation_method",
    "final_check",
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
    "tail",
    "decision",
    "measured_on",
}
LATENCY_KEYS = ("latency", "bench")


def generic_block(title: str, value: Any) -> dict[str, Any]:
    """A block the renderer does not know: key/value rows, plus a table per list of records."""

    def records(v: Any) -> bool:
        return isinstance(v, list) and bool(v) and all(isinstance(x, dict) for x in v)

    def astable(v: list[dict[str, Any]]) -> dict[str, Any]:
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
        return table(keys, rows, "l" * len(keys))

    if records(value):
        return {"title": title, "tables": [astable(value)]}
    if not isinstance(value, dict):
        return {"title": title, "tables": [table(["field", "value"], flatten(value), "ll")]}
    plain = {k: v for k, v in value.items() if not records(v)}
    tables = [table(["field", "value"], flatten(plain), "ll")] if plain else []
    tables += [astable(v) for v in value.values() if records(v)]
    return {"title": title, "tables": tables}


def _latency(r: dict[str, Any]) -> tuple[str, Any] | None:
    c = r.get("chosen") or {}
    for where, block in (("chosen", c), ("chosen.onnx", c.get("onnx") or {}), ("", r)):
        for k in LATENCY_KEYS:
            if block.get(k) is not None:
                return (f"{where}.{k}" if where else k), block[k]
    return None


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


def _regret_note(r: dict[str, Any]) -> str:
    """Where J(π*) comes from and what the frontier table's regret columns are."""
    rg = (r.get("derived") or {}).get("regret")
    if not rg:
        return ""
    clean = rg["rows"][0]["clean_regret"] if rg.get("rows") else None
    fa = r.get("frontier_analysis") or {}
    source = fa.get("best_known_source") or rg["best_known_source"]
    return (
        f"Regret against J(π*) = {num(rg['best_known_return'])} ({source}): "
        f"clean regret J(π*) − J(dense) = {num(clean)} for every row; pruning loss = J(dense) − "
        "J(pruned); attack gap = J(pruned) − J̃(pruned under its worst attack); total regret = "
        "the three summed."
    )


def _method(r: dict[str, Any]) -> list[str]:
    """How the verdict is decided, as sentences from ``evaluation_method`` (schema 4)."""
    m = r.get("evaluation_method")
    if not m:
        return []
    sq, noise = m["sequential"], m.get("noise")
    levels = ", ".join(f"{x:.4f}" for x in sq["alpha_per_look"])
    looks = ", ".join(str(x) for x in sq["looks"])
    out = [
        f"Test: {sq['test']}.",
        f"Error rate: {sq['error_rate']} (α = {sq['alpha']}; looks at {looks} episodes with "
        f"levels {levels}).",
        f"Falls: {m['falls']['rule']}.",
        f"Seeds: decisions use episode seeds {m['decision_seeds'][0]}–{m['decision_seeds'][1]} "
        "only (fine-tuning, its checkpoint selection and attack training use seeds of 10,000 "
        "and above).",
    ]
    if noise:
        out.append(
            f"Observation noise: every evaluation episode sees uniform noise of "
            f"±{noise['fraction_of_eps']:.0%} of ε ({noise['half_width']:.4g} in "
            f"{noise['space']} units) per dimension, seeded by its episode seed, the same for "
            "the dense policy and every candidate and under every attack (the attacked "
            "observation is projected back into the ε-ball), so no estimate rests on one "
            "numerical path."
        )
    rt = m["final_runtime"]
    out.append(
        f"Runtimes: the search evaluates candidates in {m['search_runtime']}; the final check "
        f"exports each level and the dense policy and measures the ONNX files in "
        f"{rt['runtime']} ({', '.join(rt['providers'])}, {rt['threads']} thread(s), batch "
        f"{rt['batch_size']}), the attacks computing their perturbations on the torch policy "
        "with the same weights."
    )
    return out


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
            [
                "policy.pt (deployed)",
                f"{c['file_bytes']:,} bytes" if c.get("file_bytes") else "n/a",
            ],
            [
                "policy.onnx (deployed)",
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
            rows += [[f"{key}.{k}", v] for k, v in flatten(val)]
    return table(["", "value"], rows, "ll")


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
    src, d = r["source"], r["dense"]
    c = r.get("chosen")
    norm = r["threat"]["norm"]
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
        products = table(["product", "dense", "deployed", "monotone under pruning"], rows, "lrrl")
    extras = [generic_block(k.replace("_", " "), v) for k, v in r.items() if k not in KNOWN]
    for which in ("dense", "chosen"):
        for k, v in (r.get(which) or {}).items():
            if k not in KNOWN_POLICY and k not in LATENCY_KEYS:
                extras.append(generic_block(f"{which}: {k.replace('_', ' ')}", v))
    timings, perf_note = _performance(r)
    figs = [
        {"name": n, "title": FIGURES[n][0], "data": figures[n]} for n in FIGURES if n in figures
    ]
    fa = r.get("frontier_analysis") or {}
    banner = headline.banner(r)
    noise = noise_warning((r.get("derived") or {}).get("resolution"))
    if noise:
        banner["noise"] = noise
    return {
        "title": f"Deployment review: {Path(src['file']).name}",
        "facts": headline.facts(r),
        "verdict": banner,
        "method_line": headline.method_line(r),
        "cards": headline.cards(r),
        "figures": {f["name"]: f for f in figs},
        "dense_vs_chosen": tables.dense_vs_chosen(r),
        "products": products,
        "frontier": tables.frontier(r),
        "frontier_note": " ".join(
            x
            for x in (
                "CVaR 10%: the mean return of the worst 10% of the episodes (at least one)."
                if r.get("evaluation_method")
                else "",
                f"Score: {fa['score_definition']}." if fa.get("score_definition") else "",
                _regret_note(r),
            )
            if x
        ),
        "frontier_reasons": tables.frontier_reasons(r),
        "final_check": tables.final_check(r),
        "attack_runs": tables.attack_runs(r),
        "method": _method(r),
        "regret": bool((r.get("derived") or {}).get("regret")),
        "layers": tables.layers(r),
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
        return table(["stage", "seconds"], rows), ""
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
    stages = table(["stage", "seconds", "share", "env steps", "env steps/s"], rows)
    ex, mem = perf["executor"], perf["peak_memory_mib"]
    workers = f"{ex['workers']} worker{'s' if ex['workers'] != 1 else ''}"
    note = f"Executor: {ex['name']}, {workers}. Peak memory: {num(mem['main'], 0)} MiB main process"
    if mem.get("worker"):
        note += f", {num(mem['worker'], 0)} MiB per worker (at most {num(mem['bound'], 0)} MiB)"
    return stages, note + "."


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
