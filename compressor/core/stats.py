"""Statistics of episode returns: summaries (mean, std, percentile-bootstrap CI, worst-decile
mean), and the pieces of a paired sequential decision (Student-t one-sided bounds, an
alpha-spending plan over planned looks, the exact sign test on paired binary outcomes).

No SciPy: the t distribution is computed from its closed form for integer degrees of freedom
(Abramowitz & Stegun 26.7.3-4), which is all a paired test on ``n`` episodes needs.
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

#: share of the worst episodes averaged by the tail statistic (CVaR 10%)
CVAR_SHARE = 0.1


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


def cvar(returns: np.ndarray | list[float], share: float = CVAR_SHARE) -> float:
    """Mean of the worst ``share`` of the episodes (at least one): CVaR at ``share``.

    :param returns: per-episode returns. :param share: the tail's share, in (0, 1].
    """
    r = np.sort(np.asarray(returns, dtype=np.float64))
    k = max(1, math.ceil(share * len(r) - 1e-9))
    return float(r[:k].mean())


# ---- the t distribution ---------------------------------------------------------------------
def t_cdf(t: float, df: int) -> float:
    """``P(T ≤ t)`` for Student's t with integer ``df`` ≥ 1 (closed form, A&S 26.7.3-4).

    :param t: the value. :param df: degrees of freedom.
    """
    if df < 1:
        raise ValueError(f"df must be at least 1, got {df}")
    theta = math.atan(abs(t) / math.sqrt(df))
    s, c2 = math.sin(theta), math.cos(theta) ** 2
    if df % 2 == 1:  # odd: (2/π)(θ + sinθ cosθ (1 + 2/3 cos²θ + 2·4/(3·5) cos⁴θ + ...))
        term, total = 1.0, 1.0 if df > 1 else 0.0
        for k in range(1, (df - 1) // 2):
            term *= c2 * (2 * k) / (2 * k + 1)
            total += term
        a = 2 / math.pi * (theta + s * math.cos(theta) * total)
    else:  # even: sinθ (1 + 1/2 cos²θ + 1·3/(2·4) cos⁴θ + ...)
        term, total = 1.0, 1.0
        for k in range(1, df // 2):
            term *= c2 * (2 * k - 1) / (2 * k)
            total += term
        a = s * total
    a = min(max(a, 0.0), 1.0)  # a = P(|T| ≤ |t|)
    return 0.5 + 0.5 * a if t >= 0 else 0.5 - 0.5 * a


@functools.lru_cache(maxsize=4096)
def t_quantile(p: float, df: int) -> float:
    """The ``p`` quantile of Student's t with integer ``df`` (bisection on :func:`t_cdf`).

    :param p: probability in (0, 1). :param df: degrees of freedom ≥ 1.
    """
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must be in (0, 1), got {p}")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        hi *= 2.0
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


@dataclass(frozen=True)
class MeanBounds:
    """One-sided bounds on the mean of paired differences at one look.

    :param n: pairs. :param mean: mean difference. :param std: sample std.
    :param lower: the one-sided ``1 - alpha`` lower bound. :param upper: the upper one.
    :param alpha: the level each bound was computed at.
    """

    n: int
    mean: float
    std: float
    lower: float
    upper: float
    alpha: float


def mean_bounds(diffs: np.ndarray | list[float], alpha: float) -> MeanBounds:
    """Student-t one-sided bounds ``mean ∓ t_{1-alpha, n-1} · s / √n`` on the mean of ``diffs``;
    infinite with fewer than two pairs (no spread to judge by).

    :param diffs: per-episode paired differences. :param alpha: one-sided level of each bound.
    """
    d = np.asarray(diffs, dtype=np.float64)
    n = len(d)
    if n < 2:
        mean = float(d.mean()) if n else 0.0
        return MeanBounds(n, mean, 0.0, -math.inf, math.inf, alpha)
    mean, std = float(d.mean()), float(d.std(ddof=1))
    half = t_quantile(1.0 - alpha, n - 1) * std / math.sqrt(n)
    return MeanBounds(n, mean, std, mean - half, mean + half, alpha)


def sign_test_greater(more: int, fewer: int) -> float:
    """One-sided exact p-value that the first of two paired binary outcomes happens more often:
    ``P(X ≥ more)`` for ``X ~ Binomial(more + fewer, 1/2)`` over the discordant pairs (McNemar's
    exact test). 1.0 when there is no discordant pair.

    :param more: pairs where only the first happened. :param fewer: pairs where only the
        second happened.
    """
    n = more + fewer
    if n == 0:
        return 1.0
    return sum(math.comb(n, k) for k in range(more, n + 1)) / 2.0**n


def spending_levels(looks: list[int], alpha: float) -> list[float]:
    """The one-sided level of each planned look: ``alpha`` spent over the looks by a
    Pocock-type function ``f(t) = alpha · ln(1 + (e - 1) t)`` of the information fraction
    ``t = n_k / n_K``. The levels sum to ``alpha``, so by the union bound the chance that any
    look wrongly rejects is at most ``alpha`` whatever the correlation between looks.

    :param looks: cumulative episode counts of the planned looks (ascending).
    :param alpha: the total one-sided error rate.
    """
    if not looks or any(b <= a for a, b in zip(looks, looks[1:])):
        raise ValueError(f"looks must be ascending and non-empty, got {looks}")
    total = looks[-1]
    spent = [alpha * math.log1p((math.e - 1) * n / total) for n in looks]
    return [b - a for a, b in zip([0.0, *spent[:-1]], spent)]
