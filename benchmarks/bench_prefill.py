"""Prompt processing with the packed prefill GEMM: speed and agreement of each activation precision.

    python benchmarks/bench_prefill.py [--model PATH] [--threads 1 2] [--rounds 3] [--reps 3]

Speed: pp512 (tokens/s over one 512-token forward call, depth 0) for load(prefill_precision=
"exact"), "int16" and "int8", each measurement in a fresh process, the precisions' order
alternating over rounds; the table gives medians and each opt-in's ratio to exact.

Agreement (the 270M file the test fixtures were made from): logits of the four reference prompts
of tests/fixtures/ref_270m.npz (transformers float32 on the file's dequantized weights) per
precision: max |d logit| over the reference's top-16 ids, max top-16 KL, and the fraction of
positions whose top-1 token is the reference's. The exact mode is what tests/test_model.py holds
to tests/tolerances.py; int16 and int8 are the opt-ins and are only reported.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PRECISIONS = ("exact", "int16", "int8")


def worker(path: str, threads: int, precision: str, reps: int) -> dict:
    import numpy as np

    import gemma3

    gemma3.set_num_threads(threads)
    model = gemma3.load(path, max_seq_len=1024, prefill_precision=precision)
    core = model.engine.core
    rng = np.random.default_rng(1)
    ids = np.asarray([2] + rng.integers(1000, 200000, 511).tolist(), np.int32)
    pp = []
    for r in range(reps + 1):  # the first is the warm-up
        core.reset(0)
        t = time.perf_counter()
        core.forward(ids, 1)
        if r:
            pp.append(512 / (time.perf_counter() - t))
    return {"pp": statistics.median(pp)}


def agreement(path: str) -> dict:
    import numpy as np

    import gemma3

    fix = ROOT / "tests" / "fixtures"
    z = np.load(fix / "ref_270m.npz")
    meta = json.loads((fix / "ref_270m.json").read_text())
    out = {}
    for precision in PRECISIONS:
        model = gemma3.load(path, max_seq_len=1024, prefill_precision=precision)
        worst, kl_max, same, n = 0.0, 0.0, 0, 0
        for name in meta["prompts"]:
            ids = z[f"{name}__ids"]
            lg = model.logits(ids).astype(np.float64)
            ti, tv = z[f"{name}__top16_ids"], z[f"{name}__top16_logits"].astype(np.float64)
            ours = np.take_along_axis(lg, ti, axis=1)
            worst = max(worst, float(np.abs(ours - tv).max()))
            p = np.exp(tv - tv.max(1, keepdims=True))
            p /= p.sum(1, keepdims=True)
            q = ours - ours.max(1, keepdims=True)
            q -= np.log(np.exp(q).sum(1, keepdims=True))
            kl_max = max(kl_max, float((p * (np.log(p) - q)).sum(1).max()))
            same += int((lg.argmax(1) == ti[:, 0]).sum())
            n += len(ids)
        out[precision] = {"dlogit": worst, "kl": kl_max, "top1": same / n, "positions": n}
        model.close()
    return out


def run(args: list[str]) -> dict:
    p = subprocess.run([sys.executable, os.path.abspath(__file__), *args], capture_output=True,
                       text=True)
    if p.returncode:
        raise RuntimeError(p.stderr[-2000:])
    return json.loads(p.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)  # threads precision reps
    ap.add_argument("--agreement-only", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.model is None:
        import gemma3

        a.model = gemma3.default_model_path()
    if a.worker:
        print(json.dumps(worker(a.model, int(a.worker[0]), a.worker[1], int(a.worker[2]))))
        return 0
    if a.agreement_only:
        print(json.dumps(agreement(a.model)))
        return 0
    print(f"model {a.model}; load average {os.getloadavg()[0]:.1f} at start")
    res = {(t, p): [] for t in a.threads for p in PRECISIONS}
    for r in range(a.rounds):
        for t in a.threads:
            order = PRECISIONS if r % 2 == 0 else PRECISIONS[::-1]
            for p in order:
                res[t, p].append(run(["--model", a.model, "--worker", str(t), p,
                                      str(a.reps)])["pp"])
    low = PRECISIONS[1:]
    print(f"\n{'threads':>7} {'exact pp512':>12}" + "".join(
        f" {p + ' pp512':>11} {p + '/exact':>11}" for p in low))
    for t in a.threads:
        e = statistics.median(res[t, "exact"])
        cells = ""
        for p in low:
            i = statistics.median(res[t, p])
            cells += f" {i:>11.1f} {i / e:>11.2f}"
        print(f"{t:>7} {e:>12.1f}{cells}")
    print(f"load average {os.getloadavg()[0]:.1f} at end")
    ag = run(["--model", a.model, "--agreement-only"])
    print(f"\n{'precision':>9} {'max |dlogit|':>12} {'max top-16 KL':>13} {'top-1 = ref':>11}")
    for p in PRECISIONS:
        g = ag[p]
        print(f"{p:>9} {g['dlogit']:>12.3g} {g['kl']:>13.3g} "
              f"{g['top1'] * 100:>10.1f}% of {g['positions']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
