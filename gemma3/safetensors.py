"""Strict safetensors reader (read-only memory map, zero copy), backed by the C reader.

Format: u64 little-endian header length N | N bytes of JSON | data. The JSON maps tensor names to
``{"dtype", "shape", "data_offsets": [begin, end]}`` relative to the data start, plus an optional
``__metadata__`` dict of strings. ``gemma3._core.Safetensors`` (csrc/io/safetensors.c) validates
everything at open time with its own strict JSON parser: header length against the file size and a
100 MB limit, UTF-8, duplicate keys, nesting depth, dtypes, non-negative integer dimensions with an
overflow-checked product, offsets inside the data region, byte sizes matching shape × dtype, no
overlaps. Malformed files raise :class:`gemma3.FormatError`, unknown dtypes
:class:`gemma3.UnsupportedError`, missing files :class:`OSError`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from . import _check
from ._core import FormatError, Safetensors, UnsupportedError

__all__ = ["DTYPES", "MAX_HEADER", "SafeTensor", "SafetensorsFile", "FormatError",
           "UnsupportedError"]

# safetensors dtype -> (numpy dtype or None, ggml type id, bytes per element)
DTYPES = {
    "F32": (np.dtype("<f4"), 0, 4),
    "F16": (np.dtype("<f2"), 1, 2),
    "BF16": (None, 30, 2),
    "F64": (np.dtype("<f8"), 28, 8),
    "I64": (np.dtype("<i8"), 27, 8),
    "I32": (np.dtype("<i4"), 26, 4),
    "I16": (np.dtype("<i2"), 25, 2),
    "I8": (np.dtype("i1"), 24, 1),
    "U8": (np.dtype("u1"), None, 1),
    "BOOL": (np.dtype("?"), None, 1),
}
MAX_HEADER = 100_000_000  # G3_ST_MAX_HEADER


@dataclass(frozen=True)
class SafeTensor:
    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int  # absolute file offsets
    end: int


class SafetensorsFile:
    """A validated safetensors file.

    ``tensors``: name -> :class:`SafeTensor` in header order; ``metadata``: the ``__metadata__``
    dict (str -> str, empty if absent). Views from :meth:`raw` keep the mapping alive.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = _check.path("path", path)
        self._f = Safetensors(self.path)
        self.metadata: dict[str, str] = self._f.metadata()
        self.tensors: dict[str, SafeTensor] = {}
        self._index: dict[str, int] = {}
        for i, (name, dt, shape, b, e) in enumerate(self._f.tensor_infos()):
            self.tensors[name] = SafeTensor(name, dt, shape, b, e)
            self._index[name] = i

    def raw(self, name: str) -> np.ndarray:
        """Read-only uint8 view of a tensor's bytes: ``(end - begin,) uint8``, zero copy."""
        if name not in self._index:
            raise KeyError(f"no tensor named {name!r} in {self.path}")
        return self._f.raw(self._index[name])

    def array(self, name: str) -> np.ndarray:
        """The tensor as float32 in its shape (BF16 widened exactly; other types converted)."""
        raw = self.raw(name)
        t = self.tensors[name]
        if t.dtype == "BF16":
            out = (raw.view("<u2").astype(np.uint32) << 16).view(np.float32)
        else:
            out = raw.view(DTYPES[t.dtype][0]).astype(np.float32)
        return out.reshape(t.shape)
