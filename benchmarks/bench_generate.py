"""llama-bench-style table: gemma3 vs llama.cpp on the same GGUF, each engine in its own process.

    python benchmarks/bench_generate.py [--model PATH] [--threads 1 2] [--depths 0 4096]
                                        [--reps 3] [--rounds 3] [--peer-python PY] [--no-peer]
                                        [--first torch] [--g3-python PY]
                                        [--prefill-precision exact|int16|int8]

Columns: pp512 (prompt processing, tokens/s over a 512-token batch) and tg128 (generation,
tokens/s over 128 single-token steps), each after `depth` tokens already in the cache. Every
measurement runs in a fresh process with the engine's own default environment: this script passes
its environment on unchanged and imports neither engine itself. One process measures one engine at
one thread count, all depths, `--reps` runs after a warm-up (median); `--rounds` rounds alternate
the engines' order, and the table gives the median over rounds and the ratio of medians.

The peer is llama.cpp through llama-cpp-python, with the same thread count, batch 512 and its
default F16 KV cache, run by `--peer-python` (default: this interpreter, if it has llama_cpp).
`--prefill-precision` loads gemma3 with that prompt activation precision (default "exact", the
24-bit default; "int16" and "int8" are the opt-ins whose agreement bench_prefill.py prints).
`--first torch` imports torch (and runs a torch matmul) in gemma3's process before gemma3, as a
notebook does; `--g3-python` picks the interpreter for gemma3 (one that has torch, for that case).

Also printed, from one more gemma3 process: decode memory traffic (bytes of weights read per token
x tokens/s) next to a streaming-read probe of this machine, and the per-op time of a decode step.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

PP, TG = 512, 128


def cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    fl = set(line.split(":")[1].split())
                    keep = ["avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni",
                            "avx512_bf16"]
                    return " ".join(k for k in keep if k in fl)
    except OSError:
        pass
    return platform.machine()


def tokens_for(n: int, vocab: int, seed: int) -> list[int]:
    import numpy as np

    rng = np.random.default_rng(seed)
    return [2] + rng.integers(1000, min(vocab, 200000), n - 1).tolist()


# ---- worker: gemma3 ------------------------------------------------------------------------------

def g3_worker(path: str, threads: int, depths: list[int], reps: int, first: str | None,
              precision: str = "exact") -> dict:
    if first == "torch":
        import torch

        a = torch.randn(512, 512)
        (a @ a).sum().item()
    import numpy as np

    import gemma3

    gemma3.set_num_threads(threads)
    n_ctx = max(depths) + PP + TG + 16
    model = gemma3.load(path, max_seq_len=n_ctx, prefill_precision=precision)
    core = model.engine.core
    out = {}
    for depth in depths:
        ctx = tokens_for(depth + PP + TG + 8, model.config.vocab_size, 1)
        pp, tg = [], []

        def fill():
            core.reset(0)
            for s in range(0, depth, 512):
                core.forward(np.asarray(ctx[s:min(s + 512, depth)], np.int32), 0)

        for r in range(reps + 1):  # the first round is the warm-up
            fill()
            t = time.perf_counter()
            core.forward(np.asarray(ctx[depth:depth + PP], np.int32), 1)
            t_pp = time.perf_counter() - t
            fill()
            if not depth:
                core.forward(np.asarray(ctx[:1], np.int32), 1)
            t = time.perf_counter()
            for i in range(TG):
                lg = core.forward(np.asarray([ctx[depth + 1 + i]], np.int32), 1)
                int(lg[0].argmax())  # what a greedy loop does with the logits
            t_tg = time.perf_counter() - t
            if r:
                pp.append(PP / t_pp)
                tg.append(TG / t_tg)
        out[str(depth)] = {"pp": statistics.median(pp), "tg": statistics.median(tg)}
    return out


def g3_extras(path: str, threads: int) -> dict:
    """Decode per-op breakdown, packed bytes, weight bytes per token, a read-bandwidth probe."""
    import mmap

    import numpy as np

    import gemma3
    from gemma3 import _core

    gemma3.set_num_threads(threads)
    model = gemma3.load(path, max_seq_len=1024)
    core = model.engine.core
    core.reset(0)
    core.forward(np.asarray(tokens_for(16, model.config.vocab_size, 3), np.int32), 1)
    core.profile(True)
    steps = 32
    for i in range(steps):
        core.forward(np.asarray([1000 + i], np.int32), 1)
    prof = {k: v / steps for k, v in core.profile(False).items() if k not in ("forwards", "tokens")}
    f = gemma3.GGUFFile(path)
    in_file = sum(t.nbytes for t in f.tensors.values())
    packed = model.packed_bytes
    rest = sum(t.nbytes for t in f.tensors.values()
               if len(t.shape) < 2 or not _core.packed_supported(t.type_id))
    per_token = packed + rest if packed else in_file
    buf = mmap.mmap(-1, 1024 * 2**20)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        try:
            buf.madvise(mmap.MADV_HUGEPAGE)
        except OSError:
            pass
    a = np.frombuffer(buf, np.float32)
    a[:] = 1.0
    _core.read_bandwidth(a)
    bw = a.nbytes / statistics.median(_core.read_bandwidth(a)[0] for _ in range(5)) / 1e9
    return {"profile": prof, "in_file": in_file, "packed": packed, "per_token": per_token,
            "read_gbs": bw, "isa": _core.isa()["selected"]}


# ---- worker: llama.cpp -----------------------------------------------------------------------------

def llama_worker(path: str, threads: int, depths: list[int], reps: int) -> dict:
    import llama_cpp

    n_ctx = max(depths) + PP + TG + 16
    llm = llama_cpp.Llama(model_path=path, n_threads=threads, n_threads_batch=threads,
                          n_ctx=n_ctx, n_batch=512, n_ubatch=512, verbose=False)
    vocab = llm.n_vocab()

    def clear():
        llm.reset()
        mem = llama_cpp.llama_get_memory(llm.ctx) if hasattr(llama_cpp, "llama_get_memory") \
            else None
        if mem is not None:
            llama_cpp.llama_memory_clear(mem, True)
        else:
            llama_cpp.llama_kv_cache_clear(llm.ctx)

    out = {}
    for depth in depths:
        ctx = tokens_for(depth + PP + TG + 8, vocab, 1)
        pp, tg = [], []
        for r in range(reps + 1):
            clear()
            if depth:
                llm.eval(ctx[:depth])
            t = time.perf_counter()
            llm.eval(ctx[depth:depth + PP])
            t_pp = time.perf_counter() - t
            clear()
            llm.eval(ctx[:depth] if depth else ctx[:1])
            t = time.perf_counter()
            for i in range(TG):
                llm.eval([ctx[depth + 1 + i]])
            t_tg = time.perf_counter() - t
            if r:
                pp.append(PP / t_pp)
                tg.append(TG / t_tg)
        out[str(depth)] = {"pp": statistics.median(pp), "tg": statistics.median(tg),
                           "version": llama_cpp.__version__}
    return out


# ---- orchestration ----------------------------------------------------------------------------------

def run_worker(python: str, args: list[str], script: str = __file__) -> dict:
    """One measurement (``script``'s worker) in a fresh process with this process's environment,
    unchanged."""
    cmd = [python, os.path.abspath(script), *args]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{p.stderr[-2000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def has_llama(python: str) -> bool:
    return subprocess.run([python, "-c", "import llama_cpp"], capture_output=True).returncode == 0


def peer_python(given: str | None, no_peer: bool) -> str | None:
    """The interpreter that runs llama.cpp (--peer-python, else this one), or None."""
    if no_peer:
        return None
    peer = given or sys.executable
    if not has_llama(peer):
        print(f"{peer} has no llama_cpp (pip install llama-cpp-python, or --peer-python): "
              "gemma3 alone", file=sys.stderr)
        return None
    return peer


def default_model(python: str) -> str:
    p = subprocess.run([python, "-c", "import gemma3; print(gemma3.default_model_path())"],
                       capture_output=True, text=True, check=True)
    return p.stdout.strip().splitlines()[-1]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--depths", type=int, nargs="+", default=[0, 4096])
    ap.add_argument("--reps", type=int, default=3, help="runs per process after a warm-up")
    ap.add_argument("--rounds", type=int, default=3, help="fresh processes per engine, alternating")
    ap.add_argument("--no-peer", action="store_true")
    ap.add_argument("--peer-python", default=None, help="interpreter with llama_cpp")
    ap.add_argument("--g3-python", default=sys.executable, help="interpreter with gemma3")
    ap.add_argument("--first", choices=["torch"], default=None,
                    help="import torch in gemma3's process before gemma3")
    ap.add_argument("--prefill-precision", choices=["exact", "int16", "int8"], default="exact",
                    help="gemma3's prompt activation precision (load(prefill_precision=...))")
    ap.add_argument("--worker", choices=["gemma3", "llama.cpp", "extras"], help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        th = a.threads[0]
        res = (g3_worker(a.model, th, a.depths, a.reps, a.first, a.prefill_precision)
               if a.worker == "gemma3" else
               llama_worker(a.model, th, a.depths, a.reps) if a.worker == "llama.cpp" else
               g3_extras(a.model, th))
        print(json.dumps(res))
        return 0

    path = a.model or default_model(a.g3_python)
    peer = peer_python(a.peer_python, a.no_peer)
    engines = [("gemma3", a.g3_python)] + ([("llama.cpp", peer)] if peer else [])
    common = ["--model", path, "--depths", *map(str, a.depths), "--reps", str(a.reps)]
    print(f"model: {path}")
    print(f"cpu: {os.cpu_count()} cores, flags: {cpu_flags()}; peer: "
          f"{'llama-cpp-python via ' + peer if peer else 'none'}; gemma3 first import: "
          f"{a.first or 'gemma3 alone'}; gemma3 prefill_precision={a.prefill_precision!r}; "
          f"load average {os.getloadavg()}")
    runs: dict = {}  # (engine, threads, depth) -> list of (pp, tg), one per round
    version = None
    for th in a.threads:
        for r in range(a.rounds):
            order = engines if r % 2 == 0 else engines[::-1]
            for name, python in order:
                extra = ["--first", a.first] if (name == "gemma3" and a.first) else []
                if name == "gemma3":
                    extra += ["--prefill-precision", a.prefill_precision]
                res = run_worker(python, ["--worker", name, "--threads", str(th), *common, *extra])
                for d, v in res.items():
                    runs.setdefault((name, th, int(d)), []).append((v["pp"], v["tg"]))
                    version = v.get("version", version)
                print(f"  round {r + 1}/{a.rounds} {name} threads={th}", file=sys.stderr)

    def med(name, th, d, i):
        v = runs.get((name, th, d))
        return statistics.median(x[i] for x in v) if v else None

    def ratio(x, y):
        return f"{x / y:6.2f}x" if x and y else "     -"

    def num(x):
        return f"{x:9.1f}" if x else "        -"

    print(f"\n{a.rounds} rounds x {a.reps} runs per engine and thread count, each round a fresh "
          f"process per engine, order alternating; llama-cpp-python {version or '-'}")
    print("| threads | depth | test  | gemma3 t/s | llama.cpp t/s | ratio |")
    print("|--------:|------:|:------|-----------:|--------------:|------:|")
    for th in a.threads:
        for d in a.depths:
            for i, test in ((0, f"pp{PP}"), (1, f"tg{TG}")):
                g, p = med("gemma3", th, d, i), med("llama.cpp", th, d, i)
                print(f"| {th:7d} | {d:5d} | {test} | {num(g)}  | {num(p)}     | {ratio(g, p)} |")

    th = max(a.threads)
    x = run_worker(a.g3_python, ["--worker", "extras", "--threads", str(th), "--model", path])
    tg2 = med("gemma3", th, min(a.depths), 1)
    print(f"\ngemma3 kernels: {x['isa']}; decode: " + (
        f"packed integer (VNNI), {x['packed'] / 2**20:.1f} MiB packed" if x["packed"]
        else "float dequantize-and-dot"))
    if tg2:
        ach = x["per_token"] * tg2 / 1e9
        print(f"decode memory traffic: {x['per_token'] / 2**20:.1f} MiB of weights read per token "
              f"(the file holds {x['in_file'] / 2**20:.1f} MiB) x {tg2:.1f} t/s = {ach:.2f} GB/s; "
              f"streaming-read probe ({th} threads, 1 GiB): {x['read_gbs']:.2f} GB/s -> "
              f"{100 * ach / x['read_gbs']:.0f}% of the roofline")
    tot = sum(x["profile"].values())
    print(f"\ngemma3 decode step ({th} threads, depth 16): {tot * 1e3:.2f} ms")
    for k, v in sorted(x["profile"].items(), key=lambda kv: -kv[1]):
        print(f"  {k:14s} {v * 1e3:7.3f} ms  {100 * v / tot:5.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
