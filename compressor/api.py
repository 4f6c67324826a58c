"""The Python API: one function per ``compress`` command, from a policy file (or an already
loaded policy) to a typed result. The CLI (compressor/cli/) parses options, calls one of these,
and prints; anything it does, a Python user can do here::

    from compressor import attack_policy, compress, evaluate_policy

    ev = evaluate_policy("profiles/hopper.pt", episodes=5)
    print(ev.result.stats.mean)
    run = compress("hopper", budget=0.05)   # the whole job; writes runs/hopper/
    print(run.report["verdict"]["summary"])
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from compressor.attacks import ATTACKS, NEEDS_CRITIC, AttackBudget, AttackContext
from compressor.certify.at_states import certify_states
from compressor.certify.deployed import DeployedCertificate, certify_deployed
from compressor.certify.global_bound import GlobalCertificate, certify_global
from compressor.core.config import list_shipped, load_profile, parse_duration, profile_policy_path
from compressor.core.errors import CompressorError
from compressor.core.executor import Executor
from compressor.core.progress import Progress, no_progress
from compressor.core.threat import ThreatModel
from compressor.deploy.quantize import QuantizeReport, quantize_policy, transfer_attacks
from compressor.evaluate import EvalResult, SuiteResult, evaluate, evaluate_suite
from compressor.finetune import FinetuneStats
from compressor.policy.loading import LoadedPolicy, load_policy, save_loaded
from compressor.policy.model import Policy
from compressor.prune.criteria import prune
from compressor.rl.ppo import PPOConfig, check_config, save_trained, train_ppo
from compressor.run.pipeline import RunResult, run_pipeline
from compressor.run.settings import Settings, resolve_settings
from compressor.search.candidate import dense_states, prune_candidate, student_state_collector

#: a policy file, the name of a shipped profile (its reference policy), or a loaded policy
Source = str | Path | LoadedPolicy
Note = Callable[[str], None]


def resolve_source(src: str | Path) -> Path:
    """A policy path, or the name of a shipped profile whose reference policy is used.

    :raises CompressorError: neither a file nor a shipped profile with a policy.
    """
    p = Path(src)
    if p.exists():
        return p
    if str(src) in list_shipped("profiles"):
        ref = profile_policy_path(load_profile(str(src)))
        if ref is not None and ref.is_file():
            return ref
    raise CompressorError(f"{src}: file not found (nor a shipped profile with a policy)")


def load(
    src: Source,
    *,
    env_id: str | None = None,
    vecnormalize: str | Path | None = None,
    note: Note | None = None,
) -> LoadedPolicy:
    """Load a policy file (any supported format) or pass a loaded one through.

    :param src: file, shipped profile name, or a :class:`LoadedPolicy`.
    :param env_id: the environment, over the one the file records.
    :param vecnormalize: observation statistics to install (SB3 ``vecnormalize.pkl``...).
    :param note: receives the loader's warnings, one line each.
    """
    if isinstance(src, LoadedPolicy):
        return src
    loaded = load_policy(resolve_source(src), env_id=env_id, vecnormalize=vecnormalize)
    for w in loaded.warnings:
        (note or (lambda _m: None))(f"warning: {w}")
    loaded.policy.eval()
    return loaded


def _seeds(settings: Settings, episodes: int | None, seed: int | None) -> list[int]:
    ev = settings.profile.evaluation
    n = ev.episodes if episodes is None else episodes
    if n < 1:
        raise CompressorError("--episodes must be at least 1")
    first = ev.seed if seed is None else seed
    return list(range(first, first + n))


@dataclass(frozen=True)
class Evaluation:
    """``compress evaluate``: the clean return with deterministic actions.

    :param env_id: the environment. :param result: return statistics over the episodes.
    """

    env_id: str
    result: EvalResult

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return {"env_id": self.env_id, **self.result.to_dict()}


def evaluate_policy(
    src: Source,
    *,
    episodes: int | None = None,
    seed: int | None = None,
    env_id: str | None = None,
    profile: str | None = None,
    note: Note | None = None,
) -> Evaluation:
    """Clean return on seeds ``seed .. seed+episodes-1`` (default: the profile's).

    :param src: policy. :param episodes: episode count. :param seed: first seed.
    :param env_id: the environment. :param profile: profile name or file.
    :param note: receives notes for the user.
    """
    loaded = load(src, env_id=env_id, note=note)
    settings = resolve_settings(loaded.policy, profile, env_id=env_id, note=note)
    seeds = _seeds(settings, episodes, seed)
    num_envs = settings.profile.evaluation.num_envs
    res, _ = evaluate(loaded.policy, settings.env_id, settings.env_kwargs, seeds, num_envs=num_envs)
    return Evaluation(settings.env_id, res)


@dataclass(frozen=True)
class AttackReport:
    """``compress attack``: clean and attacked returns on the same seeds.

    :param env_id: the environment. :param threat: the threat model.
    :param suite: clean and per-attack evaluations. :param skipped: attacks not run, and why.
    """

    env_id: str
    threat: ThreatModel
    suite: SuiteResult
    skipped: dict[str, str]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return {"env_id": self.env_id, "threat": vars(self.threat), **self.suite.to_dict()}


def attack_names(spec: str | Sequence[str], has_critic: bool) -> tuple[list[str], dict[str, str]]:
    """The attacks ``spec`` names (``all``, a comma-separated list or a list), and those that
    ``all`` leaves out with the reason.

    :raises CompressorError: an unknown name.
    """
    skipped: dict[str, str] = {}
    if spec == "all":
        names = [n for n in ATTACKS if has_critic or n not in NEEDS_CRITIC]
        skipped = {n: "no value function in the file" for n in ATTACKS if n not in names}
    else:
        raw = spec.split(",") if isinstance(spec, str) else list(spec)
        names = [n.strip() for n in raw if n.strip()]
    for n in names:
        if n not in ATTACKS:
            raise CompressorError(f"unknown attack {n!r}; available: {', '.join(ATTACKS)}, all")
    return names, skipped


def attack_policy(
    src: Source,
    *,
    attacks: str | Sequence[str] = "all",
    eps: float | None = None,
    norm: str | None = None,
    space: str | None = None,
    episodes: int | None = None,
    seed: int | None = None,
    save: Path | None = None,
    warm_start: Path | None = None,
    train_steps: int | None = None,
    profile: str | None = None,
    env_id: str | None = None,
    executor: Executor | None = None,
    progress: Progress = no_progress,
    note: Note | None = None,
    attack_time: float | str | None = None,
) -> AttackReport:
    """Returns under observation attacks in the ε-ball, all on the same seeds.

    :param attacks: ``all``, names separated by commas, or a list of names.
    :param eps: ε (default: the profile's). :param norm: ``inf`` or ``2``. :param space: ε units.
    :param episodes: episode count. :param seed: first seed.
    :param save: folder for the learned adversaries' and RS's weights.
    :param warm_start: folder of another policy's saved adversaries to start from.
    :param train_steps: env steps per learned adversary (default: the profile's).
    :param attack_time: time budget per learned adversary, seconds or e.g. ``"10m"``
        (default: the profile's ``learned_time``); training stops at it or the step count.
    :param profile: profile name or file. :param env_id: the environment.
    :param executor: runs the evaluations side by side (default: in turn, in this process).
    :param progress: told the evaluations done. :param note: receives notes for the user.
    """
    loaded = load(src, env_id=env_id, note=note)
    settings = resolve_settings(
        loaded.policy, profile, env_id=env_id, eps=eps, norm=norm, space=space, note=note
    )
    names, skipped = attack_names(attacks, loaded.critic is not None)
    prof = settings.profile
    budget = AttackBudget.from_section(prof.attacks)
    if train_steps is not None:
        budget = dataclasses.replace(budget, learned_steps=train_steps)
    if attack_time is not None:
        parse_duration(attack_time)  # a clear error before anything runs
        budget = dataclasses.replace(budget, learned_time=attack_time)
    ctx = AttackContext(
        loaded.policy,
        settings.threat,
        prof.attacks.seed,
        critic=loaded.critic,
        env_id=settings.env_id,
        env_kwargs=settings.env_kwargs,
        budget=budget,
        save_dir=save,
        warm_start=warm_start,
    )
    suite = evaluate_suite(
        loaded.policy,
        settings.env_id,
        settings.env_kwargs,
        _seeds(settings, episodes, seed),
        names,
        settings.threat,
        attack_seed=prof.attacks.seed,
        num_envs=prof.evaluation.num_envs,
        progress=progress,
        executor=executor,
        context=ctx,
    )
    return AttackReport(settings.env_id, settings.threat, suite, skipped)


@dataclass(frozen=True)
class CertifyReport:
    """``compress certify``: the deployed action's certificate at visited states (first), the
    global bound (the worst case over all states) and the local TV bounds.

    :param env_id: the environment. :param threat: the threat model. :param tau: TV threshold.
    :param certificate: the global certificate. :param local: per local method (``crown``,
        ``ibp``) the bounds at the visited states vs PGD (empty when no states were asked for).
    :param deployed: per method the deployed-action certificate at the same states.
    """

    env_id: str
    threat: ThreatModel
    tau: float
    certificate: GlobalCertificate
    local: dict[str, dict[str, Any]]
    deployed: dict[str, DeployedCertificate] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (the deployed-action block first)."""
        out: dict[str, Any] = {"env_id": self.env_id}
        out.update({f"deployed_{m}": v.to_dict() for m, v in self.deployed.items()})
        out["global"] = self.certificate.to_dict() | {"scope": "worst case over all states"}
        out.update({f"local_{m}": v for m, v in self.local.items()})
        return out


def certify_policy(
    src: Source,
    *,
    eps: float | None = None,
    norm: str | None = None,
    space: str | None = None,
    tau: float = 0.1,
    states: int = 0,
    profile: str | None = None,
    env_id: str | None = None,
    note: Note | None = None,
    tolerance: float | None = None,
    tolerance_units: str | None = None,
) -> CertifyReport:
    """Certified robustness: the global absolute-product bound and, with ``states`` > 0, local
    CROWN and IBP bounds at that many visited states with PGD's lower bound beside them.

    :param eps: ε. :param norm: ``inf`` or ``2``. :param space: ε units.
    :param tau: TV threshold of the certified radius. :param states: visited states (0: none).
    :param profile: profile name or file. :param env_id: the environment.
    :param note: receives notes for the user.
    :param tolerance: the deployed action's tolerance δ (default: the profile's
        ``certificate.deployed_tolerance``, else 0.05). :param tolerance_units: ``range``
        (fraction of the action range) or ``action`` (action units).
    """
    loaded = load(src, env_id=env_id, note=note)
    pol = loaded.policy
    settings = resolve_settings(
        pol, profile, env_id=env_id, eps=eps, norm=norm, space=space, note=note
    )
    threat = settings.threat
    cert = certify_global(pol, threat, tau)
    local: dict[str, dict[str, Any]] = {}
    deployed: dict[str, DeployedCertificate] = {}
    if states > 0:
        n_eps = max(1, min(20, states // 200))
        seeds = list(range(20_000, 20_000 + n_eps))
        _, roll = evaluate(pol, settings.env_id, settings.env_kwargs, seeds, record_states=True)
        assert roll.states is not None
        pick = roll.states[np.random.default_rng(0).permutation(len(roll.states))[:states]]
        sec = settings.profile.certificate
        tol = sec.deployed_tolerance if tolerance is None else tolerance
        units = tolerance_units or sec.deployed_tolerance_units
        for method in ("crown", "ibp"):
            empirical = min(states, 200) if method == "crown" else 0
            deployed[method] = certify_deployed(
                pol,
                pick,
                threat,
                method=method,
                tolerance=tol,
                tolerance_units=units,
                empirical_states=empirical,
            )
            local[method] = certify_states(
                pol, pick, threat, tau=tau, method=method, empirical_states=empirical
            )
    return CertifyReport(settings.env_id, threat, tau, cert, local, deployed)


@dataclass(frozen=True)
class PruneReport:
    """``compress prune``: the pruned policy and, when fine-tuned, what that cost.

    :param policy: the pruned policy. :param finetune: fine-tuning statistics, or None.
    :param output: where it was saved, or None.
    """

    policy: Policy
    finetune: FinetuneStats | None
    output: Path | None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        out: dict[str, Any] = {"sparsity": self.policy.sparsity(), "output": str(self.output)}
        if self.finetune is not None:
            out["finetune"] = self.finetune.to_dict()
        return out


def prune_policy(
    src: Source,
    sparsity: float,
    *,
    output: Path | None = None,
    method: str = "magnitude",
    scope: str = "global",
    finetune: bool = True,
    profile: str | None = None,
    env_id: str | None = None,
    note: Note | None = None,
) -> PruneReport:
    """Prune to ``sparsity`` and, by default, fine-tune with the mask fixed exactly as the
    search does (the profile's ``[finetune]``); save the result when ``output`` is given.

    :param method: ``magnitude``, ``micro`` (cuts while fine-tuning), ``structured``, ``random``.
    :param scope: ``global`` or ``layer``. :param finetune: fine-tune after pruning.
    :param profile: profile name or file. :param env_id: the environment.
    :param note: receives notes for the user.
    :param tolerance: the deployed action's tolerance δ (default: the profile's
        ``certificate.deployed_tolerance``, else 0.05). :param tolerance_units: ``range``
        (fraction of the action range) or ``action`` (action units).
    """
    loaded = load(src, env_id=env_id, note=note)
    dense = loaded.policy
    stats: FinetuneStats | None = None
    if finetune:
        settings = resolve_settings(dense, profile, env_id=env_id, note=note)
        prof = settings.profile
        prof = dataclasses.replace(
            prof, prune=dataclasses.replace(prof.prune, method=method, scope=scope)
        )
        states, _ = dense_states(dense, prof)
        collect = student_state_collector(prof, settings.threat)
        pruned, stats = prune_candidate(
            dense, sparsity, prof, states, settings.threat, collect, critic=loaded.critic
        )
    elif method == "micro":
        raise CompressorError("--method micro cuts while fine-tuning: drop --no-finetune")
    else:
        pruned = prune(dense, sparsity, method, scope)
    if output is not None:
        save_loaded(dataclasses.replace(loaded, policy=pruned), output)
    return PruneReport(pruned, stats, output)


def compress(src: str | Path, **options: Any) -> RunResult:
    """The whole job (``compress run``), options as :func:`~compressor.run.pipeline.run_pipeline`.

    :param src: a policy file, or a shipped profile name (its reference policy; the run is then
        named after the profile).
    """
    path = resolve_source(src)
    if options.get("name") is None and not Path(src).exists():
        options["name"] = str(src)
    return run_pipeline(path, **options)


@dataclass(frozen=True)
class TrainReport:
    """``compress train``: the trained reference policy, saved with its critic and provenance.

    :param output: the native file written. :param evaluation: its deterministic return on the
        configuration's evaluation seeds. :param stats: training statistics.
    """

    output: Path
    evaluation: EvalResult
    stats: dict[str, Any]


def train_policy(
    cfg: PPOConfig,
    output: Path,
    *,
    command: list[str] | None = None,
    progress: Progress = no_progress,
) -> TrainReport:
    """Train a dense reference policy with PPO, evaluate it deterministically, and save it.

    :param cfg: the PPO configuration (checked first). :param output: the native ``.pt`` file.
    :param command: the command line, recorded in the file's provenance.
    :param progress: told the env steps done.
    """
    check_config(cfg)
    pol, critic, stats = train_ppo(cfg, progress)
    seeds = list(range(cfg.eval_seed, cfg.eval_seed + cfg.eval_episodes))
    res, _ = evaluate(pol, cfg.env_id, cfg.env_kwargs, seeds)
    stats = {**stats, "eval": res.to_dict()["return"], "command": command or []}
    save_trained(pol, critic, cfg, stats, output)
    return TrainReport(output, res, stats)


def quantize(
    src: Source,
    output: Path,
    mode: str = "int8",
    *,
    fp32: Path | None = None,
    target: str = "cpu-x86",
    episodes: int = 3,
    attacks: str = "all",
    first_layer: bool = False,
    eps: float | None = None,
    norm: str | None = None,
    space: str | None = None,
    profile: str | None = None,
    env_id: str | None = None,
    note: Note | None = None,
) -> QuantizeReport:
    """``compress quantize``: quantise the policy's ONNX export, re-certify it on its own
    weights and re-evaluate it (and the fp32 export) in onnxruntime on the profile's seeds.

    :param mode: ``int8``, ``qdq`` (calibrated on visited states, on the fine-tuning seeds),
        ``fp16`` or ``int8w``. :param fp32: an fp32 export to start from.
    :param target: deployment target. :param episodes: evaluation episodes (0: none; with an
        explicit ``eps`` and no calibration the certificate then needs no environment).
    :param attacks: transfer attacks: a name, ``all`` or ``none``.
    :param first_layer: also quantise the observation (int8, qdq).
    :param eps: ε. :param norm: ball norm. :param space: ε units.
    :param profile: profile name or file. :param env_id: the environment.
    :param note: receives notes for the user.
    """
    if episodes < 0:
        raise CompressorError("--episodes must be 0 or more")
    names = transfer_attacks(attacks)
    loaded = load(src, env_id=env_id, note=note)
    pol = loaded.policy
    if episodes == 0 and mode != "qdq" and eps is not None:  # certificate only: no environment
        threat = ThreatModel(eps, norm or "inf", space or "normalized")
        return quantize_policy(
            pol, output, mode, threat=threat, fp32=fp32, target=target, attacks=names,
            quantize_first_layer=first_layer,
        )  # fmt: skip
    s = resolve_settings(pol, profile, env_id=env_id, eps=eps, norm=norm, space=space, note=note)
    ev, state_seed = s.profile.evaluation, s.profile.finetune.state_seed
    # qdq calibrates on states the policy visits, on seeds apart from the evaluation's
    calib = range(state_seed, state_seed + max(episodes, 3)) if mode == "qdq" else range(0)
    return quantize_policy(
        pol,
        output,
        mode,
        threat=s.threat,
        fp32=fp32,
        target=target,
        attacks=names,
        quantize_first_layer=first_layer,
        env_id=s.env_id,
        env_kwargs=s.env_kwargs,
        eval_seeds=range(ev.seed, ev.seed + episodes),
        calibration_seeds=calib,
        num_envs=ev.num_envs,
    )
