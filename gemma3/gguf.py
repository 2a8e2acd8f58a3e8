"""GGUF files: a validating reader (C, memory-mapped) and a writer (pure Python).

Reader::

    f = gemma3.GGUFFile("model.gguf")
    f.metadata["gemma3.block_count"]          # 18
    f.tensors["blk.0.attn_q.weight"]          # TensorInfo(shape=(1024, 640), type='Q5_0', ...)
    f.raw("blk.0.attn_q.weight")              # read-only uint8 view of the stored bytes, no copy
    f.dequantize("blk.0.attn_q.weight")       # (1024, 640) float32

Shapes are in NumPy order: a GGUF tensor with ``ne = [in, out]`` is ``(out, in)``.

Writer::

    w = GGUFWriter()
    w.add("general.architecture", "gemma3")
    w.add_tensor("token_embd.weight", array)                   # float32 -> stored F32
    w.add_tensor("blk.0.attn_q.weight", array, type="Q8_0")    # quantized by our C quantizers
    w.add_tensor_stream("blk.0.ffn_up.weight", (6912, 1152), "Q4_K", make_chunks)  # bytes at write()
    w.write("out.gguf")                                        # streamed: no whole-file copy

Value types are inferred (bool -> BOOL, int -> INT32/UINT32/INT64/UINT64 by range, float -> FLOAT32,
str -> STRING, list/ndarray -> ARRAY) or given explicitly with ``type=``.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from . import _check, _core

__all__ = ["GGUFFile", "GGUFWriter", "TensorInfo", "GGML_TYPES", "ggml_type_id"]

#: ggml type name -> id, for every id the format defines (removed ids omitted).
GGML_TYPES: dict[str, int] = {}
for _i in range(64):
    try:
        _name, _known, *_ = _core.type_info(_i)
    except Exception:  # ids past the table
        continue
    if _known:
        GGML_TYPES[_name] = _i


def ggml_type_id(t: str | int) -> int:
    """ggml type id from a name ('Q4_K', 'q8_0') or an id."""
    if isinstance(t, (int, np.integer)):
        return int(t)
    key = str(t).upper()
    if key not in GGML_TYPES:
        raise ValueError(f"unknown ggml type {t!r}; expected one of {sorted(GGML_TYPES)}")
    return GGML_TYPES[key]


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a GGUF file. ``shape`` is in NumPy order (outermost first)."""

    name: str
    shape: tuple[int, ...]
    type: str
    type_id: int
    nbytes: int
    offset: int  # absolute offset of the first byte in the file

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))


class GGUFFile:
    """A GGUF file, validated and memory-mapped read-only.

    Raises ``gemma3.FormatError`` (a ValueError) for malformed files, ``gemma3.UnsupportedError``
    for valid content this version cannot handle (e.g. removed tensor types), ``OSError`` naming
    the path when the file cannot be opened. Every length, count, offset and dimension is checked
    against the file size before use.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = _check.path("path", path)
        self._f = _core.GGUF(self.path)
        self._metadata: dict[str, Any] | None = None
        self._tensors: dict[str, TensorInfo] | None = None

    @property
    def version(self) -> int:
        return self._f.version

    @property
    def alignment(self) -> int:
        return self._f.alignment

    @property
    def data_offset(self) -> int:
        """File offset where the tensor data blob starts."""
        return self._f.data_offset

    @property
    def metadata(self) -> dict[str, Any]:
        """Every key/value pair: Python scalars and strings; numeric arrays as NumPy arrays,
        string arrays as lists of str (bytes that are not UTF-8 are kept as surrogate escapes)."""
        if self._metadata is None:
            self._metadata = self._f.metadata()
        return self._metadata

    @property
    def tensors(self) -> dict[str, TensorInfo]:
        """Tensor name -> TensorInfo, in file order."""
        if self._tensors is None:
            self._tensors = {
                name: TensorInfo(name, tuple(shape), tname, tid, nbytes, off)
                for name, shape, tid, tname, nbytes, off in self._f.tensor_infos()
            }
        return self._tensors

    def raw(self, name: str) -> np.ndarray:
        """Zero-copy read-only uint8 view of a tensor's stored bytes; keeps the file mapped."""
        return self._f.raw(name)

    def dequantize(self, name: str) -> np.ndarray:
        """The tensor as a new float32 array in NumPy order (bit-exact reference dequantization)."""
        return self._f.dequantize(name)

    def release(self, name: str) -> int:
        """Drops this process's resident pages of a tensor's bytes (whole pages; they are read
        again from the file if touched). Returns the bytes released (0 for a GGUF opened over a
        buffer)."""
        return self._f.release(name)

    def close(self) -> None:
        """Unmap the file. Raises BufferError while a view from ``raw()`` is alive."""
        self._f.close()

    @property
    def closed(self) -> bool:
        return self._f.closed

    def __enter__(self) -> GGUFFile:
        return self

    def __exit__(self, *exc) -> None:
        if not self._f.closed:
            try:
                self.close()
            except BufferError:
                pass  # views alive: the mapping is released with the last view

    def summary(self) -> str:
        """Human-readable overview: architecture, sizes, tensor type counts."""
        md = self.metadata
        arch = md.get("general.architecture", "?")
        lines = [f"{self.path}", f"  GGUF v{self.version}, {len(md)} metadata keys, "
                 f"{len(self.tensors)} tensors, alignment {self.alignment}"]
        for k, v in md.items():
            if isinstance(v, (list, np.ndarray)):
                v = f"<{type(v).__name__} of {len(v)}>"
            elif isinstance(v, str) and len(v) > 80:
                v = v[:77] + "..."
            if not k.startswith("tokenizer.") or "<" in str(v) or len(str(v)) < 40:
                lines.append(f"  {k} = {v}")
        counts: dict[str, int] = {}
        nbytes = 0
        for t in self.tensors.values():
            counts[t.type] = counts.get(t.type, 0) + 1
            nbytes += t.nbytes
        lines.append(f"  architecture {arch}; tensor bytes {nbytes / 2**20:.1f} MiB; types "
                     + ", ".join(f"{k}×{v}" for k, v in sorted(counts.items())))
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"GGUFFile({self.path!r})"


# ----------------------------------------------------------------------------------------------
# Writer

_VT = {"UINT8": 0, "INT8": 1, "UINT16": 2, "INT16": 3, "UINT32": 4, "INT32": 5, "FLOAT32": 6,
       "BOOL": 7, "STRING": 8, "ARRAY": 9, "UINT64": 10, "INT64": 11, "FLOAT64": 12}
_VT_FMT = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q",
           11: "<q", 12: "<d"}
_NP_VT = {np.dtype(np.uint8): 0, np.dtype(np.int8): 1, np.dtype(np.uint16): 2,
          np.dtype(np.int16): 3, np.dtype(np.uint32): 4, np.dtype(np.int32): 5,
          np.dtype(np.float32): 6, np.dtype(np.bool_): 7, np.dtype(np.uint64): 10,
          np.dtype(np.int64): 11, np.dtype(np.float64): 12}


def _int_type(v: int) -> int:
    if -(2**31) <= v < 2**31:
        return _VT["INT32"] if v < 0 else _VT["UINT32"]
    if 0 <= v < 2**64:
        return _VT["UINT64"] if v >= 2**63 else _VT["INT64"]
    if -(2**63) <= v < 0:
        return _VT["INT64"]
    raise OverflowError(f"integer {v} does not fit in 64 bits")


def _str_bytes(s: str | bytes) -> bytes:
    b = s if isinstance(s, bytes) else s.encode("utf-8", "surrogateescape")
    return struct.pack("<Q", len(b)) + b


class GGUFWriter:
    """Builds a GGUF v3 file in memory order: metadata, tensor infos, aligned data.

    The layout follows the reference reader strictly (tensors stored in info order, each padded to
    the alignment), so files are readable by llama.cpp as well as by ``GGUFFile``.
    """

    def __init__(self, alignment: int = 32):
        alignment = _check.integer("alignment", alignment)
        if alignment <= 0 or alignment & (alignment - 1):
            raise ValueError(f"alignment must be a power of two, got {alignment}")
        self.alignment = alignment
        self._kv: dict[str, bytes] = {}
        self._tensors: list[tuple[str, tuple[int, ...], int, bytes]] = []
        if alignment != 32:
            self.add("general.alignment", alignment, type="UINT32")

    def add(self, key: str, value: Any, type: str | None = None, elem_type: str | None = None):
        """Adds a metadata key. ``type``/``elem_type`` override the inferred GGUF value types."""
        if not _check.string("key", key):
            raise ValueError("metadata keys must be non-empty")
        if key in self._kv:
            raise ValueError(f"duplicate metadata key {key!r}")
        for arg, t in (("type", type), ("elem_type", elem_type)):
            if t is not None and (not isinstance(t, str) or t.upper() not in _VT):
                raise ValueError(f"metadata {key!r}: {arg} must be one of {sorted(_VT)}, "
                                 f"got {t!r}")
        try:
            blob = self._encode_value(value, type, elem_type)
        except (struct.error, OverflowError) as e:
            raise ValueError(f"metadata {key!r}: {value!r:.60} does not fit the value type "
                             f"({e})") from None
        self._kv[key] = _str_bytes(key) + blob

    def _check_new_name(self, name: str) -> None:
        """A tensor name not used yet, 1..63 bytes (GGML_MAX_NAME)."""
        _check.string("name", name)
        if any(n == name for n, *_ in self._tensors):
            raise ValueError(f"duplicate tensor name {name!r}")
        if not 0 < len(name.encode()) < 64:
            raise ValueError(f"tensor name {name!r} must be 1..63 bytes")

    def _encode_value(self, value, vtype, elem_type) -> bytes:
        if vtype is not None:
            vt = _VT[vtype.upper()]
        elif isinstance(value, (bool, np.bool_)):
            vt = _VT["BOOL"]
        elif isinstance(value, (int, np.integer)) and not isinstance(value, np.ndarray):
            vt = _VT_FROM_NP(value) if isinstance(value, np.integer) else _int_type(int(value))
        elif isinstance(value, (float, np.floating)):
            vt = _VT_FROM_NP(value) if isinstance(value, np.floating) else _VT["FLOAT32"]
        elif isinstance(value, (str, bytes)):
            vt = _VT["STRING"]
        elif isinstance(value, (list, tuple, np.ndarray)):
            vt = _VT["ARRAY"]
        else:
            raise TypeError(f"cannot store a {type(value).__name__} in GGUF metadata")
        if vt == _VT["STRING"]:
            return struct.pack("<i", vt) + _str_bytes(value)
        if vt != _VT["ARRAY"]:
            return struct.pack("<i", vt) + struct.pack(_VT_FMT[vt], value)
        if isinstance(value, np.ndarray):
            if value.ndim != 1:
                raise ValueError("metadata arrays must be 1-D")
            et = _VT[elem_type.upper()] if elem_type else _NP_VT.get(value.dtype)
            if et is None:
                raise TypeError(f"unsupported array dtype {value.dtype}")
            data = np.ascontiguousarray(value, dtype=np.dtype(_VT_FMT[et])).tobytes()
            return struct.pack("<iiQ", vt, et, len(value)) + data
        items = list(value)
        if elem_type:
            et = _VT[elem_type.upper()]
        elif all(isinstance(x, (str, bytes)) for x in items):
            et = _VT["STRING"]
        elif all(isinstance(x, bool) for x in items):
            et = _VT["BOOL"]
        elif all(isinstance(x, int) for x in items):
            et = max((_int_type(x) for x in items), default=_VT["INT32"],
                     key=lambda t: {5: 0, 4: 1, 11: 2, 10: 3}[t])
            if et == _VT["UINT32"] and any(x < 0 for x in items):
                et = _VT["INT64"]
        elif all(isinstance(x, (int, float)) for x in items):
            et = _VT["FLOAT32"]
        else:
            raise TypeError("metadata lists must hold one kind of value (nested arrays are not "
                            "allowed in GGUF)")
        head = struct.pack("<iiQ", vt, et, len(items))
        if et == _VT["STRING"]:
            return head + b"".join(_str_bytes(x) for x in items)
        return head + b"".join(struct.pack(_VT_FMT[et], x) for x in items)

    def add_tensor(self, name: str, array: np.ndarray, type: str | int | None = None,
                   raw_shape: tuple[int, ...] | None = None):
        """Adds a tensor given in NumPy order.

        ``array`` float data is converted to ``type`` (default F32 for float32 input, or the dtype's
        own type for float16) with our C quantizers; with ``raw_shape`` the array is taken as the
        already-encoded uint8 bytes of a tensor of that NumPy shape and ``type``.
        """
        self._check_new_name(name)
        if raw_shape is not None:
            tid = ggml_type_id(type if type is not None else "F32")
            data = np.ascontiguousarray(array, dtype=np.uint8).tobytes()
            shape = tuple(_check.integer("raw_shape item", s, 0) for s in raw_shape)
            tname, known, blck, type_size, *_ = _core.type_info(tid)
            need = int(np.prod(shape, dtype=object)) // blck * type_size if shape else 0
            if not known or (shape and shape[-1] % blck) or len(data) != need:
                raise ValueError(f"tensor {name!r}: raw_shape {shape} of type {tname} needs "
                                 f"{need} bytes (rows a multiple of {blck}), got {len(data)}")
        else:
            a = np.asarray(array)
            if type is None:
                type = {np.dtype(np.float16): "F16", np.dtype(np.int32): "I32"}.get(a.dtype, "F32")
            tid = ggml_type_id(type)
            shape = tuple(int(s) for s in a.shape)
            if tid == GGML_TYPES["F32"]:
                data = np.ascontiguousarray(a, dtype="<f4").tobytes()
            elif tid == GGML_TYPES["I32"]:
                data = np.ascontiguousarray(a, dtype="<i4").tobytes()
            else:
                flat = np.ascontiguousarray(a, dtype=np.float32).reshape(-1)
                data = _core.quantize(tid, flat).tobytes()
        if not 1 <= len(shape) <= 4:
            raise ValueError(f"tensor {name!r}: GGUF tensors have 1..4 dimensions, got {shape}")
        self._tensors.append((name, shape, tid, data))

    def add_tensor_stream(self, name: str, shape: tuple[int, ...], type: str | int,
                          chunks: Callable[[], Iterable[Any]]) -> None:
        """Adds a tensor whose encoded bytes are produced only while the file is written.

        ``shape`` is the NumPy shape, ``type`` the ggml type; ``chunks()`` is called once by
        :meth:`write` (or :meth:`to_bytes`) and returns an iterable of bytes-like pieces (bytes,
        uint8 arrays, ...) that together are exactly the tensor's encoded data, rows in order.
        Multi-gigabyte files can so be written piece by piece without holding them in memory.
        """
        self._check_new_name(name)
        shape = tuple(_check.integer("shape item", s) for s in shape)
        if not 1 <= len(shape) <= 4 or min(shape) < 0:
            raise ValueError(f"tensor {name!r}: GGUF tensors have 1..4 dimensions >= 0, "
                             f"got {shape}")
        tid = ggml_type_id(type)
        tname, known, blck, type_size, *_ = _core.type_info(tid)
        if not known:
            raise ValueError(f"tensor {name!r}: ggml type {tid} was removed from the format")
        if shape[-1] % blck:
            raise ValueError(f"tensor {name!r}: row length {shape[-1]} is not a multiple of the "
                             f"{tname} block size {blck}")
        nbytes = int(np.prod(shape, dtype=np.int64)) // blck * type_size
        self._tensors.append((name, shape, tid, _Stream(nbytes, chunks)))

    def _pieces(self) -> Iterator[Any]:
        """The file as a sequence of bytes-like pieces, in order."""
        head = bytearray(b"GGUF")
        head += struct.pack("<IQQ", 3, len(self._tensors), len(self._kv))
        for blob in self._kv.values():
            head += blob
        offset = 0
        for name, shape, tid, data in self._tensors:
            head += _str_bytes(name) + struct.pack("<I", len(shape))
            head += b"".join(struct.pack("<q", d) for d in reversed(shape))
            head += struct.pack("<iQ", tid, offset)
            offset += len(data) + (-len(data)) % self.alignment
        if self._tensors:
            head += b"\0" * ((-len(head)) % self.alignment)
        yield bytes(head)
        for name, _, _, data in self._tensors:
            if isinstance(data, _Stream):
                done = 0
                for piece in data.chunks():
                    piece = memoryview(piece).cast("B")
                    done += piece.nbytes
                    if done > data.nbytes:
                        raise ValueError(f"tensor {name!r}: chunks gave more than the "
                                         f"{data.nbytes} bytes its shape and type need")
                    yield piece
                if done != data.nbytes:
                    raise ValueError(f"tensor {name!r}: chunks gave {done} bytes, its shape "
                                     f"and type need {data.nbytes}")
            else:
                yield data
            if len(data) % self.alignment:
                yield b"\0" * ((-len(data)) % self.alignment)

    def to_bytes(self) -> bytes:
        return b"".join(self._pieces())

    def write(self, path: str | os.PathLike) -> None:
        """Writes the file piece by piece (streamed tensors are generated as they are written)."""
        with open(path, "wb") as f:
            for piece in self._pieces():
                f.write(piece)


class _Stream:
    """Byte count and producer of a tensor added with ``add_tensor_stream``."""

    __slots__ = ("nbytes", "chunks")

    def __init__(self, nbytes: int, chunks):
        self.nbytes, self.chunks = nbytes, chunks

    def __len__(self) -> int:
        return self.nbytes


def _VT_FROM_NP(v) -> int:  # noqa: N802 - small helper mirroring the table names
    return _NP_VT[np.asarray(v).dtype]
