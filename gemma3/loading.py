"""Opening a checkpoint: the argument checks of :func:`gemma3.load`, the file readers
(gemma3.loader, the vision loaders) and the memory policy (will the KV cache fit, is there room
for the packed weights). :func:`gemma3.model.load` wraps the result in a Model.
"""

from __future__ import annotations

import os
from typing import Any

from . import _check, _core
from . import vision as _vision
from .config import Gemma3Config
from .loader import build_core, is_hf_dir, load_gguf, load_hf_dir
from .tokenizer import Tokenizer


# Activations of the packed prefill GEMM (csrc/quant/packed.h): "exact" 24 bits per 32-block
# (logits as the float kernels' within tests/tolerances.py), "int8" 8 bits (opt-in: faster prompt
# processing, logits off by benchmarks/results/prefill.md's figures).
PREFILL_PRECISIONS = ("exact", "int8")


def open_checkpoint(path: str | os.PathLike | None, n_threads: int | None,
                    max_seq_len: int | None, dtype: str | None,
                    mmproj: str | os.PathLike | None, pack: bool | None, prepare=None,
                    prefill_precision: str = "exact"):
    """-> (core, config, tokenizer, path, owners, max_seq_len, vision): see gemma3.load.
    ``prepare(config, weights)``, if given, may change the weights dict before the C model is
    built (gemma3.adapters.merge_into)."""
    from ._default import default_model_path

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
        vision = _vision.load_hf_vision(path, hf, where, cfg.hidden_size, dtype)
    else:
        cfg, weights, md, owners = load_gguf(path, dtype)
        tokenizer = (Tokenizer.from_gguf_metadata(md) if "tokenizer.ggml.tokens" in md
                     else None)
        if mmproj is not None:
            mmproj = _check.path("mmproj", mmproj)
            if not os.path.exists(mmproj):
                raise FileNotFoundError(2, "no such mmproj file", mmproj)
            vision = _vision.load_mmproj(mmproj, cfg.hidden_size, dtype, tokenizer)
    if max_seq_len is None:
        max_seq_len = min(cfg.context_length, 32768)
    if isinstance(max_seq_len, bool) or not isinstance(max_seq_len, int) or max_seq_len < 1:
        raise ValueError(f"max_seq_len must be a positive integer, got {max_seq_len!r}")
    check_cache_fits(cfg, max_seq_len)
    if prepare is not None:
        prepare(cfg, weights)
    if pack is None:
        pack = _pack_fits(weights)
    elif not isinstance(pack, bool):
        raise TypeError(f"pack must be True, False or None, got {pack!r}")
    if prefill_precision not in PREFILL_PRECISIONS:
        raise ValueError(f"prefill_precision must be one of {PREFILL_PRECISIONS}, got "
                         f"{prefill_precision!r}")
    core = build_core(cfg, weights, max_seq_len, pack=pack,
                      prefill_int8=prefill_precision == "int8")
    return core, cfg, tokenizer, path, owners, max_seq_len, vision


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


def kv_cache_bytes(cfg: Gemma3Config, max_seq_len: int) -> int:
    """Bytes one sequence's KV cache reserves: float32 K and V; global layers hold every
    position, local layers a ring of min(window + KV_RING_MARGIN, max_seq_len) slots (the margin:
    history kept for rollback, see csrc/model/state.h)."""
    per_pos = 2 * 4 * cfg.num_kv_heads * cfg.head_dim
    n_global = len(cfg.global_layers)
    local = (min(cfg.sliding_window + _core.KV_RING_MARGIN, max_seq_len) if cfg.sliding_window
             else max_seq_len)
    return per_pos * (n_global * max_seq_len + (cfg.num_layers - n_global) * local)


def check_cache_fits(cfg: Gemma3Config, max_seq_len: int, n_seq: int = 1) -> None:
    """MemoryError before allocating when the KV cache could never fit in this machine's RAM."""
    need = n_seq * kv_cache_bytes(cfg, max_seq_len)
    try:
        ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return
    if need > ram:
        raise MemoryError(f"a KV cache for max_seq_len={max_seq_len} needs {need / 2**30:.1f} GiB "
                          f"but this machine has {ram / 2**30:.1f} GiB of RAM; lower max_seq_len")


def set_num_threads(n: int) -> None:
    """Threads used by every model in this process (OpenMP and BLAS). 0 = all cores."""
    _core.set_num_threads(_check.integer("n_threads", n, 0))
