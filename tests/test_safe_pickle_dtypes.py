"""numpy dtypes through the restricted unpickler: a pickled dtype state can neither mark float64
as holding object references (numpy then fails, unraisably, to free its arrays: the fuzz test's
"get_clear_loop not set for the DType 'float64'") nor resize a dtype that arrays already use
(they would read past their buffers); every real dtype still round-trips."""

from __future__ import annotations

import gc
import pickle
import sys
from typing import Any

import numpy as np
import pytest

from compressor.core.errors import CompressorError
from compressor.policy.importers.safe_pickle import safe_loads


@pytest.fixture
def unraisable(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Exceptions Python could not raise (in a destructor) while the test ran."""
    seen: list[str] = []
    monkeypatch.setattr(sys, "unraisablehook", lambda u: seen.append(repr(u.exc_value)))
    return seen


def _with_flags(obj: Any, flags: int) -> bytes:
    """``obj``'s protocol-2 pickle with its dtype state's flags byte (0 for float64) set."""
    data = bytearray(pickle.dumps(obj, protocol=2))
    at = data.index(b"K\x00t")  # BININT1 0 (the flags), then TUPLE: the dtype's state ends
    data[at + 1] = flags
    return bytes(data)


@pytest.mark.parametrize("flags", [1, 3, 17, 63])  # NPY_ITEM_REFCOUNT, + LIST_PICKLE, ...
def test_a_dtype_state_claiming_object_references_is_refused(
    flags: int, unraisable: list[str]
) -> None:
    for obj in (np.arange(3.0), np.dtype("float64")):
        with pytest.raises(CompressorError, match="dtype whose pickled state"):
            safe_loads(_with_flags(obj, flags), "stats.pkl")
    gc.collect()
    assert unraisable == []
    np.zeros(3)  # float64 itself is untouched: its arrays are created and freed as ever
    gc.collect()
    assert unraisable == [] and np.dtype("float64").flags == 0


def _global(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def test_a_dtype_in_use_is_never_resized(unraisable: list[str]) -> None:
    # dtype('V8') memoised, an array of two of them (16 bytes) made with it, then a BUILD that
    # gives the same dtype object an element size of 4096: applied in place, the array would
    # claim 8192 bytes over its 16
    data = (
        b"\x80\x02"
        + _global("numpy", "dtype")
        + b"X\x02\x00\x00\x00V8\x89\x88\x87Rq\x000"
        + _global("numpy.core.multiarray", "_reconstruct")
        + _global("numpy", "ndarray")
        + b"K\x00\x85C\x01b\x87R"
        + b"(K\x01K\x02\x85h\x00\x89C\x10"
        + b"\x00" * 16
        + b"tb"
        + b"h\x00(K\x03X\x01\x00\x00\x00|NNNM\x00\x10K\x01K\x00tb0."
    )
    arr = safe_loads(data, "stats.pkl")
    assert arr.dtype == np.dtype("V8") and arr.nbytes == 16 and len(arr.tobytes()) == 16
    del arr
    gc.collect()
    assert unraisable == []


@pytest.mark.parametrize(
    "value",
    [
        np.arange(4, dtype=np.float32),
        np.array(["ab", "c"]),
        np.array([1, "x", None], dtype=object),
        np.zeros(2, dtype=[("a", "f8"), ("b", "i4")]),
        np.zeros(2, dtype=np.dtype([("a", "f8"), ("b", "i1")], align=True)),
        np.zeros(2, dtype=("f8", (3,))),
        np.array(["2024-01-01"], dtype="datetime64[s]"),
        np.dtype(">i2"),
        np.float64(2.5),
    ],
    ids=repr,
)
@pytest.mark.parametrize("protocol", [2, 5])
def test_real_dtypes_still_load(value: Any, protocol: int, unraisable: list[str]) -> None:
    out = safe_loads(pickle.dumps({"v": value}, protocol=protocol), "ok.pkl")["v"]
    assert type(out) is type(value)
    if isinstance(value, np.ndarray):
        assert out.dtype == value.dtype and out.dtype.flags == value.dtype.flags
        np.testing.assert_array_equal(out, value)
    else:
        assert out == value
    del out
    gc.collect()
    assert unraisable == []
