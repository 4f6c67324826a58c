"""Quantisation (parity, dequantised certificate, onnxruntime evaluation) and benchmarking."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from compressor.certify.global_bound import certify_global
from compressor.core.config import Target, load_target
from compressor.core.errors import CompressorError
from compressor.core.threat import ThreatModel
from compressor.deploy.bench import bench_model, model_cost
from compressor.deploy.export import export_onnx, load_onnx_session, onnx_act, read_metadata
from compressor.deploy.onnx_actor import OnnxActor
from compressor.deploy.quantize import dequantized_policy, quantize_model, read_quantized
from compressor.evaluate import evaluate_suite
from compressor.policy.model import Policy
from compressor.policy.native import load_native
from compressor.prune.criteria import prune
from compressor.rl.rollout import rollout
from conftest import REPO, make_policy

THREAT = ThreatModel(0.05)
# Dynamic int8 on a 4→16→16→2 net with weights ~ N(0, 1/fan_in): per-channel int8 weights are
# off by ≤ 1/254 of each row's largest |w|, and each hidden activation (tanh, in [-1, 1]) is
# rounded to a uint8 step of ≤ 2/255 ≈ 0.008. Sixteen such errors through one weight row add
# up to ~0.01-0.02 in an action in [-1, 1] (measured: ≤ 0.016); 0.05 leaves 3x headroom while
# still catching a wrong scale or a transposed weight (errors of order 1).
INT8_TOL = 0.05
# fp16 keeps 11 significant bits (relative error ≤ 2^-11 ≈ 5e-4 per weight); arithmetic stays
# fp32, so the action moves by ~5e-4 (measured) — 1e-2 is the bound, 20x above that.
FP16_TOL = 1e-2


def _export(policy: Policy, path: Path) -> Path:
    export_onnx(policy, path, metadata={"certificate": "fp32 cert", "eps": "0.05"})
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Policy, Path]:
    policy = make_policy("gaussian", (16, 16), seed=3).eval()
    return policy, _export(policy, tmp_path_factory.mktemp("q") / "fp32.onnx")


@pytest.mark.parametrize("head", ["gaussian", "squashed_gaussian", "deterministic"])
def test_int8_dynamic_parity_within_tolerance(head: str, tmp_path: Path) -> None:
    policy = make_policy(head, (16, 16), seed=1).eval()
    fp32 = _export(policy, tmp_path / "fp32.onnx")
    res = quantize_model(policy, fp32, tmp_path / "int8.onnx", "int8", threat=THREAT)
    assert res.mode == "dynamic"
    assert 0 < res.parity_max_abs_err <= INT8_TOL
    # the model onnxruntime runs is the one the certificate describes (up to float noise)
    assert res.simulation_median_abs_err < 1e-5
    # independent check from the written file, batch 1 like a robot's control loop
    sess = load_onnx_session(res.path)
    obs = np.random.default_rng(5).standard_normal((20, 4)).astype(np.float32)
    with torch.no_grad():
        ref = policy.act(torch.as_tensor(obs)).numpy()
    got = np.stack([onnx_act(sess, o) for o in obs])
    assert np.abs(got - ref).max() <= INT8_TOL


def test_qdq_static_parity_with_calibration(tiny: tuple[Policy, Path], tmp_path: Path) -> None:
    policy, fp32 = tiny
    calib = policy.obs_mean.numpy() + np.random.default_rng(0).standard_normal((256, 4)) * 2
    res = quantize_model(policy, fp32, tmp_path / "qdq.onnx", "qdq", calib, threat=THREAT)
    assert res.parity_max_abs_err <= INT8_TOL
    assert res.settings["calibration_observations"] == 256
    ops = {n.op_type for n in onnx.load(str(res.path)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    assert res.simulation_median_abs_err < 1e-5


@pytest.mark.parametrize("mode", ["fp16", "int8w"])
def test_weight_only_modes(mode: str, tiny: tuple[Policy, Path], tmp_path: Path) -> None:
    policy, fp32 = tiny
    res = quantize_model(policy, fp32, tmp_path / f"{mode}.onnx", mode, threat=THREAT)
    assert res.parity_max_abs_err <= (FP16_TOL if mode == "fp16" else INT8_TOL)
    # arithmetic is fp32 on the stored weights: the dequantised policy is the model exactly
    assert res.dequantized_max_abs_err < 1e-5
    assert res.certificate["additive"] == 0.0
    assert res.certificate["rounding_points"] == []
    storage = model_cost(res.path)["weight_storage"]
    assert storage == ["fp16" if mode == "fp16" else "int8"] * 3


def test_certificate_is_computed_from_the_quantised_weights(
    tiny: tuple[Policy, Path], tmp_path: Path
) -> None:
    policy, fp32 = tiny
    res = quantize_model(policy, fp32, tmp_path / "int8.onnx", "dynamic", threat=THREAT)
    model = onnx.load(str(res.path))
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    # the int8 initializers and scales of a quantised layer, read here by hand
    wq = next(
        v for k, v in inits.items() if k.startswith("W1") and v.dtype == np.int8 and v.ndim == 2
    )
    scale = next(v for k, v in inits.items() if k.startswith("W1") and k.endswith("_scale"))
    by_hand = (wq.astype(np.float64) * scale).T
    assert res.dequantized is not None
    assert np.allclose(
        res.dequantized.layers[1].weight.detach().double().numpy(), by_hand, atol=1e-7
    )
    assert not torch.equal(res.dequantized.layers[1].weight, policy.layers[1].weight)

    fresh = dequantized_policy(policy, read_quantized(res.path))  # again, from the file alone
    cert_q = certify_global(fresh, THREAT)
    cert_fp32 = certify_global(policy, THREAT)
    assert res.certificate["lipschitz"] == pytest.approx(cert_q.lipschitz, rel=1e-12)
    assert cert_q.lipschitz != cert_fp32.lipschitz  # not the fp32 certificate standing in
    assert cert_q.lipschitz == pytest.approx(cert_fp32.lipschitz, rel=1e-2)
    assert res.certificate["fp32_for_comparison"]["lipschitz"] == cert_fp32.lipschitz

    # activation rounding adds a non-negative part; the total is what the file claims
    c = res.certificate
    assert c["additive"] > 0
    assert c["shift_bound"] == pytest.approx(c["lipschitz"] * THREAT.eps + c["additive"])
    assert c["tv_bound"] >= cert_q.tv_bound
    meta = read_metadata(res.path)
    assert json.loads(meta["certificate"])["lipschitz"] == pytest.approx(cert_q.lipschitz)
    assert meta["fp32_certificate"] == "fp32 cert"  # the fp32 one is kept, renamed
    assert json.loads(meta["quantization"])["mode"] == "dynamic"
    json.dumps(res.to_dict())


def test_compacted_model_keeps_the_certificate(tmp_path: Path) -> None:
    # 86 % of the 520 weights as whole neurons, the same share per layer: 14 of 20 neurons go
    policy = prune(make_policy("gaussian", (20, 20), seed=2).eval(), 0.86, "structured", "layer")
    fp32 = _export(policy, tmp_path / "s.onnx")
    assert model_cost(fp32)["layer_shapes"] == [[6, 4], [6, 6], [2, 6]]
    res = quantize_model(policy, fp32, tmp_path / "s16.onnx", "fp16", threat=THREAT)
    assert res.dequantized is not None and res.dequantized.spec.hidden == [6, 6]
    fp32_lip = certify_global(policy, THREAT).lipschitz
    assert res.certificate["lipschitz"] == pytest.approx(fp32_lip, rel=2e-3)


def test_quantize_rejects_bad_input(tiny: tuple[Policy, Path], tmp_path: Path) -> None:
    policy, fp32 = tiny
    with pytest.raises(CompressorError, match="unknown quantisation mode"):
        quantize_model(policy, fp32, tmp_path / "x.onnx", "int4")
    res = quantize_model(policy, fp32, tmp_path / "q.onnx", "fp16", threat=THREAT)
    with pytest.raises(CompressorError, match="already quantised"):
        quantize_model(policy, res.path, tmp_path / "qq.onnx", "int8")
    with pytest.raises(CompressorError, match="not found"):
        quantize_model(policy, tmp_path / "missing.onnx", tmp_path / "y.onnx", "int8")


def test_onnx_actor_in_rollout_on_cartpole(tmp_path: Path) -> None:
    policy = load_native(REPO / "profiles" / "cartpole.pt").eval()
    fp32 = export_onnx(policy, tmp_path / "cartpole.onnx").path
    res = rollout(OnnxActor(fp32), "CartPole-v1", {}, [0, 1], num_envs=2)
    assert res.returns.tolist() == [500.0, 500.0]

    q = quantize_model(policy, fp32, tmp_path / "cartpole_int8.onnx", "int8", threat=THREAT)
    actor = OnnxActor(q.path)
    assert actor.batch_size == 1  # dynamic scales couple rows: run batch 1, as deployed
    suite = evaluate_suite(
        actor,
        "CartPole-v1",
        {},
        [0, 1],
        ["random"],
        THREAT,
        num_envs=2,
        surrogate=q.dequantized,
        max_steps=100,
    )
    assert suite.clean.stats.mean == 100.0  # capped; the int8 model balances as long
    assert 0 < suite.attacks["random"].stats.mean <= 100.0
    with pytest.raises(CompressorError, match="deterministic"):
        actor.sample(torch.zeros(1, 4))


def test_bench_percentiles_and_counts(tiny: tuple[Policy, Path]) -> None:
    policy, fp32 = tiny
    target = Target(name="t", threads=1, batch_size=8)
    res = bench_model(fp32, target, policy, warmup=5, iters=60)
    assert set(res.onnx) == {1, 8} and set(res.torch) == {1, 8}
    for stats in (*res.onnx.values(), *res.torch.values()):
        assert 0 < stats.p50_ms <= stats.p95_ms <= stats.p99_ms
        assert stats.iters == 60
    # 4→16→16→2: (4·16 + 16) + (16·16 + 16) + (16·2 + 2) parameters, 2·Σ in·out FLOPs
    assert res.params == 80 + 272 + 34
    assert res.flops == 2 * (64 + 256 + 32)
    assert res.layer_shapes == [[16, 4], [16, 16], [2, 16]]
    assert res.providers_used == ["CPUExecutionProvider"] and res.fallback is None
    ratio = res.ratio_to_torch(1)
    assert ratio is not None and ratio > 0
    d = res.to_dict()
    json.dumps(d)
    assert d["onnx"]["1"]["p50_ms"] == res.onnx[1].p50_ms


def test_bench_reports_an_unavailable_provider(tiny: tuple[Policy, Path]) -> None:
    _, fp32 = tiny
    target = Target(name="npu", providers=["NoSuchExecutionProvider", "CPUExecutionProvider"])
    with pytest.raises(CompressorError, match="NoSuchExecutionProvider not available"):
        bench_model(fp32, target, warmup=1, iters=5)
    res = bench_model(fp32, target, warmup=1, iters=5, allow_fallback=True)
    assert res.fallback is not None and "NoSuchExecutionProvider" in res.fallback
    assert res.providers_used == ["CPUExecutionProvider"]
    assert res.providers_requested == ["NoSuchExecutionProvider", "CPUExecutionProvider"]


def test_bench_cuda_target_without_cuda(tiny: tuple[Policy, Path]) -> None:
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime build has CUDA")
    _, fp32 = tiny
    with pytest.raises(CompressorError, match="CUDAExecutionProvider not available"):
        bench_model(fp32, load_target("cuda"), warmup=1, iters=5)


def test_bench_quantised_and_structurally_pruned_models(
    tiny: tuple[Policy, Path], tmp_path: Path
) -> None:
    policy, fp32 = tiny
    q = quantize_model(policy, fp32, tmp_path / "int8.onnx", "int8", threat=THREAT)
    res = bench_model(q.path, "cpu-x86", policy, warmup=2, iters=10)
    assert res.quantization is not None and res.quantization["mode"] == "dynamic"
    assert res.weight_storage == ["fp32", "int8", "int8"]
    assert res.params == 386 and math.isfinite(res.onnx[1].p50_ms)

    # whole neurons cut (8 of 16 per layer) leave the graph: bench counts the smaller matmuls
    cut = prune(policy, 0.68, "structured", "layer")
    assert torch.equal(policy.masks()[0], torch.ones_like(policy.masks()[0]))  # unchanged
    small = export_onnx(cut, tmp_path / "cut.onnx").path
    res = bench_model(small, "cpu-x86", cut, warmup=2, iters=10)
    assert res.layer_shapes == [[8, 4], [8, 8], [2, 8]]
    assert res.params == (4 * 8 + 8) + (8 * 8 + 8) + (8 * 2 + 2)
    assert res.flops == 2 * (32 + 64 + 16)


def _cli_with(command: str) -> object:
    """The CLI app, after checking it has ``command`` (a renamed command fails its tests)."""
    from compressor.cli import app

    names = {c.name or (c.callback.__name__ if c.callback else "") for c in app.registered_commands}
    assert command in names, f"`compress {command}` is missing from compressor/cli"
    return app


def test_cli_with_fails_on_a_missing_command() -> None:
    with pytest.raises(AssertionError, match="no-such-command"):
        _cli_with("no-such-command")


def test_cli_bench_json_and_missing_provider(tiny: tuple[Policy, Path]) -> None:
    from typer.testing import CliRunner

    app = _cli_with("bench")
    _, fp32 = tiny
    runner = CliRunner()
    res = runner.invoke(app, ["bench", str(fp32), "--iters", "20", "--warmup", "2", "--json"])
    assert res.exit_code == 0, res.output
    d = json.loads(res.stdout)
    assert d["params"] == 386 and d["onnx"]["1"]["p50_ms"] <= d["onnx"]["1"]["p99_ms"]
    target = fp32.parent / "npu.toml"
    target.write_text('name = "npu"\nproviders = ["NoSuchExecutionProvider"]\n')
    res = runner.invoke(app, ["bench", str(fp32), "--target", str(target), "--iters", "5"])
    assert res.exit_code != 0
    assert "NoSuchExecutionProvider not available" in str(res.exception or res.output)


def test_cli_quantize_cartpole(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    app = _cli_with("quantize")
    out = tmp_path / "cp_int8.onnx"
    res = CliRunner().invoke(
        app,
        ["quantize", str(REPO / "profiles" / "cartpole.pt"), "-o", str(out), "--episodes", "0"],
    )
    assert res.exit_code == 0, res.output
    assert out.is_file() and json.loads(read_metadata(out)["quantization"])["mode"] == "dynamic"


def test_unbounded_rounding_is_reported_not_hidden(tmp_path: Path) -> None:
    # ReLU without an observation clip: no a-priori range, so no bound on the run-time step
    policy = make_policy("gaussian", (16, 16), activation="relu", obs_norm=False).eval()
    fp32 = export_onnx(policy, tmp_path / "r.onnx").path
    res = quantize_model(policy, fp32, tmp_path / "r8.onnx", "int8", threat=THREAT)
    assert math.isinf(res.certificate["additive"])
    assert res.certificate["certified_radius"] == 0.0 and res.certificate["tv_bound"] == 1.0
    assert json.loads(read_metadata(res.path)["certificate"])["additive"] == "inf"  # strict JSON


def test_unknown_operators_are_refused(tiny: tuple[Policy, Path]) -> None:
    _, fp32 = tiny
    model = onnx.load(str(fp32))
    next(n for n in model.graph.node if n.op_type == "Tanh").op_type = "Sigmoid"
    with pytest.raises(CompressorError, match="unexpected operators"):
        read_quantized(model)


def test_quantize_refuses_a_policy_that_is_not_the_files_source(
    tiny: tuple[Policy, Path], tmp_path: Path
) -> None:
    _, fp32 = tiny
    other = make_policy("gaussian", (16, 16), seed=4).eval()
    with pytest.raises(CompressorError, match="not exported from this policy"):
        quantize_model(other, fp32, tmp_path / "q.onnx", "int8", threat=THREAT)
    assert not (tmp_path / "q.onnx").exists()
