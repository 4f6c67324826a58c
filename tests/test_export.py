"""ONNX export: parity with torch for every head and activation, compaction, metadata, files."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from compressor.core.errors import CompressorError
from compressor.deploy import export as export_mod
from compressor.deploy.compact import compact_layers
from compressor.deploy.export import (
    ExportResult,
    export_onnx,
    graph_layer_shapes,
    load_onnx_session,
    onnx_act,
    read_metadata,
)
from compressor.policy.model import Policy, PolicySpec
from conftest import make_policy

HEADS = ("gaussian", "categorical", "squashed_gaussian", "deterministic")


def _obs(policy: Policy, n: int, seed: int = 1, spread: float = 1.0) -> np.ndarray:
    return export_mod.parity_observations(policy, n, spread, seed)


def _assert_matches(policy: Policy, path: Path, batches: tuple[int, ...] = (1, 2, 7, 100)) -> None:
    """Fresh observations (not the exporter's own parity set), typical and far out."""
    sess = load_onnx_session(path)
    for n in batches:
        for spread in (1.0, 50.0):
            obs = _obs(policy, n, seed=100 + n, spread=spread)
            got = onnx_act(sess, obs)
            with torch.no_grad():
                ref = policy.act(torch.as_tensor(obs)).numpy()
            assert got.shape == ref.shape
            if policy.spec.head == "categorical":
                assert got.dtype == np.int64
                np.testing.assert_array_equal(got, ref)
            else:
                assert got.dtype == np.float32
                np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5)


def _ops(path: Path) -> list[str]:
    return [n.op_type for n in onnx.load(str(path)).graph.node]


# ---- parity ---------------------------------------------------------------------------------
@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("activation", ["tanh", "relu", "elu"])
@pytest.mark.parametrize("obs_norm", [True, False])
def test_parity_every_head_and_activation(
    tmp_path: Path, head: str, activation: str, obs_norm: bool
) -> None:
    policy = make_policy(head=head, activation=activation, obs_norm=obs_norm, obs_dim=5, seed=3)
    res = export_onnx(policy, tmp_path / "p.onnx")
    assert isinstance(res, ExportResult)
    assert res.parity_batches == [1, 2, 7]
    assert 0.0 <= res.parity_max_abs_err <= 1e-5
    assert ("Clip" in _ops(res.path)) == obs_norm  # make_policy sets a clip only with norm
    _assert_matches(policy, res.path)


def test_clip_is_exercised(tmp_path: Path) -> None:
    """Far-out observations hit the clip: they all give the same action as the clip corner."""
    policy = make_policy(obs_dim=3, seed=4)
    res = export_onnx(policy, tmp_path / "p.onnx")
    sess = load_onnx_session(res.path)
    mean = policy.obs_mean.numpy()
    std = policy.obs_scale().numpy()
    a = onnx_act(sess, (mean + 20 * std)[None].astype(np.float32))
    b = onnx_act(sess, (mean + 1e6 * std)[None].astype(np.float32))
    np.testing.assert_allclose(a, b, atol=1e-6)


@pytest.mark.parametrize("head", ["gaussian", "deterministic"])
def test_infinite_bounds(tmp_path: Path, head: str) -> None:
    policy = make_policy(head=head, obs_dim=4, act_dim=3, seed=5)
    with torch.no_grad():
        policy.layers[-1].weight.mul_(20.0)  # outputs well outside ±1
        policy.action_low.copy_(torch.tensor([-math.inf, -0.5, -math.inf]))
        policy.action_high.copy_(torch.tensor([math.inf, 0.5, 0.25]))
    policy.spec.action_low = [-math.inf, -0.5, -math.inf]
    policy.spec.action_high = [math.inf, 0.5, 0.25]
    res = export_onnx(policy, tmp_path / "mixed.onnx")
    _assert_matches(policy, res.path)
    out = onnx_act(load_onnx_session(res.path), _obs(policy, 100, spread=3.0))
    assert np.abs(out[:, 0]).max() > 1.0  # the unbounded dimension really is unclipped
    spec = json.loads(read_metadata(res.path)["spec"])  # strict JSON despite the infinities
    assert spec["action_low"] == ["-inf", -0.5, "-inf"]

    unbounded = make_policy(head=head, seed=6)
    with torch.no_grad():
        unbounded.action_low.fill_(-math.inf)
        unbounded.action_high.fill_(math.inf)
    unbounded.spec.action_low = unbounded.spec.action_high = None
    res = export_onnx(unbounded, tmp_path / "free.onnx")
    assert not {"Min", "Max"} & set(_ops(res.path))
    _assert_matches(unbounded, res.path)


def test_squashed_needs_finite_bounds(tmp_path: Path) -> None:
    policy = make_policy(head="squashed_gaussian", seed=1)
    with torch.no_grad():
        policy.action_high.fill_(math.inf)
    with pytest.raises(CompressorError, match="finite action bounds"):
        export_onnx(policy, tmp_path / "p.onnx")
    assert list(tmp_path.iterdir()) == []


def test_squashed_asymmetric_bounds(tmp_path: Path) -> None:
    policy = make_policy(head="squashed_gaussian", act_dim=2, seed=8)
    with torch.no_grad():
        policy.action_low.copy_(torch.tensor([0.0, -3.0]))
        policy.action_high.copy_(torch.tensor([2.0, 7.5]))
    res = export_onnx(policy, tmp_path / "p.onnx")
    _assert_matches(policy, res.path)


def test_categorical_ties_break_like_torch(tmp_path: Path) -> None:
    policy = make_policy(head="categorical", act_dim=4, seed=2)
    with torch.no_grad():
        policy.layers[-1].weight.zero_()
        policy.layers[-1].bias.copy_(torch.tensor([0.5, 1.0, 1.0, 1.0]))
    res = export_onnx(policy, tmp_path / "p.onnx")
    out = onnx_act(load_onnx_session(res.path), _obs(policy, 7))
    assert out.tolist() == [1] * 7  # the first maximum, as torch.argmax


def test_no_hidden_layer(tmp_path: Path) -> None:
    policy = make_policy(hidden=(), seed=2)
    _assert_matches(policy, export_onnx(policy, tmp_path / "p.onnx").path)


# ---- masks and compaction -------------------------------------------------------------------
def test_unstructured_masks_keep_shapes(tmp_path: Path) -> None:
    policy = make_policy(activation="relu", hidden=(32, 32), obs_dim=11, act_dim=6, seed=9)
    g = torch.Generator().manual_seed(0)
    policy.set_masks([(torch.rand(m.shape, generator=g) > 0.3).float() for m in policy.masks()])
    assert 0.25 < policy.sparsity() < 0.35
    res = export_onnx(policy, tmp_path / "p.onnx")
    _assert_matches(policy, res.path)
    # scattered zeros empty no whole row or column, so nothing can be removed
    assert graph_layer_shapes(res.path) == [(32, 11), (32, 32), (6, 32)]
    assert res.removed_neurons == 0 and res.params_exported == res.params_dense


@pytest.mark.parametrize("activation", ["tanh", "relu", "elu"])
def test_structured_masks_shrink_the_graph(tmp_path: Path, activation: str) -> None:
    policy = make_policy(activation=activation, hidden=(16, 12), seed=10)
    masks = [m.clone() for m in policy.masks()]
    masks[0][[1, 4, 5, 9]] = 0  # 4 layer-1 neurons lose their inputs: constant, folded
    masks[2][:, [0, 7]] = 0  # 2 layer-2 neurons feed nothing: dropped
    masks[1][[3]] = 0  # and one layer-2 neuron is constant as well
    policy.set_masks(masks)
    res = export_onnx(policy, tmp_path / "p.onnx")
    assert res.removed_neurons == 7
    assert graph_layer_shapes(res.path) == [(12, 4), (9, 12), (2, 9)]
    assert res.params_exported == 12 * 4 + 12 + 9 * 12 + 9 + 2 * 9 + 2
    assert res.params_exported < res.params_dense
    _assert_matches(policy, res.path)

    full = export_onnx(policy, tmp_path / "full.onnx", compact=False)
    assert graph_layer_shapes(full.path) == [(16, 4), (12, 16), (2, 12)]
    assert full.removed_neurons == 0 and full.params_exported == full.params_dense


def _trunk_numpy(
    layers: list[tuple[np.ndarray, np.ndarray]], act: str, z: np.ndarray
) -> np.ndarray:
    fns: dict[str, Callable[[np.ndarray], np.ndarray]] = {
        "tanh": np.tanh,
        "relu": lambda x: np.maximum(x, 0),
        "elu": lambda x: np.where(x > 0, x, np.expm1(np.minimum(x, 0))),
    }
    f = fns[act]
    h = z.astype(np.float64)
    for i, (w, b) in enumerate(layers):
        h = h @ w.T.astype(np.float64) + b
        if i < len(layers) - 1:
            h = f(h)
    return h


@pytest.mark.parametrize("activation", ["tanh", "relu", "elu"])
def test_compaction_cascades_and_is_exact(activation: str) -> None:
    policy = make_policy(activation=activation, hidden=(8, 8, 8), seed=11)
    masks = [m.clone() for m in policy.masks()]
    # outgoing cascade: hidden-3 neuron 2 feeds nothing; hidden-2 neuron 5 fed only it
    masks[3][:, 2] = 0
    masks[2][:, 5] = 0
    masks[2][2, 5] = 1
    # incoming cascade: hidden-1 neuron 3 has no inputs (constant); hidden-2 neuron 6 read
    # only it, so it becomes constant too once the first is folded away
    masks[0][3, :] = 0
    masks[1][6, :] = 0
    masks[1][6, 3] = 1
    policy.set_masks(masks)
    layers, removed = compact_layers(policy)
    assert removed == 4
    assert [w.shape for w, _ in layers] == [(7, 4), (6, 7), (7, 6), (2, 7)]
    z = np.random.default_rng(0).standard_normal((64, 4))
    with torch.no_grad():
        ref = policy.trunk_forward(torch.as_tensor(z, dtype=torch.float32)).double().numpy()
    np.testing.assert_allclose(_trunk_numpy(layers, activation, z), ref, atol=1e-5)
    again, removed_again = compact_layers(_with_layers(policy, layers))
    assert removed_again == 0  # a fixed point: nothing left to remove
    assert [w.shape for w, _ in again] == [w.shape for w, _ in layers]


def _with_layers(policy: Policy, layers: list[tuple[np.ndarray, np.ndarray]]) -> Policy:
    spec = PolicySpec(
        obs_dim=policy.spec.obs_dim,
        act_dim=policy.spec.act_dim,
        hidden=[w.shape[0] for w, _ in layers[:-1]],
        activation=policy.spec.activation,
        head=policy.spec.head,
    )
    p = Policy(spec)
    with torch.no_grad():
        for layer, (w, b) in zip(p.layers, layers):
            layer.weight.copy_(torch.as_tensor(w))
            layer.bias.copy_(torch.as_tensor(b))
    return p


def test_fully_dead_layer_keeps_one_neuron(tmp_path: Path) -> None:
    policy = make_policy(activation="elu", hidden=(6, 5), seed=12)
    masks = [m.clone() for m in policy.masks()]
    masks[1].zero_()  # layer 2 gets no input at all: the action is a constant
    policy.set_masks(masks)
    layers, removed = compact_layers(policy)
    assert [w.shape for w, _ in layers] == [(1, 4), (1, 1), (2, 1)]
    assert removed == 5 + 4
    res = export_onnx(policy, tmp_path / "p.onnx")
    _assert_matches(policy, res.path)


# ---- files and metadata ---------------------------------------------------------------------
def test_single_file_and_result_fields(tmp_path: Path) -> None:
    policy = make_policy(seed=13)
    out = tmp_path / "empty" / "policy.onnx"
    res = export_onnx(policy, out)
    assert [p.name for p in out.parent.iterdir()] == ["policy.onnx"]  # no sidecar, no temp
    data = out.read_bytes()
    assert res.file_bytes == len(data)
    import hashlib

    assert res.sha256 == hashlib.sha256(data).hexdigest()
    assert res.opset == 17 and res.ir_version == 8
    model = onnx.load(str(out))
    onnx.checker.check_model(model, full_check=True)
    assert model.opset_import[0].version == 17
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param == "batch" and dims[1].dim_value == 4
    assert res.params_dense == policy.num_parameters()


def test_metadata_round_trip(tmp_path: Path) -> None:
    policy = make_policy(seed=14, env_id="Hopper-v5")
    policy.spec.source = {"format": "native", "sha256": "ab" * 32}
    cert = {"lipschitz": 3.5, "radius": 0.01}
    meta = {"eps": "0.075", "eps_space": "normalized", "budget": "0.05", "certificate": cert}
    res = export_onnx(policy, tmp_path / "p.onnx", metadata=meta)  # type: ignore[arg-type]
    got = read_metadata(res.path)
    assert got["eps"] == "0.075" and got["eps_space"] == "normalized" and got["budget"] == "0.05"
    assert json.loads(got["certificate"]) == cert
    assert got["source_sha256"] == "ab" * 32
    assert got["compressor_version"]
    spec = json.loads(got["spec"])
    assert spec["env_id"] == "Hopper-v5" and spec["hidden"] == [16, 16]
    assert PolicySpec(**spec).head == "gaussian"
    iface = json.loads(got["interface"])
    assert iface["input"] == "obs" and iface["output"] == "action"

    over = export_onnx(policy, tmp_path / "q.onnx", metadata={"source_sha256": "given"})
    assert read_metadata(over.path)["source_sha256"] == "given"
    empty = export_onnx(policy, tmp_path / "e.onnx", metadata={"source_sha256": ""})
    assert read_metadata(empty.path)["source_sha256"] == "ab" * 32
    with pytest.raises(CompressorError, match="reserved"):
        export_onnx(policy, tmp_path / "r.onnx", metadata={"spec": "mine"})


@pytest.mark.parametrize("opset", [13, 15, 17, 18])
def test_opsets(tmp_path: Path, opset: int) -> None:
    policy = make_policy(head="categorical", act_dim=3, seed=15)
    res = export_onnx(policy, tmp_path / "p.onnx", opset=opset)
    model = onnx.load(str(res.path))
    assert model.opset_import[0].version == opset
    assert model.ir_version == res.ir_version == (7 if opset == 13 else 8)
    _assert_matches(policy, res.path, batches=(1, 7))


def test_old_opset_rejected(tmp_path: Path) -> None:
    with pytest.raises(CompressorError, match="opset 12"):
        export_onnx(make_policy(), tmp_path / "p.onnx", opset=12)


# ---- running --------------------------------------------------------------------------------
def test_onnx_act_inputs(tmp_path: Path) -> None:
    policy = make_policy(head="squashed_gaussian", obs_dim=6, seed=16)
    sess = load_onnx_session(export_onnx(policy, tmp_path / "p.onnx").path)
    obs64 = _obs(policy, 7).astype(np.float64)
    with torch.no_grad():
        ref = policy.act(torch.as_tensor(obs64)).numpy()
    np.testing.assert_allclose(onnx_act(sess, obs64), ref, atol=1e-5)  # float64 is cast
    single = onnx_act(sess, obs64[0])
    assert single.shape == (2,)
    np.testing.assert_allclose(single, ref[0], atol=1e-5)
    for n in (1, 2, 7, 100):
        assert onnx_act(sess, _obs(policy, n)).shape == (n, 2)
    np.testing.assert_allclose(onnx_act(sess, obs64.T.copy().T), ref, atol=1e-5)  # F-order
    with pytest.raises(CompressorError, match=r"\(batch, 6\)"):
        onnx_act(sess, np.zeros((3, 5)))
    with pytest.raises(CompressorError, match="shape"):
        onnx_act(sess, np.zeros((2, 3, 6)))
    with pytest.raises(CompressorError, match="numeric"):
        onnx_act(sess, np.array([["a"] * 6]))


def test_session_errors(tmp_path: Path) -> None:
    with pytest.raises(CompressorError, match="not found"):
        load_onnx_session(tmp_path / "missing.onnx")
    path = export_onnx(make_policy(), tmp_path / "p.onnx").path
    with pytest.raises(CompressorError, match="not available"):
        load_onnx_session(path, providers=["NoSuchExecutionProvider"])
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a model")
    with pytest.raises(CompressorError):
        load_onnx_session(junk)
    with pytest.raises(CompressorError, match="not a readable ONNX"):
        read_metadata(junk)
    assert onnx_act(load_onnx_session(path, threads=1), np.zeros(4)).shape == (2,)


# ---- failures leave nothing behind -----------------------------------------------------------
def test_failure_while_writing_leaves_no_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(tmp: Path, data: bytes) -> None:
        tmp.write_bytes(data[: len(data) // 2])
        raise KeyboardInterrupt  # e.g. Ctrl-C half way through

    monkeypatch.setattr(export_mod, "_write_model", broken)
    with pytest.raises(KeyboardInterrupt):
        export_onnx(make_policy(), tmp_path / "p.onnx")
    assert list(tmp_path.iterdir()) == []


def test_parity_failure_leaves_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    policy = make_policy(seed=17)
    out = tmp_path / "p.onnx"
    out.write_bytes(b"previous export")
    monkeypatch.setattr(policy, "act", lambda obs: torch.zeros(obs.shape[0], 2) + 0.5)
    with pytest.raises(CompressorError, match="disagrees with torch"):
        export_onnx(policy, out)
    assert [p.name for p in tmp_path.iterdir()] == ["p.onnx"]
    assert out.read_bytes() == b"previous export"  # the older file is untouched, not replaced

    cat = make_policy(head="categorical", act_dim=3, seed=18)
    monkeypatch.setattr(cat, "act", lambda obs: torch.full((obs.shape[0],), 2))
    with pytest.raises(CompressorError, match="different actions"):
        export_onnx(cat, tmp_path / "c.onnx")
    assert not (tmp_path / "c.onnx").exists()


def test_skip_parity(tmp_path: Path) -> None:
    res = export_onnx(make_policy(), tmp_path / "p.onnx", check_parity=False)
    assert math.isnan(res.parity_max_abs_err) and res.parity_batches == []
    assert res.path.is_file()


def test_nan_weights_rejected(tmp_path: Path) -> None:
    policy = make_policy()
    with torch.no_grad():
        policy.layers[0].weight[0, 0] = math.nan
    with pytest.raises(CompressorError, match="NaN"):
        export_onnx(policy, tmp_path / "p.onnx")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("opset", [13, 17])
def test_sparse_storage_is_smaller_and_exact(tmp_path: Path, head: str, opset: int) -> None:
    from compressor.deploy.export import decode_sparse_weight, sparse_saves_bytes
    from compressor.deploy.quantize import read_quantized

    pol = make_policy(head, hidden=(64, 64), obs_dim=32, act_dim=8, seed=3)
    g = torch.Generator().manual_seed(0)  # scattered zeros: compaction removes nothing
    pol.set_masks([(torch.rand(m.shape, generator=g) > 0.7).float() for m in pol.masks()])
    dense = export_onnx(pol, tmp_path / "dense.onnx", opset=opset)
    sparse = export_onnx(pol, tmp_path / "sparse.onnx", opset=opset, sparse_storage=True)
    assert sparse.weight_storage == "bitmask" and "dense" in sparse.weight_storage_note
    assert sparse.file_bytes < 0.6 * dense.file_bytes
    assert sparse.parity_max_abs_err <= 1e-5
    _assert_matches(pol, tmp_path / "sparse.onnx")
    assert graph_layer_shapes(tmp_path / "sparse.onnx") == graph_layer_shapes(
        tmp_path / "dense.onnx"
    )
    # the weights read back from the file are exactly the exported ones
    a, b = read_quantized(tmp_path / "dense.onnx"), read_quantized(tmp_path / "sparse.onnx")
    for la, lb in zip(a.layers, b.layers):
        assert np.array_equal(la.weight, lb.weight)
    assert any(la.storage == "fp32-bitmask" for la in b.layers)
    # a dense matrix is left dense: storing it as a bitmask would only grow the file
    w = np.ones((8, 8), np.float32)
    assert not sparse_saves_bytes(w)
    bits = np.packbits(np.eye(8, dtype=bool).reshape(-1), bitorder="little")
    np.testing.assert_array_equal(
        decode_sparse_weight(bits, np.ones(9, np.float32), (8, 8)), np.eye(8)
    )


def test_sparse_storage_leaves_dense_policy_dense(tmp_path: Path) -> None:
    pol = make_policy("gaussian", hidden=(32,), seed=4)
    dense = export_onnx(pol, tmp_path / "dense.onnx")
    sparse = export_onnx(pol, tmp_path / "sparse.onnx", sparse_storage=True)
    assert sparse.file_bytes == dense.file_bytes


def test_parity_allows_float32_rounding_of_large_outputs_and_nothing_more(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # SAC's actors (no observation normalisation) give pre-tanh means of |μ| ≈ 90 on ordinary
    # states: their float32 rounding alone moves an action by 1e-5, which onnxruntime's other
    # summation order shows; an export must not be refused for that
    policy = make_policy("squashed_gaussian", hidden=(256, 256), obs_dim=11, act_dim=3, seed=4)
    with torch.no_grad():
        policy.layers[-1].weight.mul_(60.0)
    obs = export_mod.parity_observations(policy, 7, 1.0, 0)
    with torch.no_grad():
        big = float(policy(torch.as_tensor(obs)).abs().max())
    assert big > 50.0  # the regime of the shipped SAC Hopper's actor
    assert float(export_mod.float32_rounding(policy, [obs])[0].max()) > 0.0
    export_onnx(policy, tmp_path / "p.onnx")  # parity holds
    # an error well above rounding (1e-3 on one action) is still caught
    act = policy.act

    def off(o: torch.Tensor) -> torch.Tensor:
        a = act(o).clone()
        a[..., 0] += 1e-3
        return a

    monkeypatch.setattr(policy, "act", off)
    with pytest.raises(CompressorError, match="disagrees with torch"):
        export_onnx(policy, tmp_path / "q.onnx")
