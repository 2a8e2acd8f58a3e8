"""Cost of activation capture on the 270M model: decode tokens/s with and without it.

Decode rows (greedy, the same prompt and number of new tokens):
  plain            model.generate path, no capture argument at all
  capture none     the capture path with nothing selected: return_attention with
                   attention_layers=[] (a capture dict with no layer goes to the C forward
                   each step)
  attention L      return_attention=True for one layer, all heads (what a user asks for)
Decode time is measured from the first to the last new token (prefill excluded) by driving the
model's token generator directly, so both paths time exactly the per-token forward + sampling.
Prefill rows: the same prompt through ``logits(last_only=True)`` vs ``run_with_cache(names=[])``.

Variants are interleaved within each round (so background load hits them alike); the table shows
the median over rounds and the ratio to plain. The issue's acceptance: capture with nothing
selected costs < 2% of decode speed.

  python benchmarks/bench_capture.py [--runs 7] [--new 64] [--threads N] [--layer 5]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import numpy as np

import gemma3
from gemma3.model import GenerationConfig

PROMPT = ("The lighthouse at the end of the northern pier was built in 1872, when the harbour "
          "still sent fishing boats out every morning before dawn. Its keeper")


def decode_seconds(model, ids: list[int], n_new: int, attn) -> float:
    """Seconds from the first to the last of n_new greedy tokens (n_new - 1 decode steps)."""
    gc = GenerationConfig(max_new_tokens=n_new, temperature=0.0, stop_token_ids=[])
    model.reset()
    out: list = []
    it = model._generate_ids(ids, gc, attn, out if attn is not None else None)
    next(it)  # prefill + first token
    t = time.perf_counter()
    n = 1
    for _ in it:
        n += 1
    dt = time.perf_counter() - t
    assert n == n_new, f"generated {n} of {n_new} tokens"
    return dt


def prefill_seconds(model, ids: list[int], capture: bool) -> float:
    t = time.perf_counter()
    if capture:
        model.run_with_cache(ids, names=[], logits="last")
    else:
        model.logits(ids, last_only=True)
    return time.perf_counter() - t


def cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    have = set(line.split(":", 1)[1].split())
                    return " ".join(x for x in ("avx2", "fma", "avx512f", "avx512bw",
                                                "avx512vnni", "avx_vnni") if x in have)
    except OSError:
        pass
    return "?"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--new", type=int, default=64, help="new tokens per run")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--layer", type=int, default=5, help="layer captured in the 'attention' row")
    a = ap.parse_args()

    model = gemma3.load(n_threads=a.threads, max_seq_len=1024)
    ids = model.encode(PROMPT)
    heads = list(range(model.config.num_heads))
    variants = {
        "plain": None,
        "capture none": ([], heads),
        f"attention L{a.layer}": ([a.layer], heads),
    }
    print(f"gemma3 {gemma3.__version__}, {model!r}")
    print(f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"flags: {cpu_flags()}; threads {a.threads or 'default'}; "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}; "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"prompt {len(ids)} tokens, {a.new} new tokens ({a.new - 1} decode steps), "
          f"median of {a.runs} interleaved runs after one warm-up\n")

    for v in variants.values():  # warm-up
        decode_seconds(model, ids, 4, v)
    dec = {k: [] for k in variants}
    pre = {"prefill plain": [], "prefill capture none": []}
    for _ in range(a.runs):
        for k, v in variants.items():
            dec[k].append((a.new - 1) / decode_seconds(model, ids, a.new, v))
        pre["prefill plain"].append(len(ids) / prefill_seconds(model, ids, False))
        pre["prefill capture none"].append(len(ids) / prefill_seconds(model, ids, True))

    base = statistics.median(dec["plain"])
    print(f"{'variant':24s} {'tok/s':>9s} {'min':>9s} {'max':>9s} {'vs plain':>9s}")
    for k, xs in dec.items():
        m = statistics.median(xs)
        print(f"{'tg' + str(a.new) + ' ' + k:24s} {m:9.2f} {min(xs):9.2f} {max(xs):9.2f} "
              f"{m / base:9.3f}")
    pbase = statistics.median(pre["prefill plain"])
    for k, xs in pre.items():
        m = statistics.median(xs)
        print(f"{'pp' + str(len(ids)) + ' ' + k[8:]:24s} {m:9.1f} {min(xs):9.1f} {max(xs):9.1f} "
              f"{m / pbase:9.3f}")
    # paired per-round ratios are steadier than a ratio of medians on a shared machine
    r = [c / p for c, p in zip(dec["capture none"], dec["plain"], strict=True)]
    print(f"\ncapture none / plain, per-round ratios: median {np.median(r):.3f} "
          f"(min {min(r):.3f}, max {max(r):.3f}) -> overhead {100 * (1 - np.median(r)):+.1f}%")


if __name__ == "__main__":
    main()
