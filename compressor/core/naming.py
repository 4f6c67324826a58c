"""The words and formats every output uses for the same things: the certificate's name and
unit, what a pruning method removes, and how a sparsity is written. One place, so the progress
lines, the verdict, the report's tiles, tables and plots cannot drift apart.
"""

from __future__ import annotations

#: the one name of the global certificate's number (``GlobalCertificate.lipschitz``)
CERT_NAME = "certified bound"

_UNITS = {
    "mahalanobis_shift": "Mahalanobis shift per unit ε",
    "logit_oscillation": "logit change per unit ε",
    "action_deviation_l2": "ℓ2 action change per unit ε",
    "q_value_change_l2": "ℓ2 Q-value change per unit ε",
}

_PRUNING = {
    "structured": ("structured", "whole neurons removed"),
    "magnitude": ("unstructured", "individual weights, smallest |w| first"),
    "micro": ("unstructured", "individual weights, many small magnitude cuts"),
    "random": ("unstructured", "individual weights at random (a baseline)"),
}


def cert_unit(shift_name: str | None) -> str:
    """The unit of the certified bound for a certificate's ``shift_name``."""
    return _UNITS.get(shift_name or "", "shift per unit ε")


def cert_label(shift_name: str | None) -> str:
    """``certified bound (<unit>)``: the certificate's name with its unit."""
    return f"{CERT_NAME} ({cert_unit(shift_name)})"


def pruning_kind(method: str) -> str:
    """``structured`` or ``unstructured`` for a pruning method."""
    return _PRUNING.get(method, ("unstructured", ""))[0]


def pruning_short(method: str) -> str:
    """A few words for headlines and tiles: ``structured (whole neurons)`` or
    ``unstructured (magnitude)``."""
    if method == "structured":
        return "structured (whole neurons)"
    return f"{pruning_kind(method)} ({method})"


def pruning_description(method: str) -> str:
    """One phrase saying what a pruning method removes, e.g. ``structured (whole neurons
    removed)``."""
    kind, what = _PRUNING.get(method, ("unstructured", method))
    return f"{method}: {what}" if kind == method else f"{method}: {kind}, {what}"


def sparsity_text(fraction: float | None) -> str:
    """A sparsity as every output writes it: ``77.5%`` (one decimal); ``n/a`` when missing."""
    return "n/a" if fraction is None else f"{100 * fraction:.1f}%"
