"""Dequantization throughput per type: gemma3._core.dequantize vs the gguf package's NumPy dequantizer.

Each type decodes a row of N elements (random blocks with finite half scales); after a warm-up call,
the median of --runs timings is reported as GB/s of float32 output and of input bytes, with the ratio
ours / gguf. Single-threaded on both sides (the C reference kernels are scalar; SIMD comes later).

    python benchmarks/bench_dequant.py [--n 4194304] [--runs 7] [--types Q4_K,Q8_0]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from gemma3 import _core

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from test_quant import DEQUANT_TYPES, TYPE_ID, random_blocks  # noqa: E402


def median_seconds(fn, runs):
    fn()  # warm-up: page in buffers, first-call costs
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def cpu_flags():
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                simd = [f for f in ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw",
                                    "avx512_vnni") if f in flags]  # fmt: skip
                return f"{model}; {' '.join(simd)}"
    except OSError:
        pass
    return platform.processor()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1 << 22, help="elements per row (multiple of 256)")
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--types", default=",".join(DEQUANT_TYPES))
    args = ap.parse_args()
    import gguf
    from gguf.constants import GGMLQuantizationType

    from importlib.metadata import version

    print(f"# {cpu_flags()}; {os.cpu_count()} cpus; numpy {np.__version__}; gguf {version('gguf')}")
    print(f"# n = {args.n} elements per row, median of {args.runs} runs after a warm-up, 1 thread")
    hdr = f"{'type':8} {'in MB':>7} {'ours out GB/s':>14} {'ours in GB/s':>13} " \
          f"{'gguf out GB/s':>14} {'gguf in GB/s':>13} {'ratio':>7}"
    print(hdr)
    print("-" * len(hdr))
    rng = np.random.default_rng(0)
    for name in args.types.split(","):
        tid = TYPE_ID[name]
        blck = _core.type_info(tid)[2]
        n_blocks = args.n // blck
        n = n_blocks * blck
        data = random_blocks(name, n_blocks, rng)
        qtype = GGMLQuantizationType[name]
        t_ours = median_seconds(lambda: _core.dequantize(tid, data, n), args.runs)
        t_gguf = median_seconds(lambda: gguf.quants.dequantize(data, qtype), args.runs)
        out_b, in_b = 4 * n, data.nbytes
        note = "  (gguf returns a view, no copy)" if name == "F32" else ""
        print(f"{name:8} {in_b / 1e6:7.2f} {out_b / t_ours / 1e9:14.2f} {in_b / t_ours / 1e9:13.2f} "
              f"{out_b / t_gguf / 1e9:14.2f} {in_b / t_gguf / 1e9:13.2f} {t_gguf / t_ours:6.1f}x{note}")


if __name__ == "__main__":
    main()
