"""Strict safetensors reader (read-only memory map, zero copy).

Format: u64 little-endian header length N | N bytes of JSON | data. The JSON maps tensor names to
``{"dtype", "shape", "data_offsets": [begin, end]}`` relative to the data start, plus an optional
``__metadata__`` dict of strings. Everything is validated before use: header length against the
file size, JSON shape, dtypes, non-negative integer dimensions, offsets inside the data region,
byte sizes matching shape × dtype, no overlaps, no duplicate keys.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np

from ._core import FormatError, UnsupportedError

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
MAX_HEADER = 100 * 2**20


@dataclass(frozen=True)
class SafeTensor:
    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int  # absolute file offsets
    end: int


def _reject_duplicates(pairs):
    d = {}
    for k, v in pairs:
        if k in d:
            raise FormatError(f"duplicate key {k!r} in the safetensors header")
        d[k] = v
    return d


class SafetensorsFile:
    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        size = os.path.getsize(self.path)
        with open(self.path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise FormatError(f"{self.path}: file of {size} bytes is too short for a "
                                  "safetensors header")
            n = int.from_bytes(head, "little")
            if n > MAX_HEADER or n > size - 8:
                raise FormatError(f"{self.path}: header length {n} exceeds the file "
                                  f"({size} bytes) or the {MAX_HEADER}-byte limit")
            raw = f.read(n)
        try:
            header = json.loads(raw.decode("utf-8"), object_pairs_hook=_reject_duplicates)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise FormatError(f"{self.path}: header is not valid UTF-8 JSON: {e}") from None
        if not isinstance(header, dict):
            raise FormatError(f"{self.path}: header must be a JSON object")
        self.metadata = header.pop("__metadata__", None) or {}
        if not isinstance(self.metadata, dict):
            raise FormatError(f"{self.path}: __metadata__ must be an object")
        data_start = 8 + n
        data_len = size - data_start
        self.tensors: dict[str, SafeTensor] = {}
        spans = []
        for name, info in header.items():
            if not isinstance(info, dict) or set(info) - {"dtype", "shape", "data_offsets"}:
                raise FormatError(f"{self.path}: tensor {name!r}: bad entry {info!r}")
            dt, shape, offs = info.get("dtype"), info.get("shape"), info.get("data_offsets")
            if dt not in DTYPES:
                raise UnsupportedError(f"{self.path}: tensor {name!r} has dtype {dt!r}; "
                                       f"supported: {sorted(DTYPES)}")
            if (not isinstance(shape, list) or len(shape) > 8
                    or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                               for d in shape)):
                raise FormatError(f"{self.path}: tensor {name!r} has invalid shape {shape!r}")
            if (not isinstance(offs, list) or len(offs) != 2
                    or not all(isinstance(o, int) and not isinstance(o, bool) for o in offs)):
                raise FormatError(f"{self.path}: tensor {name!r} has invalid data_offsets {offs!r}")
            b, e = offs
            count = 1
            for d in shape:
                count *= d
            nbytes = count * DTYPES[dt][2]
            if not 0 <= b <= e <= data_len:
                raise FormatError(f"{self.path}: tensor {name!r}: data_offsets [{b}, {e}) "
                                  f"outside the {data_len}-byte data region")
            if e - b != nbytes:
                raise FormatError(f"{self.path}: tensor {name!r}: {e - b} bytes stored but shape "
                                  f"{shape} of {dt} needs {nbytes}")
            self.tensors[name] = SafeTensor(name, dt, tuple(shape), data_start + b, data_start + e)
            if e > b:
                spans.append((b, e, name))
        spans.sort()
        for (b0, e0, n0), (b1, _, n1) in zip(spans, spans[1:]):
            if b1 < e0:
                raise FormatError(f"{self.path}: tensors {n0!r} and {n1!r} overlap")
        self._map = np.memmap(self.path, dtype=np.uint8, mode="r") if size else None

    def raw(self, name: str) -> np.ndarray:
        """Read-only uint8 view of a tensor's bytes."""
        t = self.tensors[name]
        return self._map[t.begin:t.end]

    def array(self, name: str) -> np.ndarray:
        """The tensor as float32 (BF16 widened exactly; other float types converted)."""
        t = self.tensors[name]
        raw = self.raw(name)
        if t.dtype == "BF16":
            out = (raw.view("<u2").astype(np.uint32) << 16).view(np.float32)
        else:
            out = raw.view(DTYPES[t.dtype][0]).astype(np.float32)
        return out.reshape(t.shape)
