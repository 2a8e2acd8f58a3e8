"""Decode and prefill speed with a LoRA adapter: base model vs the adapter unmerged (hot-swappable,
y = W x + s B (A x) in every product) vs merged into the weights (requantized), same GGUF.

    python benchmarks/bench_adapters.py [--model PATH] [--threads 2] [--rank 16] [--reps 5]
                                        [--tg 128] [--pp 512]

The adapter is random (seeded), rank --rank on all seven projections of every layer (PEFT layout,
written to a temporary directory). Columns: tg (tokens/s over --tg single-token steps after a
16-token prompt) and pp (tokens/s over one --pp-token batch). The three models are loaded once and
measured in alternating rounds (a warm-up round first), so drift on a shared machine hits all of
them alike; medians of --reps rounds and the ratios to the base are printed. Plus the per-op
breakdown of one decode step, unmerged.

Then paired single decode steps (--pairs, the three models stepping in turn, each at the same
context length): the median of the per-step ratios to the base, which drift on a shared machine
affects least.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import gemma3
from gemma3.loader import HF_TEXT_PREFIXES, tensor_roles

sys.path.insert(0, str(Path(__file__).parent))
from bench_generate import cpu_flags, g3_breakdown, tokens_for  # noqa: E402


def write_adapter(d: Path, cfg, rank: int, seed: int = 0) -> None:
    """A PEFT LoRA directory with random A, B (the delta about 10% of a typical weight)."""
    from safetensors.numpy import save_file

    dims = cfg.to_core(1).dims
    rng = np.random.default_rng(seed)
    t = {}
    mods = []
    for r in tensor_roles("text"):
        if not (r.per_layer and r.kind == "matrix"):
            continue
        rows, cols = dims[r.shape[0]], dims[r.shape[1]]
        mods.append(r.hf.split(".")[-2])
        for i in range(cfg.num_layers):
            name = "base_model.model." + r.hf.format(t=HF_TEXT_PREFIXES[-1], i=i).removesuffix(
                ".weight")
            t[name + ".lora_A.weight"] = (rng.standard_normal((rank, cols)) / cols**0.5).astype(
                np.float32)
            t[name + ".lora_B.weight"] = (rng.standard_normal((rows, rank)) * 0.01).astype(
                np.float32)
    d.mkdir(parents=True, exist_ok=True)
    save_file(t, str(d / "adapter_model.safetensors"))
    (d / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": mods}))


def tg_pp(model, n_tg: int, n_pp: int) -> tuple[float, float]:
    core = model.engine.core
    ctx = tokens_for(16 + n_tg + n_pp, model.config.vocab_size, 1)
    core.reset(0)
    core.forward(np.asarray(ctx[:16], np.int32), 1)
    t = time.perf_counter()
    for i in range(n_tg):
        int(core.forward(np.asarray([ctx[16 + i]], np.int32), 1)[0].argmax())
    tg = n_tg / (time.perf_counter() - t)
    core.reset(0)
    t = time.perf_counter()
    core.forward(np.asarray(ctx[:n_pp], np.int32), 1)
    pp = n_pp / (time.perf_counter() - t)
    core.reset(0)
    return tg, pp


def paired(models: dict, n: int) -> dict[str, tuple[float, float]]:
    """-> {model: (median ms per step, median of its per-step ratio to the first model)}."""
    cores = {k: m.engine.core for k, m in models.items()}
    ctx = tokens_for(16 + n, next(iter(models.values())).config.vocab_size, 2)
    for c in cores.values():
        c.reset(0)
        c.forward(np.asarray(ctx[:16], np.int32), 1)
    t = {k: [] for k in cores}
    for i in range(n):
        for k, c in cores.items():
            t0 = time.perf_counter()
            int(c.forward(np.asarray([ctx[16 + i]], np.int32), 1)[0].argmax())
            t[k].append(time.perf_counter() - t0)
    first = next(iter(t.values()))
    return {k: (statistics.median(v) * 1e3,
                statistics.median(a / b for a, b in zip(v, first))) for k, v in t.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--tg", type=int, default=128)
    ap.add_argument("--pp", type=int, default=512)
    ap.add_argument("--pairs", type=int, default=300)
    a = ap.parse_args(argv)

    base = gemma3.load(a.model, n_threads=a.threads, max_seq_len=2048)
    with tempfile.TemporaryDirectory() as td:
        write_adapter(Path(td) / "lora", base.config, a.rank)
        unmerged = gemma3.load(a.model, n_threads=a.threads, max_seq_len=2048,
                               adapter=str(Path(td) / "lora"))
        merged = gemma3.load(a.model, n_threads=a.threads, max_seq_len=2048,
                             adapter=str(Path(td) / "lora"), merge=True)
    err = next(iter(merged.adapters.merged.values()))["error"]
    ad = next(iter(unmerged.adapters.loaded.values()))
    models = {"base": base, "unmerged": unmerged, "merged": merged}
    res: dict[str, list[tuple[float, float]]] = {k: [] for k in models}
    for r in range(a.reps + 1):
        for k, m in models.items():
            x = tg_pp(m, a.tg, a.pp)
            if r:
                res[k].append(x)
    print(f"# LoRA adapters: {base.path}, {a.threads} threads, CPU {cpu_flags()}")
    print(f"# adapter: rank {a.rank} on q/k/v/o/gate/up/down of all {base.config.num_layers} "
          f"layers, {ad.nbytes / 2**20:.1f} MiB float32; merged requantization error "
          f"||Q(W+D)-(W+D)||/||D||: median {statistics.median(err.values()):.3f}, "
          f"max {max(err.values()):.3f}")
    print(f"# medians of {a.reps} alternating rounds after a warm-up\n")
    print(f"| model | tg{a.tg} t/s | vs base | pp{a.pp} t/s | vs base |")
    print("|---|---:|---:|---:|---:|")
    tg0 = statistics.median(x[0] for x in res["base"])
    pp0 = statistics.median(x[1] for x in res["base"])
    for k in models:
        tg = statistics.median(x[0] for x in res[k])
        pp = statistics.median(x[1] for x in res[k])
        print(f"| {k} | {tg:.1f} | {tg / tg0:.3f} | {pp:.1f} | {pp / pp0:.3f} |")
    print(f"\n# paired single decode steps ({a.pairs} each, the models in turn)")
    print("| model | ms/step (median) | vs base (median of per-step ratios) |")
    print("|---|---:|---:|")
    for k, (ms, ratio) in paired(models, a.pairs).items():
        print(f"| {k} | {ms:.2f} | {ratio:.3f} |")
    print("\n# one decode step, unmerged (ms per op)")
    bd = g3_breakdown(unmerged)
    print(" ".join(f"{k}={v * 1e3:.2f}" for k, v in bd.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
