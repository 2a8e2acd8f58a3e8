"""Fused dequantize-and-dot and dequantization throughput per weight type and ISA.

dot_f32: y = W @ x through _core.matvec (one dot_f32 per row, single thread, GIL released) on
matrices shaped like Gemma 3 270M's: the LM head (262144 x 640, Q8_0 in the real file), an FFN
up/gate matrix (2048 x 640, Q5_0) and an FFN down matrix (640 x 2048, the K-quant rows). Reported as
GB/s of weight bytes; the scalar reference is the baseline of the ratio columns.
to_float: a 2048 x 640 (or 640 x 2048) tile dequantized in one call, as the prefill path does before
sgemm; GB/s of weight bytes read (output floats are 4 bytes per element on top).
Median of --runs timings after a warm-up; random blocks with finite half scales.

    python benchmarks/bench_dot.py [--runs 5] [--types Q8_0,Q5_0] [--no-lm-head]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from gemma3 import _core

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from test_quant import TYPE_ID  # noqa: E402
from test_quant_dot import DOT_TYPES, dot_weights  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_dequant import cpu_flags  # noqa: E402

ISA_ORDER = ["ref", "avx2", "avx512"]
LM_HEAD = ("lm_head", 262144, 640)
FFN_UP = ("ffn_up", 2048, 640)
FFN_DOWN = ("ffn_down", 640, 2048)


def median_seconds(fn, runs):
    fn()  # warm-up: page in buffers, first-call costs
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def random_matrix(name, rows, cols, rng):
    """(rows * row_bytes,) uint8: the first 64 rows drawn at random, tiled (generation is slow)."""
    base = np.concatenate([dot_weights(name, cols, rng) for _ in range(min(rows, 64))])
    reps = -(-rows // 64)
    return np.tile(base, reps)[: base.size // min(rows, 64) * rows].copy()


def shapes_for(name, lm_head):
    blck = _core.type_info(TYPE_ID[name])[2]
    out = []
    if lm_head and name == "Q8_0":
        out.append(LM_HEAD)
    if 640 % blck == 0:
        out.append(FFN_UP)
    out.append(FFN_DOWN)
    return out


def row(cells, widths):
    return " ".join(f"{c:>{w}}" for c, w in zip(cells, widths))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--types", default=",".join(DOT_TYPES))
    ap.add_argument("--no-lm-head", action="store_true", help="skip the 178 MB Q8_0 LM head")
    args = ap.parse_args()
    info = _core.isa()
    isas = ISA_ORDER[: ISA_ORDER.index(info["cpu"] if info["cpu"] != "scalar" else "ref") + 1]
    rng = np.random.default_rng(0)
    print(f"# {cpu_flags()}; {os.cpu_count()} cpus; 1 thread; median of {args.runs} runs")
    print(f"# kernels selected: {info['selected']} (G3_ISA={info['env']})")

    widths = [7, 9, 17, 8] + [10] * len(isas) + [9] * (len(isas) - 1)
    print("\n## dot_f32 (matvec): GB/s of weight bytes")
    hdr = ["type", "shape", "rows x cols", "MB"] + [f"{i} GB/s" for i in isas]
    hdr += [f"{i}/ref" for i in isas[1:]]
    print(row(hdr, widths))
    print("-" * len(row(hdr, widths)))
    for name in args.types.split(","):
        tid = TYPE_ID[name]
        for shape, rows, cols in shapes_for(name, not args.no_lm_head):
            w = random_matrix(name, rows, cols, rng)
            x = rng.standard_normal(cols).astype(np.float32)
            runs = args.runs if rows * cols < 1 << 24 else max(3, args.runs // 2)
            gbs = []
            for isa in isas:
                t = median_seconds(lambda: _core.matvec(tid, w, rows, cols, x, isa=isa), runs)
                gbs.append(w.nbytes / t / 1e9)
            cells = [name, shape, f"{rows}x{cols}", f"{w.nbytes / 1e6:.1f}"]
            cells += [f"{g:.2f}" for g in gbs] + [f"{g / gbs[0]:.1f}x" for g in gbs[1:]]
            print(row(cells, widths), flush=True)
            del w

    print("\n## to_float (dequantize one tile): GB/s of weight bytes read")
    print(row(hdr, widths))
    print("-" * len(row(hdr, widths)))
    for name in args.types.split(","):
        tid = TYPE_ID[name]
        shape, rows, cols = FFN_UP if 640 % _core.type_info(tid)[2] == 0 else FFN_DOWN
        w = random_matrix(name, rows, cols, rng)
        n = rows * cols
        gbs = []
        for isa in isas:
            t = median_seconds(lambda: _core.dequantize(tid, w, n, isa=isa), args.runs)
            gbs.append(w.nbytes / t / 1e9)
        cells = [name, shape, f"{rows}x{cols}", f"{w.nbytes / 1e6:.1f}"]
        cells += [f"{g:.2f}" for g in gbs] + [f"{g / gbs[0]:.1f}x" for g in gbs[1:]]
        print(row(cells, widths), flush=True)


if __name__ == "__main__":
    main()
