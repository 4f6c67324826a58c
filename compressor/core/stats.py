"""Summary statistics of episode returns: mean, std and a percentile-bootstrap CI."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np


@dataclass
class ReturnStats:
    """:param mean: mean return. :param std: sample std. :param ci_low: lower CI bound.
    :param ci_high: upper CI bound. :param n: episodes. :param returns: per-episode returns."""

    mean: float
    std: float
    ci_low: float
    ci_high: float
    n: int
    returns: list[float]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return asdict(self)


def summarize_returns(
    returns: np.ndarray, confidence: float = 0.95, n_boot: int = 2000, seed: int = 0
) -> ReturnStats:
    """Mean, std and a percentile-bootstrap confidence interval of the mean.

    :param returns: per-episode returns.
    :param confidence: CI level.
    :param n_boot: bootstrap resamples.
    :param seed: bootstrap RNG seed (fixed, so reports are reproducible).
    """
    r = np.asarray(returns, dtype=np.float64)
    rng = np.random.default_rng(seed)
    if len(r) > 1:
        means = r[rng.integers(0, len(r), size=(n_boot, len(r)))].mean(1)
        lo, hi = np.quantile(means, [(1 - confidence) / 2, (1 + confidence) / 2])
        std = float(r.std(ddof=1))
    else:
        lo = hi = float(r.mean())
        std = 0.0
    return ReturnStats(float(r.mean()), std, float(lo), float(hi), len(r), [float(x) for x in r])
