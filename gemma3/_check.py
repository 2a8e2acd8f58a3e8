"""Argument checks shared by the public API.

Each helper returns the value converted to a plain Python type, or raises ``TypeError`` (wrong
kind of value) or ``ValueError`` (right kind, out of range), always naming the argument and what
was expected. Bools are not integers here: ``max_new_tokens=True`` is a mistake, not 1.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

_INTS = (int, np.integer)
_REALS = (int, float, np.integer, np.floating)


def _is_bool(v: Any) -> bool:
    return isinstance(v, (bool, np.bool_))


def _got(v: Any) -> str:
    return f"{type(v).__name__} {v!r}" if len(repr(v)) < 60 else type(v).__name__


def integer(name: str, v: Any, lo: int | None = None, hi: int | None = None) -> int:
    """An int (or NumPy integer) in [lo, hi] (either bound optional)."""
    if _is_bool(v) or not isinstance(v, _INTS):
        raise TypeError(f"{name} must be an integer, got {_got(v)}")
    v = int(v)
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        if hi is None:
            raise ValueError(f"{name} must be >= {lo}, got {v}")
        if lo is None:
            raise ValueError(f"{name} must be <= {hi}, got {v}")
        raise ValueError(f"{name} must be in [{lo}, {hi}], got {v}")
    return v


def number(name: str, v: Any, lo: float | None = None, hi: float | None = None, *,
           lo_open: bool = False, finite: bool = True) -> float:
    """A real number (not NaN; finite unless ``finite=False``) in [lo, hi], or (lo, hi] with
    ``lo_open``."""
    if _is_bool(v) or not isinstance(v, _REALS):
        raise TypeError(f"{name} must be a number, got {_got(v)}")
    v = float(v)
    if math.isnan(v) or (finite and math.isinf(v)):
        raise ValueError(f"{name} must be a {'finite ' if finite else ''}number, got {v}")
    low_bad = lo is not None and (v <= lo if lo_open else v < lo)
    if low_bad or (hi is not None and v > hi):
        left = "(" if lo_open else "["
        if hi is None:
            raise ValueError(f"{name} must be {'>' if lo_open else '>='} {lo}, got {v}")
        raise ValueError(f"{name} must be in {left}{lo}, {hi}], got {v}")
    return v


def boolean(name: str, v: Any) -> bool:
    if not _is_bool(v):
        raise TypeError(f"{name} must be True or False, got {_got(v)}")
    return bool(v)


def string(name: str, v: Any) -> str:
    if not isinstance(v, str):
        raise TypeError(f"{name} must be a str, got {_got(v)}")
    return v


def path(name: str, v: Any) -> str:
    """A filesystem path (str, bytes or os.PathLike) as str."""
    if not isinstance(v, (str, bytes, os.PathLike)):
        raise TypeError(f"{name} must be a path (str or os.PathLike), got {_got(v)}")
    return os.fsdecode(v)


_I32 = np.iinfo(np.int32)


def as_ids(seq: Any, flatten: bool = False, what: str = "token ids") -> list[int]:
    """Token ids as Python ints; floats, bools and strings raise ValueError (never truncated).
    ``flatten`` also takes a (1, n) batch of one. ``what`` names the argument in messages.

    Only the representation is decided here (the C core takes int32); whether an id is in the
    vocabulary is the C core's rule (g3_model_check_tokens, see gemma3.engine)."""
    if isinstance(seq, (str, bytes)) or not isinstance(seq, (Sequence, np.ndarray)):
        raise TypeError(f"{what} must be a str or a sequence of token ids, got "
                        f"{type(seq).__name__}")
    if not isinstance(seq, np.ndarray) and any(isinstance(t, (bool, np.bool_)) for t in seq):
        raise ValueError(f"{what} must be integers, got a bool")
    arr = np.asarray(seq)
    if flatten and arr.ndim == 2 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.size == 0:
        return []
    if arr.dtype.kind not in "iu" or arr.ndim != 1:
        raise ValueError(f"{what} must be a 1-D sequence of integers, got dtype {arr.dtype} "
                         f"and shape {arr.shape}")
    out = arr.tolist()
    if arr.dtype.itemsize > 4 or arr.dtype == np.uint32:
        bad = np.nonzero((arr < _I32.min) | (arr > _I32.max))[0]
        if len(bad):
            i = int(bad[0])
            raise ValueError(f"token id {out[i]} at index {i} does not fit in int32 ({what})")
    return out
