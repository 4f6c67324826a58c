"""Building a quantised ONNX file from an fp32 export: quantise, certify, check, write.

The modes are described in :mod:`compressor.deploy.quantize`. The file is built in memory,
read back (:mod:`~compressor.deploy.quantize.graph`), certified on its own weights
(:mod:`~compressor.deploy.quantize.certificate`), checked at batch 1 against torch and
against the rounding model the certificate rests on
(:mod:`~compressor.deploy.quantize.simulate`), and only then written atomically.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from compressor.certify.global_bound import DEFAULT_TAU
from compressor.core import atomic
from compressor.core.errors import CompressorError
from compressor.core.threat import ThreatModel
from compressor.deploy.export import (
    load_onnx_session,
    onnx_act,
    parity_error,
    parity_observations,
)
from compressor.deploy.quantize.certificate import certify_quantized
from compressor.deploy.quantize.graph import QuantGraph, read_quantized
from compressor.deploy.quantize.rewrite import (
    gemm_to_matmul,
    matmul_name,
    to_fp16,
    to_int8_weights,
)
from compressor.deploy.quantize.simulate import dequantized_policy, simulate_trunk
from compressor.policy.model import Policy

__all__ = ["ALIASES", "MODES", "QuantizeResult", "quantize_model"]

MODES = ("dynamic", "qdq", "fp16", "int8w")
ALIASES = {"int8": "dynamic", "static": "qdq"}
PARITY_N = 64  # batch-1 parity observations (the deployment call pattern)
SIMULATION_TOL = 1e-4  # median |onnxruntime - simulation|: float noise is ~1e-7


@dataclass(frozen=True)
class QuantizeResult:
    """What :func:`quantize_model` wrote and measured.

    :param path: the quantised ``.onnx`` file.
    :param mode: ``dynamic``, ``qdq``, ``fp16`` or ``int8w``.
    :param file_bytes: its size. :param fp32_file_bytes: the fp32 file's size.
    :param parity_max_abs_err: largest ``|onnxruntime(quantised) − torch fp32|`` action
        difference over typical observations, batch 1 (categorical: fraction of differing
        actions).
    :param dequantized_max_abs_err: the same against the dequantised torch policy (what the
        activation rounding alone changes).
    :param simulation_max_abs_err: the same against
        :func:`~compressor.deploy.quantize.simulate.simulate_trunk`, which checks that
        onnxruntime computes what the certificate models. Most rows agree to float noise; a
        value within last-bit noise of a rounding boundary (onnxruntime's tanh is not numpy's)
        may round the other way, moving that row by one step times a weight column.
    :param simulation_median_abs_err: the median over rows of that difference.
    :param dequantized: the torch policy with the file's own weights (None if unreadable).
    :param certificate: from :func:`~compressor.deploy.quantize.certificate.certify_quantized`.
    :param settings: mode options (per-channel, reduce_range, skipped layers, calibration).
    """

    path: Path
    mode: str
    file_bytes: int
    fp32_file_bytes: int
    parity_max_abs_err: float
    dequantized_max_abs_err: float
    simulation_max_abs_err: float
    simulation_median_abs_err: float
    dequantized: Policy | None
    certificate: dict[str, Any]
    settings: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (the policy object is left out)."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["path"] = str(self.path)
        d.pop("dequantized")
        return d


def quantize_model(
    policy: Policy,
    fp32_onnx_path: str | Path,
    out_path: str | Path,
    mode: str = "dynamic",
    calibration_obs: np.ndarray | None = None,
    *,
    threat: ThreatModel | None = None,
    tau: float = DEFAULT_TAU,
    per_channel: bool = True,
    reduce_range: bool = False,
    quantize_first_layer: bool = False,
) -> QuantizeResult:
    """Quantise an exported fp32 model, check it against torch and certify it on its own weights.

    The file is built in memory, checked, certified and only then written atomically; its
    metadata gets ``quantization`` (the settings) and ``certificate`` (the quantised model's),
    and an fp32 ``certificate`` already there is kept as ``fp32_certificate``.

    :param policy: the torch policy the fp32 file was exported from.
    :param fp32_onnx_path: that fp32 file.
    :param out_path: destination ``.onnx``.
    :param mode: ``dynamic`` (or ``int8``), ``qdq``, ``fp16`` or ``int8w``.
    :param calibration_obs: raw observations (N, obs_dim) to calibrate ``qdq`` scales on; use
        states the policy visits. Default: 512 Gaussian draws from the normalisation statistics
        (their first two moments match the visited states, their tails do not).
    :param threat: ε, norm and space (default: the fp32 file's metadata, else the env profile).
    :param tau: TV threshold of the certified radius.
    :param per_channel: one weight scale per output neuron (dynamic, qdq; int8w always is).
    :param reduce_range: 7-bit weights, for x86 CPUs without VNNI (see
        :mod:`~compressor.deploy.quantize.certificate`).
    :param quantize_first_layer: also round the observation itself (dynamic, qdq).
    :raises CompressorError: unknown mode, unreadable file, or a graph that cannot be certified.
    """
    mode = ALIASES.get(mode, mode)
    if mode not in MODES:
        raise CompressorError(
            f"unknown quantisation mode {mode!r}; expected int8 (dynamic), qdq, fp16 or int8w"
        )
    src = Path(fp32_onnx_path)
    data, fp32, props = _read_fp32(policy, src)
    gemms = [n.name for n in fp32.graph.node if n.op_type == "Gemm"]
    skip = [] if quantize_first_layer or len(gemms) < 2 else gemms[:1]
    settings: dict[str, Any] = {"mode": mode, "fp32_sha256": hashlib.sha256(data).hexdigest()}
    if mode in ("dynamic", "qdq"):
        settings.update(per_channel=per_channel, reduce_range=reduce_range, fp32_layers=skip)
    options = _Options(skip, per_channel, reduce_range)
    model, n_calibration = _quantize(policy, src, fp32, mode, calibration_obs, options)
    if n_calibration is not None:
        settings["calibration_observations"] = n_calibration

    graph = read_quantized(model)
    deq = dequantized_policy(policy, graph)
    threat = threat or _resolve_threat(policy, props)
    cert = certify_quantized(deq, graph, threat, tau, fp32_policy=policy)
    blob = _with_metadata(model, props, settings, cert)
    errs, sim_median = _parity(policy, deq, graph, blob, mode)
    atomic.write_bytes(out_path, blob)
    return QuantizeResult(
        path=Path(out_path),
        mode=mode,
        file_bytes=len(blob),
        fp32_file_bytes=len(data),
        parity_max_abs_err=errs[0],
        dequantized_max_abs_err=errs[1],
        simulation_max_abs_err=errs[2],
        simulation_median_abs_err=sim_median,
        dequantized=deq,
        certificate=cert,
        settings=settings,
    )


@dataclass(frozen=True)
class _Options:
    """The quantiser's options: fp32 layers kept, per-channel scales, 7-bit weights."""

    skip: list[str]
    per_channel: bool
    reduce_range: bool


def _read_fp32(policy: Policy, src: Path) -> tuple[bytes, onnx.ModelProto, dict[str, str]]:
    """The fp32 file's bytes, model and metadata, checked to be ``policy``'s unquantised export."""
    if not src.is_file():
        raise CompressorError(f"{src}: file not found")
    data = src.read_bytes()
    try:
        fp32 = onnx.load_from_string(data)
    except Exception as exc:  # protobuf DecodeError and friends
        raise CompressorError(f"{src}: not a readable ONNX model ({type(exc).__name__})") from None
    props = {p.key: p.value for p in fp32.metadata_props}
    if "quantization" in props:
        raise CompressorError(f"{src} is already quantised; start from the fp32 export")
    try:  # the normalisation and log_std come from ``policy``: it must be the file's source
        parity_error(policy, data)
    except CompressorError as exc:
        raise CompressorError(f"{src} was not exported from this policy ({exc})") from None
    return data, fp32, props


def _quantize(
    policy: Policy,
    src: Path,
    fp32: onnx.ModelProto,
    mode: str,
    calibration_obs: np.ndarray | None,
    options: _Options,
) -> tuple[onnx.ModelProto, int | None]:
    """The quantised model (in memory), and how many observations calibrated it (qdq only)."""
    if mode == "fp16":
        return to_fp16(fp32), None
    if mode == "int8w":
        return to_int8_weights(fp32), None
    with tempfile.TemporaryDirectory(prefix="compress-quant-") as tmp, _quiet_quantizer():
        if mode == "dynamic":
            return _quantize_dynamic(fp32, Path(tmp), options), None
        obs = _calibration(policy, calibration_obs)
        return _quantize_static(src, fp32, Path(tmp), obs, options), len(obs)


def _quantize_dynamic(fp32: onnx.ModelProto, tmp: Path, options: _Options) -> onnx.ModelProto:
    """onnxruntime's ``quantize_dynamic`` on the MatMul form of the graph."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    prepared, out = tmp / "matmul.onnx", tmp / "q.onnx"
    # every Gemm becomes MatMul + Add here (onnxruntime would otherwise rewrite them itself,
    # under names we could not exclude); skipped layers stay fp32 MatMuls
    onnx.save(gemm_to_matmul(fp32), str(prepared))
    quantize_dynamic(
        prepared,
        out,
        op_types_to_quantize=["MatMul"],
        nodes_to_exclude=[matmul_name(fp32, name) for name in options.skip],
        per_channel=options.per_channel,
        reduce_range=options.reduce_range,
        weight_type=QuantType.QInt8,
    )
    return onnx.load(str(out))


def _calibration(policy: Policy, calibration_obs: np.ndarray | None) -> np.ndarray:
    """The calibration observations as float32 (N, obs_dim); default: typical draws."""
    if calibration_obs is None:
        calibration_obs = parity_observations(policy, 512, 1.0, seed=0)
    obs = np.asarray(calibration_obs, dtype=np.float32)
    if obs.ndim != 2 or obs.shape[1] != policy.spec.obs_dim or len(obs) == 0:
        raise CompressorError(
            f"calibration observations must have shape (N, {policy.spec.obs_dim})"
        )
    return obs


def _quantize_static(
    src: Path, fp32: onnx.ModelProto, tmp: Path, obs: np.ndarray, options: _Options
) -> onnx.ModelProto:
    """onnxruntime's ``quantize_static`` (QDQ format) calibrated on ``obs``, 64 rows a batch."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    name = fp32.graph.input[0].name
    batches = iter([{name: obs[i : i + 64]} for i in range(0, len(obs), 64)])

    class Reader(CalibrationDataReader):  # type: ignore[misc]
        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(batches, None)

    out = tmp / "q.onnx"
    quantize_static(
        src,
        out,
        Reader(),
        quant_format=QuantFormat.QDQ,
        op_types_to_quantize=["Gemm"],
        per_channel=options.per_channel,
        reduce_range=options.reduce_range,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        nodes_to_exclude=options.skip,
        # The action mean (last Gemm's output) would otherwise be rounded to a step of its
        # calibrated range / 255: fp32 outputs keep the action precise.
        extra_options={"OpTypesToExcludeOutputQuantization": ["Gemm"]},
    )
    return onnx.load(str(out))


def _with_metadata(
    model: onnx.ModelProto, props: dict[str, str], settings: dict[str, Any], cert: dict[str, Any]
) -> bytes:
    """The model's bytes with the fp32 file's metadata (its certificate renamed
    ``fp32_certificate``), the quantisation settings and the quantised certificate."""
    del model.metadata_props[:]
    for key, value in props.items():
        model.metadata_props.add(
            key="fp32_certificate" if key == "certificate" else key, value=value
        )
    model.metadata_props.add(key="quantization", value=json.dumps(settings, sort_keys=True))
    model.metadata_props.add(key="certificate", value=_strict_json(cert))
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        raise CompressorError(f"quantised model is invalid: {str(exc).splitlines()[0]}") from None
    return model.SerializeToString()


def _parity(
    policy: Policy, deq: Policy, graph: QuantGraph, blob: bytes, mode: str
) -> tuple[list[float], float]:
    """Batch-1 action differences (the deployment call) of onnxruntime against fp32 torch, the
    dequantised policy and the rounding simulation; and the simulation's median difference.

    :raises CompressorError: onnxruntime departs from the rounding model (nothing is written).
    """
    session = load_onnx_session(blob, threads=1)
    obs = parity_observations(policy, PARITY_N, 1.0, seed=7)
    with torch.no_grad():
        t_obs = torch.as_tensor(obs)
        ref = policy.act(t_obs).numpy()
        ref_deq = deq.act(t_obs).numpy()
        z = deq.normalize(t_obs).double().numpy()
    sim = np.concatenate(
        [
            policy.postprocess(
                torch.as_tensor(simulate_trunk(graph, z[i : i + 1], policy.spec.activation)).float()
            ).numpy()
            for i in range(len(z))
        ]
    )
    got = np.stack([onnx_act(session, obs[i : i + 1])[0] for i in range(len(obs))])
    if policy.spec.head == "categorical":
        rows = [(got != r).astype(np.float64) for r in (ref, ref_deq, sim)]
    else:
        rows = [np.abs(got.astype(np.float64) - r).max(axis=1) for r in (ref, ref_deq, sim)]
    errs = [float(r.mean() if policy.spec.head == "categorical" else r.max()) for r in rows]
    median = float(np.median(rows[2]))
    if median > SIMULATION_TOL:
        # most rows must match the rounding model exactly; if not, the kernels compute
        # something else (e.g. saturating int16 sums) and the certificate would not hold
        raise CompressorError(
            f"onnxruntime's {mode} model departs from the rounding model the certificate "
            f"assumes (median |Δ| {median:.2g}); on x86 without VNNI retry with "
            "reduce_range=True; nothing was written"
        )
    return errs, median


@contextlib.contextmanager
def _quiet_quantizer() -> Iterator[None]:
    """onnxruntime's quantiser logs a pre-processing advice on the root logger every call."""
    before = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(before)


def _strict_json(obj: Any) -> str:
    """JSON any parser reads: an infinite bound (ReLU net without an observation clip) is
    written as the string "inf", as the exporter does, never as a bare ``Infinity``."""

    def fix(o: Any) -> Any:
        if isinstance(o, float) and not math.isfinite(o):
            return str(o)
        if isinstance(o, dict):
            return {str(k): fix(v) for k, v in o.items()}
        if isinstance(o, (list, tuple)):
            return [fix(v) for v in o]
        return o

    return json.dumps(fix(obj), allow_nan=False, default=str)


def _resolve_threat(policy: Policy, props: dict[str, str]) -> ThreatModel:
    """The fp32 file's own threat model if it has one, else the policy's env profile's."""
    if "eps" in props:
        return ThreatModel(
            float(props["eps"]), props.get("norm", "inf"), props.get("eps_space", "normalized")
        )
    from compressor.core.config import profile_for_env

    prof = profile_for_env(policy.spec.env_id) if policy.spec.env_id else None
    if prof is not None:
        return ThreatModel(prof.threat.eps, prof.threat.norm, prof.threat.space)
    return ThreatModel(0.05)
