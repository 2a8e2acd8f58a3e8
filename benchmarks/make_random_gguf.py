"""Random-weight GGUFs with the real shapes of Gemma 3 1B, 4B, 12B and 27B (text), for speed and
memory benchmarks.

    python benchmarks/make_random_gguf.py --size 1b|4b|12b|27b --mix q4_0|q4_k_m [--out PATH]
                                          [--check] [--check-only]

--check loads the file with gemma3 and with llama.cpp (llama-cpp-python), checks the logits are
finite, and compares greedy tokens on a short prompt: free-running in each engine, and
teacher-forced (llama.cpp fed gemma3's sequence: per-position argmax and logit difference).

Default output: ~/.cache/gemma3/bench/gemma-3-{size}-random-{mix}.gguf. The file is a normal
Gemma 3 GGUF that llama.cpp loads too: the metadata keys its converter writes for these sizes
(§3.1 of shared/reference/llama-cpp-gemma3.md), the tokenizer copied from the embedded 270M GGUF
(262144 tokens, so token_embd has 262144 rows), no output.weight (tied, as published files).

Weights are N(0, 0.02) (inverse-CDF sampling from 16 random bits, far finer than the 4-bit
quantization), norm weights 1 + N(0, 0.05) stored as F32 (GGUF stores 1 + w). Types follow what
llama.cpp's quantizer (src/llama-quant.cpp) picks for the two mixes:

* q4_0:   every matrix Q4_0; token_embd (the tied output) Q6_K, or Q8_0 when its row length is not
          a multiple of 256 (1B: 1152).
* q4_k_m: matrices Q4_K; attn_v and ffn_down Q6_K on layers where use_more_bits(i, n) holds
          (i < n/8, i >= 7n/8, or (i - n/8) % 3 == 2); token_embd Q6_K. Rows whose length is
          not a multiple of 256 fall back as llama.cpp does: Q4_K -> Q5_0, Q6_K -> Q8_0 (1B: every
          matrix reading the 1152-wide residual).

Tensors are generated, quantized by our C quantizers and written in chunks of rows, on a pool of
threads (NumPy and the quantizers release the GIL), so the ~3 GB 4B file never sits in memory.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from statistics import NormalDist

import numpy as np

import gemma3
from gemma3 import _core
from gemma3.gguf import ggml_type_id

# Gemma 3 text configs (HF Gemma3TextConfig per size; shared/reference/*). vocab is the tokenizer's.
SIZES = {
    "1b": dict(name="1B", n_embd=1152, n_layer=26, n_head=4, n_kv=1, head_dim=256, n_ff=6912,
               ctx=32768, window=512, rope_scale=None),
    "4b": dict(name="4B", n_embd=2560, n_layer=34, n_head=8, n_kv=4, head_dim=256, n_ff=10240,
               ctx=131072, window=1024, rope_scale=8.0),
    "12b": dict(name="12B", n_embd=3840, n_layer=48, n_head=16, n_kv=8, head_dim=256,
                n_ff=15360, ctx=131072, window=1024, rope_scale=8.0),
    # query_pre_attn_scalar 168 = 5376 / 32: llama.cpp derives it from the 62-layer count, and so
    # does gemma3.config (no key is written, as llama.cpp's converter writes none)
    "27b": dict(name="27B", n_embd=5376, n_layer=62, n_head=32, n_kv=16, head_dim=128,
                n_ff=21504, ctx=131072, window=1024, rope_scale=8.0),
}
FILE_TYPE = {"q4_0": 2, "q4_k_m": 15}  # llama_ftype MOSTLY_Q4_0, MOSTLY_Q4_K_M
FALLBACK = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}  # row length % 256 != 0
STD, NORM_STD = 0.02, 0.05
CHUNK = 1 << 24  # elements generated + quantized per task


def use_more_bits(i: int, n: int) -> bool:
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def pick_type(kind: str, layer: int | None, n_layer: int, row: int, mix: str) -> str:
    if kind == "token_embd":  # tied output: llama.cpp's output-tensor rule
        t = "Q6_K"
    elif mix == "q4_0":
        t = "Q4_0"
    elif kind in ("attn_v", "ffn_down") and use_more_bits(layer, n_layer):
        t = "Q6_K"
    else:
        t = "Q4_K"
    if row % 256 and t in FALLBACK:
        t = FALLBACK[t]
    return t


def tensors(cfg: dict, mix: str):
    """(name, numpy shape, type) in the order llama.cpp's converter writes them."""
    E, F, L = cfg["n_embd"], cfg["n_ff"], cfg["n_layer"]
    q, kv, D = cfg["n_head"] * cfg["head_dim"], cfg["n_kv"] * cfg["head_dim"], cfg["head_dim"]
    V = cfg["vocab"]
    out = [("token_embd.weight", (V, E), pick_type("token_embd", None, L, E, mix))]
    for i in range(L):
        mats = [("attn_q", (q, E)), ("attn_k", (kv, E)), ("attn_v", (kv, E)),
                ("attn_output", (E, q)), ("ffn_gate", (F, E)), ("ffn_up", (F, E)),
                ("ffn_down", (E, F))]
        for kind, shape in mats:
            out.append((f"blk.{i}.{kind}.weight", shape, pick_type(kind, i, L, shape[1], mix)))
        for norm, n in [("attn_norm", E), ("attn_q_norm", D), ("attn_k_norm", D),
                        ("post_attention_norm", E), ("ffn_norm", E), ("post_ffw_norm", E)]:
            out.append((f"blk.{i}.{norm}.weight", (n,), "F32"))
    out.append(("output_norm.weight", (E,), "F32"))
    return out


_TABLE = np.array([NormalDist().inv_cdf((i + 0.5) / 65536) for i in range(65536)],
                  np.float32) * STD


def _chunk(seed: int, ti: int, ci: int, n: int, tid: int) -> np.ndarray:
    rng = np.random.default_rng([seed, ti, ci])
    x = _TABLE[rng.integers(0, 65536, n, dtype=np.uint16)]
    return _core.quantize(tid, x)


def stream(pool: ThreadPoolExecutor, seed: int, ti: int, shape: tuple[int, int], tid: int,
           ahead: int):
    """Chunks of whole rows, generated and quantized on the pool, yielded in order."""
    rows, row = shape
    per = max(1, CHUNK // row)

    def gen():
        pending = []
        for ci, r0 in enumerate(range(0, rows, per)):
            n = (min(rows, r0 + per) - r0) * row
            pending.append(pool.submit(_chunk, seed, ti, ci, n, tid))
            if len(pending) > ahead:
                yield pending.pop(0).result()
        for f in pending:
            yield f.result()
    return gen


def tokenizer_metadata() -> dict:
    f = gemma3.GGUFFile(gemma3.default_model_path())
    try:
        return {k: v for k, v in f.metadata.items() if k.startswith("tokenizer.")}
    finally:
        f.close()


def make(size: str, mix: str, out: Path, seed: int = 0, threads: int | None = None) -> Path:
    cfg = dict(SIZES[size])
    tok = tokenizer_metadata()
    cfg["vocab"] = len(tok["tokenizer.ggml.tokens"])
    w = gemma3.GGUFWriter()
    w.add("general.architecture", "gemma3")
    w.add("general.type", "model")
    w.add("general.name", f"Gemma 3 {cfg['name']} random weights ({mix})")
    w.add("general.size_label", cfg["name"])
    w.add("general.description", f"random N(0, {STD}) weights with the shapes of Gemma 3 "
          f"{cfg['name']}, made by benchmarks/make_random_gguf.py --seed {seed}")
    p = "gemma3."
    w.add(p + "context_length", cfg["ctx"], type="UINT32")
    w.add(p + "embedding_length", cfg["n_embd"], type="UINT32")
    w.add(p + "block_count", cfg["n_layer"], type="UINT32")
    w.add(p + "feed_forward_length", cfg["n_ff"], type="UINT32")
    w.add(p + "attention.head_count", cfg["n_head"], type="UINT32")
    w.add(p + "attention.layer_norm_rms_epsilon", 1e-6, type="FLOAT32")
    w.add(p + "attention.key_length", cfg["head_dim"], type="UINT32")
    w.add(p + "attention.value_length", cfg["head_dim"], type="UINT32")
    w.add(p + "rope.freq_base", 1_000_000.0, type="FLOAT32")
    if cfg["rope_scale"]:
        w.add(p + "rope.scaling.type", "linear")
        w.add(p + "rope.scaling.factor", cfg["rope_scale"], type="FLOAT32")
    w.add(p + "attention.sliding_window", cfg["window"], type="UINT32")
    w.add(p + "attention.head_count_kv", cfg["n_kv"], type="UINT32")
    for k, v in tok.items():
        w.add(k, v)
    w.add("general.quantization_version", 2, type="UINT32")
    w.add("general.file_type", FILE_TYPE[mix], type="UINT32")

    threads = threads or os.cpu_count() or 1
    pool = ThreadPoolExecutor(threads)
    for ti, (name, shape, t) in enumerate(tensors(cfg, mix)):
        if len(shape) == 1:
            rng = np.random.default_rng([seed, ti])
            w.add_tensor(name, 1.0 + NORM_STD * rng.standard_normal(shape, dtype=np.float32))
        else:
            w.add_tensor_stream(name, shape, t, stream(pool, seed, ti, shape, ggml_type_id(t),
                                                       ahead=2 * threads))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".part")
    try:
        w.write(tmp)
        os.replace(tmp, out)
    finally:
        pool.shutdown()
        if tmp.exists():
            tmp.unlink()
    return out


PROMPT = "The quick brown fox jumps over the lazy dog"


def check(path: Path, n_new: int = 8, threads: int = 2, extra_bufts: bool = True,
          long: bool = False) -> None:
    """Both engines load the file; finite logits; greedy agreement on a short prompt. With
    ``long``, also the last logits after window + 100 random tokens (exercises the sliding
    window and, on global layers, RoPE scaling at distance)."""
    m = gemma3.load(path, max_seq_len=128 if not long else m_long(path))
    ids = m.tokenizer.encode(PROMPT, add_bos=True)
    seq, margins = list(ids), []
    for _ in range(n_new):
        lg = m.logits(seq)
        if not np.isfinite(lg).all():
            raise SystemExit(f"gemma3: non-finite logits at length {len(seq)}")
        top2 = np.partition(lg[-1], -2)[-2:]
        margins.append(float(top2[1] - top2[0]))
        seq.append(int(lg[-1].argmax()))
    g_logits = m.logits(seq[:-1])  # rows predicting seq[1:]
    g_new = seq[len(ids):]
    if long:
        n_long = m.config.sliding_window + 100
        rng = np.random.default_rng(5)
        long_ids = [2] + rng.integers(1000, 200000, n_long - 1).tolist()
        g_long = m.logits(long_ids, last_only=True)
    del m
    print(f"gemma3    greedy: {g_new}  (top-1 minus top-2 logit: "
          + " ".join(f"{x:.3f}" for x in margins) + f"; logit std {g_logits[-1].std():.3f})")
    try:
        import llama_cpp
    except ImportError:
        print("llama-cpp-python is not installed: no llama.cpp comparison")
        return
    from bench_generate import llama_open

    # logits_all: llama-cpp-python keeps no logits in .scores otherwise
    llm = llama_open(str(path), threads, 128, extra_bufts, logits_all=True)
    llm.reset()
    llm.eval(ids)
    l_new = []
    for _ in range(n_new):
        row = np.asarray(llm.scores[llm.n_tokens - 1])
        if not np.isfinite(row).all():
            raise SystemExit(f"llama.cpp: non-finite logits at length {llm.n_tokens}")
        l_new.append(int(row.argmax()))
        llm.eval([l_new[-1]])
    same = next((i for i, (a, b) in enumerate(zip(g_new, l_new)) if a != b), len(g_new))
    print(f"llama.cpp greedy: {l_new}  (agree on the first {same} of {n_new}; "
          f"llama-cpp-python {llama_cpp.__version__})")
    # teacher-forced: llama.cpp on gemma3's sequence, every position's logits
    llm.reset()
    llm.eval(seq[:-1])
    l_logits = np.asarray(llm.scores[:len(seq) - 1])
    diff = l_logits - g_logits
    d = np.abs(diff).max(axis=1)
    rel = np.sqrt((diff ** 2).mean()) / g_logits.std()
    agree = (l_logits.argmax(1) == g_logits.argmax(1))
    print(f"teacher-forced over {len(seq) - 1} positions: argmax agrees at {int(agree.sum())}; "
          f"rms logit difference / logit std {rel:.4f}; max |logit difference| per position: "
          + " ".join(f"{x:.3f}" for x in d))
    del llm
    if long:
        llm = llama_open(str(path), threads, n_long + 16, extra_bufts)
        llm.reset()
        llm.eval(long_ids)
        l_long = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(len(g_long),)).copy()
        del llm
        rel = np.sqrt(((l_long - g_long) ** 2).mean()) / g_long.std()
        print(f"after {n_long} random tokens: argmax gemma3 {int(g_long.argmax())} llama.cpp "
              f"{int(l_long.argmax())}; rms logit difference / logit std {rel:.4f}; "
              f"finite: {bool(np.isfinite(g_long).all() and np.isfinite(l_long).all())}")


def m_long(path: Path) -> int:
    f = gemma3.GGUFFile(path)
    try:
        return int(f.metadata.get("gemma3.attention.sliding_window", 512)) + 128
    finally:
        f.close()


def default_path(size: str, mix: str) -> Path:
    return Path.home() / ".cache" / "gemma3" / "bench" / f"gemma-3-{size}-random-{mix}.gguf"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", choices=sorted(SIZES), required=True)
    ap.add_argument("--mix", choices=sorted(FILE_TYPE), default="q4_k_m")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="default: all cores")
    ap.add_argument("--check", action="store_true", help="then compare gemma3 and llama.cpp")
    ap.add_argument("--check-only", action="store_true", help="only --check an existing file")
    ap.add_argument("--check-long", action="store_true",
                    help="--check also compares the last logits after window + 100 tokens")
    ap.add_argument("--peer-no-extra-bufts", action="store_true",
                    help="llama.cpp without repacked/AMX buffers (see bench_generate.py)")
    a = ap.parse_args(argv)
    out = a.out or default_path(a.size, a.mix)
    if a.check_only:
        check(out, threads=a.threads or 2, extra_bufts=not a.peer_no_extra_bufts,
              long=a.check_long)
        return 0
    t = time.perf_counter()
    make(a.size, a.mix, out, a.seed, a.threads)
    dt = time.perf_counter() - t
    f = gemma3.GGUFFile(out)
    counts: dict[str, int] = {}
    for ti in f.tensors.values():
        counts[ti.type] = counts.get(ti.type, 0) + 1
    f.close()
    print(f"{out}: {out.stat().st_size / 2**20:.1f} MiB in {dt:.1f} s; tensor types "
          + ", ".join(f"{k} x{v}" for k, v in sorted(counts.items())))
    if a.check:
        check(out, threads=a.threads or 2, extra_bufts=not a.peer_no_extra_bufts,
              long=a.check_long)
    return 0


if __name__ == "__main__":
    sys.exit(main())
