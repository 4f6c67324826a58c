"""Read pickles that come with third-party policies without executing anything from them.

A pickle is a program: every global it names is imported and called while loading. This module's
unpickler admits only globals that cannot do harm when called with arbitrary arguments (numpy
array and dtype reconstruction, a few container builtins) and replaces the classes an RL Zoo
``vecnormalize.pkl`` needs (SB3's ``VecNormalize`` and ``RunningMeanStd``, gym/gymnasium spaces,
numpy random states) by inert records that only keep the arguments and state the pickle gives
them. Nothing is imported from those packages, so neither the old ``gym`` nor
``stable_baselines3`` is needed. Every other global is refused with an error naming it.
"""

from __future__ import annotations

import _compat_pickle
import io
import pickle
import pickletools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np

from compressor.core.errors import CompressorError

#: Largest pickle read (normalisation stats are a few KiB; this only stops absurd files).
MAX_PICKLE_BYTES = 64 << 20

ALLOWED_SUMMARY = "numpy arrays, numpy dtypes/scalars, containers and SB3 normalisation records"


def _numpy_globals() -> dict[str, Any]:
    # Take the functions numpy itself pickles with, instead of importing numpy.core (deprecated
    # in numpy 2) or numpy._core (absent in numpy 1): both spellings map to the same objects.
    reconstruct = np.ndarray((0,)).__reduce__()[0]
    scalar = np.float64(0.0).__reduce__()[0]
    frombuffer = np.arange(1).__reduce_ex__(5)[0]
    out: dict[str, Any] = {"numpy.ndarray": np.ndarray, "numpy.dtype": np.dtype}
    for core in ("numpy.core", "numpy._core"):
        out[f"{core}.multiarray._reconstruct"] = reconstruct
        out[f"{core}.multiarray.scalar"] = scalar
        out[f"{core}.numeric._frombuffer"] = frombuffer
    return out


#: Globals returned as the real object: all are pure constructors of data.
SAFE_GLOBALS: dict[str, Any] = {
    **_numpy_globals(),
    "collections.OrderedDict": __import__("collections").OrderedDict,
    "builtins.set": set,
    "builtins.frozenset": frozenset,
    "builtins.complex": complex,
    "builtins.bytearray": bytearray,
    "_codecs.encode": __import__("codecs").encode,  # protocol-2 pickles spell bytes this way
}

#: Exact globals replaced by inert records.
RECORD_GLOBALS = frozenset(
    {
        "stable_baselines3.common.vec_env.vec_normalize.VecNormalize",
        "stable_baselines3.common.running_mean_std.RunningMeanStd",
    }
)
#: Module prefixes whose every global is replaced by an inert record (spaces, RNG states).
RECORD_MODULE_PREFIXES = ("gym.spaces", "gymnasium.spaces", "numpy.random")


class PickledRecord:
    """An inert stand-in for a class the pickle names: keeps its arguments and state, runs nothing.

    ``global_name`` is the ``module.name`` the pickle referenced.
    """

    global_name = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> PickledRecord:
        obj = super().__new__(cls)
        obj.args = args
        obj.kwargs = kwargs
        obj.state = None
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args = args
        self.kwargs = kwargs

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def fields(self) -> dict[str, Any]:
        """The record's attribute dict (``__getstate__`` output, slot state merged in)."""
        state = self.state
        if isinstance(state, tuple) and len(state) == 2:  # (dict state, slot state)
            merged: dict[str, Any] = {}
            for part in state:  # a corrupt pickle can put anything here: keep the dicts only
                if isinstance(part, dict):
                    merged.update(part)
            return merged
        return dict(state) if isinstance(state, dict) else {}

    def __repr__(self) -> str:
        return f"<record {self.global_name}>"


_record_classes: dict[str, type[PickledRecord]] = {}


def _record_class(full_name: str) -> type[PickledRecord]:
    cls = _record_classes.get(full_name)
    if cls is None:
        cls = type(f"Record[{full_name}]", (PickledRecord,), {"global_name": full_name})
        _record_classes[full_name] = cls
    return cls


def is_admitted(full_name: str) -> bool:
    """Whether the restricted unpickler would admit the global ``module.name``."""
    return (
        full_name in SAFE_GLOBALS
        or full_name in RECORD_GLOBALS
        or any(full_name.startswith(p + ".") for p in RECORD_MODULE_PREFIXES)
    )


def referenced_globals(data: bytes) -> list[tuple[str, str]]:
    """Every global ``(module, name)`` a pickle references, read from its opcodes (nothing runs).

    Best effort for STACK_GLOBAL (its operands are tracked through the memo); returns what it
    found before any malformed opcode.

    :param data: the pickle bytes.
    """
    found: list[tuple[str, str]] = []
    strings: list[Any] = []
    memo: dict[int, Any] = {}
    try:
        for op, arg, _pos in pickletools.genops(data):
            arg = cast(Any, arg)
            name = op.name
            if name in ("SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "STRING"):
                strings.append(arg)
            elif name == "MEMOIZE":
                memo[len(memo)] = strings[-1] if strings else None
            elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
                memo[int(arg)] = strings[-1] if strings else None
            elif name in ("GET", "BINGET", "LONG_BINGET"):
                strings.append(memo.get(int(arg)))
            elif name in ("GLOBAL", "INST"):
                module, _, attr = str(arg).partition(" ")
                found.append((module, attr))
            elif name == "STACK_GLOBAL" and len(strings) >= 2:
                found.append((str(strings[-2]), str(strings[-1])))
    except Exception:  # malformed tail: the unpickler reports it properly
        pass
    return list(dict.fromkeys(found))


class _Memo(dict):  # type: ignore[type-arg]
    """The unpickler's memo, also noting under which keys each numpy dtype was stored."""

    def __init__(self) -> None:
        super().__init__()
        self.dtype_keys: dict[int, list[Any]] = {}

    def __setitem__(self, key: Any, value: Any) -> None:
        super().__setitem__(key, value)
        if isinstance(value, np.dtype):
            self.dtype_keys.setdefault(id(value), []).append(key)


def _dtype_from_state(base: np.dtype, state: Any, origin: str) -> np.dtype:
    """A new dtype: ``base`` with a pickled ``__setstate__`` state applied to a fresh copy.

    numpy's ``dtype.__setstate__`` trusts the state: its ``flags`` can mark float64 as holding
    object references (numpy then fails, unraisably, to free every array of it: "get_clear_loop
    not set for the DType 'float64'"), and applied to a dtype that arrays already use, its
    ``elsize`` makes them read past their buffers. So a state is applied to a copy only, and
    refused unless the result has the flags and size numpy gives the type it describes.
    """
    make, args = cast(tuple[Any, ...], base.__reduce__())[:2]  # (np.dtype, (str, False, True))
    new = make(*args)  # a fresh descriptor that no array uses
    new.__setstate__(state)
    try:
        if new.names is not None:
            ref = np.dtype(new.descr, align=new.isalignedstruct)
        elif new.subdtype is not None:
            ref = np.dtype(new.subdtype)
        else:
            ref = np.dtype(new.str)
        consistent = new.flags == ref.flags and new.itemsize == ref.itemsize
    except (TypeError, ValueError):
        consistent = False
    if not consistent:
        raise CompressorError(
            f"{origin}: refused a numpy dtype whose pickled state does not match its type "
            "(corrupt or crafted file; nothing was executed)"
        )
    return new


# The pure-Python unpickler (pickle._Unpickler, private but stable; joblib subclasses it too):
# only it lets BUILD be overridden, which numpy dtypes need (see _dtype_from_state). Pickles read
# here are a few KiB, so its speed does not matter.
class RestrictedUnpickler(pickle._Unpickler):
    """An unpickler that admits only :data:`SAFE_GLOBALS` and inert records, and builds numpy
    dtypes from their pickled state without mutating one in place.

    :param file: binary stream with the pickle.
    :param origin: file name used in error messages.
    :param refused: globals found refused by an opcode scan, listed in the error message.
    """

    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, file: io.BufferedIOBase, origin: str, refused: list[str]) -> None:
        super().__init__(file)
        self.origin = origin
        self.refused = refused
        self.memo: _Memo = _Memo()

    def load_build(self) -> None:
        """BUILD: a dtype's state gives a new, checked dtype in the old one's stack slot and
        memo entries (anything already made with the old one keeps it, unchanged)."""
        stack: list[Any] = self.stack  # type: ignore[attr-defined]
        inst = stack[-2] if len(stack) >= 2 else None
        if not isinstance(inst, np.dtype):
            super().load_build()  # type: ignore[misc]
            return
        state = stack.pop()
        new = _dtype_from_state(inst, state, self.origin)
        stack[-1] = new
        for key in self.memo.dtype_keys.pop(id(inst), []):
            if self.memo.get(key) is inst:
                self.memo[key] = new

    dispatch[pickle.BUILD[0]] = load_build  # type: ignore[assignment]

    def find_class(self, module: str, name: str) -> Any:
        # protocol 0-2 pickles spell Python 3 names the Python 2 way (__builtin__.set); map them
        # back as pickle's own find_class does, before the allowlist sees them
        module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        full = f"{module}.{name}"
        if full in SAFE_GLOBALS:
            return SAFE_GLOBALS[full]
        if is_admitted(full):
            return _record_class(full)
        found = dict.fromkeys([full, *self.refused])  # a corrupt name may hold a newline: repr it
        names = ", ".join(n if n.isprintable() else repr(n) for n in found)
        raise CompressorError(
            f"refused to load {names} from {self.origin}: pickles may only contain "
            f"{ALLOWED_SUMMARY} (nothing was executed; do not use this file if you did not make it)"
        )

    def persistent_load(self, pid: Any) -> Any:
        raise CompressorError(f"{self.origin}: refused a pickle persistent id (not a stats file)")


def safe_loads(data: bytes, origin: str = "pickle") -> Any:
    """Unpickle ``data`` admitting only data constructors and inert records.

    :param data: pickle bytes.
    :param origin: file name for error messages.
    :raises CompressorError: on a refused global or a truncated / corrupt pickle.
    """
    if not data:
        raise CompressorError(f"{origin}: file is empty")
    if len(data) > MAX_PICKLE_BYTES:
        raise CompressorError(f"{origin}: pickle is larger than {MAX_PICKLE_BYTES >> 20} MiB")
    names = [f"{m}.{n}" for m, n in referenced_globals(data)]
    refused = [g for g in names if not is_admitted(g)]
    try:
        return RestrictedUnpickler(io.BytesIO(data), origin, refused).load()
    except CompressorError:
        raise
    except Exception as exc:  # EOFError, UnpicklingError, ValueError, ... on corrupt input
        detail = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
        raise CompressorError(f"{origin}: truncated or corrupt pickle ({detail})") from None


@dataclass
class NormStats:
    """Observation normalisation statistics: ``clip((obs - mean) / sqrt(var + epsilon), ±clip)``.

    :param mean: per-feature running mean.
    :param var: per-feature running variance.
    :param clip_obs: clip of the normalised observation, or None.
    :param epsilon: the epsilon under the square root.
    :param norm_obs: whether observations are normalised at all.
    :param count: number of observations the stats were estimated from (0 if unknown).
    :param source: where the stats came from (file name).
    """

    mean: np.ndarray
    var: np.ndarray
    clip_obs: float | None
    epsilon: float
    norm_obs: bool
    count: float
    source: str

    def validate(self, origin: str) -> None:
        """Raise if the statistics are unusable (NaN, negative variance, inconsistent sizes)."""
        if self.mean.ndim != 1 or self.mean.shape != self.var.shape:
            raise CompressorError(
                f"{origin}: normalisation mean/var must be 1-D of equal size "
                f"(got {self.mean.shape} and {self.var.shape})"
            )
        if not (np.isfinite(self.mean).all() and np.isfinite(self.var).all()):
            raise CompressorError(f"{origin}: normalisation statistics contain NaN or inf")
        if (self.var < 0).any():
            raise CompressorError(f"{origin}: normalisation variance is negative")


def _as_vector(value: Any, what: str, origin: str) -> np.ndarray:
    if not isinstance(value, np.ndarray) or value.dtype.kind not in "fiu":
        raise CompressorError(f"{origin}: {what} is not a numeric array (not SB3 VecNormalize?)")
    return value.astype(np.float64)


def load_vecnormalize(path: str | Path) -> NormStats:
    """Read observation statistics from an SB3 / RL Zoo ``vecnormalize.pkl`` without running it.

    :param path: the pickle file.
    :raises CompressorError: missing, corrupt, refused content, or not a VecNormalize pickle.
    """
    p = Path(path)
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        raise CompressorError(f"{p}: normalisation file not found") from None
    except OSError as exc:
        raise CompressorError(f"{p}: cannot read ({exc.strerror})") from None
    root = safe_loads(data, p.name)
    if not isinstance(root, PickledRecord) or not root.global_name.endswith(".VecNormalize"):
        raise CompressorError(
            f"{p}: not an SB3 VecNormalize pickle; pass the vecnormalize.pkl saved with the model"
        )
    fields = root.fields()
    rms = fields.get("obs_rms")
    if isinstance(rms, dict):
        raise CompressorError(f"{p}: dict-observation normalisation is not supported (flat only)")
    if not isinstance(rms, PickledRecord):
        raise CompressorError(f"{p}: VecNormalize pickle has no obs_rms statistics")
    rms_fields = rms.fields()
    clip = fields.get("clip_obs")
    try:
        stats = NormStats(
            mean=_as_vector(rms_fields.get("mean"), "obs_rms.mean", p.name),
            var=_as_vector(rms_fields.get("var"), "obs_rms.var", p.name),
            clip_obs=None if clip is None or not np.isfinite(float(clip)) else float(clip),
            epsilon=float(fields.get("epsilon", 1e-8)),
            norm_obs=bool(fields.get("norm_obs", True)),
            count=float(rms_fields.get("count", 0.0)),
            source=p.name,
        )
    except (TypeError, ValueError, OverflowError) as exc:  # a field of the wrong kind
        detail = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
        raise CompressorError(f"{p}: malformed VecNormalize fields ({detail})") from None
    stats.validate(p.name)
    return stats
