"""Long context on the 270M model: a 32,768-token prompt, KV-cache memory measured.

    python benchmarks/bench_context.py [--model PATH] [--threads 2] [--ctx 32768] [--no-peer]

Prints prefill tokens/s of 512-token chunks at depths 0, 8K, 16K and 32K - 512, decode tokens/s at
the full depth, and the KV-cache bytes: reserved by gemma3 (measured from the cache buffers)
against the theoretical size of (a) every layer global and (b) Gemma 3's 5 local : 1 global
layout with a ring of `window` slots on local layers — the memory claim, measured. llama.cpp (F16
cache, its default) runs the same prompt in the same process when llama-cpp-python is installed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np

import gemma3
from gemma3 import _core

CHUNK = 512


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ctx", type=int, default=32768)
    ap.add_argument("--no-peer", action="store_true")
    ap.add_argument("--peer-no-extra-bufts", action="store_true")
    a = ap.parse_args(argv)
    path = str(a.model or gemma3.default_model_path())
    gemma3.set_num_threads(a.threads)
    n = a.ctx
    rng = np.random.default_rng(7)
    ids = np.concatenate([[2], rng.integers(1000, 200000, n + 64)]).astype(np.int32)
    marks = sorted({0, 8192, 16384, n - CHUNK} & set(range(0, n, CHUNK)) | {n - CHUNK})

    model = gemma3.load(path, max_seq_len=n + 64)
    cfg = model.config
    core = model.engine.core
    pp_at: dict[int, float] = {}
    t_all = time.perf_counter()
    for s in range(0, n, CHUNK):
        t = time.perf_counter()
        core.forward(ids[s:s + CHUNK], 1 if s + CHUNK >= n else 0)
        if s in marks:
            pp_at[s] = CHUNK / (time.perf_counter() - t)
    t_all = time.perf_counter() - t_all
    steps = []
    for i in range(32):
        t = time.perf_counter()
        core.forward(ids[n + i:n + i + 1], 1)
        steps.append(time.perf_counter() - t)
    tg = 1.0 / statistics.median(steps)
    model.engine.ids = ids[:core.n_past].tolist()  # the loop above drove the C core directly
    kv = model.kv_cache
    per_pos = 2 * 4 * cfg.num_kv_heads * cfg.head_dim  # K and V, float32
    n_glob = len(cfg.global_layers)
    theo_all_global = cfg.num_layers * (n + 64) * per_pos
    theo_5_1 = per_pos * (n_glob * (n + 64) + (cfg.num_layers - n_glob) * cfg.sliding_window)
    measured = kv.nbytes
    used = sum(kv[i].nbytes for i in range(cfg.num_layers))

    peer = None
    if not a.no_peer:
        try:
            sys.path.insert(0, os.path.dirname(__file__))
            from bench_generate import llama_open

            llm = llama_open(path, a.threads, n + 64, not a.peer_no_extra_bufts)
            peer_pp: dict[int, float] = {}
            toks = ids.tolist()
            for s in range(0, n, CHUNK):
                t = time.perf_counter()
                llm.eval(toks[s:s + CHUNK])
                if s in marks:
                    peer_pp[s] = CHUNK / (time.perf_counter() - t)
            psteps = []
            for i in range(32):
                t = time.perf_counter()
                llm.eval([toks[n + i]])
                psteps.append(time.perf_counter() - t)
            peer = (peer_pp, 1.0 / statistics.median(psteps))
        except ImportError:
            print("llama-cpp-python not installed: no peer column", file=sys.stderr)

    print(f"model {path}; {a.threads} threads; prompt {n} tokens in chunks of {CHUNK}; "
          f"whole prefill {t_all:.1f} s ({n / t_all:.1f} t/s)")
    print("| measure | gemma3 t/s | llama.cpp t/s | ratio |")
    print("|:--|--:|--:|--:|")
    for s in marks:
        p = peer[0].get(s) if peer else None
        r = f"{pp_at[s] / p:.2f}x" if p else "-"
        print(f"| pp{CHUNK} at depth {s} | {pp_at[s]:.1f} | {p and f'{p:.1f}' or '-'} | {r} |")
    p = peer[1] if peer else None
    print(f"| tg at depth {n} | {tg:.1f} | {p and f'{p:.1f}' or '-'} | "
          f"{f'{tg / p:.2f}x' if p else '-'} |")
    print()
    print(f"KV cache (float32 K and V, max_seq_len {n + 64}):")
    print(f"  measured reserved by gemma3:     {measured / 2**20:9.1f} MiB "
          f"(holding {used / 2**20:.1f} MiB of live positions)")
    print(f"  theoretical, 5:1 local/global:   {theo_5_1 / 2**20:9.1f} MiB")
    print(f"  theoretical, every layer global: {theo_all_global / 2**20:9.1f} MiB "
          f"-> the layout saves {theo_all_global / measured:.1f}x")
    print(kv.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
