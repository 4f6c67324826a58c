"""The top of the report page: the verdict banner (one recommendation, the checks behind it,
what the final check did), the tiles, and the facts list. Formatted strings from the report
dict only.

Reports of schema 4 carry the paired sequential decision (``verdict.status``, ``final_check``);
older ones are shown from their point estimates, as they were decided.
"""

from __future__ import annotations

from typing import Any

from compressor.core.naming import (
    CERT_NAME,
    cert_label,
    cert_unit,
    pruning_description,
    pruning_short,
)
from compressor.report.fmt import falls_text, norm_name, num, pct, sci, signed

STATUS_WORD = {"pass": "PASS", "fail": "FAIL", "undecided": "UNDECIDED"}


def status(r: dict[str, Any]) -> str:
    """``pass``, ``fail`` or ``undecided`` (older reports: pass or fail)."""
    v = r["verdict"]
    return str(v.get("status") or ("pass" if v["passed"] else "fail"))


def _unit(r: dict[str, Any]) -> str:
    d = r["dense"]["certificates"][r["threat"]["norm"]]
    return cert_unit(d.get("shift_name"))


def _test_check(t: dict[str, Any]) -> dict[str, Any]:
    """One condition's final test as a banner line."""
    versus = "dense clean" if t["condition"] == "clean" else f"dense under {t['reference']}"
    text = (
        f"{t['condition']}: {num(t['candidate_mean'])} vs {versus} {num(t['reference_mean'])}; "
        f"difference {signed(t['mean_diff'])}, one-sided lower bound {signed(t['lower'])} "
        f"≥ −{num(t['margin'])} allowed ({t['n']} episodes); falls {t['falls']} vs "
        f"{t['reference_falls']}; worst-decile mean {num(t['candidate_cvar10'])} vs "
        f"{num(t['reference_cvar10'])}"
    )
    return {"ok": t["status"] == "pass", "text": text if not t.get("reason") else t["reason"]}


def _sweet(r: dict[str, Any]) -> str:
    """The sweet spot, shown as secondary: it is not what the verdict deploys."""
    sw = (r.get("derived") or {}).get("sweet_spot")
    if not sw:
        return ""
    what = (
        "the dense policy: no pruned level scored higher"
        if sw.get("label") == "dense"
        else ("passed the search" if sw["passed"] else "failed the search")
    )
    choose = (r.get("final_check") or {}).get("choose")
    hint = (
        "; `--choose sweet-spot` deploys the best-scored passing level instead"
        if choose == "max-sparsity" and sw.get("label") != "dense"
        else ""
    )
    return (
        f"Not the recommendation, for comparison: the sweet spot (highest mean of normalised "
        f"clean and robust score) is {pct(sw['sparsity'])}, score {num(sw['score'], 3)} "
        f"(clean {num(sw['clean_score'], 3)}, robust {num(sw['robust_score'], 3)}; dense clean "
        f"= 1), {what}{hint}."
    )


def _old_checks(r: dict[str, Any]) -> list[dict[str, Any]]:
    """Banner lines of a report without a final check (schema < 4): its point estimates."""
    b, c = r["budget"], r.get("chosen")
    if c is None:
        return [
            {
                "ok": False,
                "text": f"{pct(f['sparsity'])} {f.get('status') or 'fail'}: "
                + "; ".join(f["reasons"]),
            }
            for f in sorted(r["frontier"], key=lambda f: f["sparsity"])
        ]
    lip = c["certificates"][r["threat"]["norm"]]["lipschitz"]
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
            "text": f"{CERT_NAME} {sci(lip)} ≤ dense {sci(b['dense_lipschitz'])} {_unit(r)}",
        },
    ]
    return checks + [{"ok": False, "text": x} for x in c.get("final_check", [])]


def banner(r: dict[str, Any]) -> dict[str, Any]:
    """The verdict banner: headline, checks, why this policy, what the final check did."""
    b, c, v = r["budget"], r.get("chosen"), r["verdict"]
    st = status(r)
    pruning = v.get("pruning") or pruning_description(r["profile"]["prune"]["method"])
    out: dict[str, Any] = {"passed": v["passed"], "status": st, "summary": v["summary"]}
    fc = r.get("final_check")
    if c is not None:
        out["headline"] = (
            f"{STATUS_WORD[st]}: deploy policy.onnx, sparsity {pct(c['sparsity'])} "
            f"{pruning_short(r['profile']['prune']['method'])}, within budget {b['budget']}"
        )
        tests = (c.get("decision") or {}).get("tests")
        out["checks"] = [_test_check(t) for t in tests] if tests else _old_checks(r)
        if tests:
            lip = c["certificates"][r["threat"]["norm"]]["lipschitz"]
            out["checks"].append(
                {
                    "ok": True,
                    "text": f"{CERT_NAME} {sci(lip)} ≤ dense {sci(b['dense_lipschitz'])} "
                    f"{_unit(r)}",
                }
            )
        deploy = v.get("deploy") or {}
        out["why"] = (
            f"Deploy this one: {deploy['why']}. Pruning: {pruning}."
            if deploy
            else f"Pruning: {pruning}."
        )
    else:
        word = STATUS_WORD[st]
        out["headline"] = (
            f"{word}: no sparsity could be decided within budget {b['budget']}"
            if st == "undecided"
            else f"{word}: no sparsity met budget {b['budget']}"
        )
        out["checks"] = _old_checks(r)
        out["why"] = f"Nothing was exported. Pruning tried: {pruning}."
    if fc:
        out["final"] = "Final check: " + fc["story"]
    out["limit"] = _limit(r)
    sweet = _sweet(r)
    if sweet:
        out["sweet"] = sweet
    return out


def _limit(r: dict[str, Any]) -> str:
    """Why no sparser level was deployed."""
    c, lim = r.get("chosen"), (r.get("derived") or {}).get("limit")
    if c is None:
        return "Per sparsity, the checks that failed or stayed open are listed above."
    tried = [
        a
        for a in (r.get("final_check") or {}).get("attempts", [])
        if a["sparsity"] > c["sparsity"] and a["status"] != "pass"
    ]
    if tried:
        levels = ", ".join(f"{pct(a['sparsity'])} ({a['status']})" for a in tried)
        return f"Why not sparser: {levels} passed the search but not the final check."
    if lim:
        return f"Why not sparser: {pct(lim['sparsity'])} was tried and did not pass: " + "; ".join(
            lim["reasons"]
        )
    return "No sparser level failed the search: the search grid's top was reached."


def method_line(r: dict[str, Any]) -> str:
    """How the verdict was decided, in one sentence (schema 4), else ""."""
    m = r.get("evaluation_method")
    if not m:
        return ""
    sq, noise = m["sequential"], m.get("noise")
    looks = "/".join(str(x) for x in sq["looks"])
    noise_text = (
        f"every episode sees uniform observation noise of ±{noise['fraction_of_eps']:.0%} of ε "
        "seeded by its seed"
        if noise
        else "no observation noise"
    )
    spent = r["verdict"].get("episodes")
    return (
        f"Decided on paired episodes (candidate − dense on the same seeds), sequentially: looks "
        f"at {looks} episodes, one-sided error rate α = {sq['alpha']} per decision over all "
        f"looks; {noise_text}; final check on policy.onnx in onnxruntime at batch "
        f"{m['final_runtime']['batch_size']}"
        + (f"; {spent:,} candidate episodes spent on decisions." if spent else ".")
    )


def _deployed_card(d: dict[str, Any], c: dict[str, Any] | None) -> list[list[str]]:
    """The deployed action's certificate tile (none for reports without it)."""

    def block(p: dict[str, Any] | None) -> dict[str, Any] | None:
        b = ((p or {}).get("local_certificate") or {}).get("deployed")
        return b if b and b.get("n_states") else None

    bd, bc = block(d), block(c)
    if bd is None:
        return []

    def line(b: dict[str, Any]) -> str:
        frac = b.get("deviation_frac_range")
        if frac is None:
            return f"{pct(b['frac_certified_at_eps'])} of states"
        return f"median max|Δa| {pct(max(frac['median']))} of range"

    tol = bd["tolerance_given"]
    what = (
        "argmax fixed"
        if bd["action_map"] == "argmax"
        else (f"|Δa| ≤ {tol['value']:g}" + (" of range" if tol["units"] == "range" else ""))
    )
    return [
        [
            f"deployed action certified at ε ({what})",
            pct(bc["frac_certified_at_eps"]) if bc else "—",
            (f"{line(bc)}; " if bc else "")
            + f"dense {pct(bd['frac_certified_at_eps'])}, "
            + line(bd),
        ]
    ]


def cards(r: dict[str, Any]) -> list[list[str]]:
    """The tiles: [title, value, sub-line] each."""
    d, c = r["dense"], r.get("chosen")
    norm = r["threat"]["norm"]
    fc = r.get("final_check") or {}
    dense_final = (fc.get("dense") or {}).get("evaluation") or d["evaluation"]
    dense_tail = (fc.get("dense") or {}).get("tail") or d.get("tail") or {}
    kind = pruning_short(r["profile"]["prune"]["method"])
    attack = c["strongest_attack"] if c else None

    def mean(ev: dict[str, Any], name: str | None) -> Any:
        e = ev["clean"] if name == "clean" else ev["attacks"].get(name or "")
        return e["return"]["mean"] if e else None

    dense_robust = min((a["return"]["mean"] for a in dense_final["attacks"].values()), default=None)
    ctail = (c or {}).get("tail") or {}
    return [
        ["deployed sparsity", pct(c["sparsity"]) if c else "none", kind],
        [
            "non-zero parameters",
            f"{c['params_nonzero']:,}" if c else "—",
            f"dense {d['params_nonzero']:,}",
        ],
        [
            "clean return",
            num(c["clean_return"]) if c else "—",
            f"dense {num(mean(dense_final, 'clean'))}",
        ],
        [
            "robust return",
            num(c["robust_return"]) if c else "—",
            f"{attack}; dense {num(dense_robust)}" if c else f"dense {num(dense_robust)}",
        ],
        [
            "falls (clean)",
            falls_text(ctail.get("clean")) if c else "—",
            f"dense {falls_text(dense_tail.get('clean'))}",
        ],
        *_deployed_card(d, c),
        [
            CERT_NAME,
            sci(c["certificates"][norm]["lipschitz"]) if c else "—",
            f"dense {sci(d['certificates'][norm]['lipschitz'])}; {_unit(r)}",
        ],
        [
            "policy.onnx",
            f"{c['onnx']['file_bytes']:,} B" if c else "—",
            f"source {d['file_bytes']:,} B" if d.get("file_bytes") is not None else "",
        ],
    ]


def facts(r: dict[str, Any]) -> list[list[str]]:
    """The facts list: [name, value, part of the value to emphasise] each."""
    src, th, b = r["source"], r["threat"], r["budget"]
    norm = th["norm"]
    ev = r["seeds"]["evaluation"]
    m = r.get("evaluation_method")
    unit = _unit(r)
    rows: list[list[str]] = [
        ["environment", str(r["profile"]["env"]["id"])],
        [
            "policy",
            f"{src['head']} head, layers {' → '.join(str(x) for x in src['layer_sizes'])}, "
            f"{src['activation']}",
        ],
        ["pruning", pruning_description(r["profile"]["prune"]["method"])],
        [
            "threat model",
            f"{norm_name(norm)} ball, ε = {th['eps']} in {th['space']} observation units",
            th["space"],
        ],
        [
            "budget",
            f"b = {b['budget']}; scale = dense clean − random-action return = "
            f"{num(b['dense_clean'])} − {num(b['random_return'])} = {num(b['scale'])}; a "
            f"candidate may lose {num(b['budget'] * b['scale'])} (clean and robust)",
        ],
        [
            "certificate",
            f"{cert_label(r['dense']['certificates'][norm].get('shift_name'))} no larger than "
            f"the dense policy's {sci(b['dense_lipschitz'])} {unit}"
            + (f"; certified TV ≤ {b['max_tv']}" if b.get("max_tv") is not None else ""),
        ],
    ]
    if m:
        sq = m["sequential"]
        lo, hi = m["decision_seeds"]
        rows += [
            [
                "episodes",
                f"first look {sq['first']} per condition (seeds {ev[0]}–{ev[-1]}), then "
                f"{sq['batch']} more while a decision is open, up to {sq['cap']}; decision "
                f"seeds {lo}–{hi}, the same for every policy",
            ],
            [
                "falls",
                "terminated before the time limit"
                + ("" if m["falls"]["on_termination"] else " (not counted: success here)")
                + (
                    f", or return below {num(m['falls']['below'])}"
                    if m["falls"]["below"] is not None
                    else ""
                ),
            ],
            [
                "measured on",
                f"search: torch; final check: policy.onnx in onnxruntime "
                f"({', '.join(m['final_runtime']['providers'])}, batch "
                f"{m['final_runtime']['batch_size']})",
                "policy.onnx in onnxruntime",
            ],
        ]
    else:
        rows.append(
            [
                "episodes",
                f"{len(ev)} per evaluation, seeds {ev[0]}–{ev[-1]}, the same for every candidate",
            ]
        )
    rows.append(
        [
            "attacks",
            f"screening (every candidate) {', '.join(r['attacks']['screen'])}; final (dense "
            f"and deployed) {', '.join(r['attacks']['final'])}",
        ]
    )
    return [f if len(f) == 3 else [*f, ""] for f in rows]
