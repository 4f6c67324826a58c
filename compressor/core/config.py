"""Task profiles and deployment targets: TOML files read into typed dataclasses.

Unknown or misspelt keys are errors that name the key and what was expected, so a typo can
never silently fall back to a default. Shipped profiles and targets are found by name; a
user's own file is used when a path is given.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, get_type_hints

from compressor.core.errors import CompressorError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


@dataclass(frozen=True)
class EnvSection:
    id: str = ""
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ThreatSection:
    eps: float = 0.05
    norm: str = "inf"
    space: str = "normalized"


#: Episode seeds below this are for evaluations and budget decisions only; fine-tuning (its
#: states, DAgger rounds, checkpoint selection) and attack training use seeds at or above it.
DECISION_SEED_END = 10_000
#: ``[search] choose``: which passing level the run recommends and exports.
CHOOSE = ("max-sparsity", "sweet-spot")


@dataclass(frozen=True)
class EvaluationSection:
    """``[evaluation]``: episodes, seeds, and the sequential paired decision.

    :param episodes: episodes of the first look (every policy, every condition).
    :param seed: the first episode seed; decisions use ``seed .. seed + max_episodes - 1``.
    :param num_envs: parallel sub-envs.
    :param max_episodes: the most episodes a decision may use before it says "undecided".
    :param batch: episodes added per look while a decision is open.
    :param alpha: one-sided error rate of each decision (a false pass, or a false fail), spent
        over the planned looks.
    :param obs_noise: half-width of the uniform observation noise every evaluation episode
        sees, as a fraction of ε (0: none), seeded by the episode seed.
    :param fall_fraction: an episode whose return is below
        ``J_random + fall_fraction · (median dense clean return − J_random)`` is a fall.
    :param fall_on_termination: an episode that terminates before its time limit is a fall
        (true for walkers; false where termination is success, e.g. Acrobot).
    """

    episodes: int = 10
    seed: int = 0
    num_envs: int = 16
    max_episodes: int = 64
    batch: int = 16
    alpha: float = 0.05
    obs_noise: float = 0.01
    fall_fraction: float = 0.5
    fall_on_termination: bool = True

    @property
    def cap(self) -> int:
        """Most episodes per decision (at least the first look's)."""
        return max(self.episodes, self.max_episodes)


def parse_duration(value: float | int | str) -> float:
    """Seconds from ``90``, ``"90"``, ``"90s"``, ``"10m"`` or ``"1.5h"``."""
    units = {"s": 1.0, "m": 60.0, "h": 3600.0}
    text = str(value).strip().lower()
    try:
        secs = float(text[:-1]) * units[text[-1]] if text and text[-1] in units else float(text)
    except ValueError:
        raise CompressorError(
            f"bad duration {value!r}: give seconds or a number with s, m or h (e.g. '10m')"
        ) from None
    if not secs > 0 or secs != secs:
        raise CompressorError(f"bad duration {value!r}: must be positive")
    return secs


@dataclass(frozen=True)
class AttackBudget:
    """Training budgets of the attacks that learn something before they attack.

    :param pgd_steps: PGD steps of every gradient attack (literature: 10 of ε/10).
    :param rs_episodes: episodes of the victim (stochastic actions) whose transitions train
        Robust Sarsa's ``Q^π``.
    :param rs_epochs: passes over those transitions per regulariser strength.
    :param rs_reg: smoothness regulariser strengths to scan; the strongest attack is kept.
    :param rs_scan_episodes: episodes (on seeds apart from the evaluation's) that pick it.
    :param mad_rs_ratio: weight of MAD in the MAD+RS objective (the rest on RS's ``-Q``).
    :param learned_steps: env steps of PPO training of each learned adversary (SA-RL, PA-AD).
    :param learned_num_envs: parallel envs of that training.
    :param learned_time: wall-clock budget of each learned adversary's training, seconds or a
        duration such as ``"10m"`` (None: only ``learned_steps``); training stops at whichever
        comes first.
    :param learned_gamma: the adversary's discount: a return-minimising adversary over long
        episodes needs a long horizon (0.99 taught SA-RL to help the victim on Hopper).
    """

    pgd_steps: int = 10
    rs_episodes: int = 20
    rs_epochs: int = 30
    rs_reg: list[float] = field(default_factory=lambda: [0.0, 0.1, 1.0])
    rs_scan_episodes: int = 4
    mad_rs_ratio: float = 0.2
    learned_steps: int = 100_000
    learned_num_envs: int = 8
    learned_time: float | str | None = None
    learned_gamma: float = 0.999

    @property
    def learned_time_s(self) -> float | None:
        """``learned_time`` in seconds (None when unset)."""
        return None if self.learned_time is None else parse_duration(self.learned_time)

    @classmethod
    def from_section(cls, section: Any) -> AttackBudget:
        """The budgets named in a profile's ``[attacks]`` section (same field names)."""
        names = [f.name for f in dataclasses.fields(cls)]
        return cls(**{n: getattr(section, n) for n in names if hasattr(section, n)})


@dataclass(frozen=True)
class AttacksSection(AttackBudget):
    """``[attacks]``: the training budgets (:class:`AttackBudget`) and which attacks run:
    ``screen`` on every candidate, ``final`` on the dense and the chosen policy (put the attacks
    that train there)."""

    screen: list[str] = field(default_factory=lambda: ["random", "mad"])
    final: list[str] = field(default_factory=lambda: ["random", "mad"])
    seed: int = 0


@dataclass(frozen=True)
class CertificateSection:
    tau: float = 0.1
    norms: list[str] = field(default_factory=lambda: ["inf", "2"])
    states: int = 1000
    empirical_states: int = 200
    local_method: str = "crown"
    #: the deployed-action certificate's tolerance δ per action dimension: a fraction of the
    #: action range (``deployed_tolerance_units = "range"``, default 5%) or in action units
    #: (``"action"``, for unbounded action spaces)
    deployed_tolerance: float = 0.05
    deployed_tolerance_units: str = "range"


@dataclass(frozen=True)
class PruneSection:
    method: str = "magnitude"  # magnitude | micro | structured | random
    scope: str = "global"
    micro_steps: int = 16  # micro: number of cuts on the cubic schedule
    micro_end: float = 0.5  # micro: share of the fine-tuning steps over which cuts happen


#: ``distill``: distillation (+ DAgger); ``ppo``: PPO on the env's reward; ``distill+ppo``: the
#: first, then the second.
FINETUNE_METHODS = ("distill", "ppo", "distill+ppo")


def check_finetune_settings(
    method: str, ppo_steps: int, ppo_num_envs: int, ppo_num_steps: int, ppo_minibatches: int
) -> None:
    """Raise :class:`CompressorError` for a fine-tuning method or PPO shape that cannot run."""
    if method not in FINETUNE_METHODS:
        raise CompressorError(
            f"finetune.method {method!r} is not one of: {', '.join(FINETUNE_METHODS)}"
        )
    if min(ppo_num_envs, ppo_num_steps, ppo_minibatches) < 1:
        raise CompressorError(
            "finetune.ppo_num_envs, ppo_num_steps and ppo_minibatches must be at least 1"
        )
    batch = ppo_num_envs * ppo_num_steps
    if batch % ppo_minibatches:
        raise CompressorError(
            f"finetune.ppo_num_envs × ppo_num_steps ({batch}) must be divisible by "
            f"ppo_minibatches ({ppo_minibatches})"
        )
    if ppo_steps < batch:
        raise CompressorError(
            f"finetune.ppo_steps ({ppo_steps}) must be at least ppo_num_envs × ppo_num_steps "
            f"({batch}), one PPO rollout"
        )


#: ``[finetune] adversarial_target`` values (see :class:`FinetuneConfig`)
ADVERSARIAL_TARGETS = ("true", "perturbed")
#: ``[finetune] select_attacks`` values: the attacks that need nothing but the policy (no
#: critic, no training), cheap enough to run on every checkpoint
SELECT_ATTACKS = ("random", "mad")


@dataclass(frozen=True)
class FinetuneConfig:
    """:param steps: optimiser steps. :param batch_size: states per step. :param lr: Adam
    learning rate. :param perturbed_fraction: share of each batch perturbed in the ε-ball.
    :param adversarial_fraction: share of each batch attacked by PGD on the student.
    :param adversarial_steps: PGD steps of that attack.
    :param adversarial_target: what the adversarial rows are matched to (one of
        :data:`ADVERSARIAL_TARGETS`): ``true``, the teacher at the true state (the student is
        pushed to be *more* robust than the teacher: SA-PPO's smoothness in distillation form),
        or ``perturbed``, the teacher at the point PGD found where student and teacher differ
        most (the student copies the teacher inside the ball, its robustness included, and no
        row asks it to differ from the teacher anywhere).
    :param smoothness_weight: weight κ of SA-PPO's smoothness regulariser (0: off).
    :param preserve_certificate: project ``|w| ≤ |w_dense|`` after every step.
    :param dagger_rounds: rounds of rolling out the student and adding the states it visits
        (labelled by the teacher) before training again: imitation's cure for drifting into
        states the teacher never showed.
    :param method: one of :data:`FINETUNE_METHODS`.
    :param ppo_steps: env steps of PPO fine-tuning (rounded down to whole rollouts).
    :param ppo_num_envs: parallel envs. :param ppo_num_steps: steps per env per rollout.
    :param ppo_minibatches: minibatches per epoch. :param ppo_epochs: epochs per rollout.
    :param ppo_lr: Adam learning rate (annealed linearly to 0). :param ppo_clip_coef: PPO clip.
    :param ppo_ent_coef: entropy bonus. :param ppo_gamma: discount.
    :param ppo_gae_lambda: GAE λ.
    :param ppo_norm_reward: scale rewards by the std of the discounted return, as
        ``compress train`` does by default; a loaded critic predicts values in the units it was
        trained with, so match it (``false`` for policies trained with ``--no-norm-reward``).
        A learned critic always uses scaled rewards (raw returns are slow to fit).
    :param ppo_critic_steps: env steps of the value-only phase (on the dense policy's
        rollouts) that learns a critic when the policy file has none.
    :param select_episodes: episodes (on seeds of their own, apart from the verdict's) on which
        every fine-tuning checkpoint is evaluated; the one with the best return is kept
        (:mod:`compressor.finetune.select`; 0: off, the last checkpoint is kept).
    :param select_attacks: attacks (of :data:`SELECT_ATTACKS`) each checkpoint is also
        evaluated under, on the same seeds; the kept one then has the best worst-condition
        difference from the dense policy (none: clean return only).
    :param dagger_patience: with selection, stop the DAgger rounds once this many in a row did
        not improve the selected return (0: run every round).
    :param lost_fraction: with selection, stop fine-tuning once a DAgger round did not improve
        a best return below the dense one by more than this share of its size: the level is
        clearly lost (0: never)."""

    steps: int = 2000
    batch_size: int = 256
    lr: float = 1e-3
    perturbed_fraction: float = 0.25
    adversarial_fraction: float = 0.25
    adversarial_steps: int = 3
    adversarial_target: str = "true"
    smoothness_weight: float = 0.0
    preserve_certificate: bool = False
    dagger_rounds: int = 1
    method: str = "distill"
    ppo_steps: int = 50_000
    ppo_num_envs: int = 8
    ppo_num_steps: int = 256
    ppo_minibatches: int = 32
    ppo_epochs: int = 10
    ppo_lr: float = 3e-4
    ppo_clip_coef: float = 0.2
    ppo_ent_coef: float = 0.0
    ppo_gamma: float = 0.99
    ppo_gae_lambda: float = 0.95
    ppo_norm_reward: bool = True
    ppo_critic_steps: int = 20_000
    select_episodes: int = 0
    select_attacks: list[str] = field(default_factory=list)
    dagger_patience: int = 0
    lost_fraction: float = 0.0

    def __post_init__(self) -> None:
        if self.adversarial_target not in ADVERSARIAL_TARGETS:
            raise CompressorError(
                f"finetune.adversarial_target must be one of {', '.join(ADVERSARIAL_TARGETS)}, "
                f"not {self.adversarial_target!r}"
            )
        bad = [a for a in self.select_attacks if a not in SELECT_ATTACKS]
        if bad or len(set(self.select_attacks)) < len(self.select_attacks):
            raise CompressorError(
                f"finetune.select_attacks lists distinct attacks of: {', '.join(SELECT_ATTACKS)} "
                f"(got {self.select_attacks!r})"
            )
        check_finetune_settings(
            self.method, self.ppo_steps, self.ppo_num_envs, self.ppo_num_steps, self.ppo_minibatches
        )


@dataclass(frozen=True)
class FinetuneSection(FinetuneConfig):
    """``[finetune]``: the fine-tuning settings (:class:`FinetuneConfig`) and where its states
    come from: ``state_episodes`` dense-policy episodes from seed ``state_seed``, then
    ``dagger_episodes`` student episodes per DAgger round (and ``dagger_perturbed_episodes``
    more under uniform observation noise of the full ε: the states a perturbed student visits);
    checkpoint selection's ``select_episodes`` follow on the next seeds."""

    dagger_rounds: int = 2
    dagger_episodes: int = 10
    dagger_perturbed_episodes: int = 0
    state_episodes: int = 20
    state_seed: int = 10_000


@dataclass(frozen=True)
class SearchSection:
    """``[search]``: the sparsity grid, bisection steps, an optional certified-TV ceiling, and
    which passing level to recommend (``choose``: one of :data:`CHOOSE`)."""

    grid: list[float] = field(default_factory=lambda: [0.3, 0.5, 0.7, 0.8, 0.9])
    refine: int = 2
    max_tv: float | None = None
    choose: str = "max-sparsity"


@dataclass(frozen=True)
class ReferenceSection:
    """The best return known for the task (the regret decomposition's ``J(π*)``) and where it
    comes from; ``None``: the best return measured in the run."""

    best_return: float | None = None
    source: str = ""


@dataclass(frozen=True)
class Profile:
    """A task profile: environment, threat model, evaluation, attacks and search settings."""

    name: str = "default"
    description: str = ""
    policy: str = ""
    env: EnvSection = field(default_factory=EnvSection)
    threat: ThreatSection = field(default_factory=ThreatSection)
    evaluation: EvaluationSection = field(default_factory=EvaluationSection)
    attacks: AttacksSection = field(default_factory=AttacksSection)
    certificate: CertificateSection = field(default_factory=CertificateSection)
    prune: PruneSection = field(default_factory=PruneSection)
    finetune: FinetuneSection = field(default_factory=FinetuneSection)
    search: SearchSection = field(default_factory=SearchSection)
    reference: ReferenceSection = field(default_factory=ReferenceSection)
    path: str = ""

    def seeds(self) -> list[int]:
        """The first look's episode seeds (shared by every candidate)."""
        return list(range(self.evaluation.seed, self.evaluation.seed + self.evaluation.episodes))

    def decision_seeds(self) -> list[int]:
        """Every seed a decision may use, in the order the looks add them."""
        return list(range(self.evaluation.seed, self.evaluation.seed + self.evaluation.cap))

    def to_dict(self) -> dict[str, Any]:
        """The resolved profile as a JSON-ready dict."""
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Target:
    """A deployment target: runtime providers, opset, precision, threads, latency budget.

    ``sparse_storage`` stores sparse weight matrices as bitmask + non-zero values in the ONNX
    file (smaller download and flash footprint; the runtime rebuilds them dense at start).
    """

    name: str = "cpu-x86"
    description: str = ""
    providers: list[str] = field(default_factory=lambda: ["CPUExecutionProvider"])
    opset: int = 17
    precision: str = "fp32"
    threads: int = 1
    batch_size: int = 1
    latency_budget_ms: float | None = None
    sparse_storage: bool = False
    path: str = ""

    def to_dict(self) -> dict[str, Any]:
        """The resolved target as a JSON-ready dict."""
        return dataclasses.asdict(self)


T = TypeVar("T")


def _build(cls: type[T], data: dict[str, Any], where: str) -> T:
    """Build dataclass ``cls`` from ``data``, rejecting unknown keys and wrong types."""
    if not isinstance(data, dict):
        raise CompressorError(f"{where}: expected a table, got {type(data).__name__}")
    hints = get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.name != "path"]  # type: ignore[arg-type]
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key not in names:
            raise CompressorError(
                f"{where}: unknown key {key!r}; expected one of: {', '.join(names)}"
            )
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _build(hint, value, f"{where} [{key}]")  # type: ignore[arg-type]
        else:
            kwargs[key] = _check_type(value, hint, f"{where}: key {key!r}")
    return cls(**kwargs)


def _check_type(value: Any, hint: Any, where: str) -> Any:
    text = getattr(hint, "__name__", None) if isinstance(hint, type) else str(hint)
    text = text or str(hint)
    if hint is bool:
        ok = isinstance(value, bool)
    elif hint is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif hint is str:
        ok = isinstance(value, str)
    elif "float | str | None" in text:  # a duration: seconds or "10m"
        ok = isinstance(value, (int, float, str)) and not isinstance(value, bool)
        if ok:
            parse_duration(value)
    elif "float | None" in text:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif text.startswith("list[float]"):
        ok = isinstance(value, list) and all(isinstance(v, (int, float)) for v in value)
        value = [float(v) for v in value] if ok else value
    elif text.startswith("list[str]"):
        ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
    elif text.startswith("dict"):
        ok = isinstance(value, dict)
    else:  # pragma: no cover - every field type is listed above
        ok = True
    if not ok:
        raise CompressorError(f"{where} has the wrong type ({value!r}); expected {text}")
    return value


def data_dir(kind: str) -> Path:
    """The folder of shipped ``profiles`` or ``targets`` (installed copy or source checkout)."""
    installed = Path(__file__).resolve().parents[1] / "_data" / kind
    if installed.is_dir():
        return installed
    return Path(__file__).resolve().parents[2] / kind


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise CompressorError(f"{path}: file not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise CompressorError(f"{path}: invalid TOML ({exc})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise CompressorError(f"{path}: cannot read ({exc})") from None
    except RecursionError:  # tomllib's parser recurses once per nested array or table
        raise CompressorError(f"{path}: invalid TOML (nested too deeply)") from None


def _resolve(kind: str, name_or_path: str) -> Path:
    p = Path(name_or_path)
    if p.suffix == ".toml" or p.exists() or "/" in name_or_path:
        if not p.is_file():
            raise CompressorError(f"{kind[:-1]} file {p} not found")
        return p
    shipped = data_dir(kind) / f"{name_or_path}.toml"
    if not shipped.is_file():
        names = ", ".join(list_shipped(kind)) or "none"
        raise CompressorError(f"unknown {kind[:-1]} {name_or_path!r}; shipped: {names}")
    return shipped


def list_shipped(kind: str) -> list[str]:
    """Names of the shipped ``profiles`` or ``targets``."""
    return sorted(p.stem for p in data_dir(kind).glob("*.toml"))


def load_profile(name_or_path: str) -> Profile:
    """Load a shipped profile by name (``hopper``) or a user's TOML file by path."""
    path = _resolve("profiles", name_or_path)
    prof = dataclasses.replace(_build(Profile, _read_toml(path), str(path)), path=str(path))
    check_evaluation(prof.evaluation, str(path))
    if prof.finetune.state_seed < DECISION_SEED_END:
        raise CompressorError(
            f"{path}: finetune.state_seed must be at least {DECISION_SEED_END}: the seeds below "
            "are reserved for evaluations and decisions"
        )
    if prof.search.choose not in CHOOSE:
        raise CompressorError(f"{path}: search.choose must be one of {', '.join(CHOOSE)}")
    if not prof.search.grid or any(not 0 <= s < 1 for s in prof.search.grid):
        raise CompressorError(f"{path}: search.grid must list sparsities in [0, 1)")
    from compressor.prune.criteria import PRUNE_METHODS, SCOPES

    if prof.prune.method not in PRUNE_METHODS:
        raise CompressorError(
            f"{path}: prune.method {prof.prune.method!r} is not one of {', '.join(PRUNE_METHODS)}"
        )
    if prof.prune.scope not in SCOPES:
        raise CompressorError(f"{path}: prune.scope must be one of {', '.join(SCOPES)}")
    return prof


def check_evaluation(ev: EvaluationSection, where: str) -> None:
    """Raise :class:`CompressorError` for ``[evaluation]`` settings that cannot decide.

    :param ev: the section. :param where: the profile's path, for the message.
    """
    if ev.episodes < 1 or ev.batch < 1:
        raise CompressorError(
            f"{where}: evaluation.episodes and evaluation.batch must be at least 1"
        )
    if not 0.0 < ev.alpha < 0.5:
        raise CompressorError(f"{where}: evaluation.alpha must be in (0, 0.5), got {ev.alpha}")
    if not 0.0 <= ev.obs_noise < 1.0:
        raise CompressorError(f"{where}: evaluation.obs_noise is a fraction of ε, in [0, 1)")
    if not 0.0 <= ev.fall_fraction <= 1.0:
        raise CompressorError(f"{where}: evaluation.fall_fraction must be in [0, 1]")
    if ev.seed < 0 or ev.seed + ev.cap > DECISION_SEED_END:
        raise CompressorError(
            f"{where}: evaluation seeds {ev.seed}..{ev.seed + ev.cap - 1} must lie in "
            f"0..{DECISION_SEED_END - 1} (the seeds reserved for decisions)"
        )


def profile_for_env(env_id: str) -> Profile | None:
    """The shipped profile whose environment is ``env_id`` (same name, any version), if any."""
    family = env_id.split("-v")[0]
    for name in list_shipped("profiles"):
        prof = load_profile(name)
        if prof.env.id == env_id or prof.env.id.split("-v")[0] == family:
            return prof
    return None


def profile_policy_path(profile: Profile) -> Path | None:
    """The reference dense policy a profile ships with, resolved beside the profile file."""
    if not profile.policy:
        return None
    return Path(profile.path).parent / profile.policy


def load_target(name_or_path: str) -> Target:
    """Load a shipped target by name (``cpu-x86``) or a user's TOML file by path."""
    path = _resolve("targets", name_or_path)
    tgt = dataclasses.replace(_build(Target, _read_toml(path), str(path)), path=str(path))
    if not 7 <= tgt.opset <= 21:
        raise CompressorError(f"{path}: opset {tgt.opset} is outside the supported 7..21")
    return tgt
