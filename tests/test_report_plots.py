"""The report's plots draw what they claim: the frontier's y-axis holds every interval it draws
(a robust CI far below its floor included), and each regret bar's three segments end at the
total regret, negative terms included; sparsity ticks read as in the tables."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from matplotlib.patches import Rectangle
from test_report_frontier import run  # noqa: F401  (the module's report fixture)

from compressor.report.build import load_report
from compressor.report.plots import frontier_figure, regret_figure


def test_frontier_axis_holds_every_interval(run: Path) -> None:  # noqa: F811
    r = load_report(run)
    lowest = min(r["budget"]["robust_floor"], *(f["robust_return"] for f in r["frontier"]))
    f = r["frontier"][-1]
    f["robust_ci"] = [lowest - 900.0, f["robust_return"] + 5.0]  # far below everything else
    fig = frontier_figure(r)
    assert fig is not None
    ax = fig.axes[0]
    lo, hi = ax.get_ylim()
    drawn = [c for f in r["frontier"] for c in (f["clean_ci"] + (f.get("robust_ci") or []))]
    assert lo < min(drawn) and hi > max(drawn)
    ticks = [t.get_text() for t in fig.axes[-1].get_xticklabels() if t.get_text()]
    assert ticks and all(t.endswith(".0%") for t in ticks)  # as the tables write sparsity


def test_regret_bars_sum_to_the_total(run: Path) -> None:  # noqa: F811
    r = json.loads(json.dumps(load_report(run)))
    rows = r["derived"]["regret"]["rows"]
    # a negative pruning loss (fine-tuning gained return) must still end the bar at the total
    rows[1]["pruning_loss"] = -40.0
    rows[1]["total"] = rows[1]["clean_regret"] - 40.0 + rows[1]["attack_gap"]
    fig = regret_figure(r)
    assert fig is not None
    bars = [p for p in fig.axes[0].patches if isinstance(p, Rectangle)]
    n = len(rows)
    assert len(bars) == 3 * n
    for i, row in enumerate(rows):
        last = bars[2 * n + i]
        assert last.get_y() + last.get_height() == pytest.approx(row["total"])
        for k in (1, 2):  # each segment starts where the one before ended
            prev, cur = bars[(k - 1) * n + i], bars[k * n + i]
            assert cur.get_y() == pytest.approx(prev.get_y() + prev.get_height())
    labels = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    assert labels[0] == "dense" and all(x.endswith("%") and "." in x for x in labels[1:])


def test_deployed_certificate_bars_are_the_certified_fractions(run: Path) -> None:  # noqa: F811
    import torch

    from compressor.certify.deployed import certify_deployed
    from compressor.core.threat import ThreatModel
    from compressor.report.plots import deployed_certificate_figure
    from conftest import make_policy

    r = json.loads(json.dumps(load_report(run)))
    policy = make_policy("gaussian", (8,), "tanh", 4, 2, True, seed=1)
    states = torch.randn(20, 4)
    block = certify_deployed(policy, states, ThreatModel(0.1), empirical_states=5).to_dict()
    r["dense"]["local_certificate"] = {"deployed": block}
    r["chosen"]["local_certificate"] = {"deployed": block}
    fig = deployed_certificate_figure(r)
    assert fig is not None
    heights = sorted(p.get_height() for p in fig.axes[0].patches if isinstance(p, Rectangle))
    want = sorted(
        2 * (block["deviation_frac_range"]["median"] + block["deviation_frac_range"]["p95"])
    )
    assert heights == pytest.approx(want)
    assert "fraction of the action range" in fig.axes[0].get_ylabel()


def test_deployed_certificate_tile(run: Path) -> None:  # noqa: F811
    import torch

    from compressor.certify.deployed import certify_deployed
    from compressor.core.threat import ThreatModel
    from compressor.report.headline import cards
    from conftest import make_policy

    r = json.loads(json.dumps(load_report(run)))
    assert not any(t[0].startswith("deployed action") for t in cards(r))  # no block, no tile
    policy = make_policy("categorical", (8,), "tanh", 4, 2, True, seed=1)
    states = policy.obs_mean + torch.randn(30, 4, generator=torch.Generator().manual_seed(0))
    dep = certify_deployed(policy, states, ThreatModel(0.05), empirical_states=5).to_dict()
    r["dense"]["local_certificate"] = {"deployed": dep}
    r["chosen"]["local_certificate"] = {"deployed": dep}
    tiles = {t[0]: t for t in cards(r)}
    tile = tiles["deployed action certified at ε (argmax fixed)"]
    assert tile[1] == f"{100 * dep['frac_certified_at_eps']:.1f}%"
    assert dep["sound"] is True
