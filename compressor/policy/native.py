"""The native policy file: `torch.save` of a dict of tensors, numbers, strings, lists and dicts
only, so it loads with ``torch.load(weights_only=True)``: a format tag with a version, the spec,
the state dict (masks as bool) and, optionally, a ``"critic"`` entry (a state-value net) and a
``"q_nets"`` entry (Q-networks: SAC/TD3/TQC critics, DQN's target net).

Version 2 added the spec fields of the off-policy heads (``state_dependent_std``,
``log_std_bounds``, ``log_std_transform``, ``squash``, ``exploration``) and ``env_wrappers``, and
the ``"q_nets"`` entry; a version 1 file is a version 2 file that uses none of them, so both are
read (their defaults describe version 1 exactly).
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import Any

import torch

from compressor.core import atomic
from compressor.core.errors import CompressorError
from compressor.policy.model import Policy, PolicySpec, check_finite

FORMAT_TAG = "edge-policy-compressor/policy"
FORMAT_VERSION = 2
#: Versions this tool reads.
READABLE_VERSIONS = (1, 2)


def sha256_file(path: str | Path) -> str:
    """SHA-256 hex digest of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def policy_to_dict(policy: Policy) -> dict[str, Any]:
    """The native, ``weights_only``-loadable representation of a policy."""
    state = {k: v.detach().clone().contiguous() for k, v in policy.state_dict().items()}
    for k in state:
        if k.startswith("mask"):  # masks are 0/1: stored as bool (4x smaller), read back as float
            state[k] = state[k].bool()
    return {
        "format": FORMAT_TAG,
        "version": FORMAT_VERSION,
        "spec": dataclasses.asdict(policy.spec),
        "state_dict": state,
    }


def policy_from_dict(obj: Any, origin: str = "policy") -> Policy:
    """Build a :class:`Policy` from :func:`policy_to_dict` output, validating everything."""
    if not isinstance(obj, dict) or obj.get("format") != FORMAT_TAG:
        raise CompressorError(f"{origin}: not a native compressor policy (missing format tag)")
    version = obj.get("version")
    if not isinstance(version, int) or version not in READABLE_VERSIONS:  # corrupt: any type
        shown = version if isinstance(version, int) else "(missing or not an integer)"
        raise CompressorError(
            f"{origin}: native format version {shown} is not supported "
            f"(this tool reads versions {', '.join(map(str, READABLE_VERSIONS))})"
        )
    if not isinstance(obj.get("spec"), dict):
        raise CompressorError(f"{origin}: malformed policy spec (not a table)")
    try:
        spec = PolicySpec(**obj["spec"])
        policy = Policy(spec)
    except TypeError as exc:  # a field name the spec does not have (one line: it is the file's)
        detail = " ".join(str(exc).split())
        raise CompressorError(f"{origin}: malformed policy spec ({detail})") from None
    except CompressorError as exc:  # validate() does not know the file name
        raise CompressorError(f"{origin}: {exc}") from None
    state = obj.get("state_dict")
    if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
        raise CompressorError(f"{origin}: missing or malformed state_dict")
    try:
        policy.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0] if str(exc) else "shape mismatch"
        raise CompressorError(f"{origin}: weights do not match the spec ({first})") from None
    check_finite(policy, origin)
    return policy


def save_policy(policy: Policy, path: str | Path) -> None:
    """Atomically save a policy in the native format (loads with ``weights_only=True``)."""
    payload = policy_to_dict(policy)
    atomic.write_with(path, lambda tmp: torch.save(payload, tmp))


def load_native(path: str | Path) -> Policy:
    """Load a native ``.pt`` policy without executing any pickled code."""
    p = Path(path)
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CompressorError(f"{p}: file not found") from None
    except Exception as exc:  # torch raises many types for truncated / foreign files
        msg = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise CompressorError(f"{p}: cannot read as a native policy file ({msg})") from None
    return policy_from_dict(obj, str(p))
