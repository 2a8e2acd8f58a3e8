"""Speculative decoding: plain vs prompt-lookup vs draft-model decode speed, acceptance, and the
cost of a verify pass, with llama.cpp's lookup decoding on the same prompts.

    python benchmarks/bench_speculative.py [--model PATH] [--threads 2] [--k 4 8] [--new 96]
                                           [--reps 3] [--random 1b 4b] [--no-peer]

1. The real 270M on input-grounded prompts (rewrite a given text with one change, summarise a
   given text, continue code with repeated identifiers): greedy decode tokens/s plain and with
   ``draft="prompt_lookup"`` for each k, acceptance rate, tokens per verify pass, and whether the
   output equals plain greedy. The 270M drafting for itself (a second copy) shows the draft-model
   mechanics (its acceptance is ~1 by construction, its cost ~2x).
2. A verify pass: one forward of k + 1 tokens vs one decode step, after 300 cached tokens
   (median of alternating runs): the greedy pass (every row's arg-max, engine.feed mode 3) and
   the sampling pass (every row's logits).
3. The random-weight 1B/4B (benchmarks/make_random_gguf.py; made if missing) with the 270M as
   draft model: decode tokens/s plain vs drafted, and the verify-pass ratio. Acceptance there is
   meaningless (random weights), only the mechanics and costs are.
4. llama.cpp (llama-cpp-python, ``LlamaPromptLookupDecoding``) plain vs lookup on the same prompts
   and GGUF, same threads.

Decode tokens/s is N / t(N), t(N) the time of a call generating N tokens with its prompt already
cached (an untimed warm-up call before each; the timed call feeds one prompt token again). Modes
alternate within each of --reps rounds so that load from other processes spreads over all of
them; medians are printed.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

try:  # the llama.cpp section runs in llama-cpp-python's environment, without gemma3
    import gemma3
    from gemma3 import speculative as spec
except ImportError:
    gemma3 = spec = None

ROOT = Path(__file__).resolve().parents[1]
LLAMA_PYTHON = "/work/llamavenv/bin/python"

PD = (ROOT / "tests" / "data" / "pd_text.txt").read_text()

CODE = '''class InventoryManager:
    def __init__(self, warehouse_name, inventory_items):
        self.warehouse_name = warehouse_name
        self.inventory_items = inventory_items

    def total_inventory_value(self):
        return sum(item.unit_price * item.quantity for item in self.inventory_items)

    def find_inventory_item(self, item_name):
        for item in self.inventory_items:
            if item.item_name == item_name:
                return item
        return None

    def remove_inventory_item(self, item_name):
'''


def prompts() -> dict[str, str]:
    text = PD[:1400]
    return {
        "rewrite": ("Rewrite the following text, replacing the name 'Bennet' by 'Smith' and "
                    f"changing nothing else.\n\nText:\n{text}\n\nRewritten text:\n"),
        "summarise": f"Summarise the following text in a few sentences.\n\n{text}\n\nSummary:",
        "code": CODE,
    }


def cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    fl = set(line.split(":")[1].split())
                    keep = ["avx2", "fma", "avx512f", "avx512bw", "avx512_vnni"]
                    return " ".join(k for k in keep if k in fl)
    except OSError:
        pass
    return platform.machine()


def decode_rates(runs: dict, n: int, reps: int) -> dict:
    """{mode: n / median t(n)}; run(n) generates n tokens from a cached prompt (it does its own
    untimed warm-up). Modes alternate within each round."""
    times = {k: [] for k in runs}
    for _ in range(reps):
        for k, run in runs.items():
            times[k].append(run(n))
    return {k: n / statistics.median(v) for k, v in times.items()}


def g3_runner(model, prompt: str, **kw):
    def run(n):
        model.generate(prompt, max_new_tokens=1, temperature=0)  # cache the prompt
        t = time.perf_counter()
        model.generate(prompt, max_new_tokens=n, temperature=0, **kw)
        return time.perf_counter() - t
    return run


def verify_ratio(model, ks: list[int], reps: int) -> dict:
    """Median time of a verify pass of k + 1 tokens / one decode step (logits of its one row).
    Keys (k, 3): the greedy pass (every row's arg-max only, what greedy speculative decoding
    asks for); (k, 2): every row's logits (speculative sampling); 0: the step in seconds."""
    eng = model.engine
    core = eng.core
    ids = np.asarray([2] + list(range(1000, 1299)), np.int32)
    times = {(0, 1): []} | {(k, mode): [] for k in ks for mode in (3, 2)}
    with eng.exclusive():
        eng.reset()
        core.forward(ids, 0)
        n0 = core.n_past
        for r in range(reps * 5 + 1):
            for k, mode in times:
                assert core.truncate(n0)
                t = time.perf_counter()
                core.forward(ids[1:k + 2], mode)
                if r:
                    times[(k, mode)].append(time.perf_counter() - t)
        eng.reset()
    one = statistics.median(times[(0, 1)])
    return {key: statistics.median(v) / one for key, v in times.items() if key[0]} | {0: one}


def section_270m(m, ks, n, reps, draft_copy):
    print(f"\n## 270M, greedy, {n} new tokens")
    print("| prompt | mode | decode tok/s | x plain | acceptance | tokens/verify | same as plain |")
    print("|---|---|---:|---:|---:|---:|---|")
    for name, p in prompts().items():
        plain_ids = m.generate(p, max_new_tokens=n, temperature=0, return_ids=True)
        modes = [(f"prompt_lookup k={k}", "prompt_lookup", k) for k in ks]
        if draft_copy is not None:
            modes.append((f"270M draft k={ks[0]}", draft_copy, ks[0]))
        runs = {"plain": g3_runner(m, p)} | {
            label: g3_runner(m, p, draft=d, num_draft_tokens=k) for label, d, k in modes}
        rates = decode_rates(runs, n, reps)
        base = rates["plain"]
        print(f"| {name} | plain | {base:.1f} | 1.00 | | | |")
        for label, d, k in modes:
            st = spec.Stats()
            got = m.generate(p, max_new_tokens=n, temperature=0, return_ids=True, draft=d,
                             num_draft_tokens=k, stats=st)
            rate = rates[label]
            print(f"| {name} | {label} | {rate:.1f} | {rate / base:.2f} | "
                  f"{st.acceptance_rate:.2f} | {st.tokens_per_call:.2f} | {got == plain_ids} |")


def section_verify(models: dict, ks, reps):
    print("\n## Verify pass of k + 1 tokens / one decode step, after 300 cached tokens")
    print("greedy: every row's arg-max (engine.feed mode 3, what greedy speculative decoding "
          "runs); all logits: every row's logits (speculative sampling)")
    print("| model | 1-token step ms | " + " | ".join(f"k={k} greedy | k={k} all logits"
                                                     for k in ks) + " |")
    print("|---|---:|" + "---:|---:|" * len(ks))
    for name, model in models.items():
        r = verify_ratio(model, ks, reps)
        print(f"| {name} | {r[0] * 1e3:.1f} | " +
              " | ".join(f"{r[(k, 3)]:.2f}x | {r[(k, 2)]:.2f}x" for k in ks) + " |")


def section_random(paths: dict, m270, ks, n, reps, threads):
    print(f"\n## Random-weight models with the 270M as draft ({n} new tokens; acceptance is "
          "meaningless with random weights)")
    print("| model | mode | decode tok/s | x plain | acceptance | tokens/verify |")
    print("|---|---|---:|---:|---:|---:|")
    loaded = {}
    p = prompts()["code"]
    for size, path in paths.items():
        t = gemma3.load(path, n_threads=threads, max_seq_len=2048)
        loaded[f"random {size}"] = t
        runs = {"plain": g3_runner(t, p)} | {
            k: g3_runner(t, p, draft=m270, num_draft_tokens=k) for k in ks}
        rates = decode_rates(runs, n, reps)
        base = rates["plain"]
        print(f"| {size} | plain | {base:.1f} | 1.00 | | |")
        for k in ks:
            st = spec.Stats()
            t.generate(p, max_new_tokens=n, temperature=0, draft=m270, num_draft_tokens=k,
                       stats=st)
            print(f"| {size} | 270M draft k={k} | {rates[k]:.1f} | {rates[k] / base:.2f} | "
                  f"{st.acceptance_rate:.2f} | {st.tokens_per_call:.2f} |")
    return loaded


def section_llama(path: str, ks, n, reps, threads):
    try:
        from llama_cpp import Llama
        from llama_cpp.llama_speculative import LlamaPromptLookupDecoding
        import llama_cpp
    except ImportError as e:
        print(f"\n(llama.cpp peer skipped: {e}; run with /work/llamavenv/bin/python)")
        return
    print(f"\n## llama.cpp {llama_cpp.__version__} (llama-cpp-python), same GGUF, {threads} "
          "threads, greedy")
    print("| prompt | mode | decode tok/s | x plain |")
    print("|---|---|---:|---:|")

    def runner(llm, p):
        def run(k):
            llm.create_completion(p, max_tokens=1, temperature=0.0)  # cache the prompt
            t = time.perf_counter()
            llm.create_completion(p, max_tokens=k, temperature=0.0)
            return time.perf_counter() - t
        return run

    common = dict(model_path=path, n_ctx=4096, n_threads=threads, n_threads_batch=threads,
                  n_batch=512, verbose=False)
    plain = Llama(**common)
    lookups = {k: Llama(**common, draft_model=LlamaPromptLookupDecoding(num_pred_tokens=k))
               for k in ks}
    for name, p in prompts().items():
        rates = decode_rates({"plain": runner(plain, p)} | {
            k: runner(llm, p) for k, llm in lookups.items()}, n, reps)
        base = rates["plain"]
        print(f"| {name} | plain | {base:.1f} | 1.00 |")
        for k in lookups:
            print(f"| {name} | lookup k={k} | {rates[k]:.1f} | {rates[k] / base:.2f} |")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="the 270M GGUF (default: the embedded one)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--k", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--new", type=int, default=96)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--random", nargs="*", default=["1b"], choices=["1b", "4b"])
    ap.add_argument("--no-peer", action="store_true")
    ap.add_argument("--llama-python", default=LLAMA_PYTHON,
                    help="a Python with llama-cpp-python for the peer section")
    ap.add_argument("--only", choices=["270m", "verify", "random", "peer"], nargs="*")
    a = ap.parse_args(argv)
    only = set(a.only or ["270m", "verify", "random", "peer"])
    if gemma3 is None:  # the peer section, run in llama-cpp-python's environment
        section_llama(a.model, a.k, a.new, a.reps, a.threads)
        return 0
    path = str(a.model or gemma3.default_model_path())
    print(f"# bench_speculative: {platform.node()}, CPU flags: {cpu_flags()}, threads "
          f"{a.threads}; machine shared with other jobs: figures are medians of {a.reps} runs")
    m = gemma3.load(path, n_threads=a.threads, max_seq_len=4096)
    if "270m" in only:
        copy = gemma3.load(path, n_threads=a.threads, max_seq_len=4096)
        section_270m(m, a.k, a.new, a.reps, copy)
        copy.close()
    models = {"270M": m}
    if ("random" in only or "verify" in only) and a.random:
        sys.path.insert(0, str(ROOT / "benchmarks"))
        import make_random_gguf as mrg

        paths = {}
        for size in a.random:
            p = mrg.default_path(size, "q4_k_m")
            if not p.exists():
                print(f"(making {p})")
                mrg.make(size, "q4_k_m", p)
            paths[size] = p
        if "random" in only:
            models |= section_random(paths, m, a.k, min(a.new, 48), a.reps, a.threads)
        else:
            models |= {f"random {s}": gemma3.load(p, n_threads=a.threads, max_seq_len=2048)
                       for s, p in paths.items()}
    if models and "verify" in only:
        section_verify(models, a.k, a.reps)
    if not a.no_peer and "peer" in only:
        m.close()  # free the cores' caches and memory for the peer
        if os.path.exists(a.llama_python):
            sys.stdout.flush()
            subprocess.run([a.llama_python, __file__, "--model", path, "--threads",
                            str(a.threads), "--new", str(a.new), "--reps", str(a.reps),
                            "--k", *map(str, a.k)], check=False)
        else:
            print(f"\n(llama.cpp peer skipped: no {a.llama_python})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
