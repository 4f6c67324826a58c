"""The report's tables: the frontier (one table: returns, falls, worst-decile means, certificate,
score, regret, episodes and decision per level), the final check, dense vs deployed, the attack
runs, the layers. Formatted strings from the report dict only.
"""

from __future__ import annotations

from typing import Any

from compressor.core.naming import CERT_NAME, cert_unit
from compressor.report.fmt import falls_text, norm_name, num, pct, sci, signed, table


def _ci(v: list[float] | None) -> str:
    # a line break (HTML shows it in wide tables; Markdown cells turn it into a space)
    return f"\n({num(v[0])}\u00a0to\u00a0{num(v[1])})" if v else ""


def _pair(t: dict[str, Any] | None, worst: str | None, key: str) -> str:
    """``clean; worst attack`` values of a ``tail`` block."""
    if not t:
        return "n/a"
    a = t.get("clean")
    b = t.get(worst or "")

    def one(x: dict[str, Any] | None) -> str:
        if x is None:
            return "n/a"
        return falls_text(x) if key == "falls" else num(x["cvar10"])

    return f"{one(a)};\n{one(b)}"


def frontier(r: dict[str, Any]) -> dict[str, Any]:
    """One row per evaluated level (the dense policy first) with everything the search knew."""
    d = r["dense"]
    front = sorted(r["frontier"], key=lambda f: f["sparsity"])
    dv = r.get("derived") or {}
    scores = (dv.get("scores") or {}).get("frontier") or [{}] * len(front)
    regret = (dv.get("regret") or {}).get("rows") or []
    by_label = {"dense": regret[0]} if regret and regret[0]["label"] == "dense" else {}
    cand_regret = [x for x in regret if x["label"] == "candidate"] or [{}] * len(front)
    c, sw = r.get("chosen"), dv.get("sweet_spot") or {}
    deployed = c["sparsity"] if c else None
    unit = cert_unit(d["certificates"][r["threat"]["norm"]].get("shift_name"))

    def marks(s: float, is_dense: bool) -> str:
        out = []
        if not is_dense and deployed is not None and abs(s - deployed) < 1e-12:
            out.append("deployed")
        if sw and abs(s - sw["sparsity"]) < 1e-12 and (sw.get("label") == "dense") == is_dense:
            out.append("sweet spot")
        return f" ({', '.join(out)})" if out else ""

    def regret_cells(g: dict[str, Any]) -> list[str]:
        return [num(g.get("pruning_loss")), num(g.get("attack_gap")), num(g.get("total"))]

    dce = d["evaluation"]["clean"]["return"]
    worst = d.get("strongest_attack")
    dro = d["evaluation"]["attacks"].get(worst or "", {}).get("return")
    rows = [
        [
            "dense" + marks(0.0, True),
            num(d["clean_return"]) + _ci([dce["ci_low"], dce["ci_high"]]),
            num(d["robust_return"])
            + (_ci([dro["ci_low"], dro["ci_high"]]) if dro else "")
            + (f"\n{worst}" if worst else ""),
            _pair(d.get("tail"), worst, "falls"),
            _pair(d.get("tail"), worst, "cvar"),
            sci(r["budget"]["dense_lipschitz"]),
            f"{d['params_nonzero']:,}",
            num(((dv.get("scores") or {}).get("dense") or {}).get("score"), 3),
            *regret_cells(by_label.get("dense", {})),
            str(dce["n"]),
            "reference",
        ]
    ]
    for f, s, g in zip(front, scores, cand_regret):
        status = f.get("status") or ("pass" if f["passed"] else "fail")
        verdict = status + (" (see below)" if f["reasons"] else "")
        rows.append(
            [
                pct(f["sparsity"]) + marks(f["sparsity"], False),
                num(f["clean_return"]) + _ci(f.get("clean_ci")),
                num(f["robust_return"])
                + _ci(f.get("robust_ci"))
                + (f"\n{f['strongest_attack']}" if f["strongest_attack"] else ""),
                _pair(f.get("tail"), f["strongest_attack"], "falls"),
                _pair(f.get("tail"), f["strongest_attack"], "cvar"),
                sci(f["lipschitz"]),
                f"{f['params_nonzero']:,}",
                num(s.get("score"), 3),
                *regret_cells(g),
                "n/a" if f.get("episodes") is None else f"{f['episodes']:,}",
                verdict,
            ]
        )
    head = [
        "sparsity",
        "clean return (95% CI)",
        "robust return (95% CI), worst attack",
        "falls: clean; worst attack",
        "CVaR 10%: clean; worst attack",
        f"{CERT_NAME} ({unit})",
        "non-zero params",
        "score",
        "pruning loss",
        "attack gap",
        "total regret",
        "episodes",
        "decision",
    ]
    return table(head, rows, "lrrrrrrrrrrrl")


def frontier_reasons(r: dict[str, Any]) -> list[str]:
    """Why each level of the frontier table did not pass, one line per level."""
    front = sorted(r["frontier"], key=lambda f: f["sparsity"])
    return [
        f"{pct(f['sparsity'])} {f.get('status') or 'fail'}: " + "; ".join(f["reasons"])
        for f in front
        if f["reasons"]
    ]


def final_check(r: dict[str, Any]) -> dict[str, Any] | None:
    """One row per level tried in the final check and condition: the paired test on ONNX."""
    fc = r.get("final_check")
    if not fc:
        return None
    rows = []
    for a in fc["attempts"]:
        for t in a["decision"]["tests"]:
            result = t["status"] + (f": {t['reason']}" if t.get("reason") else "")
            rows.append(
                [
                    pct(a["sparsity"]),
                    t["condition"],
                    f"dense {t['reference']}",
                    str(t["n"]),
                    num(t["candidate_mean"]),
                    num(t["reference_mean"]),
                    signed(t["mean_diff"]),
                    f"{signed(t['lower'])} to {signed(t['upper'])}",
                    f"−{num(t['margin'])}",
                    f"{t['falls']} vs {t['reference_falls']} (p = {t['falls_p']:.3g})",
                    f"{num(t['candidate_cvar10'])} vs {num(t['reference_cvar10'])}",
                    result,
                ]
            )
        if not a["decision"]["tests"]:
            rows.append([pct(a["sparsity"]), *[""] * 10, "; ".join(a["decision"]["reasons"])])
    head = [
        "sparsity",
        "condition",
        "compared with",
        "episodes",
        "mean return",
        "dense mean",
        "difference",
        "one-sided bounds",
        "allowed",
        "falls vs dense (exact p)",
        "worst-decile mean vs dense",
        "result",
    ]
    return table(head, rows, "lllrrrrrrrrl")


def _ret(e: dict[str, Any] | None) -> str:
    if e is None:
        return "—"
    s = e["return"]
    return f"{num(s['mean'])} ({num(s['ci_low'])} to {num(s['ci_high'])}; {s['n']} episodes)"


def _returns(r: dict[str, Any]) -> tuple[list[list[str]], str]:
    """Return, falls and worst-decile rows per condition, dense vs deployed, measured the same
    way (both ONNX in a report with a final check); and the header of the dense column."""
    d, c = r["dense"], r.get("chosen")
    fc = r.get("final_check")
    dense_ev, dense_tail = d["evaluation"], d.get("tail") or {}
    head = "dense"
    if fc:
        dense_ev, dense_tail = fc["dense"]["evaluation"], fc["dense"].get("tail") or {}
        head = "dense (ONNX)"
    cev = c["evaluation"] if c else None
    ctail = (c or {}).get("tail") or {}
    rows = [["clean return (95% CI)", _ret(dense_ev["clean"]), _ret(cev["clean"]) if cev else "—"]]
    for name, a in dense_ev["attacks"].items():
        ca = cev["attacks"].get(name) if cev else None
        # an ONNX model has no action distribution: no TV to show then
        tv = a["mean_tv"] is not None or (ca is not None and ca["mean_tv"] is not None)

        def cell(e: dict[str, Any], tv: bool = tv) -> str:
            return f"{_ret(e)}; {num(e['mean_tv'], 3)}" if tv else _ret(e)

        rows.append(
            [
                f"return under {name} (95% CI)" + ("; mean TV reached" if tv else ""),
                cell(a),
                cell(ca) if ca else "—",
            ]
        )
    robust = min((a["return"]["mean"] for a in dense_ev["attacks"].values()), default=None)
    rows.append(
        [
            "robust return (min over attacks)",
            num(robust),
            num(c["robust_return"]) if c else "—",
        ]
    )
    for name in ["clean", *dense_ev["attacks"]]:
        if name in dense_tail or name in ctail:
            rows.append(
                [
                    f"falls; worst-decile mean (CVaR 10%), {name}",
                    _tail(dense_tail.get(name)),
                    _tail(ctail.get(name)) if c else "—",
                ]
            )
    return rows, head


def _tail(t: dict[str, Any] | None) -> str:
    return "n/a" if not t else f"{falls_text(t)}; {num(t['cvar10'])}"


def dense_vs_chosen(r: dict[str, Any]) -> dict[str, Any]:
    """Dense vs deployed: size, returns (same runtime), falls, every certificate."""
    d, c = r["dense"], r.get("chosen")

    def both(f: Any) -> list[str]:
        return [f(d), f(c) if c else "—"]

    returns, dense_head = _returns(r)
    rows = [
        ["sparsity", *both(lambda p: pct(p["sparsity"]))],
        [
            "parameters, non-zero / total",
            *both(lambda p: f"{p['params_nonzero']:,} / {p['params']:,}"),
        ],
        *returns,
    ]
    for norm, cert in d["certificates"].items():
        n = norm_name(norm)
        cc = c["certificates"].get(norm) if c else None
        rows += [
            [
                f"{CERT_NAME}, {n} ({cert_unit(cert.get('shift_name'))})",
                sci(cert["lipschitz"]),
                sci(cc and cc["lipschitz"]) if c else "—",
            ],
            [
                f"certified TV at ε, {n} (from the {CERT_NAME})",
                num(cert["tv_bound"], 4),
                num(cc and cc["tv_bound"], 4) if c else "—",
            ],
            [
                f"certified radius ε*(τ = {cert['tau']}), {n}",
                sci(cert["certified_radius"]),
                sci(cc and cc["certified_radius"]) if c else "—",
            ],
        ]
    unit = cert_unit(d["certificates"][r["threat"]["norm"]].get("shift_name"))
    rows += _local_rows(d.get("local_certificate"), (c or {}).get("local_certificate"), unit)
    return table(["", dense_head, "deployed (policy.onnx)" if c else "deployed"], rows)


def _local_rows(dl: dict[str, Any] | None, cl: dict[str, Any] | None, unit: str) -> list[list[str]]:
    if not dl:
        return []
    loc, emp = dl["local"], dl["empirical"]

    def lc(f: Any) -> list[str]:
        return [f(dl), f(cl) if cl else "—"]

    if "tv_median" not in loc:  # no action distribution to take a TV of
        return _local_shift_rows(dl, lc, unit)
    rows = [
        [
            f"certified TV at ε (local, {loc['method']}), median / p95 over "
            f"{loc['n_states']:,} states",
            *lc(lambda x: f"{num(x['local']['tv_median'], 4)} / {num(x['local']['tv_p95'], 4)}"),
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
    return rows + [
        [
            f"empirical TV at ε (PGD), median over {emp['n_states']:,} states",
            *lc(lambda x: num(x["empirical"]["tv_median"], 4)),
        ],
        [
            "certified ÷ empirical, median (TV; shift)",
            *lc(lambda x: f"{num(x['ratio_tv_median'], 2)}; {num(x['ratio_shift_median'], 2)}"),
        ],
    ]


def _local_shift_rows(dl: dict[str, Any], lc: Any, unit: str) -> list[list[str]]:
    """The local certificate's rows for heads without a TV (deterministic, argmax, state σ)."""
    loc = dl["local"]
    rows = [
        [
            f"certified change at ε (local, {loc['method']}), median / p95 over "
            f"{loc['n_states']:,} states ({unit.replace(' per unit ε', '')})",
            *lc(
                lambda x: (
                    f"{num(x['local']['shift_median'], 4)} / {num(x['local']['shift_p95'], 4)}"
                )
            ),
        ]
    ]
    if "frac_argmax_certified" in loc:
        rows.append(
            [
                "states whose action provably cannot change",
                *lc(lambda x: pct(x["local"].get("frac_argmax_certified"))),
            ]
        )
    return rows


def attack_runs(r: dict[str, Any]) -> dict[str, Any] | None:
    """Which attack ran on which policy, on how many episodes, what it reached and cost."""
    runs = r.get("attack_runs")
    if not runs:
        return None
    seen: set[tuple[str, str]] = set()
    rows = []
    for x in runs:
        key = (x["policy"], x["attack"])
        if key in seen:
            continue
        seen.add(key)
        rows.append(
            [
                x["policy"],
                x["attack"],
                str(x["episodes"]) if x.get("episodes") is not None else "n/a",
                f"failed: {x['failed']}" if x.get("failed") else num(x["return"]),
                "—" if x.get("failed") else x["ci"],
                num(x["mean_tv"], 4),
                num(x["eval_wall_s"]),
                x.get("training") or "—",
            ]
        )
    head = [
        "policy",
        "attack",
        "episodes",
        "mean return",
        "95% CI",
        "mean TV reached",
        "evaluation time (s)",
        "attack training",
    ]
    return table(head, rows, "llrrrrrl")


def layers(r: dict[str, Any]) -> dict[str, Any] | None:
    """Per Linear layer: shape, weights, non-zero weights dense and deployed, all-zero rows."""
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
        "non-zero, deployed",
        "pruned, deployed",
        "all-zero rows / columns",
    ]
    return table(head, rows)
