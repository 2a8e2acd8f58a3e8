"""The long-context claim on the big shapes: random-weight Gemma 3 4B / 12B / 27B text GGUFs
(benchmarks/make_random_gguf.py) loaded with max_seq_len=131072 and a 16- or 8-bit KV cache.

    python benchmarks/bench_big_shapes.py --size 4b --mix q4_k_m --kv bf16 [--prompt 16384]
        [--decode 32] [--threads 2] [--peer-python /path/to/venv-with-llama-cpp-python/bin/python]

For each engine, in its own fresh process (ours first, then llama.cpp's with the matching
type_k / type_v and flash attention, which llama.cpp needs for a quantized V): the KV bytes
against the 5 local : 1 global theory (global layers hold every position, local layers a window),
the process's resident memory after loading and after the prompt, and with --prompt N, the
prefill tokens/s of an N-token prompt and the decode tokens/s that follow it at that depth.
Weights are random, so only the mechanics and the speed mean anything, not the tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
KV_BYTES = {"f32": 4.0, "bf16": 2.0, "f16": 2.0, "q8_0": 34 / 32}  # per element (q8_0: 32 + scale)
LLAMA_TYPE = {"f32": 0, "f16": 1, "q8_0": 8, "bf16": 30}  # ggml_type ids
GGUF_KEYS = ("block_count", "attention.head_count_kv", "attention.key_length",
             "attention.sliding_window")


def rss() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def theory(path: str, ctx: int, kv: str) -> dict:
    """KV bytes of one sequence by the 5:1 rule, from the file's own metadata."""
    sys.path.insert(0, str(HERE.parent))
    import gemma3

    f = gemma3.GGUFFile(path)
    md = {k: f.metadata[f"gemma3.{k}"] for k in GGUF_KEYS}
    f.close()
    n_layer, n_kv, hd, win = (int(md[k]) for k in GGUF_KEYS)
    n_global = sum(1 for i in range(n_layer) if (i + 1) % 6 == 0)
    per_pos = 2 * n_kv * hd * KV_BYTES[kv]
    return {"theory_5to1": per_pos * (n_global * ctx + (n_layer - n_global) * min(win, ctx)),
            "theory_all_global": per_pos * n_layer * ctx, "layers": n_layer,
            "global_layers": n_global, "window": win}


def prompt_ids(n: int) -> list[int]:
    import numpy as np

    return [2] + np.random.default_rng(7).integers(1000, 200000, n - 1).tolist()


def run_gemma3(a) -> dict:
    import numpy as np

    import gemma3

    out: dict = {"engine": "gemma3"}
    t = time.perf_counter()
    m = gemma3.load(a.model, max_seq_len=a.ctx, n_threads=a.threads, kv_dtype=a.kv)
    out["load_s"] = time.perf_counter() - t
    out["rss_after_load"] = rss()
    out["kv_bytes"] = m.memory()["kv_cache"]
    out["memory"] = m.memory()
    if a.prompt:
        ids = prompt_ids(a.prompt)
        t = time.perf_counter()
        m.logits(ids, last_only=True)
        out["prefill_tps"] = a.prompt / (time.perf_counter() - t)
        steps = []
        with m.engine.exclusive():
            for i in range(a.decode):
                t = time.perf_counter()
                m.engine.step(1000 + i)
                steps.append(time.perf_counter() - t)
        out["decode_tps"] = 1.0 / float(np.median(steps))
        out["rss_after_prompt"] = rss()
    return out


def run_llama(a) -> dict:
    import numpy as np
    from llama_cpp import Llama

    out: dict = {"engine": "llama.cpp"}
    t = time.perf_counter()
    llm = Llama(a.model, n_ctx=a.ctx, n_threads=a.threads, n_threads_batch=a.threads,
                n_batch=512, n_ubatch=512, type_k=LLAMA_TYPE[a.kv], type_v=LLAMA_TYPE[a.kv],
                flash_attn=True, verbose=False)
    out["load_s"] = time.perf_counter() - t
    out["rss_after_load"] = rss()
    if a.prompt:
        ids = prompt_ids(a.prompt)
        t = time.perf_counter()
        llm.eval(ids)
        out["prefill_tps"] = a.prompt / (time.perf_counter() - t)
        steps = []
        for i in range(a.decode):
            t = time.perf_counter()
            llm.eval([1000 + i])
            steps.append(time.perf_counter() - t)
        out["decode_tps"] = 1.0 / float(np.median(steps))
        out["rss_after_prompt"] = rss()
    return out


def child(a) -> int:
    res = run_gemma3(a) if a.engine == "gemma3" else run_llama(a)
    print("RESULT " + json.dumps(res))
    return 0


def spawn(python: str, a, engine: str, extra_env: dict | None = None) -> dict:
    cmd = [python, __file__, "--child", engine, "--model", a.model, "--ctx", str(a.ctx),
           "--kv", a.kv, "--prompt", str(a.prompt), "--decode", str(a.decode),
           "--threads", str(a.threads)]
    env = dict(os.environ)
    if engine == "gemma3":
        env["PYTHONPATH"] = str(HERE.parent) + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    for line in r.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    return {"engine": engine, "error": (r.stderr or r.stdout).strip().splitlines()[-3:]}


def result_line(r: dict, a, th: dict) -> str:
    if "error" in r:
        return f"{r['engine']}: FAILED {r['error']}"
    line = (f"{r['engine']:>9}: load {r['load_s']:.1f} s, RSS after load "
            f"{r['rss_after_load'] / 2**30:.2f} GiB")
    if "kv_bytes" in r:
        line += (f", KV {r['kv_bytes'] / 2**30:.3f} GiB = "
                 f"{r['kv_bytes'] / th['theory_5to1']:.3f} x theory")
    if "prefill_tps" in r:
        line += (f"; {a.prompt}-token prompt {r['prefill_tps']:.1f} t/s, then decode "
                 f"{r['decode_tps']:.2f} t/s; RSS {r['rss_after_prompt'] / 2**30:.2f} GiB")
    return line


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="4b")
    ap.add_argument("--mix", default="q4_k_m")
    ap.add_argument("--model", default=None)
    ap.add_argument("--ctx", type=int, default=131072)
    ap.add_argument("--kv", choices=sorted(KV_BYTES), default="bf16")
    ap.add_argument("--prompt", type=int, default=0, help="prompt tokens (0: load only)")
    ap.add_argument("--decode", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--peer-python", default=None)
    ap.add_argument("--g3-python", default=sys.executable)
    ap.add_argument("--child", choices=["gemma3", "llama"], default=None)
    a = ap.parse_args(argv)
    if a.model is None:
        a.model = str(Path.home() / ".cache" / "gemma3" / "bench" /
                      f"gemma-3-{a.size}-random-{a.mix}.gguf")
    if a.child:
        a.engine = a.child
        return child(a)
    th = theory(a.model, a.ctx, a.kv)
    print(f"model: {a.model} ({os.path.getsize(a.model) / 2**30:.2f} GiB), max_seq_len {a.ctx}, "
          f"kv {a.kv}, {a.threads} threads, load average {os.getloadavg()[0]:.2f}")
    print(f"{th['layers']} layers, {th['global_layers']} global, window {th['window']}: KV theory "
          f"5:1 = {th['theory_5to1'] / 2**30:.3f} GiB (all layers global: "
          f"{th['theory_all_global'] / 2**30:.2f} GiB)")
    # each engine's line is printed as soon as its process ends (llama.cpp's 16K prompt on the 4B
    # takes tens of minutes: ours should not wait for it to be seen)
    runs = []
    for python, engine in [(a.g3_python, "gemma3")] + ([(a.peer_python, "llama")]
                                                        if a.peer_python else []):
        runs.append(spawn(python, a, engine))
        print(result_line(runs[-1], a, th), flush=True)
    ok = [r for r in runs if "prefill_tps" in r]
    if len(ok) == 2:
        print(f"ratio gemma3 / llama.cpp: prefill {ok[0]['prefill_tps'] / ok[1]['prefill_tps']:.2f}x"
              f", decode {ok[0]['decode_tps'] / ok[1]['decode_tps']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
