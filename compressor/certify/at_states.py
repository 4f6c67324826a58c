"""Certified vs empirical robustness at the states a policy visits.

Runs the local (CROWN or IBP) certificate and PGD's empirical search at the same states, so a
report shows certified ≥ empirical and the gap between them, per state and in distribution.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from compressor.certify.empirical import empirical_search
from compressor.certify.local import certify_local
from compressor.core.threat import ThreatModel
from compressor.policy.model import Policy


def certify_states(
    policy: Policy,
    states: np.ndarray,
    threat: ThreatModel,
    *,
    tau: float = 0.1,
    method: str = "crown",
    empirical_states: int = 200,
    seed: int = 0,
) -> dict[str, Any]:
    """Local certificate at every state, PGD lower bound at the first ``empirical_states``.

    :param policy: the policy.
    :param states: raw observations (n, obs_dim), e.g. visited by the dense policy.
    :param threat: ε, norm, space.
    :param tau: TV threshold for the certified fractions.
    :param method: ``crown`` or ``ibp``.
    :param empirical_states: states also attacked by PGD (50 steps, 2 restarts).
    :param seed: PGD's random-start seed.
    :returns: JSON-ready dict: the local summary, the empirical summary, and the median over
        states of certified / empirical (shift and TV) on the states that have both.
    """
    local = certify_local(policy, states, threat, method=method, tau=tau)
    out: dict[str, Any] = {"local": local.to_dict()}
    k = min(empirical_states, len(states))
    if k == 0:
        return out
    emp = empirical_search(
        policy, states[:k], threat, generator=torch.Generator().manual_seed(seed)
    )
    out["empirical"] = {
        "n_states": k,
        "shift_median": float(np.median(emp.shift)),
        "tv_median": float(np.median(emp.tv)),
        "tv_mean": float(np.mean(emp.tv)),
        "tv_max": float(np.max(emp.tv)),
    }
    cert_shift = np.asarray(local.shift_bound[:k], dtype=np.float64)
    ok = emp.shift > 1e-12
    if ok.any():
        out["ratio_shift_median"] = float(np.median(cert_shift[ok] / emp.shift[ok]))
    if local.tv_bound is not None:
        ok_tv = emp.tv > 1e-12
        if ok_tv.any():
            cert_tv = np.asarray(local.tv_bound[:k], dtype=np.float64)
            out["ratio_tv_median"] = float(np.median(cert_tv[ok_tv] / emp.tv[ok_tv]))
        # soundness, checked on every run: no PGD result may exceed its certificate
        out["sound"] = bool(np.all(emp.tv <= np.asarray(local.tv_bound[:k]) * (1 + 1e-4) + 1e-5))
    return out
