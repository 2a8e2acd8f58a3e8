"""Batch evaluation on the 270M: perplexity vs llama.cpp, and batched generation throughput.

1. Perplexity of tests/data/pd_text.txt (Pride and Prejudice, ch. 1; public domain) with the
   llama.cpp protocol (``llama-perplexity``'s default: chunks of n_ctx tokens of the text tokenized
   with BOS, each chunk's first token replaced by BOS, only its second half scored) — by gemma3
   (``model.perplexity(..., protocol="llama.cpp")``) and by llama.cpp itself through
   llama-cpp-python on the same GGUF and n_ctx (``logits_all=True``, every chunk evaluated from an
   empty cache, the same rows log-softmaxed in float64). Acceptance: perplexities within 1%.
   Tokens/s counts the n_ctx tokens of every chunk over the wall time of the whole computation
   (forward passes plus the log-softmax of the scored rows) — llama.cpp computes logits for every
   row (logits_all), gemma3 only for the scored ones.
2. Greedy generation of B prompts: ``generate_batch`` (one forward per step for all sequences) vs
   ``generate`` one prompt after another, B = 1, 4, 8; new tokens/s and the ratio. The outputs
   are checked equal.

Median of ``--runs`` rounds, variants interleaved. Prints the load average: the numbers mean
little on a busy machine.

  python benchmarks/bench_eval.py [--n-ctx 256] [--threads N] [--runs 3] [--new 32]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np

import gemma3

TEXT = Path(__file__).resolve().parents[1] / "tests" / "data" / "pd_text.txt"
PROMPTS = [
    "The lighthouse at the end of the northern pier was built in 1872, and its keeper",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "In the spring of that year the river rose higher than anyone could remember, and",
    "A recipe for bread needs only four things:",
    "The committee met on Tuesday to discuss the budget. The chairman opened by saying",
    "Photosynthesis is the process by which plants",
    "Once upon a time, in a village at the edge of a great forest, there lived",
    "The three laws of motion, first stated by Isaac Newton, are",
]


def cpu_flags() -> str:
    try:
        flags = open("/proc/cpuinfo").read().split("flags", 1)[1].split("\n", 1)[0]
    except (OSError, IndexError):
        return "?"
    return " ".join(f for f in ("avx2", "fma", "avx512f", "avx512bw", "avx512vnni")
                    if f" {f}" in flags)


def llama_cpp_perplexity(path: str, text: str, n_ctx: int, threads: int):
    """llama-perplexity's default protocol on llama.cpp's logits (llama-cpp-python)."""
    import llama_cpp.llama_cpp as llama_cpp  # the ctypes binding Llama() reads its defaults from
    from llama_cpp import Llama

    # No extra buffer types (AMX / repacked weights): on CPUs that report AMX inside a VM that
    # does not enable its tile state, ggml's AMX matmul dies with SIGILL. Plain ggml CPU kernels.
    defaults = llama_cpp.llama_model_default_params

    def no_extra_bufts():
        p = defaults()
        p.use_extra_bufts = False
        return p

    llama_cpp.llama_model_default_params = no_extra_bufts
    llm = Llama(model_path=path, n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, logits_all=True,
                n_threads=threads, n_threads_batch=threads, verbose=False)
    tokens = llm.tokenize(text.encode("utf-8"), add_bos=True, special=False)
    bos = llm.token_bos()
    first = n_ctx // 2

    def run():
        nll, n = 0.0, 0
        for i in range(len(tokens) // n_ctx):
            chunk = list(tokens[i * n_ctx:(i + 1) * n_ctx])
            chunk[0] = bos
            llm.reset()
            llm.eval(chunk)
            x = np.asarray(llm.scores[first:n_ctx - 1], dtype=np.float64)
            m = x.max(axis=1)
            lse = m + np.log(np.exp(x - m[:, None]).sum(axis=1))
            tgt = np.asarray(chunk[first + 1:n_ctx])
            nll -= float((x[np.arange(len(tgt)), tgt] - lse).sum())
            n += len(tgt)
        return float(np.exp(nll / n)), n, (len(tokens) // n_ctx) * n_ctx

    return llm, tokens, run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--n-ctx", type=int, default=256)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--new", type=int, default=32, help="new tokens per prompt")
    ap.add_argument("--skip-llama", action="store_true")
    a = ap.parse_args()
    path = str(a.model or gemma3.default_model_path())
    text = TEXT.read_text(encoding="utf-8")
    model = gemma3.load(path, n_threads=a.threads, max_seq_len=max(1024, a.n_ctx))
    print(f"{platform.processor() or platform.machine()}  flags: {cpu_flags()}  threads: "
          f"{a.threads}  load average: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f}")
    print(f"model: {path}\n")

    # -- 1. perplexity --------------------------------------------------------------------------
    ours_tokens = model.tokenizer.encode(text, add_bos=True)
    peer = None
    if not a.skip_llama:
        try:
            llm, peer_tokens, peer_run = llama_cpp_perplexity(path, text, a.n_ctx, a.threads)
            peer = peer_run
            same = list(peer_tokens) == ours_tokens
            print(f"tokenization: gemma3 {len(ours_tokens)} tokens, llama.cpp {len(peer_tokens)}"
                  f" ({'identical' if same else 'DIFFERENT'})")
        except ImportError:
            print("llama-cpp-python is not installed: llama.cpp column skipped")
    model.perplexity(text, a.n_ctx)  # warm-up
    if peer is not None:
        peer()
    t_ours, t_peer = [], []
    for _ in range(a.runs):
        t = time.perf_counter()
        p = model.perplexity(text, a.n_ctx)
        t_ours.append(time.perf_counter() - t)
        if peer is not None:
            t = time.perf_counter()
            ppl_peer, n_peer, tok_peer = peer()
            t_peer.append(time.perf_counter() - t)
    n_fed = p.n_windows * a.n_ctx
    print(f"\nperplexity, llama.cpp protocol, n_ctx {a.n_ctx}: {p.n_windows} chunks, "
          f"{p.n_tokens} tokens scored")
    print(f"{'engine':<12} {'PPL':>10} {'tokens/s':>10} {'s':>8}")
    so = statistics.median(t_ours)
    print(f"{'gemma3':<12} {p.ppl:>10.4f} {n_fed / so:>10.1f} {so:>8.2f}")
    if peer is not None:
        sp = statistics.median(t_peer)
        print(f"{'llama.cpp':<12} {ppl_peer:>10.4f} {tok_peer / sp:>10.1f} {sp:>8.2f}")
        r = p.ppl / ppl_peer
        print(f"ratio gemma3 / llama.cpp: PPL {r:.5f} ({(r - 1) * 100:+.3f}%, acceptance within "
              f"1%: {'PASS' if abs(r - 1) < 0.01 else 'FAIL'}), speed {sp / so:.2f}x")
        assert n_peer == p.n_tokens
    print(f"bits per byte (gemma3): {p.bits_per_byte:.4f}")

    # -- 2. generate_batch ------------------------------------------------------------------------
    print(f"\ngreedy generation, {a.new} new tokens per prompt (no early stop)")
    print(f"{'batch':>5} {'one-by-one tok/s':>17} {'generate_batch tok/s':>21} {'ratio':>7}")
    kw = dict(max_new_tokens=a.new, temperature=0.0, stop_token_ids=[])
    for B in (1, 4, 8):
        prompts = PROMPTS[:B]
        ref = [model.generate(q, return_ids=True, **kw) for q in prompts]  # warm-up + reference
        got = model.generate_batch(prompts, return_ids=True, **kw)
        assert got == ref, f"generate_batch differs from generate at batch {B}"
        n_new = sum(len(x) for x in ref)
        t1, tb = [], []
        for _ in range(a.runs):
            t = time.perf_counter()
            for q in prompts:
                model.reset()  # no reuse of a cached prompt: both sides prefill every prompt
                model.generate(q, return_ids=True, **kw)
            t1.append(time.perf_counter() - t)
            t = time.perf_counter()
            model.generate_batch(prompts, return_ids=True, **kw)
            tb.append(time.perf_counter() - t)
        s1, sb = statistics.median(t1), statistics.median(tb)
        print(f"{B:>5} {n_new / s1:>17.1f} {n_new / sb:>21.1f} {s1 / sb:>6.2f}x")
    print(f"\nload average at the end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
