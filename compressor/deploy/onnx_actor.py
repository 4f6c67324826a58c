"""An :class:`~compressor.rl.rollout.Actor` that acts through onnxruntime.

Every action comes from the exported file, so an evaluation with it
(:func:`compressor.evaluate.evaluate_suite`, with a torch ``surrogate`` for the attacks)
measures the model that ships. How many observations go into one ``session.run`` is the
actor's ``batch_size``: the rollout engine hands it one row per running sub-env; with
``batch_size=1`` it makes one call per row, as a robot's control loop does; with the target's
batch size it makes calls of at most that many rows. The choice matters for dynamic int8
graphs, which compute one activation scale per call over all its rows, so one row's action
depends on the others in its call.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx
import torch

from compressor.core.errors import CompressorError
from compressor.deploy.export import load_onnx_session, onnx_act

__all__ = ["OnnxActor", "has_dynamic_rounding"]


def has_dynamic_rounding(model: str | Path | bytes) -> bool:
    """Whether the graph quantises activations per call (``DynamicQuantizeLinear``).

    :param model: the ``.onnx`` file or its bytes.
    """
    proto = (
        onnx.load_from_string(model)
        if isinstance(model, bytes)
        else onnx.load(str(model), load_external_data=False)
    )
    return any(n.op_type == "DynamicQuantizeLinear" for n in proto.graph.node)


class OnnxActor:
    """Deterministic actions from an ONNX policy, through onnxruntime.

    :param model: the ``.onnx`` file or its bytes.
    :param providers: onnxruntime providers (default CPU).
    :param threads: intra-op threads.
    :param batch_size: most observations per ``session.run``: ``1`` runs each row as its own
        call (the deployment call of a single robot), an integer ``k`` runs the batch in calls
        of at most ``k`` rows, None runs the whole batch in one call. ``"auto"`` (default):
        1 for graphs with dynamic rounding (rows would couple), else None.
    """

    def __init__(
        self,
        model: str | Path | bytes,
        providers: list[str] | None = None,
        threads: int | None = 1,
        batch_size: int | Literal["auto"] | None = "auto",
    ) -> None:
        if batch_size == "auto":
            batch_size = 1 if has_dynamic_rounding(model) else None
        if batch_size is not None and batch_size < 1:
            raise CompressorError(f"batch_size must be at least 1 (or None), got {batch_size}")
        self.model = model
        self.providers = providers
        self.threads = threads
        self.batch_size: int | None = batch_size
        self.session = load_onnx_session(model, providers, threads=threads)

    @property
    def env_wrappers(self) -> list[dict[str, Any]]:
        """The observation wrappers the exported policy expects its env to apply (the RL Zoo's
        time feature...), from the graph's ``interface`` metadata (none: empty): rollouts wrap
        the env in them, as they do for the torch policy it was exported from."""
        meta = self.session.get_modelmeta().custom_metadata_map
        try:
            wrappers = json.loads(meta.get("interface", "{}")).get("input_wrappers", [])
        except (json.JSONDecodeError, AttributeError):
            return []
        return list(wrappers) if isinstance(wrappers, list) else []

    def act(self, obs: torch.Tensor) -> torch.Tensor:
        """Deterministic actions for a batch of raw observations.

        :param obs: shape (batch, obs_dim).
        """
        x = obs.detach().cpu().numpy()
        k = self.batch_size
        if k is None or x.ndim != 2 or len(x) <= k:
            out = onnx_act(self.session, x)
        else:
            calls = [onnx_act(self.session, x[i : i + k]) for i in range(0, len(x), k)]
            out = np.concatenate(calls)
        return torch.from_numpy(np.ascontiguousarray(out))

    def sample(self, obs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Not available: the exported graph holds only the deterministic action."""
        raise CompressorError("an ONNX policy has only its deterministic action; cannot sample")

    def __getstate__(self) -> dict[str, Any]:
        """Pickled without the session (executors send actors to worker processes)."""
        return {k: v for k, v in self.__dict__.items() if k != "session"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.session = load_onnx_session(self.model, self.providers, threads=self.threads)
