"""The onnxruntime actor through the one suite runner: same numbers as the former evaluate_onnx."""

from __future__ import annotations

import pytest

from compressor.core.threat import ThreatModel
from compressor.deploy.export import export_onnx
from compressor.deploy.quantize import OnnxActor, evaluate_onnx, quantize_model
from conftest import make_policy

THREAT = ThreatModel(0.1)
SEEDS = [3, 4, 5]
# Per-episode returns of `evaluate_onnx` (compressor/deploy/quantize.py at fc1a109) on this
# tiny Pendulum policy: 3 episodes capped at 40 steps, 2 sub-envs, attack seed 2.
KNOWN = {
    "fp32": {
        "clean": [-335.72800705685876, -354.76237508855525, -273.86572395074717],
        "random": [-335.38287989064327, -355.14761283824697, -273.68716694471357],
        "mad": [-334.6609993876653, -355.8383013475769, -273.6977054955092],
    },
    # dynamic int8, one observation per onnxruntime call (as deployed)
    "int8_rows": {
        "clean": [-335.6960871584299, -354.7512789908975, -273.8598814653156],
        "random": [-335.3577410581172, -355.13009233704963, -273.6744593211391],
        "mad": [-334.5667579934045, -355.80222679198255, -273.6625618851226],
    },
    # dynamic int8, the whole vector-env batch in one call (its scales couple the rows)
    "int8_batch": {
        "clean": [-335.68222102859755, -354.7443207217836, -273.85373382886934],
        "random": [-335.31813863249243, -355.1085376949665, -273.6666439406943],
        "mad": [-334.58234334034626, -355.79771288969, -273.66372113928816],
    },
}


@pytest.fixture(scope="module")
def pendulum(tmp_path_factory: pytest.TempPathFactory) -> dict:
    d = tmp_path_factory.mktemp("pendulum")
    policy = make_policy("gaussian", (8, 8), obs_dim=3, act_dim=1, seed=5).eval()
    fp32 = export_onnx(policy, d / "fp32.onnx").path
    q = quantize_model(policy, fp32, d / "int8.onnx", "int8", threat=THREAT)
    return {"policy": policy, "fp32": fp32, "int8": q.path, "dequantized": q.dequantized}


@pytest.mark.parametrize("case", list(KNOWN))
def test_onnx_suite_matches_known_numbers(case: str, pendulum: dict) -> None:
    if case == "fp32":
        actor, surrogate = OnnxActor(pendulum["fp32"]), pendulum["policy"]
    else:
        actor = OnnxActor(pendulum["int8"], row_by_row=case == "int8_rows")
        surrogate = pendulum["dequantized"]
    suite = evaluate_onnx(
        actor,
        "Pendulum-v1",
        {},
        SEEDS,
        surrogate=surrogate,
        attacks=["random", "mad"],
        threat=THREAT,
        attack_seed=2,
        num_envs=2,
        max_steps=40,
    )
    got = {"clean": suite.clean, **suite.attacks}
    for name, returns in KNOWN[case].items():
        assert got[name].stats.returns == pytest.approx(returns, rel=1e-12, abs=1e-9), name
        assert got[name].mean_tv is None  # the graph has no action distribution
        assert got[name].steps == 40 * len(SEEDS)
