"""llama-bench-style table: gemma3 vs llama.cpp on the same GGUF, same threads, same run.

    python benchmarks/bench_generate.py [--model PATH] [--threads 1 2] [--depths 0 4096]
                                        [--reps 3] [--no-peer]

Columns: pp512 (prompt processing, tokens/s over a 512-token batch) and tg128 (generation,
tokens/s over 128 single-token steps), each after `depth` tokens already in the cache; median of
--reps runs after a warm-up. The peer is llama.cpp through llama-cpp-python (its version is
printed), with the same thread count, batch 512 and an F16 KV cache (its default).

Also printed: decode memory traffic (bytes of weights read per token x tokens/s) next to a
streaming-read probe of this machine, and gemma3's per-op breakdown of one decode step.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import numpy as np

import gemma3
from gemma3 import _core

PP, TG = 512, 128


def cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    fl = set(line.split(":")[1].split())
                    keep = ["avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni",
                            "avx512_bf16"]
                    return " ".join(k for k in keep if k in fl)
    except OSError:
        pass
    return platform.machine()


def tokens_for(n: int, vocab: int, seed: int) -> list[int]:
    rng = np.random.default_rng(seed)
    return [2] + rng.integers(1000, min(vocab, 200000), n - 1).tolist()


# ---------------------------------------------------------------------------------------------
# gemma3

def g3_run(model, depth: int, reps: int):
    ctx = tokens_for(depth + PP + TG + 8, model.config.vocab_size, 1)
    pp, tg = [], []
    for r in range(reps + 1):  # first round is the warm-up
        core = model.engine.core
        core.reset(0)
        if depth:
            for s in range(0, depth, 512):
                core.forward(np.asarray(ctx[s:min(s + 512, depth)], np.int32), 0)
        t = time.perf_counter()
        core.forward(np.asarray(ctx[depth:depth + PP], np.int32), 1)
        t_pp = time.perf_counter() - t
        # tg: single-token steps after depth (cache truncated back to depth)
        core.reset(0)
        if depth:
            for s in range(0, depth, 512):
                core.forward(np.asarray(ctx[s:min(s + 512, depth)], np.int32), 0)
        else:
            core.forward(np.asarray(ctx[:1], np.int32), 1)
        t = time.perf_counter()
        for i in range(TG):
            lg = core.forward(np.asarray([ctx[depth + 1 + i]], np.int32), 1)
            int(lg[0].argmax())  # what a greedy loop does with the logits
        t_tg = time.perf_counter() - t
        if r:
            pp.append(PP / t_pp)
            tg.append(TG / t_tg)
    return statistics.median(pp), statistics.median(tg)


def g3_breakdown(model, steps: int = 32) -> dict[str, float]:
    core = model.engine.core
    core.reset(0)
    core.forward(np.asarray(tokens_for(16, model.config.vocab_size, 3), np.int32), 1)
    core.profile(True)
    for i in range(steps):
        core.forward(np.asarray([1000 + i], np.int32), 1)
    p = core.profile(False)
    return {k: v / steps for k, v in p.items() if k not in ("forwards", "tokens")}


# ---------------------------------------------------------------------------------------------
# llama.cpp

def llama_open(path: str, threads: int, n_ctx: int, extra_bufts: bool = True,
               logits_all: bool = False):
    """extra_bufts=False turns off llama.cpp's extra buffer types (weight repacking, AMX): a
    wheel built with -march=native on a CPU that advertises AMX dies with SIGILL where the kernel
    does not grant AMX state, as on some VMs."""
    import llama_cpp
    import llama_cpp.llama_cpp as ll

    if not extra_bufts and not getattr(ll, "_g3_patched", False):
        orig = ll.llama_model_default_params

        def params():
            p = orig()
            p.use_extra_bufts = False
            return p

        ll.llama_model_default_params = params
        ll._g3_patched = True
    return llama_cpp.Llama(model_path=path, n_threads=threads, n_threads_batch=threads,
                           n_ctx=n_ctx, n_batch=512, n_ubatch=512, logits_all=logits_all,
                           verbose=False)


def llama_run(llm, depth: int, reps: int, vocab: int):
    import llama_cpp

    ctx = tokens_for(depth + PP + TG + 8, vocab, 1)
    pp, tg = [], []

    def clear():
        llm.reset()
        mem = llama_cpp.llama_get_memory(llm.ctx) if hasattr(llama_cpp, "llama_get_memory") \
            else None
        if mem is not None:
            llama_cpp.llama_memory_clear(mem, True)
        else:
            llama_cpp.llama_kv_cache_clear(llm.ctx)

    for r in range(reps + 1):
        clear()
        if depth:
            llm.eval(ctx[:depth])
        t = time.perf_counter()
        llm.eval(ctx[depth:depth + PP])
        t_pp = time.perf_counter() - t
        clear()
        llm.eval(ctx[:depth] if depth else ctx[:1])
        t = time.perf_counter()
        for i in range(TG):
            llm.eval([ctx[depth + 1 + i]])
        t_tg = time.perf_counter() - t
        if r:
            pp.append(PP / t_pp)
            tg.append(TG / t_tg)
    return statistics.median(pp), statistics.median(tg)


# ---------------------------------------------------------------------------------------------

def bandwidth_probe(threads: int, mib: int = 1024, reps: int = 5) -> float:
    """GB/s of the best streaming read we know (read_bandwidth: wide loads, 4 KiB software
    prefetch) over an array on 2 MiB pages where the kernel allows them, as the packed weights
    are: the decode kernels are judged against the same conditions."""
    import mmap

    _core.set_num_threads(threads)
    buf = mmap.mmap(-1, mib * 2**20)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        try:
            buf.madvise(mmap.MADV_HUGEPAGE)
        except OSError:
            pass
    a = np.frombuffer(buf, np.float32)
    a[:] = 1.0
    _core.read_bandwidth(a)
    return a.nbytes / statistics.median(_core.read_bandwidth(a)[0] for _ in range(reps)) / 1e9


def weight_bytes_per_token(path: str, packed_bytes: int) -> tuple[int, int]:
    """(bytes of weights in the file, bytes a decode step reads). With packing the packed copies
    replace every matrix of a packable type; an untied token_embd is then only read one row per
    token and is left out."""
    f = gemma3.GGUFFile(path)
    in_file = sum(t.nbytes for t in f.tensors.values())
    if not packed_bytes:
        return in_file, in_file
    rest = sum(t.nbytes for t in f.tensors.values()
               if len(t.shape) < 2 or not _core.packed_supported(t.type_id))
    return in_file, packed_bytes + rest


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--depths", type=int, nargs="+", default=[0, 4096])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--no-peer", action="store_true")
    ap.add_argument("--no-pack", action="store_true",
                    help="gemma3 with load(pack=False): the float dequantize-and-dot decode kernels")
    ap.add_argument("--peer-no-extra-bufts", action="store_true",
                    help="disable llama.cpp's repacked/AMX buffers (needed for AMX builds on "
                         "machines without AMX permission)")
    a = ap.parse_args(argv)
    path = str(a.model or gemma3.default_model_path())
    n_ctx = max(a.depths) + PP + TG + 16
    peer = None
    if not a.no_peer:
        try:
            import llama_cpp

            peer = f"llama.cpp via llama-cpp-python {llama_cpp.__version__}" + (
                " (extra buffer types off)" if a.peer_no_extra_bufts else "")
        except ImportError:
            print("llama-cpp-python is not installed: `pip install llama-cpp-python` to compare",
                  file=sys.stderr)
    print(f"model: {path}")
    print(f"cpu: {os.cpu_count()} cores, flags: {cpu_flags()}; gemma3 kernels: "
          f"{_core.isa()['selected']}; peer: {peer or 'none'}")
    print(f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')} "
          f"GOMP_SPINCOUNT={os.environ.get('GOMP_SPINCOUNT')}; load average {os.getloadavg()}")
    rows = []
    tg2 = None
    packed = 0
    for th in a.threads:
        gemma3.set_num_threads(th)
        model = gemma3.load(path, max_seq_len=n_ctx, pack=False if a.no_pack else None)
        packed = model.packed_bytes
        llm = llama_open(path, th, n_ctx, not a.peer_no_extra_bufts) if peer else None
        for d in a.depths:
            g_pp, g_tg = g3_run(model, d, a.reps)
            l_pp, l_tg = llama_run(llm, d, a.reps, model.config.vocab_size) if llm else (None,
                                                                                          None)
            rows.append((th, d, g_pp, l_pp, g_tg, l_tg))
            if d == 0 and th == max(a.threads):
                tg2 = g_tg
            print(f"  measured threads={th} depth={d}", file=sys.stderr)
        if th == max(a.threads):
            breakdown = g3_breakdown(model)
        del model, llm

    def ratio(x, y):
        return f"{x / y:6.2f}x" if x and y else "     -"

    def num(x):
        return f"{x:9.1f}" if x else "        -"

    print()
    print("| threads | depth | test  | gemma3 t/s | llama.cpp t/s | ratio |")
    print("|--------:|------:|:------|-----------:|--------------:|------:|")
    for th, d, g_pp, l_pp, g_tg, l_tg in rows:
        print(f"| {th:7d} | {d:5d} | pp{PP} | {num(g_pp)}  | {num(l_pp)}     | {ratio(g_pp, l_pp)} |")
        print(f"| {th:7d} | {d:5d} | tg{TG} | {num(g_tg)}  | {num(l_tg)}     | {ratio(g_tg, l_tg)} |")
    in_file, bpt = weight_bytes_per_token(path, packed)
    print(f"\ngemma3 decode kernels: " + (f"packed integer (VNNI), {packed / 2**20:.1f} MiB packed"
                                          if packed else "float dequantize-and-dot"))
    bw = bandwidth_probe(max(a.threads))
    if tg2:
        ach = bpt * tg2 / 1e9
        print(f"decode memory traffic: {bpt / 2**20:.1f} MiB of weights read per token (the file "
              f"holds {in_file / 2**20:.1f} MiB) x {tg2:.1f} t/s "
              f"= {ach:.2f} GB/s; streaming-read probe ({max(a.threads)} threads, 1 GiB): "
              f"{bw:.2f} GB/s -> {100 * ach / bw:.0f}% of the roofline "
              f"(roofline {bw * 1e9 / bpt:.1f} t/s)")
    tot = sum(breakdown.values())
    print(f"\ngemma3 decode step ({max(a.threads)} threads, depth 16): {tot * 1e3:.2f} ms")
    for k, v in sorted(breakdown.items(), key=lambda kv: -kv[1]):
        print(f"  {k:14s} {v * 1e3:7.3f} ms  {100 * v / tot:5.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
