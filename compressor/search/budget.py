"""The budget rule (design.md, "Threat model and budget"), fixed by the dense policy's measurements.

With ``scale = J_clean(dense) - J_clean(uniform random actions)`` and the allowed loss
``m = b·scale``, a candidate passes when ``J_clean(c) ≥ J_clean(dense) - m``,
``J_robust(c) ≥ J_robust(dense) - m`` (``J_robust`` = minimum over the attack suite), it falls
no more often than the dense policy beyond chance, and its certificate is no looser than the
dense one (its certified bound is not larger), plus an optional absolute TV ceiling.

The return and fall conditions are statistical decisions on paired episodes
(:mod:`compressor.search.sequential`); :meth:`Budget.check` is the plain point-estimate reading
of the same rule, for a quick look and for older callers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from compressor.certify.global_bound import GlobalCertificate
from compressor.core.naming import CERT_NAME, cert_unit
from compressor.evaluate import SuiteResult
from compressor.search.sequential import PairedRule

#: relative slack for comparing certificates computed in floating point
CERT_RTOL = 1e-9


@dataclass
class Budget:
    """The acceptance rule, fixed by the dense policy's measurements.

    :param budget: the fraction ``b`` of the return scale a candidate may lose.
    :param dense_clean: dense clean return. :param dense_robust: dense robust return.
    :param random_return: return of uniformly random actions (the scale's floor).
    :param dense_lipschitz: the dense certificate's bound (the certified bound).
    :param max_tv: optional absolute ceiling on the certified TV at ε.
    :param reference_attack: the dense policy's strongest attack (the robust tests compare
        every attack of a candidate with the dense policy under it).
    :param fall_below: return under which an episode counts as a fall (None: none).
    :param fall_on_termination: whether termination before the time limit is a fall.
    """

    budget: float
    dense_clean: float
    dense_robust: float
    random_return: float
    dense_lipschitz: float
    max_tv: float | None = None
    reference_attack: str | None = None
    fall_below: float | None = None
    fall_on_termination: bool = True

    @property
    def scale(self) -> float:
        """``J_clean(dense) - J_clean(random)``; floored at a tiny positive value."""
        return max(self.dense_clean - self.random_return, 1e-9)

    @property
    def margin(self) -> float:
        """The loss a candidate may have: ``b · scale``."""
        return self.budget * self.scale

    @property
    def clean_floor(self) -> float:
        """Lowest clean return a candidate may have."""
        return self.dense_clean - self.margin

    @property
    def robust_floor(self) -> float:
        """Lowest robust return a candidate may have."""
        return self.dense_robust - self.margin

    def paired(self) -> PairedRule:
        """The statistical part of the rule, for :func:`compressor.search.sequential.decide`."""
        return PairedRule(
            self.margin, self.reference_attack, self.fall_below, self.fall_on_termination
        )

    def certificate_reasons(self, cert: GlobalCertificate) -> list[str]:
        """Why the certificate fails the budget (empty: it does not)."""
        reasons = []
        if cert.lipschitz > self.dense_lipschitz * (1 + CERT_RTOL):
            unit = cert_unit(cert.shift_name)
            reasons.append(
                f"certificate looser than dense ({CERT_NAME} {cert.lipschitz:.4g} > "
                f"{self.dense_lipschitz:.4g} {unit})"
            )
        if self.max_tv is not None and cert.tv_bound is not None and cert.tv_bound > self.max_tv:
            reasons.append(f"certified TV {cert.tv_bound:.4g} > max_tv {self.max_tv}")
        return reasons

    def check(self, suite: SuiteResult, cert: GlobalCertificate) -> list[str]:
        """Reasons the candidate fails on point estimates (empty: it passes)."""
        reasons = []
        if suite.clean.stats.mean < self.clean_floor:
            reasons.append(
                f"clean return {suite.clean.stats.mean:.1f} < floor {self.clean_floor:.1f}"
            )
        if suite.robust_return < self.robust_floor:
            reasons.append(
                f"robust return {suite.robust_return:.1f} ({suite.strongest_attack}) "
                f"< floor {self.robust_floor:.1f}"
            )
        return reasons + self.certificate_reasons(cert)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict including the derived floors."""
        return {
            "budget": self.budget,
            "scale": self.scale,
            "random_return": self.random_return,
            "dense_clean": self.dense_clean,
            "dense_robust": self.dense_robust,
            "clean_floor": self.clean_floor,
            "robust_floor": self.robust_floor,
            "dense_lipschitz": self.dense_lipschitz,
            "max_tv": self.max_tv,
            "margin": self.margin,
            "reference_attack": self.reference_attack,
            "fall_below": self.fall_below,
            "fall_on_termination": self.fall_on_termination,
        }
