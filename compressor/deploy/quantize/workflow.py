"""What ``compress quantize`` does, as one function: export fp32 (unless given), collect
calibration states, quantise and certify, then re-evaluate the quantised and the fp32 model
through onnxruntime on the same seeds, under transfer attacks computed on torch surrogates.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from compressor.core.config import Target, load_target
from compressor.core.errors import CompressorError
from compressor.core.threat import ThreatModel
from compressor.deploy.export import export_onnx
from compressor.deploy.onnx_actor import OnnxActor
from compressor.deploy.quantize.build import ALIASES, QuantizeResult, quantize_model
from compressor.evaluate import SuiteResult, evaluate_suite
from compressor.policy.model import Policy
from compressor.rl.rollout import rollout

__all__ = ["QuantizeReport", "quantize_policy", "transfer_attacks"]


def transfer_attacks(spec: str = "all") -> list[str]:
    """Attack names usable as transfer attacks on an ONNX model: those that need neither
    training nor the victim's value function.

    :param spec: ``all``, ``none`` or one attack name.
    :raises CompressorError: a name that is not such an attack.
    """
    cheap = _transfer_capable()
    names = [] if spec == "none" else cheap if spec == "all" else [spec]
    _check_transfer(names, cheap)
    return names


def _transfer_capable() -> list[str]:
    from compressor.attacks import ATTACKS, NEEDS_CRITIC, TRAINED

    return [n for n in ATTACKS if n not in (*TRAINED, *NEEDS_CRITIC)]


def _check_transfer(names: Sequence[str], cheap: list[str]) -> None:
    for n in names:
        if n not in cheap:
            raise CompressorError(
                f"unknown transfer attack {n!r}; available: {', '.join(cheap)}, all, none"
            )


@dataclass(frozen=True)
class QuantizeReport:
    """What :func:`quantize_policy` wrote and measured.

    :param result: the quantised file, its parity checks and its certificate.
    :param attacks: the transfer attacks evaluated.
    :param evaluation: ``quantized`` and ``fp32`` suites through onnxruntime, on the same
        seeds (empty when no evaluation seeds were given).
    """

    result: QuantizeResult
    attacks: tuple[str, ...] = ()
    evaluation: dict[str, SuiteResult] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict: the result's, plus ``evaluation`` when there is one."""
        data = self.result.to_dict()
        if self.evaluation:
            data["evaluation"] = {k: v.to_dict() for k, v in self.evaluation.items()}
        return data

    def summary_rows(self) -> list[tuple[str, str, str]]:
        """(what, quantised, fp32) rows: size, parity, certificate, returns."""
        res, cert = self.result, self.result.certificate
        fp = cert.get("fp32_for_comparison", {})
        rows = [
            (
                "mode / file bytes",
                f"{res.mode} / {res.file_bytes}",
                f"fp32 / {res.fp32_file_bytes}",
            ),
            ("max |Δaction| vs torch fp32 (batch 1)", f"{res.parity_max_abs_err:.2e}", "–"),
            (
                f"certified shift per ε ({cert['shift_name']})",
                f"{cert['lipschitz']:.4g}",
                f"{fp.get('lipschitz', float('nan')):.4g}",
            ),
            ("additive shift from activation rounding", f"{cert['additive']:.4g}", "0"),
            (f"certified radius (TV ≤ {cert['tau']})", _radius(cert), _radius(fp)),
        ]
        for name in ["clean", *self.attacks] if self.evaluation else []:
            q, f = (
                s.clean if name == "clean" else s.attacks[name]
                for s in (self.evaluation["quantized"], self.evaluation["fp32"])
            )
            label = f"return, {name}{' (transfer)' if name != 'clean' else ''}, {q.stats.n} ep"
            rows.append((label, f"{q.stats.mean:.1f}", f"{f.stats.mean:.1f}"))
        return rows


def _radius(cert: dict[str, Any]) -> str:
    if cert.get("radius_unbounded"):
        return "unbounded"
    return "–" if cert.get("certified_radius") is None else f"{cert['certified_radius']:.4g}"


def quantize_policy(
    policy: Policy,
    output: str | Path,
    mode: str = "int8",
    *,
    threat: ThreatModel,
    fp32: str | Path | None = None,
    target: Target | str = "cpu-x86",
    env_id: str | None = None,
    env_kwargs: dict[str, Any] | None = None,
    eval_seeds: Sequence[int] = (),
    calibration_seeds: Sequence[int] = (),
    attacks: Sequence[str] = (),
    num_envs: int = 16,
    quantize_first_layer: bool = False,
) -> QuantizeReport:
    """Quantise ``policy``'s ONNX export, certify it on its own weights, and re-evaluate it.

    :param policy: the torch policy (in eval mode).
    :param output: destination of the quantised ``.onnx``.
    :param mode: ``int8`` (dynamic), ``qdq`` (static, calibrated), ``fp16`` or ``int8w``.
    :param threat: ε, norm and space of the certificate and the attacks.
    :param fp32: an fp32 export of ``policy`` to start from (default: export it now, at the
        target's opset, into a temporary file).
    :param target: deployment target (name, TOML file or :class:`~compressor.core.config.Target`).
    :param env_id: gymnasium id, needed for evaluation and calibration seeds.
    :param env_kwargs: kwargs for ``gymnasium.make``.
    :param eval_seeds: one reset seed per evaluation episode (empty: no evaluation).
    :param calibration_seeds: episodes whose visited states calibrate ``qdq`` scales (empty:
        :func:`~compressor.deploy.quantize.build.quantize_model`'s default draws; ignored by
        the other modes). Keep them apart from ``eval_seeds``.
    :param attacks: transfer attacks (:func:`transfer_attacks`), computed on the dequantised
        policy for the quantised model and on ``policy`` for the fp32 one.
    :param num_envs: parallel sub-envs of the evaluation.
    :param quantize_first_layer: also round the observation itself (int8, qdq).
    :raises CompressorError: seeds without an environment, an unknown attack or mode, or a
        file that cannot be quantised or certified.
    """
    names = tuple(attacks)
    _check_transfer(names, _transfer_capable())
    if (eval_seeds or calibration_seeds) and not env_id:
        raise CompressorError("evaluation and calibration seeds need an environment: pass env_id")
    tgt = load_target(target) if isinstance(target, str) else target
    kwargs = dict(env_kwargs or {})
    with tempfile.TemporaryDirectory(prefix="compress-quantize-") as tmp:
        fp32_path = Path(fp32) if fp32 is not None else _export_fp32(policy, tgt, threat, Path(tmp))
        calibration = None
        if calibration_seeds and ALIASES.get(mode, mode) == "qdq":
            assert env_id
            seeds = list(calibration_seeds)
            calibration = rollout(policy, env_id, kwargs, seeds, record_states=True).states
        res = quantize_model(
            policy,
            fp32_path,
            output,
            mode,
            calibration,
            threat=threat,
            quantize_first_layer=quantize_first_layer,
        )
        evaluation: dict[str, SuiteResult] = {}
        if eval_seeds:
            assert env_id
            models = {"quantized": (res.path, res.dequantized), "fp32": (fp32_path, policy)}
            for key, (path, surrogate) in models.items():
                evaluation[key] = evaluate_suite(
                    OnnxActor(path),
                    env_id,
                    kwargs,
                    list(eval_seeds),
                    list(names),
                    threat,
                    num_envs=num_envs,
                    surrogate=surrogate,
                )
    return QuantizeReport(res, names, evaluation)


def _export_fp32(policy: Policy, target: Target, threat: ThreatModel, folder: Path) -> Path:
    """``policy`` exported at the target's opset, the threat model in its metadata."""
    meta = {
        "target": target.name,
        "eps": str(threat.eps),
        "norm": threat.norm,
        "eps_space": threat.space,
    }
    return export_onnx(policy, folder / "fp32.onnx", metadata=meta, opset=target.opset).path
