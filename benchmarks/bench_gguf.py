"""GGUF open cost on the 270M file: gemma3.GGUFFile vs the gguf package's GGUFReader.

Three ways to open, each timed as the median of runs after a warm-up (the page cache is warm, so
this measures parsing, not disk): ours listing tensors only (metadata stays in the mapping, the
262144-entry token list is not built), ours also building ``.metadata``, and ``gguf.GGUFReader``
(which parses every field up front). RSS growth of each is measured in a fresh process from
/proc/self/statm, against the file's tensor bytes.

    python benchmarks/bench_gguf.py [--path model.gguf] [--runs 7] [--peer-runs 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path

import numpy as np

import gemma3

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_dequant import cpu_flags  # noqa: E402

WAYS = {
    "ours, tensors only": "f = gemma3.GGUFFile(p); f.tensors",
    "ours + .metadata": "f = gemma3.GGUFFile(p); f.tensors; f.metadata",
    "gguf.GGUFReader": "f = gguf.GGUFReader(p)",
}

RSS_PROG = """
import os, sys, numpy, gguf, gemma3
page = os.sysconf("SC_PAGE_SIZE")
rss = lambda: int(open("/proc/self/statm").read().split()[1]) * page
p = sys.argv[1]
r0 = rss()
{code}
print(rss() - r0)
"""


def median_seconds(code, path, runs):
    env = {"gemma3": gemma3, "gguf": __import__("gguf"), "p": path}
    exec(code, env)  # warm-up: page cache, first-call costs
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        exec(code, env)
        times.append(time.perf_counter() - t0)
        env.pop("f", None)
    return statistics.median(times)


def rss_growth(code, path):
    out = subprocess.run([sys.executable, "-c", RSS_PROG.format(code=code), path],
                         capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--path", default=gemma3.default_model_path())
    ap.add_argument("--runs", type=int, default=7, help="timed runs of our reader")
    ap.add_argument("--peer-runs", type=int, default=3, help="timed runs of gguf.GGUFReader (slow)")
    args = ap.parse_args()
    f = gemma3.GGUFFile(args.path)
    tensor_bytes = sum(t.nbytes for t in f.tensors.values())
    size = os.path.getsize(args.path)
    del f

    print(f"# {cpu_flags()}; {os.cpu_count()} cpus; numpy {np.__version__}; gguf {version('gguf')}")
    print(f"# {args.path}: {size / 2**20:.1f} MiB, tensor data {tensor_bytes / 2**20:.1f} MiB")
    print(f"# median of {args.runs} runs (gguf: {args.peer_runs}) after a warm-up; warm page cache")
    hdr = (f"{'open':22} {'median ms':>10} {'vs gguf':>9} {'RSS growth MiB':>15} "
           f"{'% of tensors':>13}")
    print(hdr)
    print("-" * len(hdr))
    rows = {}
    for name, code in WAYS.items():
        runs = args.peer_runs if name.startswith("gguf") else args.runs
        rows[name] = (median_seconds(code, args.path, runs), rss_growth(code, args.path))
    t_peer = rows["gguf.GGUFReader"][0]
    for name, (t, rss) in rows.items():
        print(f"{name:22} {t * 1e3:10.2f} {t_peer / t:8.1f}x {rss / 2**20:15.1f} "
              f"{100 * rss / tensor_bytes:12.1f}%")


if __name__ == "__main__":
    main()
