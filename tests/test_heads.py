"""The policy heads off-policy algorithms need: squashed Gaussian with a state-dependent σ,
tanh-squashed deterministic actors, greedy over Q-values; their sampling, divergences, MAD
objective, masks, native format (version 1 still read) and ONNX export."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from compressor.core.errors import CompressorError
from compressor.core.pgd import max_divergence_point
from compressor.core.threat import ThreatModel, sample_ball
from compressor.deploy.export import export_onnx, load_onnx_session, onnx_act
from compressor.policy.loading import load_policy
from compressor.policy.model import Policy, PolicySpec
from compressor.policy.native import load_native, policy_to_dict, save_policy
from compressor.prune.criteria import prune
from conftest import make_policy


def _policy(kind: str, seed: int = 0, obs_dim: int = 3, act_dim: int = 2) -> Policy:
    """Small random policies of the new head variants."""
    options: dict[str, object] = {
        "sac": {"head": "squashed_gaussian", "state_dependent_std": True,
                "log_std_bounds": [-20.0, 2.0]},
        "sac_tanh_std": {"head": "squashed_gaussian", "state_dependent_std": True,
                         "log_std_bounds": [-5.0, 2.0], "log_std_transform": "tanh"},
        "td3": {"head": "deterministic", "squash": True, "exploration": 0.1},
        "dqn": {"head": "q_greedy", "exploration": 0.05},
    }[kind]  # fmt: skip
    discrete = kind == "dqn"
    spec = PolicySpec(
        obs_dim=obs_dim,
        act_dim=act_dim,
        hidden=[16, 16],
        activation="relu",
        obs_norm=True,
        obs_clip=5.0,
        action_low=None if discrete else [-2.0] * act_dim,
        action_high=None if discrete else [1.0] * act_dim,
        **options,  # type: ignore[arg-type]
    )
    p = Policy(spec)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in p.named_parameters():
            t.copy_(torch.randn(t.shape, generator=g) * (0.5 if "weight" in name else 0.1))
        p.obs_mean.copy_(torch.randn(obs_dim, generator=g, dtype=torch.float64))
        p.obs_var.copy_(torch.rand(obs_dim, generator=g, dtype=torch.float64) + 0.5)
    return p


KINDS = ["sac", "sac_tanh_std", "td3", "dqn"]


def _x(n: int = 32, d: int = 3, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed)) * 2


def test_state_dependent_sigma() -> None:
    p = _policy("sac")
    x = _x()
    mean, log_std = p.distribution_params(x)
    h = p.hidden_forward(p.normalize(x))
    torch.testing.assert_close(log_std, p.log_std_layer(h).clamp(-20.0, 2.0))
    torch.testing.assert_close(mean, p(x))
    with torch.no_grad():  # a raw log σ far outside the bounds is clipped (SB3) or squashed
        p.log_std_layer.bias.fill_(50.0)
    assert float(p.distribution_params(x)[1].max()) == 2.0
    q = _policy("sac_tanh_std")
    raw = q.log_std_layer(q.hidden_forward(q.normalize(x)))
    expected = -5.0 + 0.5 * 7.0 * (torch.tanh(raw) + 1.0)
    torch.testing.assert_close(q.distribution_params(x)[1], expected)
    # the deployed action is tanh(μ) rescaled into [low, high]
    torch.testing.assert_close(p.act(x), -2.0 + (torch.tanh(mean) + 1.0) * 0.5 * 3.0)


@pytest.mark.parametrize("kind", KINDS)
def test_sampling(kind: str) -> None:
    p = _policy(kind)
    x = _x(2000).clone()
    x[1:] = x[0]  # one state, many draws
    g = torch.Generator().manual_seed(0)
    a = p.sample(x, g)
    greedy = p.act(x[:1])
    if kind == "dqn":  # ε-greedy: the greedy action except for a fraction ≈ ε (1 - 1/n)
        off = float((a != greedy).float().mean())
        assert 0.01 < off < 0.06
        return
    low, high = p.action_low, p.action_high
    assert bool(((a >= low) & (a <= high)).all())
    if kind == "td3":  # Gaussian noise of 0.1 · half-range around the action, clipped
        spread = (a - greedy).std(0)
        assert bool((spread > 0.05).all() and (spread < 0.2).all())
    else:  # the rescaled tanh of μ + σ ξ: undo the squash, find μ and σ(s) again
        mean, log_std = p.distribution_params(x[:1])
        u = torch.atanh((2 * (a - low) / (high - low) - 1).clamp(-1 + 1e-6, 1 - 1e-6))
        sigma = log_std.exp()[0]
        quart = torch.quantile(u, torch.tensor([0.25, 0.75]), dim=0)
        assert bool(((u.median(0).values - mean[0]).abs() < 5 * sigma / math.sqrt(2000)).all())
        torch.testing.assert_close((quart[1] - quart[0]) / 1.349, sigma, rtol=0.15, atol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_divergences(kind: str) -> None:
    p = _policy(kind)
    x = _x()
    a, b = p(x), p(x + 0.3)
    zero = p.divergence(a, a)
    assert bool((zero == 0).all()) and bool((p.divergence(a, b) >= 0).all())
    assert bool((p.total_variation(a, a) == 0).all())
    if kind == "dqn":
        flipped = (a.argmax(-1) != b.argmax(-1)).float()
        torch.testing.assert_close(p.total_variation(a, b), flipped)
        margin = p.attack_objective(a, b)  # > 0 exactly where the greedy action changed
        assert torch.equal(margin > 0, flipped.bool())
        shifted = b + 7.0  # a common shift of the Q-values changes neither
        torch.testing.assert_close(p.divergence(a, shifted), p.divergence(a, b))
    else:  # the deployed action's distance, in action units
        dist = (p.postprocess(a) - p.postprocess(b)).norm(dim=-1)
        torch.testing.assert_close(p.total_variation(a, b), dist)
        torch.testing.assert_close(p.attack_objective(a, b), dist**2)


@pytest.mark.parametrize("kind", ["sac", "td3", "dqn"])
def test_mad_beats_random_noise(kind: str) -> None:
    """MAD's objective per head moves the deployed action further than random points of the
    same ball (for q_greedy: flips more greedy actions)."""
    p = _policy(kind, act_dim=3)
    x = _x(256)
    threat = ThreatModel(0.3)
    scale = threat.scale(p)
    g = torch.Generator().manual_seed(0)
    mad = max_divergence_point(p, x, scale, threat, 10, g)
    noise = x + sample_ball(tuple(x.shape), 0.3, "inf", g) * scale
    assert float(((mad - x) / scale).abs().max()) <= 0.3 + 1e-5
    with torch.no_grad():
        ref = p(x)
        moved_mad = p.total_variation(ref, p(mad)).mean()
        moved_noise = p.total_variation(ref, p(noise)).mean()
    assert float(moved_mad) > 1.5 * float(moved_noise) > 0


def test_masks_cover_the_deployed_path_only() -> None:
    """Pruning masks every Linear of the deployed action; the σ layer is not on it: it is
    neither pruned nor counted, nor exported."""
    dense = _policy("sac")
    assert len(dense.masks()) == len(dense.layers) == 3
    for method in ("magnitude", "structured"):
        p = prune(dense, 0.5, method)
        assert abs(p.sparsity() - 0.5) < 0.1
        assert torch.equal(p.log_std_layer.weight, dense.log_std_layer.weight)
        assert all(float(m.mean()) < 1 for m in p.masks()[:2])
    n_deployed = sum(la.weight.numel() + la.bias.numel() for la in dense.layers)
    assert dense.num_parameters() == n_deployed


@pytest.mark.parametrize("kind", KINDS)
def test_export_is_the_deployed_action(kind: str, tmp_path: Path) -> None:
    p = _policy(kind)
    res = export_onnx(p.eval(), tmp_path / "p.onnx", compact=False)
    assert res.params_exported == p.num_parameters()  # no σ layer in the graph
    x = _x(64).numpy() * 5
    got = onnx_act(load_onnx_session(tmp_path / "p.onnx"), x)
    with torch.no_grad():
        ref = p.act(torch.as_tensor(x)).numpy()
    if kind == "dqn":
        assert got.dtype == np.int64
        np.testing.assert_array_equal(got, ref)
    else:
        np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5)


def test_act_is_batch_invariant_and_float64_normalisation_is_vecnormalize() -> None:
    p = make_policy("gaussian", hidden=(64, 64), obs_dim=11, act_dim=3)
    x = torch.randn(16, 11, dtype=torch.float64) * 3
    rows = torch.cat([p.act(x[i : i + 1]) for i in range(16)])
    assert torch.equal(p.act(x), rows)  # bit for bit, whatever the batch
    torch.testing.assert_close(p.act(x), p.postprocess(p(x)), rtol=0, atol=1e-5)
    mean, var = p.obs_mean.numpy(), p.obs_var.numpy()
    expected = np.clip((x.numpy() - mean) / np.sqrt(var + p.spec.obs_eps), -10, 10)
    assert np.array_equal(p.normalize(x).numpy(), expected.astype(np.float32))


@pytest.mark.parametrize("kind", KINDS)
def test_native_round_trip(kind: str, tmp_path: Path) -> None:
    p = _policy(kind)
    save_policy(p, tmp_path / "p.pt")
    q = load_native(tmp_path / "p.pt")
    assert q.spec == p.spec
    x = _x()
    assert torch.equal(q.act(x), p.act(x))
    if p.std_kind == "state":
        torch.testing.assert_close(q.distribution_params(x)[1], p.distribution_params(x)[1])


def test_version_1_files_still_load(tmp_path: Path) -> None:
    p = make_policy("squashed_gaussian", obs_dim=3, act_dim=1, env_id="Pendulum-v1")
    payload = policy_to_dict(p)
    payload["version"] = 1  # as version 1 wrote it: none of the fields version 2 added
    for key in ("state_dependent_std", "log_std_bounds", "log_std_transform", "squash",
                "exploration", "env_wrappers"):  # fmt: skip
        payload["spec"].pop(key)
    payload["state_dict"]["obs_mean"] = payload["state_dict"]["obs_mean"].float()
    payload["state_dict"]["obs_var"] = payload["state_dict"]["obs_var"].float()
    torch.save(payload, tmp_path / "v1.pt")
    loaded = load_policy(tmp_path / "v1.pt")
    assert loaded.policy.std_kind == "parameter" and loaded.policy.spec.env_wrappers == []
    x = _x(8)
    torch.testing.assert_close(loaded.policy.act(x), p.act(x))
    payload["version"] = 3
    torch.save(payload, tmp_path / "v3.pt")
    with pytest.raises(CompressorError, match="version 3 is not supported"):
        load_policy(tmp_path / "v3.pt")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"head": "gaussian", "state_dependent_std": True}, "only defined for squashed"),
        ({"head": "squashed_gaussian", "squash": True}, "only defined for deterministic"),
        ({"head": "deterministic", "squash": True, "action_low": None}, "finite action bounds"),
        ({"head": "squashed_gaussian", "log_std_bounds": [2.0, -2.0]}, "low < high"),
        ({"head": "squashed_gaussian", "log_std_transform": "tanh"}, "needs log_std_bounds"),
        ({"head": "q_greedy", "exploration": 2.0}, "probability"),
        ({"head": "gaussian", "env_wrappers": ["TimeFeatureWrapper"]}, "env_wrappers"),
    ],
)
def test_spec_validation(options: dict[str, object], message: str) -> None:
    base: dict[str, object] = {"obs_dim": 3, "act_dim": 1, "hidden": [4],
                               "action_low": [-1.0], "action_high": [1.0]}  # fmt: skip
    with pytest.raises(CompressorError, match=message):
        Policy(PolicySpec(**{**base, **options}))  # type: ignore[arg-type]


def test_time_feature_recorded_in_the_spec_reaches_every_env() -> None:
    from compressor.rl.envs import env_dims, make_vector_env
    from compressor.rl.rollout import rollout

    wrappers = [{"name": "TimeFeatureWrapper", "max_steps": 1000, "test_mode": False}]
    assert env_dims("Pendulum-v1", {}, wrappers)["obs_dim"] == 4
    envs = make_vector_env("Pendulum-v1", {}, 2, wrappers)
    obs, _ = envs.reset(seed=0)
    envs.close()
    assert obs.shape == (2, 4) and np.all(obs[:, -1] == 1.0)
    p = make_policy("gaussian", obs_dim=4, act_dim=1)
    p.spec.env_wrappers = wrappers
    seen: list[np.ndarray] = []
    rollout(p, "Pendulum-v1", {}, [0], num_envs=1, on_transition=lambda *a: seen.append(a[4]))
    times = np.concatenate(seen)[:, -1]  # 1 - t/200 after step t (Pendulum's limit is 200)
    np.testing.assert_allclose(times, 1.0 - np.arange(1, 201) / 200.0)
    with pytest.raises(CompressorError, match="not supported"):
        env_dims("Pendulum-v1", {}, [{"name": "HistoryWrapper"}])
    assert math.isfinite(float(times[0]))
