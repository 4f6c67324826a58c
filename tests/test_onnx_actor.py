"""The onnxruntime actor through the one suite runner, and the quantise-and-evaluate workflow.

The known numbers below were produced by the former ``evaluate_onnx`` and the former
``compress quantize`` orchestration (compressor/deploy/quantize.py and cli/app.py at fc1a109);
the one suite runner and :func:`quantize_policy` must reproduce them. Since then two numbers
moved on purpose: the exported files grew by their new ``interface`` metadata (input wrappers,
action map, σ), and the torch reference normalises in float64 as SB3 does, which moves the int8
parity error in its 6th digit; every return is unchanged.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from compressor.certify.deployed import empirical_deviation
from compressor.core.errors import CompressorError
from compressor.core.threat import ThreatModel
from compressor.deploy.export import export_onnx, load_onnx_session, onnx_act
from compressor.deploy.onnx_actor import OnnxActor
from compressor.deploy.quantize import quantize_model, quantize_policy
from compressor.evaluate import evaluate_suite
from compressor.policy.model import Policy
from conftest import make_policy

THREAT = ThreatModel(0.1)
SEEDS = [3, 4, 5]
# Per-episode returns of `evaluate_onnx` on this tiny Pendulum policy: 3 episodes capped at
# 40 steps, 2 sub-envs, attack seed 2.
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
# The former CLI orchestration on the same policy: fp32 exported for cpu-x86 with the threat in
# its metadata, qdq calibrated on the states of seeds 100-101, full 200-step episodes on seeds
# 3-4, transfer attacks random and mad (attack seed 0, 2 sub-envs).
FP32_FLOW = {
    "clean": [-1827.103757422777, -1877.2427368814385],
    "random": [-1827.6463884203379, -1877.3465863105162],
    "mad": [-1822.5302651070226, -1875.092037513991],
}
KNOWN_FLOW = {
    "int8": {
        "lipschitz": 7.835679019129733,
        "additive": 0.06630788500051445,
        "parity": 0.0046895891427993774,
        "file_bytes": 5982,
        "quantized": {
            "clean": [-1826.8096560267338, -1877.2498065946359],
            "random": [-1827.3525426022281, -1877.3517942276346],
            "mad": [-1822.3881746266409, -1874.4523046575102],
        },
    },
    "qdq": {
        "lipschitz": 7.835679019129733,
        "additive": 0.05930813541796364,
        "parity": 0.09626945853233337,
        "file_bytes": 5968,
        "quantized": {
            "clean": [-1826.921811395867, -1877.186645023141],
            "random": [-1827.3572992834063, -1877.180482696531],
            "mad": [-1822.4236039411908, -1874.4091355200976],
        },
    },
}


def _policy() -> Policy:
    return make_policy("gaussian", (8, 8), obs_dim=3, act_dim=1, seed=5).eval()


@pytest.fixture(scope="module")
def pendulum(tmp_path_factory: pytest.TempPathFactory) -> dict:
    d = tmp_path_factory.mktemp("pendulum")
    policy = _policy()
    fp32 = export_onnx(policy, d / "fp32.onnx").path
    q = quantize_model(policy, fp32, d / "int8.onnx", "int8", threat=THREAT)
    return {"policy": policy, "fp32": fp32, "int8": q.path, "dequantized": q.dequantized}


# onnxruntime's int8 kernels differ between CPUs (VNNI dot products, AVX2's saturating u8×s8
# pairs), so an int8 graph's actions move in the 6th digit from one machine to the next; fp32
# graphs are reproduced to the last digits.
INT8_REL = 1e-4


def _assert_returns(got: dict, known: dict, rel: float = 1e-12) -> None:
    for name, returns in known.items():
        assert got[name].stats.returns == pytest.approx(returns, rel=rel, abs=1e-9), name


@pytest.mark.parametrize("case", list(KNOWN))
def test_onnx_suite_matches_known_numbers(case: str, pendulum: dict) -> None:
    if case == "fp32":
        actor, surrogate = OnnxActor(pendulum["fp32"]), pendulum["policy"]
    else:
        actor = OnnxActor(pendulum["int8"], batch_size=1 if case == "int8_rows" else None)
        surrogate = pendulum["dequantized"]
    suite = evaluate_suite(
        actor,
        "Pendulum-v1",
        {},
        SEEDS,
        ["random", "mad"],
        THREAT,
        attack_seed=2,
        num_envs=2,
        surrogate=surrogate,
        max_steps=40,
    )
    got = {"clean": suite.clean, **suite.attacks}
    _assert_returns(got, KNOWN[case], rel=1e-12 if case == "fp32" else INT8_REL)
    for res in got.values():
        assert res.mean_tv is None  # the graph has no action distribution
        assert res.steps == 40 * len(SEEDS)


def test_batch_size_sets_the_calls(pendulum: dict) -> None:
    obs = np.random.default_rng(0).standard_normal((5, 3)).astype(np.float32) * 3
    session = load_onnx_session(pendulum["int8"], threads=1)
    one_call = onnx_act(session, obs)
    per_row = np.concatenate([onnx_act(session, obs[i : i + 1]) for i in range(5)])
    in_pairs = np.concatenate([onnx_act(session, obs[i : i + 2]) for i in (0, 2, 4)])
    # dynamic int8 scales couple the rows of a call, so the call pattern shows in the actions
    assert not np.array_equal(one_call, per_row)
    assert not np.array_equal(in_pairs, per_row)
    x = torch.as_tensor(obs)
    assert OnnxActor(pendulum["int8"]).batch_size == 1  # auto: dynamic rounding, one per call
    assert np.array_equal(OnnxActor(pendulum["int8"], batch_size=1).act(x).numpy(), per_row)
    assert np.array_equal(OnnxActor(pendulum["int8"], batch_size=2).act(x).numpy(), in_pairs)
    assert np.array_equal(OnnxActor(pendulum["int8"], batch_size=None).act(x).numpy(), one_call)
    assert OnnxActor(pendulum["fp32"]).batch_size is None  # auto: no coupling, one call
    with pytest.raises(CompressorError, match="batch_size"):
        OnnxActor(pendulum["fp32"], batch_size=0)


def test_onnx_actor_pickles_for_executors(pendulum: dict) -> None:
    actor = OnnxActor(pendulum["int8"], batch_size=2)
    again = pickle.loads(pickle.dumps(actor))
    x = torch.as_tensor(np.random.default_rng(1).standard_normal((4, 3)), dtype=torch.float32)
    assert again.batch_size == 2
    assert torch.equal(again.act(x), actor.act(x))


def test_attacking_an_onnx_actor_needs_a_surrogate(pendulum: dict) -> None:
    actor = OnnxActor(pendulum["fp32"])
    with pytest.raises(CompressorError, match="surrogate"):
        evaluate_suite(actor, "Pendulum-v1", {}, [0], ["random"], THREAT, max_steps=5)
    clean_only = evaluate_suite(actor, "Pendulum-v1", {}, [0], [], THREAT, max_steps=5)
    assert clean_only.clean.steps == 5 and clean_only.attacks == {}


@pytest.mark.parametrize("mode", list(KNOWN_FLOW))
def test_quantize_policy_matches_the_former_cli_numbers(mode: str, tmp_path: Path) -> None:
    report = quantize_policy(
        _policy(),
        tmp_path / f"{mode}.onnx",
        mode,
        threat=THREAT,
        env_id="Pendulum-v1",
        eval_seeds=[3, 4],
        calibration_seeds=[100, 101],
        attacks=["random", "mad"],
        num_envs=2,
    )
    known = KNOWN_FLOW[mode]
    cert = report.result.certificate
    assert cert["lipschitz"] == pytest.approx(known["lipschitz"], rel=1e-12)
    assert cert["additive"] == pytest.approx(known["additive"], rel=1e-12)
    # the deployed action of the quantised graph: bounded per dimension, never beyond its range,
    # and at least what PGD moves the dequantised policy's action
    dep = cert["deployed_action"]
    pol = _policy()
    span = (pol.action_high - pol.action_low).numpy()
    assert len(dep["per_dim"]) == pol.spec.act_dim
    assert all(0.0 <= v <= s + 1e-12 for v, s in zip(dep["per_dim"], span))
    states = pol.obs_mean + torch.randn(
        16, pol.spec.obs_dim, generator=torch.Generator().manual_seed(0)
    )
    emp = empirical_deviation(pol, states, THREAT, steps=20)
    assert (emp.max(0) <= np.asarray(dep["per_dim"]) + 1e-6).all()
    assert report.result.parity_max_abs_err == pytest.approx(
        known["parity"], rel=1e-2
    )  # int8 kernels vary by CPU
    assert report.result.file_bytes == known["file_bytes"]
    q, f = report.evaluation["quantized"], report.evaluation["fp32"]
    _assert_returns({"clean": q.clean, **q.attacks}, known["quantized"], rel=INT8_REL)
    _assert_returns({"clean": f.clean, **f.attacks}, FP32_FLOW)
    if mode == "qdq":
        assert report.result.settings["calibration_observations"] == 400  # 2 episodes × 200
    d = json.loads(json.dumps(report.to_dict()))
    assert set(d["evaluation"]) == {"quantized", "fp32"}
    labels = [row[0] for row in report.summary_rows()]
    assert labels[-3:] == [
        "return, clean, 2 ep",
        "return, random (transfer), 2 ep",
        "return, mad (transfer), 2 ep",
    ]


def test_quantize_policy_refuses_seeds_without_an_environment(tmp_path: Path) -> None:
    with pytest.raises(CompressorError, match="env_id"):
        quantize_policy(_policy(), tmp_path / "q.onnx", threat=THREAT, eval_seeds=[0])
    with pytest.raises(CompressorError, match="unknown transfer attack"):
        quantize_policy(_policy(), tmp_path / "q.onnx", threat=THREAT, attacks=["rs"])
    assert not (tmp_path / "q.onnx").exists()
