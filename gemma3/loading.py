"""Opening a checkpoint: the argument checks of :func:`gemma3.load`, the file readers
(gemma3.loader, the vision loaders) and the memory policy (will the KV cache fit, is there room
for the packed weights). :func:`gemma3.model.load` wraps the result in a Model.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import _check, _core
from . import vision as _vision
from .config import Gemma3Config
from .gguf import GGUFFile
from .loader import build_core, is_hf_dir, load_gguf, load_hf_dir
from .tokenizer import Tokenizer


#: the types a KV cache can store (load(kv_dtype=)): ggml type id, bytes of a head row of d
#: elements. q8_0 is ggml's block_q8_0 (32 int8 and one fp16 scale), so head_dim % 32 == 0.
KV_DTYPES = {"f32": (0, lambda d: 4 * d), "f16": (1, lambda d: 2 * d),
             "bf16": (30, lambda d: 2 * d), "q8_0": (8, lambda d: d // 32 * 34)}


def check_kv_dtype(kv_dtype: str, head_dim: int | None = None) -> str:
    """The checked name of a KV cache type; ValueError naming what is wrong."""
    if not isinstance(kv_dtype, str) or kv_dtype not in KV_DTYPES:
        raise ValueError(f"kv_dtype must be one of {', '.join(map(repr, KV_DTYPES))}, "
                         f"got {kv_dtype!r}")
    if kv_dtype == "q8_0" and head_dim is not None and head_dim % 32:
        raise ValueError(f"kv_dtype='q8_0' stores blocks of 32 values per head, but this model's "
                         f"head_dim is {head_dim}; use 'f16' or 'bf16'")
    return kv_dtype


def kv_dtype_name(type_id: int) -> str:
    return next(k for k, (t, _) in KV_DTYPES.items() if t == type_id)

# Activations of the packed prefill GEMM (csrc/quant/packed.h), as base-256 digits per 32-block:
# "exact" 3 (24 bits: logits as the float kernels' within tests/tolerances.py); the opt-ins
# "int16" 2 and "int8" 1 (faster prompt processing, logits off by benchmarks/results/prefill.md's
# figures).
PREFILL_PRECISIONS = {"exact": 3, "int16": 2, "int8": 1}


def open_checkpoint(path: str | os.PathLike | None, n_threads: int | None,
                    max_seq_len: int | None, dtype: str | None,
                    mmproj: str | os.PathLike | None, pack: bool | None, prepare=None,
                    vision_dtype: str | None = None, kv_dtype: str = "f32",
                    prefill_precision: str = "exact"):
    """-> (core, config, tokenizer, path, owners, max_seq_len, vision, footprint): see gemma3.load.
    ``prepare(config, weights)``, if given, may change the weights dict before the C model is
    built (gemma3.adapters.merge_into). ``vision_dtype``: the tower's compute mode
    (gemma3.vision.vision_dtype: "bf16", "f32", None = the file's precision class)."""
    from ._default import default_model_path

    _vision.vision_dtype(vision_dtype)  # a bad value fails before anything is read
    check_kv_dtype(kv_dtype)
    if path is None:
        path = default_model_path()
    path = _check.path("path", path)
    if not os.path.exists(path):
        raise FileNotFoundError(2, "no such checkpoint file or directory", path)
    if n_threads is not None:
        if not isinstance(n_threads, int) or n_threads < 1:
            raise ValueError(f"n_threads must be a positive integer, got {n_threads!r}")
        _core.set_num_threads(n_threads)
    if dtype is not None and not isinstance(dtype, str):
        raise TypeError(f"dtype must be a str such as 'q8_0' or None, got {type(dtype).__name__}")
    vision = None
    if is_hf_dir(path):
        if mmproj is not None:
            raise ValueError("mmproj goes with a text GGUF; an HF directory carries its own "
                             "vision tower")
        cfg, weights, hf, owners = load_hf_dir(path, dtype)
        tok_path = os.path.join(path, "tokenizer.json")
        tokenizer = Tokenizer.from_hf_json(tok_path) if os.path.exists(tok_path) else None
        where = {name: s for s in owners for name in s.tensors}
        vision = _vision.load_hf_vision(path, hf, where, cfg.hidden_size, dtype, vision_dtype)
    else:
        cfg, weights, md, owners = load_gguf(path, dtype)
        tokenizer = (Tokenizer.from_gguf_metadata(md) if "tokenizer.ggml.tokens" in md
                     else None)
        if mmproj is not None:
            mmproj = _check.path("mmproj", mmproj)
            if not os.path.exists(mmproj):
                raise FileNotFoundError(2, "no such mmproj file", mmproj)
            vision = _vision.load_mmproj(mmproj, cfg.hidden_size, dtype, tokenizer,
                                         vision_dtype)
    if max_seq_len is None:
        max_seq_len = min(cfg.context_length, 32768)
    if isinstance(max_seq_len, bool) or not isinstance(max_seq_len, int) or max_seq_len < 1:
        raise ValueError(f"max_seq_len must be a positive integer, got {max_seq_len!r}")
    check_kv_dtype(kv_dtype, cfg.head_dim)
    check_cache_fits(cfg, max_seq_len, kv_dtype=kv_dtype)
    if prepare is not None:
        prepare(cfg, weights)
    if pack is None:
        pack = _pack_fits(weights)
    elif not isinstance(pack, bool):
        raise TypeError(f"pack must be True, False or None, got {pack!r}")
    if prefill_precision not in PREFILL_PRECISIONS:
        raise ValueError(f"prefill_precision must be one of {tuple(PREFILL_PRECISIONS)}, got "
                         f"{prefill_precision!r}")
    core = build_core(cfg, weights, max_seq_len, pack=pack, kv_type=KV_DTYPES[kv_dtype][0],
                      prefill_digits=PREFILL_PRECISIONS[prefill_precision])
    footprint = weight_footprint(weights, owners)
    if core.packed_bytes and isinstance(owners, GGUFFile):
        footprint.released = release_packed(owners)
    return core, cfg, tokenizer, path, owners, max_seq_len, vision, footprint


@dataclass
class Footprint:
    """Where a model's weights live: ``mapped`` bytes are read in place from the checkpoint
    ``files`` (page cache, shared with other processes), ``owned`` bytes were converted on load
    and live in this process; ``released``: mapped bytes whose pages were dropped after packing."""
    files: list[str] = field(default_factory=list)
    mapped: int = 0
    owned: int = 0
    released: int = 0


def _in_mapping(a: np.ndarray) -> bool:
    while isinstance(a, np.ndarray) and a.base is not None:
        a = a.base
    return not isinstance(a, np.ndarray)  # a reader's view object (GGUF / safetensors mapping)


def weight_footprint(weights: dict[str, Any], owners: Any) -> Footprint:
    fp = Footprint(files=[os.path.realpath(o.path) for o in
                          (owners if isinstance(owners, (list, tuple)) else [owners])
                          if getattr(o, "path", None)])
    for e in weights.values():
        a = e[-1] if isinstance(e, tuple) else e
        if isinstance(a, np.ndarray):
            if _in_mapping(a):
                fp.mapped += a.nbytes
            else:
                fp.owned += a.nbytes
    return fp


def release_packed(f: GGUFFile) -> int:
    """After packing: drop the resident file pages of every matrix the packed kernels read from
    their copy (a packed model otherwise holds each matrix twice). A matrix still read in place
    (the embedding's rows) brings back only the pages it touches."""
    return sum(f.release(name) for name, t in f.tensors.items()
               if len(t.shape) == 2 and _core.packed_supported(t.type_id))


def _smaps_rss(files: list[str]) -> int | None:
    """Resident bytes of this process's mappings of ``files`` (/proc/self/smaps), or None."""
    try:
        text = open("/proc/self/smaps").read()
    except OSError:
        return None
    total, inside = 0, False
    for line in text.splitlines():
        head = line.split(None, 5)
        if head and "-" in head[0] and len(head) >= 5 and ":" not in head[0]:
            inside = len(head) == 6 and head[5].strip() in files
        elif inside and line.startswith("Rss:"):
            total += int(line.split()[1]) * 1024
    return total


def _process_rss() -> int | None:
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def memory(engine, footprint: Footprint, vision) -> dict[str, int | None]:
    """Model.memory(): bytes by kind (see its docstring)."""
    core = engine.core
    out = {"weights_mapped": footprint.mapped,
           "weights_mapped_resident": _smaps_rss(footprint.files),
           "weights_packed": core.packed_bytes,
           "weights_owned": footprint.owned,
           "vision": vision.nbytes if vision is not None else 0,
           "kv_cache": core.cache_bytes * core.n_seq,
           "run_state": core.run_bytes}
    resident = out["weights_mapped_resident"]
    out["total"] = sum(v for k, v in out.items() if k != "weights_mapped" and v is not None) + \
        (footprint.mapped if resident is None else 0)
    out["process_rss"] = _process_rss()
    return out


def _pack_fits(weights: dict[str, Any]) -> bool:
    """Whether repacking the matrices for the integer decode kernels takes at most half of the
    memory available now (an upper bound: every matrix of a packable type counts)."""
    need = sum(e[3].nbytes for e in weights.values()
               if isinstance(e, tuple) and _core.packed_supported(e[0]))
    try:
        with open("/proc/meminfo") as f:
            avail = next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return True
    return need <= avail // 2


def kv_cache_bytes(cfg: Gemma3Config, max_seq_len: int, kv_dtype: str = "f32") -> int:
    """Bytes one sequence's KV cache reserves: K and V of ``kv_dtype``; global layers hold every
    position, local layers a ring of min(window + KV_RING_MARGIN, max_seq_len) slots (the margin:
    history kept for rollback, see csrc/model/state.h). Computed, never allocated."""
    per_pos = 2 * KV_DTYPES[check_kv_dtype(kv_dtype, cfg.head_dim)][1](cfg.head_dim)
    per_pos *= cfg.num_kv_heads
    n_global = len(cfg.global_layers)
    local = (min(cfg.sliding_window + _core.KV_RING_MARGIN, max_seq_len) if cfg.sliding_window
             else max_seq_len)
    return per_pos * (n_global * max_seq_len + (cfg.num_layers - n_global) * local)


def check_cache_fits(cfg: Gemma3Config, max_seq_len: int, n_seq: int = 1,
                     kv_dtype: str = "f32") -> None:
    """MemoryError before allocating when the KV cache could never fit in this machine's RAM."""
    need = n_seq * kv_cache_bytes(cfg, max_seq_len, kv_dtype)
    try:
        ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return
    if need > ram:
        raise MemoryError(f"a {kv_dtype} KV cache for max_seq_len={max_seq_len} needs "
                          f"{need / 2**30:.1f} GiB "
                          f"but this machine has {ram / 2**30:.1f} GiB of RAM; lower max_seq_len")


def set_num_threads(n: int) -> None:
    """Threads used by every model in this process (OpenMP and BLAS). 0 = all cores."""
    _core.set_num_threads(_check.integer("n_threads", n, 0))
