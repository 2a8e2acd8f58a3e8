"""Resident memory of the 270M after load + 8 generated tokens, gemma3 against llama.cpp.

    python benchmarks/bench_memory.py [--model PATH] [--ctx 4096] [--threads 2] [--rounds 3]
                                      [--peer-python PY] [--no-peer] [--g3-python PY]

Each engine runs in a fresh process of its own, with its own default environment, rounds
alternating the order. A process loads the file with a context of ``--ctx`` tokens (gemma3:
``max_seq_len``, llama.cpp: ``n_ctx``), generates 8 tokens greedily through the public API
(``Model.generate``; ``Llama.generate``), then reads its resident set (VmRSS) and its peak
(VmHWM) from /proc/self/status. It then times greedy generation of 8 and of 136 tokens from
the same prompt (median of 3 each, after that first call as warm-up): decode tokens/s is
128 / (t136 - t8), so the prompt's cost cancels. End of text does not stop either engine
(gemma3: ``stop_token_ids=[]``; llama.cpp's ``generate`` is a bare token iterator).

gemma3's process also prints its ``Model.memory()`` breakdown (packed / mapped / owned weights, KV
cache, run state). Medians over the rounds and the ratio are printed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_generate import default_model, peer_python, run_worker  # noqa: E402

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."
SHORT, LONG = 8, 136


def status() -> dict:
    out = {}
    for line in open("/proc/self/status"):
        key = line.split(":")[0]
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(line.split()[1]) * 1024
    return out


def decode_rate(gen) -> float:
    """128 / (t(136 tokens) - t(8 tokens)), each the median of 3 timed calls."""
    times = {}
    for n in (SHORT, LONG):
        ts = []
        for _ in range(3):
            t = time.perf_counter()
            got = gen(n)
            ts.append(time.perf_counter() - t)
            assert got == n, (got, n)
        times[n] = statistics.median(ts)
    return (LONG - SHORT) / (times[LONG] - times[SHORT])


def g3_worker(path: str, ctx: int, threads: int) -> dict:
    import gemma3

    m = gemma3.load(path, max_seq_len=ctx, n_threads=threads)

    def gen(n):
        return len(m.generate(PROMPT, max_new_tokens=n, temperature=0, stop_token_ids=[],
                              return_ids=True))

    gen(SHORT)
    res = {**status(), "memory": m.memory()}
    res["decode_tps"] = decode_rate(gen)
    return res


def llama_worker(path: str, ctx: int, threads: int) -> dict:
    from llama_cpp import Llama

    llm = Llama(path, n_ctx=ctx, n_threads=threads, n_threads_batch=threads, n_batch=512,
                verbose=False)
    prompt = llm.tokenize(PROMPT.encode())

    def gen(n):
        got = 0
        for _ in llm.generate(prompt, temp=0.0, reset=True):
            got += 1
            if got == n:
                break
        return got

    gen(SHORT)
    res = status()
    res["decode_tps"] = decode_rate(gen)
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--ctx", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-peer", action="store_true")
    ap.add_argument("--peer-python", default=None, help="interpreter with llama_cpp")
    ap.add_argument("--g3-python", default=sys.executable, help="interpreter with gemma3")
    ap.add_argument("--worker", choices=["gemma3", "llama.cpp"], help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        fn = g3_worker if a.worker == "gemma3" else llama_worker
        print(json.dumps(fn(a.model, a.ctx, a.threads)))
        return 0

    path = a.model or default_model(a.g3_python)
    peer = peer_python(a.peer_python, a.no_peer)
    engines = [("gemma3", a.g3_python)] + ([("llama.cpp", peer)] if peer else [])
    print(f"model: {path} ({os.path.getsize(path) / 2**20:.1f} MiB), context {a.ctx}, "
          f"{a.threads} threads, {a.rounds} rounds alternating, load average "
          f"{os.getloadavg()[0]:.2f}")
    runs: dict = {name: [] for name, _ in engines}
    for r in range(a.rounds):
        for name, python in (engines if r % 2 == 0 else engines[::-1]):
            res = run_worker(python, ["--worker", name, "--model", path, "--ctx", str(a.ctx),
                                      "--threads", str(a.threads)], __file__)
            runs[name].append(res)
            print(f"  round {r + 1} {name:9}: RSS {res['VmRSS'] / 2**20:7.1f} MiB (peak "
                  f"{res['VmHWM'] / 2**20:7.1f}), decode {res['decode_tps']:6.1f} t/s", flush=True)
    med = {name: {k: statistics.median(x[k] for x in rs) for k in ("VmRSS", "VmHWM", "decode_tps")}
           for name, rs in runs.items()}
    print(f"\n| engine | RSS after load + {SHORT} tokens (MiB) | peak RSS (MiB) | decode t/s |")
    print("|:--|--:|--:|--:|")
    for name, v in med.items():
        print(f"| {name} | {v['VmRSS'] / 2**20:.1f} | {v['VmHWM'] / 2**20:.1f} | "
              f"{v['decode_tps']:.1f} |")
    if "llama.cpp" in med:
        g, p = med["gemma3"], med["llama.cpp"]
        print(f"gemma3 / llama.cpp: RSS {g['VmRSS'] / p['VmRSS']:.3f}x, peak "
              f"{g['VmHWM'] / p['VmHWM']:.3f}x, decode {g['decode_tps'] / p['decode_tps']:.2f}x")
    mem = runs["gemma3"][-1]["memory"]
    print("gemma3 memory(): " + ", ".join(
        f"{k} {v / 2**20:.1f} MiB" for k, v in mem.items() if isinstance(v, int) and v))
    return 0


if __name__ == "__main__":
    sys.exit(main())
