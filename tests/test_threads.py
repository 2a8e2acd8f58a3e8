"""One thread pool, ours, and nothing leaked into the user's process.

* ``import gemma3`` (and loading and running a model) leaves ``os.environ`` exactly as it was:
  thread and BLAS settings go through the libraries' APIs (csrc/threading.c), not through
  variables that only work when read in time.
* Results are bitwise identical at any thread count, prefill included: every product that goes
  through BLAS is cut into blocks whose shape depends on the matrix only (csrc/kernels/gemm.c),
  the packed prefill GEMM shares out blocks of output rows (csrc/kernels/matmul.c), and every
  other parallel loop partitions outputs, never reductions. Checked on logits bytes at
  1, 2 and 3 threads, on the real 270M (dims large enough for many blocks) and on the tiny model.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import gemma3

TINY = Path(__file__).parent / "fixtures" / "tiny" / "tiny"
ROOT = Path(__file__).resolve().parents[1]


def test_import_and_run_leave_environment_unchanged():
    code = (
        "import json, os, sys\n"
        "before = dict(os.environ)\n"
        "import gemma3\n"
        "after_import = dict(os.environ)\n"
        f"m = gemma3.load({str(TINY)!r}, n_threads=2)\n"
        "m.generate([2, 5, 9, 11], max_new_tokens=4, temperature=0, return_ids=True)\n"
        "m.logits(list(range(2, 60)))\n"
        "print(json.dumps([before == after_import, before == dict(os.environ),\n"
        "                  sorted(set(os.environ.items()) ^ set(before.items()))]))\n"
    )
    env = {k: v for k, v in __import__("os").environ.items()
           if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY", "OPENBLAS_CORETYPE")}
    env["PYTHONPATH"] = str(ROOT)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    same_import, same_run, diff = json.loads(out.stdout.strip().splitlines()[-1])
    assert same_import and same_run, diff


def _logits_at(model, ids, threads):
    gemma3.set_num_threads(threads)
    try:
        return model.logits(ids)
    finally:
        gemma3.set_num_threads(0)


@pytest.mark.parametrize("n,precision", [(200, "exact"), (600, "exact"), (200, "int8")])
def test_prefill_bitwise_identical_across_thread_counts_270m(n, precision):
    """One chunk; two chunks with keys in the cache; the opt-in 8-bit prefill GEMM. With VNNI
    every matrix goes through the packed prefill GEMM (output blocks of 128 rows shared out),
    otherwise through the BLAS blocks."""
    model = gemma3.load(max_seq_len=1024, prefill_precision=precision)
    ids = [2] + np.random.default_rng(n).integers(1000, 200000, n - 1).tolist()
    rows = [0, n // 2, n - 1]
    got = {t: _logits_at(model, ids, t)[rows] for t in (1, 2, 3)}
    assert got[1].tobytes() == got[2].tobytes()
    assert got[1].tobytes() == got[3].tobytes()


def test_tiny_bitwise_identical_across_thread_counts():
    model = gemma3.load(TINY)
    ids = [2, *np.random.default_rng(3).integers(3, 512, 299).tolist()]
    a, b, c = (_logits_at(model, ids, t) for t in (1, 2, 3))
    assert a.tobytes() == b.tobytes() == c.tobytes()
    gen = []
    for t in (1, 2):
        gemma3.set_num_threads(t)
        gen.append(model.generate(ids[:40], max_new_tokens=12, temperature=0, return_ids=True))
    gemma3.set_num_threads(0)
    assert gen[0] == gen[1]
