"""Long context on the 270M model, per KV cache type: memory, speed at depth, fidelity.

    python benchmarks/bench_context.py [--model PATH] [--threads 2] [--ctx 32768]
                                       [--kv f32 bf16 f16 q8_0] [--fidelity 2500]
                                       [--peer-python PY] [--no-peer]

For each ``kv_dtype`` (gemma3.load(kv_dtype=)), in a fresh process of its own:
  - KV bytes: reserved by gemma3 (the cache buffers) against the theory of Gemma 3's layout (global
    layers every position, local layers a ring of window + KV_RING_MARGIN slots) and against every
    layer global;
  - pp512 tokens/s at depths 0, 4K, 8K, 16K and ctx - 512 while a ctx-token prompt is fed in 512-token
    chunks, and decode tokens/s at the full depth (median of 32 steps);
  - fidelity on a `--fidelity`-token prompt (more than 4 sliding windows): top-1 agreement with the
    f32 cache at every position, and the largest KL(f32 || kv) over the f32 run's top-64 ids
    (renormalized there: the full-vocabulary KL would need 2,500 x 262K floats kept).
The peer is llama.cpp (llama-cpp-python, ``--peer-python``, default: this interpreter when it has
llama_cpp) with the matching ``type_k``/``type_v`` and ``flash_attn=True``, in its own process,
same prompt, same chunking. Processes run one after another; rerun for medians on a busy machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

CHUNK = 512
TYPES = ["f32", "bf16", "f16", "q8_0"]
GGML_TYPE = {"f32": 0, "f16": 1, "q8_0": 8, "bf16": 30}


def prompt(n: int):
    import numpy as np

    rng = np.random.default_rng(7)
    return np.concatenate([[2], rng.integers(1000, 200000, n + 64)]).astype(np.int32)


def marks_for(n: int) -> list[int]:
    return sorted({0, 4096, 8192, 16384, n - CHUNK} & set(range(0, n, CHUNK)))


def log_softmax(x):
    import numpy as np

    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def g3_worker(path: str, threads: int, n: int, kv: str, fid_n: int, ref: str | None) -> dict:
    import numpy as np

    import gemma3
    from gemma3 import _core

    gemma3.set_num_threads(threads)
    ids = prompt(n)
    model = gemma3.load(path, max_seq_len=n + 64, kv_dtype=kv)
    cfg, core = model.config, model.engine.core
    pp = {}
    for s in range(0, n, CHUNK):
        t = time.perf_counter()
        core.forward(ids[s:s + CHUNK], 1 if s + CHUNK >= n else 0)
        if s in marks_for(n):
            pp[s] = CHUNK / (time.perf_counter() - t)
    steps = []
    for i in range(32):
        t = time.perf_counter()
        core.forward(ids[n + i:n + i + 1], 1)
        steps.append(time.perf_counter() - t)
    reserved = core.cache_bytes
    row = {"f32": 4 * cfg.head_dim, "f16": 2 * cfg.head_dim, "bf16": 2 * cfg.head_dim,
           "q8_0": cfg.head_dim // 32 * 34}[kv]
    per_pos = 2 * cfg.num_kv_heads * row
    n_glob, L, N = len(cfg.global_layers), cfg.num_layers, n + 64
    ring = min(cfg.sliding_window + _core.KV_RING_MARGIN, N)
    out = {"pp": pp, "tg": 1.0 / sorted(steps)[len(steps) // 2], "reserved": reserved,
           "theory": per_pos * (n_glob * N + (L - n_glob) * ring), "all_global": per_pos * L * N}
    model.close()
    if fid_n:
        m = gemma3.load(path, max_seq_len=fid_n + 8, kv_dtype=kv)
        fids = prompt(fid_n)[:fid_n].tolist()
        z = np.load(ref) if ref else None
        logits = m.logits(fids)
        top1 = logits.argmax(-1)
        ls = log_softmax(logits)
        if z is None:
            ids64 = np.argsort(-logits, axis=-1)[:, :64]
            np.savez(os.environ["G3_BENCH_REF"], top1=top1, ids64=ids64,
                     lp64=np.take_along_axis(ls, ids64, -1))
        else:
            p_log = z["lp64"] - np.log(np.exp(z["lp64"]).sum(-1, keepdims=True))
            q = np.take_along_axis(ls, z["ids64"], -1)
            q_log = q - np.log(np.exp(q).sum(-1, keepdims=True))
            kl = (np.exp(p_log) * (p_log - q_log)).sum(-1)
            out["top1"] = float((top1 == z["top1"]).mean())
            out["kl_max"] = float(kl.max())
        m.close()
    return out


def llama_worker(path: str, threads: int, n: int, kv: str) -> dict:
    import statistics

    import llama_cpp

    ids = prompt(n).tolist()
    llm = llama_cpp.Llama(model_path=path, n_threads=threads, n_threads_batch=threads,
                          n_ctx=n + 64, n_batch=CHUNK, n_ubatch=CHUNK, flash_attn=True,
                          type_k=GGML_TYPE[kv], type_v=GGML_TYPE[kv], verbose=False)
    pp = {}
    for s in range(0, n, CHUNK):
        t = time.perf_counter()
        llm.eval(ids[s:s + CHUNK])
        if s in marks_for(n):
            pp[s] = CHUNK / (time.perf_counter() - t)
    steps = []
    for i in range(32):
        t = time.perf_counter()
        llm.eval([ids[n + i]])
        steps.append(time.perf_counter() - t)
    return {"pp": pp, "tg": 1.0 / statistics.median(steps)}


def run(py: str, args: list[str], env: dict | None = None) -> dict | None:
    r = subprocess.run([py, __file__, *args], capture_output=True, text=True,
                       env={**os.environ, **(env or {})})
    if r.returncode:
        print(r.stderr[-2000:], file=sys.stderr)
        return None
    return json.loads(r.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ctx", type=int, default=32768)
    ap.add_argument("--kv", nargs="+", default=TYPES, choices=TYPES)
    ap.add_argument("--fidelity", type=int, default=2500, help="prompt tokens (0: skip)")
    ap.add_argument("--peer-python", default=None)
    ap.add_argument("--no-peer", action="store_true")
    ap.add_argument("--worker", choices=["gemma3", "llama.cpp"], help=argparse.SUPPRESS)
    ap.add_argument("--kv-one", default="f32", help=argparse.SUPPRESS)
    ap.add_argument("--ref", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.model is None:
        import gemma3

        a.model = str(gemma3.default_model_path())
    if a.worker == "gemma3":
        print(json.dumps(g3_worker(a.model, a.threads, a.ctx, a.kv_one, a.fidelity, a.ref)))
        return 0
    if a.worker == "llama.cpp":
        print(json.dumps(llama_worker(a.model, a.threads, a.ctx, a.kv_one)))
        return 0
    peer_py = a.peer_python or sys.executable
    common = ["--model", a.model, "--threads", str(a.threads), "--ctx", str(a.ctx)]
    res, peer = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        ref = os.path.join(tmp, "f32.npz")
        kinds = ["f32"] + [k for k in a.kv if k != "f32"]  # f32 first: the fidelity reference
        for kv in kinds:
            args = ["--worker", "gemma3", "--kv-one", kv, "--fidelity", str(a.fidelity), *common]
            if kv != "f32" and os.path.exists(ref):
                args += ["--ref", ref]
            res[kv] = run(sys.executable, args, {"G3_BENCH_REF": ref})
            if not a.no_peer:
                peer[kv] = run(peer_py, ["--worker", "llama.cpp", "--kv-one", kv, *common])
    load = os.getloadavg()
    print(f"model {a.model}; {a.threads} threads; {a.ctx}-token prompt in chunks of {CHUNK}; "
          f"load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}")
    print("\n| kv_dtype | KV MiB (theory) | all-global MiB | top-1 vs f32 | max KL (top-64) |")
    print("|:--|--:|--:|--:|--:|")
    for kv, r in res.items():
        if not r:
            continue
        fid = (f"{100 * r['top1']:.2f}% | {r['kl_max']:.2e}" if "top1" in r else "(ref) | -")
        print(f"| {kv} | {r['reserved'] / 2**20:.1f} ({r['theory'] / 2**20:.1f}) | "
              f"{r['all_global'] / 2**20:.1f} | {fid} |")
    print("\n| kv_dtype | measure | gemma3 t/s | llama.cpp t/s | ratio |")
    print("|:--|:--|--:|--:|--:|")
    for kv, r in res.items():
        if not r:
            continue
        p = peer.get(kv)
        rows = [(f"pp{CHUNK} at depth {d}", r["pp"][d], p and p["pp"].get(d)) for d in r["pp"]]
        rows.append((f"tg at depth {a.ctx}", r["tg"], p and p["tg"]))
        for name, ours, theirs in rows:
            ratio = f"{ours / theirs:.2f}x" if theirs else "-"
            print(f"| {kv} | {name} | {ours:.1f} | {f'{theirs:.1f}' if theirs else '-'} | "
                  f"{ratio} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
