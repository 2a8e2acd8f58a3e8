"""Cost of interventions on the 270M model: greedy decode tokens/s with and without hooks.

Decode rows (greedy, the same prompt and number of new tokens; prefill excluded):
  plain            model.generate's token generator, no hooks at all
  steer (C)        one built-in steering vector at blocks.6.hook_resid_post, every position
                   (an add inside the C forward; no Python per layer)
  callback/layer   a Python function (that reads the activation and returns None) at
                   hook_resid_post of every layer: 18 GIL round trips per token
Decode time is measured from the first to the last new token by driving the model's token
generator directly. Variants are interleaved within each round (background load hits them
alike); the table shows the median over rounds and the ratio to plain, plus the per-call cost of
one Python callback (the extra time per token divided by the layers hooked).

The issue's acceptance: a steered 128-token greedy generation is at most 5% slower than plain.

  python benchmarks/bench_interventions.py [--runs 5] [--new 128] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import numpy as np

import gemma3
from gemma3 import hooks
from gemma3.model import GenerationConfig

PROMPT = ("The lighthouse at the end of the northern pier was built in 1872, when the harbour "
          "still sent fishing boats out every morning before dawn. Its keeper")


def decode_seconds(model, ids: list[int], n_new: int, plan) -> float:
    gc = GenerationConfig(max_new_tokens=n_new, temperature=0.0, stop_token_ids=[])
    model.reset()
    it = model._generate_ids(ids, gc, hooks=plan)
    next(it)  # prefill + first token
    t = time.perf_counter()
    n = 1
    for _ in it:
        n += 1
    dt = time.perf_counter() - t
    assert n == n_new, f"generated {n} of {n_new} tokens"
    return dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    model = gemma3.load(n_threads=args.threads, max_seq_len=1024)
    cfg = model.config
    ids = model.encode(PROMPT)
    rng = np.random.default_rng(0)
    vec = rng.standard_normal(cfg.hidden_size).astype(np.float32)
    vec *= 400 / np.linalg.norm(vec)
    variants = {
        "plain": None,
        "steer (C)": hooks.plan(cfg, [("blocks.6.hook_resid_post", hooks.steer(vec))]),
        "callback/layer": hooks.plan(cfg, [(lambda n: n.endswith("hook_resid_post"),
                                            lambda a, h: None)]),
    }
    for name, p in variants.items():  # warm-up (and the same greedy text with no-op hooks)
        decode_seconds(model, ids, 8, p)
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(args.runs):
        for name, p in variants.items():
            times[name].append(decode_seconds(model, ids, args.new, p))
    steps = args.new - 1
    med = {k: statistics.median(v) for k, v in times.items()}
    cpu = platform.processor() or platform.machine()
    print(f"gemma3 {gemma3.__version__} | 270M Q4_K_M | {cpu}"
          f" | threads {gemma3.model._core.get_num_threads()} | cpus {os.cpu_count()} | "
          f"{args.new} new tokens, median of {args.runs} interleaved runs")
    print("| variant | tok/s | ms/token | vs plain |")
    print("|---|---:|---:|---:|")
    for k, v in med.items():
        print(f"| {k} | {steps / v:.1f} | {1e3 * v / steps:.2f} | {v / med['plain']:.3f}x |")
    per_cb = (med["callback/layer"] - med["plain"]) / steps / cfg.num_layers
    print(f"\nPython callback hook: {1e6 * per_cb:.0f} us per call "
          f"({cfg.num_layers} per token here; copy in + call + copy out of a (1, "
          f"{cfg.hidden_size}) activation)")
    print(f"steered decode: {100 * (med['steer (C)'] / med['plain'] - 1):+.1f}% vs plain "
          f"(acceptance: <= +5%)")


if __name__ == "__main__":
    main()
