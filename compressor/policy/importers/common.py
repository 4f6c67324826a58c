"""Importers for third-party policy files, and the pieces they share.

Each importer turns a foreign file into an :class:`ImportResult`: a :class:`Policy`, an optional
critic in the native ``"critic"`` entry form (see ``compressor.rl.ppo.save_trained``), the
Q-networks the file holds beyond the actor (native ``"q_nets"`` items, see
:class:`compressor.policy.value.QNet`), and the warnings a user must see.
``compressor.policy.loading.load_policy`` picks the importer.
"""

from __future__ import annotations

import io
import json
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch

from compressor.core.errors import CompressorError
from compressor.policy.importers.safe_pickle import NormStats, load_vecnormalize
from compressor.policy.model import Policy, PolicySpec, check_finite
from compressor.rl.envs import make_env

__all__ = [
    "ImportResult",
    "NormStats",
    "apply_norm_stats",
    "build_policy",
    "critic_entry",
    "fold_quantile_mean",
    "q_entry",
    "linear_chain",
    "load_norm_stats",
    "resolve_env_id",
    "torch_load_safe",
]

#: Default normalisation epsilon and clip of gymnasium's NormalizeObservation + CleanRL's clip.
DEFAULT_EPS = 1e-8
DEFAULT_CLIP = 10.0


@dataclass
class ImportResult:
    """What an importer produces.

    :param policy: the policy (weights, normalisation, bounds, spec with env id and source).
    :param critic: a native critic entry ``{"hidden", "activation", "input", "state_dict"}``
        (state dict of ``nn.Sequential`` Linear/act/.../Linear), or None.
    :param warnings: problems the user must see (missing stats, env version mapped, ...).
    :param q_nets: native ``"q_nets"`` items (:meth:`compressor.policy.value.QNet.to_entry`).
    """

    policy: Policy
    critic: dict[str, Any] | None = None
    warnings: list[str] = field(default_factory=list)
    q_nets: list[dict[str, Any]] = field(default_factory=list)


# ---- torch files ------------------------------------------------------------------------------
def torch_load_safe(src: bytes | Path, origin: str) -> Any:
    """``torch.load(weights_only=True)`` with its failures turned into one-line errors.

    ``weights_only`` admits tensors and plain containers only, so nothing in the file runs; a
    global outside that set is named in the error as refused.

    :param src: the file's bytes, or its path.
    :param origin: file name for error messages.
    """
    try:
        f = io.BytesIO(src) if isinstance(src, bytes) else src
        return torch.load(f, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CompressorError(f"{origin}: file not found") from None
    except Exception as exc:  # torch raises many types for truncated / foreign / hostile files
        text = str(exc)
        m = re.search(r"nsupported (?:global: )?GLOBAL (\S+)", text)
        if m:
            named = _pickled_globals(src, m.group(1))
            raise CompressorError(
                f"refused to load {', '.join(named)} from {origin}: torch files may only contain "
                "tensors and plain containers (nothing was executed; do not use this file if "
                "you did not make it)"
            ) from None
        if "Weights only load failed" in text:
            # a bare pickle (not torch's zip format): name the code it would have called
            from compressor.policy.importers.safe_pickle import referenced_globals

            data = src if isinstance(src, bytes) else Path(src).read_bytes()
            names = sorted({f"{m}.{n}" for m, n in referenced_globals(data)})
            if names:
                raise CompressorError(
                    f"refused to load {origin}: it is a pickle referencing {', '.join(names)}; "
                    "policy files may only contain tensors and plain containers (nothing was "
                    "executed; do not use this file if you did not make it)"
                ) from None
            last = [ln for ln in text.splitlines() if ln.strip()][-2:-1] or ["unsupported"]
            msg = f"{origin}: not a loadable torch file ({last[0][:120]})"
            raise CompressorError(msg) from None
        detail = text.splitlines()[0][:160] if text else type(exc).__name__
        raise CompressorError(f"{origin}: truncated or corrupt torch file ({detail})") from None


def _pickled_globals(src: bytes | Path, torch_name: str) -> list[str]:
    """The non-torch globals the pickle inside a torch file names (read from its opcodes), or
    torch's own name for the refused one (it drops ``builtins.``) when they cannot be read."""
    import zipfile

    from compressor.policy.importers.safe_pickle import referenced_globals

    try:
        data = src if isinstance(src, bytes) else Path(src).read_bytes()
        if data[:4] == b"PK\x03\x04":
            with zipfile.ZipFile(io.BytesIO(data)) as zf:
                member = next(n for n in zf.namelist() if n.endswith("data.pkl"))
                data = zf.read(member)
        import _compat_pickle  # protocol 2 (torch's) spells builtins the Python 2 way

        found = []
        for module, name in referenced_globals(data):
            module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
            found.append(f"{_compat_pickle.IMPORT_MAPPING.get(module, module)}.{name}")
    except Exception:  # corrupt archive: torch's name is all there is
        found = []
    named = [g for g in found if not g.startswith(("torch.", "collections.OrderedDict"))]
    return named or [torch_name]


# ---- environments ----------------------------------------------------------------------------
def _probe_obs_dim(
    env_id: str, env_kwargs: dict[str, Any], wrappers: list[dict[str, Any]] | None = None
) -> int | None:
    """Flat observation size if ``env_id`` (in ``wrappers``) can be built here, else None."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # deprecation notices of old versions are noise here
            env = make_env(env_id, env_kwargs, wrappers)
    except Exception:  # unregistered, moved (mujoco-py v2/v3), missing dependency, bad kwargs
        return None
    try:
        shape = getattr(env.observation_space, "shape", None)
        return int(shape[0]) if shape is not None and len(shape) == 1 else -1
    finally:
        env.close()


def resolve_env_id(
    env_id: str,
    env_kwargs: dict[str, Any] | None = None,
    obs_dim: int | None = None,
    wrappers: list[dict[str, Any]] | None = None,
) -> tuple[str, str | None]:
    """Map an env id to one that can be built here, preferring the id itself.

    When ``env_id`` is an old version that this gymnasium cannot build (e.g. ``Hopper-v3``, whose
    mujoco-py backend is gone), the newest buildable version of the same env whose observation
    size matches ``obs_dim`` is used instead (``Hopper-v5``), with a warning.

    :param env_id: the id the policy was trained on.
    :param env_kwargs: keyword arguments for ``gymnasium.make``.
    :param obs_dim: the policy's observation size, to pick a compatible version.
    :param wrappers: the policy's ``spec.env_wrappers`` (they change the observation size).
    :returns: the id to use, and a warning when it differs from ``env_id``.
    """
    kwargs = dict(env_kwargs or {})
    if _probe_obs_dim(env_id, kwargs, wrappers) is not None:
        return env_id, None
    m = re.fullmatch(r"(.+)-v(\d+)", env_id)
    versions: list[tuple[int, str]] = []
    if m:
        pattern = re.compile(re.escape(m.group(1)) + r"-v(\d+)")
        for key in gym.registry:
            km = pattern.fullmatch(key)
            if km and key != env_id:
                versions.append((int(km.group(1)), key))
    fallback = None
    for _, cand in sorted(versions, reverse=True):
        cand_dim = _probe_obs_dim(cand, kwargs, wrappers)
        if cand_dim is None:
            continue
        if obs_dim is None or cand_dim == obs_dim:
            fallback = cand
            break
        fallback = fallback or cand
    if fallback is None:
        raise CompressorError(
            f"environment {env_id!r} cannot be created with this gymnasium install; "
            "pass an installed environment with --env"
        )
    return fallback, (
        f"{env_id} is not available in this gymnasium; using {fallback} instead "
        f"(returns on {fallback} are not comparable with {env_id}; pass --env to choose another)"
    )


# ---- normalisation statistics ------------------------------------------------------------------
def load_norm_stats(path: str | Path) -> NormStats:
    """Read observation normalisation statistics from a file, without executing anything.

    Accepts an SB3 / RL Zoo ``vecnormalize.pkl`` (restricted unpickler), or, for policies whose
    trainer did not save its statistics (CleanRL), a ``.npz`` or ``.json`` holding ``mean`` and
    ``var`` and optionally ``clip`` (default 10) and ``epsilon`` (default 1e-8).

    :param path: the statistics file.
    """
    p = Path(path)
    if not p.is_file():
        raise CompressorError(f"{p}: normalisation file not found")
    suffix = p.suffix.lower()
    if suffix not in (".npz", ".json"):
        return load_vecnormalize(p)
    try:
        if suffix == ".npz":
            with np.load(p, allow_pickle=False) as npz:
                raw: dict[str, Any] = {k: npz[k] for k in npz.files}
        else:
            raw = json.loads(p.read_text())
    except Exception as exc:  # zipfile / json / value errors on foreign files
        detail = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
        raise CompressorError(f"{p}: cannot read normalisation statistics ({detail})") from None
    if not isinstance(raw, dict) or "mean" not in raw or "var" not in raw:
        raise CompressorError(f"{p}: normalisation file must hold 'mean' and 'var' arrays")
    clip = raw.get("clip", raw.get("clip_obs", DEFAULT_CLIP))
    try:
        stats = NormStats(
            mean=np.asarray(raw["mean"], dtype=np.float64),
            var=np.asarray(raw["var"], dtype=np.float64),
            clip_obs=None if clip is None else float(clip),
            epsilon=float(raw.get("epsilon", DEFAULT_EPS)),
            norm_obs=True,
            count=float(raw.get("count", 0.0)),
            source=p.name,
        )
    except (TypeError, ValueError, OverflowError) as exc:
        raise CompressorError(f"{p}: malformed normalisation statistics ({exc})") from None
    stats.validate(p.name)
    return stats


def apply_norm_stats(policy: Policy, stats: NormStats) -> None:
    """Install normalisation statistics into a policy (spec and buffers).

    :param policy: the policy, modified in place.
    :param stats: the statistics; ``norm_obs=False`` disables normalisation and clipping.
    """
    spec = policy.spec
    if not stats.norm_obs:
        spec.obs_norm, spec.obs_clip = False, None
        return
    if stats.mean.shape != (spec.obs_dim,):
        raise CompressorError(
            f"{stats.source}: statistics are for {stats.mean.shape[0]} observations but the "
            f"policy takes {spec.obs_dim}; pass the statistics saved with this policy"
        )
    spec.obs_norm, spec.obs_clip, spec.obs_eps = True, stats.clip_obs, stats.epsilon
    with torch.no_grad():
        policy.get_buffer("obs_mean").copy_(torch.as_tensor(stats.mean, dtype=torch.float64))
        policy.get_buffer("obs_var").copy_(torch.as_tensor(stats.var, dtype=torch.float64))


# ---- weights -------------------------------------------------------------------------------
Layer = tuple[torch.Tensor, torch.Tensor]


def linear_chain(state: dict[str, Any], prefix: str, origin: str) -> list[Layer]:
    """The ``(weight, bias)`` pairs of an ``nn.Sequential`` stored under ``prefix`` in index order.

    :param state: a state dict.
    :param prefix: e.g. ``"mlp_extractor.policy_net."``.
    :param origin: file name for error messages.
    """
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.weight")
    idx = sorted(
        int(m.group(1)) for k in state if isinstance(k, str) and (m := pattern.fullmatch(k))
    )
    layers = []
    for i in idx:
        w, b = state[f"{prefix}{i}.weight"], state.get(f"{prefix}{i}.bias")
        if not (isinstance(w, torch.Tensor) and isinstance(b, torch.Tensor)) or (
            w.dim() != 2 or b.shape != (w.shape[0],)
        ):
            raise CompressorError(f"{origin}: layer {prefix}{i} is not a Linear layer with bias")
        layers.append((w, b))
    return layers


def tensor_state(obj: Any, what: str, origin: str) -> dict[str, torch.Tensor]:
    """``obj`` as a state dict (string keys, tensor values), or a one-line error naming ``what``.

    :param obj: a value read from a checkpoint.
    :param what: its role, for the message (e.g. ``actor_state_dict``).
    :param origin: file name for error messages.
    """
    if not isinstance(obj, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    ):
        raise CompressorError(f"{origin}: {what} is not a state dict of tensors (corrupt file?)")
    return obj


def check_chain(layers: list[Layer], in_dim: int, what: str, origin: str) -> None:
    """Raise unless consecutive Linear layers fit together, starting from ``in_dim`` inputs."""
    size = in_dim
    for i, (w, b) in enumerate(layers):
        if w.dim() != 2 or b.shape != (w.shape[0],):  # e.g. action_net/value_net, read unchecked
            raise CompressorError(f"{origin}: {what} layer {i} is not a Linear layer with bias")
        if w.shape[1] != size:
            raise CompressorError(
                f"{origin}: {what} layer {i} takes {w.shape[1]} inputs but receives {size} "
                "(unsupported architecture: only plain MLPs can be imported)"
            )
        size = w.shape[0]


def build_policy(
    spec: PolicySpec,
    layers: list[Layer],
    origin: str,
    log_std: torch.Tensor | None = None,
    log_std_layer: Layer | None = None,
) -> Policy:
    """A :class:`Policy` for ``spec`` holding the given layer weights (checked for NaN/inf).

    :param spec: the architecture (``hidden`` must match ``layers``).
    :param layers: ``(weight, bias)`` of every Linear layer, input first.
    :param origin: file name for error messages.
    :param log_std: state-independent log standard deviation (Gaussian heads).
    :param log_std_layer: ``(weight, bias)`` of the state-dependent ``log σ`` layer (squashed
        heads with ``spec.state_dependent_std``), reading the last hidden activation.
    """
    if len(layers) != len(spec.hidden) + 1:
        raise CompressorError(
            f"{origin}: {len(layers)} layers do not match the spec's hidden sizes"
        )
    # before Policy(spec): a corrupt obs_dim must not size an allocation the weights do not back
    check_chain(layers, spec.obs_dim, "policy", origin)
    if [int(w.shape[0]) for w, _ in layers] != [*spec.hidden, spec.act_dim]:
        raise CompressorError(f"{origin}: layer sizes do not match the spec's hidden sizes")
    policy = Policy(spec)
    with torch.no_grad():
        for i, (w, b) in enumerate(layers):
            policy.get_parameter(f"layers.{i}.weight").copy_(w.to(torch.float32))
            policy.get_parameter(f"layers.{i}.bias").copy_(b.to(torch.float32))
        if policy.std_kind == "parameter":
            if log_std is None or log_std.numel() != spec.act_dim:
                raise CompressorError(f"{origin}: Gaussian policy has no usable log_std")
            policy.get_parameter("log_std").copy_(log_std.reshape(-1).to(torch.float32))
        elif policy.std_kind == "state":
            target = policy.log_std_layer
            if log_std_layer is None or not all(
                isinstance(t, torch.Tensor) and t.shape == ref.shape
                for t, ref in zip(log_std_layer, (target.weight, target.bias))
            ):
                raise CompressorError(
                    f"{origin}: the log σ layer is missing or does not fit the last hidden layer"
                )
            target.weight.copy_(log_std_layer[0].to(torch.float32))
            target.bias.copy_(log_std_layer[1].to(torch.float32))
    check_finite(policy, origin)
    return policy


def critic_entry(layers: list[Layer], activation: str, obs_dim: int, origin: str) -> dict[str, Any]:
    """A native critic entry (``nn.Sequential`` state dict keys ``0.weight``, ``2.weight``, ...).

    :param layers: ``(weight, bias)`` of every Linear layer, the last one with one output.
    :param activation: activation between layers.
    :param obs_dim: input size (the policy's normalised observation).
    :param origin: file name for error messages.
    """
    check_chain(layers, obs_dim, "value", origin)
    if not layers or layers[-1][0].shape[0] != 1:
        raise CompressorError(f"{origin}: value network must end in a single output")
    state: dict[str, torch.Tensor] = {}
    for i, (w, b) in enumerate(layers):
        if not (torch.isfinite(w).all() and torch.isfinite(b).all()):
            raise CompressorError(f"{origin}: value network layer {i} contains NaN or inf values")
        state[f"{2 * i}.weight"] = w.detach().to(torch.float32).clone()
        state[f"{2 * i}.bias"] = b.detach().to(torch.float32).clone()
    return {
        "hidden": [int(w.shape[0]) for w, _ in layers[:-1]],
        "activation": activation,
        "input": "normalized_obs",
        "state_dict": state,
    }


def fold_quantile_mean(w: torch.Tensor, b: torch.Tensor, n_outputs: int) -> Layer:
    """The Linear layer whose outputs are the means of ``w, b``'s quantile outputs.

    A quantile head's output ``k·n_outputs + j`` is quantile ``k`` of output ``j`` (QR-DQN views
    its output as ``(n_quantiles, n_actions)``; a TQC critic has ``n_outputs = 1``). The mean of
    linear outputs is the linear layer with averaged rows, so the fold is exact.

    :param w: weight, shape ``(n_quantiles · n_outputs, hidden)``.
    :param b: bias, shape ``(n_quantiles · n_outputs,)``.
    :param n_outputs: outputs per quantile (actions; 1 for a state-action critic).
    """
    rows = int(w.shape[0])
    if n_outputs <= 0 or rows % n_outputs:
        raise CompressorError(f"{rows} quantile outputs are not a multiple of {n_outputs}")
    n_q = rows // n_outputs
    w64, b64 = w.detach().to(torch.float64), b.detach().to(torch.float64)
    fw = w64.reshape(n_q, n_outputs, -1).mean(0)
    fb = b64.reshape(n_q, n_outputs).mean(0)
    return fw.to(torch.float32), fb.to(torch.float32)


def q_entry(
    layers: list[Layer],
    activation: str,
    obs_dim: int,
    act_dim: int,
    origin: str,
    *,
    kind: str,
    role: str,
    action_input: str = "scaled",
    bounds: tuple[list[float], list[float]] | None = None,
) -> dict[str, Any]:
    """A native ``"q_nets"`` item (``nn.Sequential`` keys ``0.weight``, ``2.weight``, ...).

    :param layers: ``(weight, bias)`` of every Linear layer, quantiles already folded.
    :param activation: activation between layers.
    :param obs_dim: the policy's observation size.
    :param act_dim: action size (``state_action``) or number of actions (``state``).
    :param origin: file name for error messages.
    :param kind: ``state_action`` (``Q(s, a)``) or ``state`` (``Q(s, ·)``).
    :param role: e.g. ``critic`` or ``target``.
    :param action_input: ``scaled`` (to [-1, 1]) or ``raw`` (``state_action`` only).
    :param bounds: the action bounds for a ``scaled`` action input.
    """
    in_dim = obs_dim + (act_dim if kind == "state_action" else 0)
    out_dim = 1 if kind == "state_action" else act_dim
    check_chain(layers, in_dim, f"{role} Q-network", origin)
    if not layers or layers[-1][0].shape[0] != out_dim:
        raise CompressorError(f"{origin}: {role} Q-network must end in {out_dim} output(s)")
    state: dict[str, torch.Tensor] = {}
    for i, (w, b) in enumerate(layers):
        if not (torch.isfinite(w).all() and torch.isfinite(b).all()):
            raise CompressorError(f"{origin}: {role} Q-network layer {i} contains NaN or inf")
        state[f"{2 * i}.weight"] = w.detach().to(torch.float32).clone()
        state[f"{2 * i}.bias"] = b.detach().to(torch.float32).clone()
    low, high = bounds if bounds is not None else ([-1.0] * act_dim, [1.0] * act_dim)
    return {
        "kind": kind,
        "role": role,
        "hidden": [int(w.shape[0]) for w, _ in layers[:-1]],
        "activation": activation,
        "input": "normalized_obs",
        "action_input": action_input,
        "action_low": [float(x) for x in low],
        "action_high": [float(x) for x in high],
        "state_dict": state,
    }
