"""What each stage of ``compress run`` hands to the next: plain frozen values, read by the
report and never changed once made.

    set-up ─► RunSetup ─► dense measurement ─► DenseMeasurement ─► search ─► SearchResult
          ─► chosen policy ─► ChosenPolicy ─► report
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
from compressor.search.budget import Budget
from compressor.search.candidate import Candidate


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
        """The evaluation seeds every policy of the run is judged on."""
        return self.profile.seeds()


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

    def screen_suite(self, screen: list[str]) -> SuiteResult:
        """The dense suite restricted to the screening attacks."""
        attacks = {k: v for k, v in self.suite.attacks.items() if k in screen}
        return SuiteResult(self.suite.clean, attacks, self.suite.threat)


@dataclass(frozen=True)
class ChosenPolicy:
    """The chosen candidate, judged on the whole final suite, certified and exported.

    :param candidate: the search's candidate. :param suite: its screening and final attacks.
    :param final_only: the evaluations run in this stage (the final attacks not screened).
    :param certificates: global certificates by norm. :param export: the ONNX export.
    """

    candidate: Candidate
    suite: SuiteResult
    final_only: SuiteResult
    certificates: dict[str, GlobalCertificate]
    export: ExportResult

    @property
    def policy(self) -> Policy:
        """The chosen policy."""
        assert self.candidate.policy is not None
        return self.candidate.policy
