"""The edge policy compressor: a smaller, faster RL policy that is provably no less robust.

The Python API mirrors the ``compress`` commands (compressor/api.py)::

    from compressor import compress, evaluate_policy

    print(evaluate_policy("profiles/hopper.pt", episodes=5).result.stats.mean)
    run = compress("hopper", budget=0.05)
    print(run.report["verdict"]["summary"], run.run_dir)

Names are imported on first use, so ``import compressor`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

#: public name -> module that defines it
_API = {
    "compress": "compressor.api",
    "evaluate_policy": "compressor.api",
    "attack_policy": "compressor.api",
    "certify_policy": "compressor.api",
    "prune_policy": "compressor.api",
    "train_policy": "compressor.api",
    "quantize": "compressor.api",
    "load": "compressor.api",
    "resolve_source": "compressor.api",
    "run_pipeline": "compressor.run.pipeline",
    "export_onnx": "compressor.deploy.export",
    "bench_model": "compressor.deploy.bench",
    "quantize_policy": "compressor.deploy.quantize",
    "OnnxActor": "compressor.deploy.onnx_actor",
    "describe": "compressor.policy.loading",
    "load_policy": "compressor.policy.loading",
    "save_loaded": "compressor.policy.loading",
    "Policy": "compressor.policy.model",
    "PolicySpec": "compressor.policy.model",
    "Profile": "compressor.core.config",
    "load_profile": "compressor.core.config",
    "load_target": "compressor.core.config",
    "ThreatModel": "compressor.core.threat",
    "CompressorError": "compressor.core.errors",
}

__all__ = sorted(_API)


def __getattr__(name: str) -> Any:
    """Import a public name from its module on first use (PEP 562)."""
    if name not in _API:
        raise AttributeError(f"module 'compressor' has no attribute {name!r}")
    value = getattr(importlib.import_module(_API[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_API])
