"""What each stage of ``compress run`` hands to the next: plain frozen values, read by the
report and never changed once made.

    set-up ─► RunSetup ─► dense measurement ─► DenseMeasurement ─► search ─► SearchResult
          ─► final check ─► FinalCheck (its ChosenPolicy, if one passed) ─► report
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from compressor.attacks.base import AttackContext
from compressor.certify.global_bound import GlobalCertificate
from compressor.core.config import Profile, Target
from compressor.core.threat import ThreatModel
from compressor.deploy.export import ExportResult
from compressor.evaluate import SuiteResult
from compressor.policy.loading import LoadedPolicy
from compressor.policy.model import Policy
from compressor.rl.noise import ObservationNoise
from compressor.search.budget import Budget
from compressor.search.candidate import Candidate
from compressor.search.sequential import Decision, PairedRule, ReferenceSeries


@dataclass(frozen=True)
class RunSetup:
    """The loaded policy, the resolved settings and the run directory.

    :param loaded: the dense policy file, loaded. :param profile: the resolved profile (env
        filled in; attacks needing a critic removed when the file has none).
    :param threat: the threat model. :param target: the deployment target.
    :param budget: the budget fraction. :param run_dir: the run directory.
    :param resumed: whether an earlier run of the same configuration is resumed.
    :param command: the command line, for the report.
    """

    loaded: LoadedPolicy
    profile: Profile
    threat: ThreatModel
    target: Target
    budget: float
    run_dir: Path
    resumed: bool
    command: tuple[str, ...] = ()

    @property
    def dense(self) -> Policy:
        """The dense policy (eval mode)."""
        return self.loaded.policy

    @property
    def env_id(self) -> str:
        """The environment every rollout of the run uses."""
        return self.profile.env.id

    @property
    def env_kwargs(self) -> dict[str, Any]:
        """A fresh copy of the environment's kwargs."""
        return dict(self.profile.env.kwargs)

    @property
    def seeds(self) -> list[int]:
        """The first look's seeds every policy of the run is judged on."""
        return self.profile.seeds()

    @property
    def noise(self) -> ObservationNoise | None:
        """The observation noise of every evaluation episode (None: ``obs_noise = 0``)."""
        f = self.profile.evaluation.obs_noise
        if f <= 0:
            return None
        return ObservationNoise(f, self.threat, tuple(self.threat.scale(self.dense).tolist()))


@dataclass(frozen=True)
class DenseMeasurement:
    """The dense policy, measured: what every candidate is compared with.

    :param suite: clean return and every attack of the suite (screen and final).
    :param random_return: return of uniformly random actions (the budget's scale floor).
    :param states: the dense policy's visited states (distillation), from their own seeds.
    :param state_steps: env steps spent collecting them.
    :param cert_states: the fixed sample of them every local certificate is computed at.
    :param certificates: global certificates by norm. :param local: the local certificate.
    :param rule: the budget rule the dense numbers fix. :param attack_ctx: the attacks' context.
    :param reference: the dense policy's clean and screening evaluations on the decision seeds,
        extended on demand while the search decides its candidates.
    """

    suite: SuiteResult
    random_return: float
    states: np.ndarray
    state_steps: int
    cert_states: np.ndarray
    certificates: dict[str, GlobalCertificate]
    local: dict[str, Any]
    rule: Budget
    attack_ctx: AttackContext
    reference: ReferenceSeries | None = None

    def screen_suite(self, screen: list[str]) -> SuiteResult:
        """The dense suite restricted to the screening attacks."""
        attacks = {k: v for k, v in self.suite.attacks.items() if k in screen}
        return SuiteResult(self.suite.clean, attacks, self.suite.threat)


@dataclass(frozen=True)
class ChosenPolicy:
    """The chosen candidate, judged on the whole final suite as the exported ONNX model,
    certified and exported.

    :param candidate: the search's candidate.
    :param suite: clean and every final attack, measured on ``policy.onnx`` in onnxruntime.
    :param final_only: the evaluations run in the final check for it (all of ``suite``).
    :param certificates: global certificates by norm. :param export: the ONNX export.
    :param decision: the final paired decision (against the dense ONNX model).
    """

    candidate: Candidate
    suite: SuiteResult
    final_only: SuiteResult
    certificates: dict[str, GlobalCertificate]
    export: ExportResult
    decision: Decision | None = None

    @property
    def policy(self) -> Policy:
        """The chosen policy."""
        assert self.candidate.policy is not None
        return self.candidate.policy


@dataclass(frozen=True)
class FinalAttempt:
    """One passing level of the search, judged on the final suite as its exported ONNX model.

    :param candidate: the search's candidate. :param suite: its final-suite evaluations.
    :param decision: the paired decision against the dense ONNX model.
    :param export: the ONNX file that was measured.
    """

    candidate: Candidate
    suite: SuiteResult
    decision: Decision
    export: ExportResult


@dataclass(frozen=True)
class FinalCheck:
    """The final check: the passing levels tried in turn (highest first, or by score), each
    exported and measured on the final suite in onnxruntime at the target's batch size, until
    one passes; and the dense policy measured the same way.

    :param chosen: the level that passed, exported as ``policy.onnx`` (None: none passed).
    :param attempts: every level tried, in order. :param choose: how the order was set.
    :param dense_suite: the dense ONNX model's final-suite evaluations (None: nothing tried).
    :param dense_export: its export. :param rule: the paired rule of the final decisions.
    :param batch_size: the onnxruntime batch size the models ran at.
    """

    chosen: ChosenPolicy | None
    attempts: tuple[FinalAttempt, ...] = ()
    choose: str = "max-sparsity"
    dense_suite: SuiteResult | None = None
    dense_export: ExportResult | None = None
    rule: PairedRule | None = None
    batch_size: int | None = None

    @property
    def passed(self) -> bool:
        """Whether a level passed the final check."""
        return self.chosen is not None

    @property
    def suites(self) -> list[SuiteResult]:
        """Every suite evaluated in the final check (the dense model's included)."""
        own = [a.suite for a in self.attempts]
        return own + ([self.dense_suite] if self.dense_suite is not None else [])
