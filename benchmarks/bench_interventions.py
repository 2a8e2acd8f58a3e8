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


def paired_steps(model, ids: list[int], variants: dict, reps: int) -> dict[str, list[float]]:
    """Seconds of single decode steps at the same context, the variants alternating step by step
    (so that a loaded machine's slow phases hit them alike): the prompt is cached once, then each
    step feeds one token and is cut back off (``truncate``)."""
    eng, core = model.engine, model.engine.core
    out: dict[str, list[float]] = {k: [] for k in variants}
    tok = np.array([ids[-1]], np.int32)
    with eng.exclusive():
        eng.evaluate(ids, 0)
        n = core.n_past
        names = list(variants)
        for r in range(reps):
            for k in names[r % len(names):] + names[:r % len(names)]:
                p = variants[k]
                kw = {} if p is None else {"hooks": p.spec}
                t = time.perf_counter()
                core.forward(tok, 1, **kw)
                out[k].append(time.perf_counter() - t)
                assert core.truncate(n)
        eng.reset()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--steps", type=int, default=400, help="paired single-step repetitions")
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
    best = {k: min(v) for k, v in times.items()}
    cpu = platform.processor() or platform.machine()
    print(f"gemma3 {gemma3.__version__} | 270M Q4_K_M | {cpu}"
          f" | threads {gemma3.model._core.get_num_threads()} | cpus {os.cpu_count()} | "
          f"{args.new} new tokens, median of {args.runs} interleaved runs")
    print("| variant | tok/s (median) | ms/token | vs plain | tok/s (best run) | vs plain |")
    print("|---|---:|---:|---:|---:|---:|")
    for k, v in med.items():
        print(f"| {k} | {steps / v:.1f} | {1e3 * v / steps:.2f} | {v / med['plain']:.3f}x | "
              f"{steps / best[k]:.1f} | {best[k] / best['plain']:.3f}x |")
    for label, t in (("median", med), ("best run", best)):
        per_cb = (t["callback/layer"] - t["plain"]) / steps / cfg.num_layers
        print(f"{label}: Python callback hook {1e6 * per_cb:.0f} us per call ({cfg.num_layers} "
              f"per token; GIL back, copy in, call, copy out of a (1, {cfg.hidden_size}) "
              f"activation); steered decode {100 * (t['steer (C)'] / t['plain'] - 1):+.1f}% vs "
              f"plain (acceptance: <= +5%)")


    # the same three variants as paired single decode steps
    st = paired_steps(model, ids, variants, args.steps)
    ratio = {k: statistics.median(a / b for a, b in zip(st[k], st["plain"], strict=True))
             for k in st}
    print(f"\npaired single decode steps at {len(ids)} cached positions ({args.steps} each, "
          f"variants alternating step by step): median ms/step and median per-pair ratio")
    print("| variant | ms/step | vs plain (paired) |")
    print("|---|---:|---:|")
    for k, v in st.items():
        print(f"| {k} | {1e3 * statistics.median(v):.2f} | {ratio[k]:.3f}x |")
    per_cb = (statistics.median(st["callback/layer"]) - statistics.median(st["plain"])) / \
        cfg.num_layers
    print(f"Python callback hook (paired): {1e6 * per_cb:.0f} us per call; steered step "
          f"{100 * (ratio['steer (C)'] - 1):+.1f}% vs plain")


if __name__ == "__main__":
    main()
