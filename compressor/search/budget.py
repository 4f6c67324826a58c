"""The budget rule (design.md, "Threat model and budget"), fixed by the dense policy's measurements.

With ``scale = J_clean(dense) - J_clean(uniform random actions)`` a candidate passes when
``J_clean(c) ≥ J_clean(dense) - b·scale``, ``J_robust(c) ≥ J_robust(dense) - b·scale``
(``J_robust`` = minimum over the attack suite) and its certificate is no looser than the dense
one (its certified Lipschitz bound is not larger), plus an optional absolute TV ceiling.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from compressor.certify.global_bound import GlobalCertificate
from compressor.evaluate import SuiteResult

#: relative slack for comparing certificates computed in floating point
CERT_RTOL = 1e-9


@dataclass
class Budget:
    """The acceptance rule, fixed by the dense policy's measurements.

    :param budget: the fraction ``b`` of the return scale a candidate may lose.
    :param dense_clean: dense clean return. :param dense_robust: dense robust return.
    :param random_return: return of uniformly random actions (the scale's floor).
    :param dense_lipschitz: the dense certificate's Lipschitz bound.
    :param max_tv: optional absolute ceiling on the certified TV at ε.
    """

    budget: float
    dense_clean: float
    dense_robust: float
    random_return: float
    dense_lipschitz: float
    max_tv: float | None = None

    @property
    def scale(self) -> float:
        """``J_clean(dense) - J_clean(random)``; floored at a tiny positive value."""
        return max(self.dense_clean - self.random_return, 1e-9)

    @property
    def clean_floor(self) -> float:
        """Lowest clean return a candidate may have."""
        return self.dense_clean - self.budget * self.scale

    @property
    def robust_floor(self) -> float:
        """Lowest robust return a candidate may have."""
        return self.dense_robust - self.budget * self.scale

    def check(self, suite: SuiteResult, cert: GlobalCertificate) -> list[str]:
        """Reasons the candidate fails (empty: it passes)."""
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
        if cert.lipschitz > self.dense_lipschitz * (1 + CERT_RTOL):
            reasons.append(
                f"certificate looser than dense (Lipschitz {cert.lipschitz:.4g} > "
                f"{self.dense_lipschitz:.4g})"
            )
        if self.max_tv is not None and cert.tv_bound is not None and cert.tv_bound > self.max_tv:
            reasons.append(f"certified TV {cert.tv_bound:.4g} > max_tv {self.max_tv}")
        return reasons

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
        }
