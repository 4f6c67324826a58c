"""Import a dense ONNX policy (``policy.onnx``) into the :class:`Policy` it computes.

Isaac Lab, mjlab (rsl_rl's exporter), SB3's export recipe and this tool's own ``compress export``
write an MLP as a chain of standard operators. The graph is parsed with ``onnx``, never run:
the path from the observation input to the action output must read

    [Cast/Identity/Flatten]  [Sub|Add mean]  [Div|Mul std]  [Clip ±c]       normalisation, clip
    (Gemm | MatMul [+ Add])  (Tanh | Relu | Elu)  ...  (Gemm | MatMul [+ Add])   the MLP
    [Clip lo hi | Min hi, Max lo | Tanh [affine] | ArgMax]                   the action

Subgraphs that only combine constants (a transposed weight, ``std + eps``, this tool's bitmask
weight storage) are folded first, each node run alone in onnxruntime on its constant inputs.
Any other node on the path is refused, naming it. Branches off the path (SB3's value
and log-probability outputs, a σ head) are ignored. The metadata this tool writes (``spec``,
``action_std``) restores the head, the environment and its wrappers of a policy it exported.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from compressor.core.errors import CompressorError
from compressor.policy.importers.common import (
    ImportResult,
    Layer,
    apply_norm_stats,
    build_policy,
    load_norm_stats,
)
from compressor.policy.model import DISCRETE_HEADS, PolicySpec
from compressor.policy.native import sha256_file

FORMAT = "onnx"
MAX_ONNX_BYTES = 1 << 30
_ACTS = {"Tanh": "tanh", "Relu": "relu", "Elu": "elu"}
_PASS = ("Identity", "Cast", "Flatten")
#: Ops whose later inputs are a target shape, computed from the batch size by some exporters
#: (SB3's Gaussian mean is ``expand``-ed to its own shape): on a [batch, n] tensor, no-ops.
_SHAPED = ("Expand", "Reshape")


def looks_like_onnx(path: Path, magic: bytes) -> bool:
    """Whether a file is (meant to be) an ONNX model: its suffix, or a protobuf whose first
    field is a small ``ir_version``.

    :param path: the file. :param magic: its first bytes.
    """
    return path.suffix.lower() == ".onnx" or (len(magic) > 1 and magic[0] == 8 and magic[1] < 32)


def _load(path: Path) -> Any:
    import onnx

    if path.stat().st_size > MAX_ONNX_BYTES:
        raise CompressorError(f"{path.name}: implausibly large for a policy graph")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf's DecodeError and friends
        raise CompressorError(
            f"{path.name}: not a readable ONNX model ({type(exc).__name__})"
        ) from None
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer):
        try:
            from onnx.external_data_helper import load_external_data_for_model

            load_external_data_for_model(model, str(path.parent))
        except Exception as exc:  # missing sidecar, path outside the folder
            detail = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
            raise CompressorError(
                f"{path.name}: cannot read its external weights ({detail})"
            ) from None
    return model


def _fold(model: Any, node: Any, consts: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Outputs of one node whose inputs are all constants, computed by onnxruntime on a graph of
    that node alone (standard operators on constant tensors; nothing from the file runs)."""
    import onnxruntime as ort
    from onnx import helper

    inputs = list(dict.fromkeys(i for i in node.input if i))  # Slice may repeat one
    typed = [
        helper.make_tensor_value_info(
            i, helper.np_dtype_to_tensor_dtype(consts[i].dtype), consts[i].shape
        )
        for i in inputs
    ]
    outputs = [helper.make_empty_tensor_value_info(o) for o in node.output]
    graph = helper.make_graph([node], "fold", typed, outputs)
    sub = helper.make_model(graph, opset_imports=list(model.opset_import))
    sub.ir_version = model.ir_version
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(sub.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return [np.asarray(v) for v in sess.run(None, {i: consts[i] for i in inputs})]


def _constants(model: Any) -> tuple[dict[str, np.ndarray], list[Any]]:
    """Initialisers and ``Constant`` outputs, with every node computed from constants only
    folded in; returns them and the remaining nodes, in graph order."""
    from onnx import numpy_helper

    consts = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    rest = []
    for node in model.graph.node:
        inputs = [i for i in node.input if i]
        if node.op_type == "Constant" or (inputs and all(i in consts for i in inputs)):
            try:
                outs = _fold(model, node, consts)
            except Exception as exc:  # an operator onnxruntime cannot run on these constants
                detail = str(exc).strip().splitlines()[0][:120] if str(exc) else type(exc).__name__
                raise CompressorError(
                    f"cannot fold constant node {node.name or node.op_type!r} ({node.op_type}): "
                    f"{detail}"
                ) from None
            consts.update(dict(zip(node.output, outs)))
        else:
            rest.append(node)
    return consts, rest


def _path(model: Any, consts: dict[str, np.ndarray], nodes: list[Any]) -> tuple[str, list[Any]]:
    """The graph input and the nodes from it to the action output, input first."""
    inputs = [i for i in model.graph.input if i.name not in consts]
    if len(inputs) != 1:
        names = [i.name for i in inputs]
        raise CompressorError(
            f"the graph has inputs {names}; a policy graph takes one observation tensor "
            "(recurrent policies with state inputs are not supported)"
        )
    outputs = [o.name for o in model.graph.output]
    wanted = [o for o in outputs if o.lower() in ("action", "actions")] or outputs[:1]
    if not wanted:
        raise CompressorError("the graph has no output")
    producer = {o: n for n in nodes for o in n.output}
    chain, name, start = [], wanted[0], inputs[0].name
    while name != start:
        node = producer.get(name)
        if node is None:
            raise CompressorError(f"output {wanted[0]!r} does not depend on the input {start!r}")
        dynamic = [i for i in node.input if i and i not in consts]
        if node.op_type in _SHAPED and dynamic and dynamic[0] == node.input[0]:
            dynamic = dynamic[:1]  # the target shape is computed from the batch: not data
        if len(dynamic) != 1:
            raise CompressorError(
                f"node {node.name or node.op_type!r} ({node.op_type}) combines {len(dynamic)} "
                "computed tensors: not a dense MLP"
            )
        chain.append(node)
        name = dynamic[0]
        if len(chain) > 10_000:
            raise CompressorError("the graph's action path does not reach its input (a cycle?)")
    return start, chain[::-1]


def _attr(node: Any, name: str, default: Any) -> Any:
    from onnx import helper

    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _refuse(node: Any, why: str = "") -> CompressorError:
    label = node.name or node.op_type
    return CompressorError(
        f"unsupported node {label!r} ({node.op_type}) on the action path{': ' + why if why else ''}"
        "; only dense MLPs (Gemm/MatMul+Add, Tanh/Relu/Elu, Sub/Div normalisation, Clip, "
        "Tanh-rescale, ArgMax) can be imported"
    )


def _const_of(node: Any, consts: dict[str, np.ndarray], x: str) -> np.ndarray:
    """The constant operand of a binary node whose other operand is ``x``."""
    other = [i for i in node.input if i and i != x]
    if len(other) != 1 or other[0] not in consts:
        raise _refuse(node, "expected one constant operand")
    return np.asarray(consts[other[0]], dtype=np.float64)


def _bounds_of(node: Any, consts: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """A Clip node's ``(min, max)`` (inputs from opset 11, attributes before)."""
    ins = list(node.input)
    lo = consts.get(ins[1]) if len(ins) > 1 and ins[1] else _attr(node, "min", -math.inf)
    hi = consts.get(ins[2]) if len(ins) > 2 and ins[2] else _attr(node, "max", math.inf)
    if lo is None or hi is None:
        raise _refuse(node, "its bounds are not constants")
    return np.asarray(lo, dtype=np.float64), np.asarray(hi, dtype=np.float64)


def _linear(nodes: list[Any], i: int, consts: dict[str, np.ndarray], x: str) -> tuple[Layer, int]:
    """The Linear layer starting at ``nodes[i]`` (Gemm, or MatMul with an optional Add) and the
    index after it. Weights come out in ``nn.Linear``'s ``(out, in)`` layout."""
    node, ins = nodes[i], list(nodes[i].input)
    if len(ins) < 2 or ins[0] != x or ins[1] not in consts:
        raise _refuse(node, "only x·W with a constant W")
    w = np.asarray(consts[ins[1]])
    if w.ndim != 2 or w.dtype.kind not in "fiu" or 0 in w.shape:
        raise _refuse(node, "its weight is not a numeric matrix")
    w = w.astype(np.float32)
    bias = None
    if node.op_type == "Gemm":
        if _attr(node, "transA", 0) or float(_attr(node, "alpha", 1.0)) != 1.0:
            raise _refuse(node, "only Gemm(x, W, b) with alpha = 1 and transA = 0")
        w = w if _attr(node, "transB", 0) else w.T
        if len(ins) > 2 and ins[2]:
            if ins[2] not in consts:
                raise _refuse(node, "its bias is not a constant")
            bias = np.asarray(consts[ins[2]], dtype=np.float64) * float(_attr(node, "beta", 1.0))
        j = i + 1
    else:
        w, j = w.T, i + 1
        if j < len(nodes) and nodes[j].op_type == "Add":
            c = _const_of(nodes[j], consts, node.output[0])
            if c.size == w.shape[0]:
                bias, j = c, j + 1
    b = np.zeros(w.shape[0], np.float32)
    if bias is not None:
        if bias.size not in (1, w.shape[0]):
            raise _refuse(node, f"its bias has {bias.size} entries for {w.shape[0]} outputs")
        b = np.broadcast_to(bias.reshape(-1), (w.shape[0],)).astype(np.float32)
    return (torch.as_tensor(np.ascontiguousarray(w)), torch.as_tensor(b.copy())), j


def _prefix(
    nodes: list[Any], consts: dict[str, np.ndarray], x: str
) -> tuple[dict[str, Any], int, str]:
    """Casts, normalisation and the observation clip in front of the first Linear."""
    out: dict[str, Any] = {"mean": None, "std": None, "clip": None}
    i = 0
    while i < len(nodes) and nodes[i].op_type not in ("Gemm", "MatMul"):
        node, op = nodes[i], nodes[i].op_type
        if op in _PASS or op in _SHAPED:
            pass
        elif op in ("Sub", "Add") and out["mean"] is None and out["std"] is None:
            if node.input[0] != x and op == "Sub":
                raise _refuse(node, "only x - mean")
            c = _const_of(node, consts, x)
            out["mean"] = c if op == "Sub" else -c
        elif op in ("Div", "Mul") and out["std"] is None and out["clip"] is None:
            if node.input[0] != x and op == "Div":
                raise _refuse(node, "only x / std")
            c = _const_of(node, consts, x)
            out["std"] = c if op == "Div" else 1.0 / c
        elif op == "Clip" and out["clip"] is None:
            lo, hi = _bounds_of(node, consts)
            if lo.size != 1 or hi.size != 1 or float(lo) != -float(hi) or float(hi) <= 0:
                raise _refuse(node, "only a symmetric clip ±c of the normalised observation")
            out["clip"] = float(hi)
        else:
            raise _refuse(node)
        x, i = node.output[0], i + 1
    return out, i, x


def _mlp(
    nodes: list[Any], i: int, consts: dict[str, np.ndarray], x: str
) -> tuple[list[Layer], str | None, int, str]:
    """Linear layers with one activation between them; returns them, the activation, the index
    after the last Linear and its output name."""
    layers: list[Layer] = []
    act: str | None = None
    while i < len(nodes) and nodes[i].op_type in ("Gemm", "MatMul"):
        layer, i = _linear(nodes, i, consts, x)
        layers.append(layer)
        x = nodes[i - 1].output[0]
        if i < len(nodes) and nodes[i].op_type in _ACTS:
            nxt = i + 1
            if nxt >= len(nodes) or nodes[nxt].op_type not in ("Gemm", "MatMul"):
                break  # a last Tanh is the action's squash, not an activation
            node = nodes[i]
            name = _ACTS[node.op_type]
            if name == "elu" and float(_attr(node, "alpha", 1.0)) != 1.0:
                raise _refuse(node, "only ELU with alpha = 1")
            if act is not None and name != act:
                raise _refuse(node, f"mixes {act} and {name}; one activation per MLP")
            act, x, i = name, node.output[0], nxt
    if not layers:
        raise CompressorError("the graph has no Linear layer (Gemm or MatMul) on its action path")
    return layers, act, i, x


def _keeps_rows(node: Any, consts: dict[str, np.ndarray], width: int) -> bool:
    """A Reshape to ``(-1, width)`` (SB3 reshapes its actions so): the layout is unchanged."""
    shape = consts.get(node.input[1]) if len(node.input) > 1 else None
    return shape is not None and [int(v) for v in np.ravel(shape)] in ([-1, width], [0, width])


def _suffix(
    nodes: list[Any], i: int, consts: dict[str, np.ndarray], x: str, width: int
) -> dict[str, Any]:
    """The action map after the last Linear (``width`` outputs): ``none``, ``clip`` (Clip, or
    Min/Max), ``tanh`` (Tanh, then any per-dimension affine: the rescale to ``[low, high]``)
    or ``argmax``."""
    out: dict[str, Any] = {"map": "none", "low": None, "high": None}
    lo, hi = -np.inf, np.inf
    alpha, beta = np.ones(1), np.zeros(1)
    for node in nodes[i:]:
        op = node.op_type
        if op in ("Identity", "Expand") or (op == "Reshape" and _keeps_rows(node, consts, width)):
            pass  # any other Reshape could regroup the outputs (quantiles): refused
        elif op == "ArgMax" and out["map"] == "none":
            if int(_attr(node, "axis", 0)) not in (1, -1):
                raise _refuse(node, "only ArgMax over the last axis")
            out["map"] = "argmax"
        elif op == "Tanh" and out["map"] == "none":
            out["map"] = "tanh"
        elif op in ("Add", "Sub", "Mul", "Div") and out["map"] == "tanh":
            if op in ("Sub", "Div") and node.input[0] != x:
                raise _refuse(node, "only y - c and y / c after the tanh")
            c = _const_of(node, consts, x).reshape(-1)
            if op in ("Add", "Sub"):
                beta = beta + (c if op == "Add" else -c)
            else:
                scale = c if op == "Mul" else 1.0 / c
                alpha, beta = alpha * scale, beta * scale
        elif op == "Clip" and out["map"] in ("none", "clip"):
            lo_c, hi_c = _bounds_of(node, consts)
            lo, hi, out["map"] = np.maximum(lo, lo_c), np.minimum(hi, hi_c), "clip"
        elif op in ("Min", "Max") and out["map"] in ("none", "clip"):
            c = _const_of(node, consts, x)
            fmax = float(np.finfo(np.float32).max)
            c = np.where(np.abs(c) >= fmax, np.sign(c) * np.inf, c)  # the exporter's "no bound"
            lo, hi = (lo, np.minimum(hi, c)) if op == "Min" else (np.maximum(lo, c), hi)
            out["map"] = "clip"
        else:
            raise _refuse(node)
        x = node.output[0]
    if out["map"] == "tanh":
        alpha, beta = np.asarray(alpha, np.float64), np.asarray(beta, np.float64)
        if np.any(alpha <= 0):
            raise CompressorError("the tanh output is rescaled by a non-positive factor")
        out["low"], out["high"] = beta - alpha, beta + alpha
    elif out["map"] == "clip":
        out["low"], out["high"] = np.asarray(lo, np.float64), np.asarray(hi, np.float64)
    return out


def _metadata(model: Any) -> tuple[dict[str, Any], list[float] | None]:
    """The ``spec`` and ``action_std`` this tool's exporter writes (empty when absent)."""
    props = {p.key: p.value for p in model.metadata_props}
    try:
        spec = json.loads(props.get("spec", "{}"))
        std = json.loads(props.get("action_std", "{}")).get("log_std")
    except (ValueError, AttributeError):
        return {}, None
    spec = spec if isinstance(spec, dict) else {}
    ok = isinstance(std, list) and all(isinstance(v, (int, float)) for v in std)
    return spec, [float(v) for v in std] if ok else None


def _vector(v: Any, n: int, what: str) -> list[float]:
    arr = np.asarray(v, dtype=np.float64).reshape(-1)
    if arr.size == 1:
        arr = np.full(n, float(arr[0]))
    if arr.size != n:
        raise CompressorError(f"the graph's {what} has {arr.size} entries, expected {n}")
    return [float(a) for a in arr]


def _head(
    suffix: dict[str, Any], meta: dict[str, Any], log_std: list[float] | None, act_dim: int
) -> tuple[str, dict[str, Any], list[str]]:
    """The head (and its spec options) computing the graph's action, preferring the one this
    tool's metadata records when the graph agrees with it."""
    notes: list[str] = []
    head, kind = meta.get("head"), suffix["map"]
    options: dict[str, Any] = {}
    expl = meta.get("exploration", 0.0)
    if isinstance(expl, (int, float)) and not isinstance(expl, bool) and expl >= 0:
        options["exploration"] = float(expl)
    if kind == "argmax":
        if head not in DISCRETE_HEADS:
            head = "categorical"
            notes.append("argmax over the last layer read as a categorical head (logits)")
        return str(head), options if head == "q_greedy" else {}, notes
    std_ok = log_std is not None and len(log_std) == act_dim
    if kind == "tanh":
        if head == "squashed_gaussian" and std_ok and not meta.get("state_dependent_std"):
            return "squashed_gaussian", {}, notes
        if head == "squashed_gaussian":
            notes.append("the graph holds the deployed action only: σ (not in it) is not imported")
        return "deterministic", {**options, "squash": True}, notes
    if head == "gaussian" and std_ok:
        return "gaussian", {}, notes
    if kind == "none":
        notes.append("the graph does not bound its action; neither does the imported policy")
    return "deterministic", options, notes


def import_onnx(
    path: Path,
    env_id: str | None = None,
    vecnormalize: str | Path | None = None,
    env_kwargs: dict[str, Any] | None = None,
) -> ImportResult:
    """Import a dense ONNX policy graph (see the module docstring for what it may contain).

    :param path: the ``.onnx`` file (external weights are read from its folder).
    :param env_id: the environment; default: the one this tool's export metadata records.
    :param vecnormalize: statistics to use instead of the graph's own normalisation.
    :param env_kwargs: kwargs for ``gymnasium.make``; default: the metadata's.
    """
    origin = path.name
    model = _load(path)
    try:
        consts, nodes = _constants(model)
        start, chain = _path(model, consts, nodes)
        pre, i, x = _prefix(chain, consts, start)
        layers, act, i, x = _mlp(chain, i, consts, x)
        suffix = _suffix(chain, i, consts, x, int(layers[-1][0].shape[0]))
    except CompressorError as exc:
        raise CompressorError(f"{origin}: {exc}") from None
    except (ValueError, TypeError, IndexError, KeyError, ZeroDivisionError) as exc:
        # a graph whose operands are not what its operators need (a corrupt file)
        detail = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
        raise CompressorError(f"{origin}: malformed policy graph ({detail})") from None
    meta, log_std = _metadata(model)
    obs_dim, act_dim = int(layers[0][0].shape[1]), int(layers[-1][0].shape[0])
    head, options, notes = _head(suffix, meta, log_std, act_dim)
    env_id = env_id or (meta.get("env_id") if isinstance(meta.get("env_id"), str) else None)
    if not env_id:
        raise CompressorError(
            f"{origin}: an ONNX graph does not record its environment; pass --env ENV_ID"
        )
    kwargs: dict[str, Any] = dict(env_kwargs) if env_kwargs is not None else {}
    if env_kwargs is None and isinstance(meta.get("env_kwargs"), dict):
        kwargs = dict(meta["env_kwargs"])
    low = high = None
    if head not in DISCRETE_HEADS and suffix["low"] is not None:
        low = _vector(suffix["low"], act_dim, "lower action bound")
        high = _vector(suffix["high"], act_dim, "upper action bound")
    wrappers = meta["env_wrappers"] if isinstance(meta.get("env_wrappers"), list) else []
    spec = PolicySpec(
        obs_dim=obs_dim,
        act_dim=act_dim,
        hidden=[int(w.shape[0]) for w, _ in layers[:-1]],
        activation=act or str(meta.get("activation", "tanh")),
        head=head,
        obs_norm=pre["mean"] is not None or pre["std"] is not None,
        obs_clip=pre["clip"],
        obs_eps=0.0,
        action_low=low,
        action_high=high,
        env_id=env_id,
        env_kwargs=kwargs,
        source=_source(path, model, meta),
        env_wrappers=wrappers,
        **options,
    )
    std = torch.tensor(log_std, dtype=torch.float32) if log_std is not None else None
    policy = build_policy(spec, layers, origin, log_std=std)
    if spec.obs_norm:
        mean = _vector(pre["mean"] if pre["mean"] is not None else 0.0, obs_dim, "mean")
        scale = _vector(pre["std"] if pre["std"] is not None else 1.0, obs_dim, "std")
        with torch.no_grad():
            policy.obs_mean.copy_(torch.tensor(mean, dtype=torch.float32))
            s = torch.tensor(scale, dtype=torch.float32)
            policy.obs_var.copy_(s * s)
    if vecnormalize is not None:
        stats_path = Path(vecnormalize)
        apply_norm_stats(policy, load_norm_stats(stats_path))
        spec.source["obs_stats"] = {"file": stats_path.name, "sha256": sha256_file(stats_path)}
    return ImportResult(policy, None, notes)


def _source(path: Path, model: Any, meta: dict[str, Any]) -> dict[str, Any]:
    origin = meta.get("source") if isinstance(meta.get("source"), dict) else {}
    return {
        "format": FORMAT,
        "file": path.name,
        "sha256": sha256_file(path),
        "producer": f"{model.producer_name} {model.producer_version}".strip(),
        "opset": max(
            (int(o.version) for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0
        ),
        "exported_from": origin or None,
        "obs_stats": {"file": path.name, "kind": "in the graph"} if origin is not None else None,
    }
