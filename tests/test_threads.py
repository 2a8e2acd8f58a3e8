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


@pytest.mark.parametrize("n,kv,precision", [(200, "f32", "exact"), (600, "f32", "exact"),
                                             (600, "q8_0", "exact"), (200, "f32", "int8")])
def test_prefill_bitwise_identical_across_thread_counts_270m(n, kv, precision):
    """One chunk; two chunks with keys in the cache (flash blocks over the stored type); the
    opt-in 8-bit prefill GEMM. With VNNI every matrix goes through the packed prefill GEMM
    (output blocks of 128 rows shared out), otherwise through the BLAS blocks."""
    model = gemma3.load(max_seq_len=1024, kv_dtype=kv, prefill_precision=precision)
    ids = [2] + np.random.default_rng(n).integers(1000, 200000, n - 1).tolist()
    rows = [0, n // 2, n - 1]
    got = {t: _logits_at(model, ids, t)[rows] for t in (1, 2, 3)}
    assert got[1].tobytes() == got[2].tobytes()
    assert got[1].tobytes() == got[3].tobytes()


@pytest.mark.parametrize("kv", ["f32", "bf16", "f16"])
def test_tiny_bitwise_identical_across_thread_counts(kv):
    """Prefill (flash blocks), decode (one-position items, keys cut in fixed chunks past 256)."""
    model = gemma3.load(TINY, kv_dtype=kv)
    ids = [2, *np.random.default_rng(3).integers(3, 512, 299).tolist()]
    a, b, c = (_logits_at(model, ids, t) for t in (1, 2, 3))
    assert a.tobytes() == b.tobytes() == c.tobytes()
    gen = []
    for t in (1, 2):
        gemma3.set_num_threads(t)
        gen.append(model.generate(ids[:40], max_new_tokens=12, temperature=0, return_ids=True))
    gemma3.set_num_threads(0)
    assert gen[0] == gen[1]


# ---- the pool itself (csrc/pool.c: the OpenMP constructs our kernels use, on our threads) --------
@pytest.mark.parametrize("nt", [1, 2, 3, 5])
@pytest.mark.parametrize("n, chunk", [(0, 1), (1, 1), (1000, 7), (4097, 64)])
def test_pool_runs_each_construct_as_openmp_defines_it(nt, n, chunk):
    r = gemma3._core.pool_probe(nt, n, chunk)
    so, dn = r["static_owner"], r["dynamic_owner"]
    # static: contiguous blocks in thread order, sizes differing by at most one
    assert np.all(np.diff(so) >= 0) and (n == 0 or so.max() < nt)
    sizes = np.bincount(so, minlength=nt) if n else np.zeros(nt, int)
    if n >= nt:
        assert sizes.max() - sizes.min() <= 1
    # dynamic: every index run exactly once, by a team member, chunk by chunk
    assert np.all(r["dynamic_count"] == 1) and (n == 0 or dn.max() < nt)
    for c0 in range(0, n, chunk):
        assert len(set(dn[c0:c0 + chunk])) == 1
    assert r["team_static"] == (nt if n else 0) and r["team_region"] == nt
    assert r["barrier_ok"] == 1 and r["singles"] == 1
    assert r["nested"] == 1  # a region inside a region runs on its caller alone


def test_no_openmp_runtime_is_loaded():
    """gemma3 links no OpenMP runtime (libgomp / libomp): a process that imports it and runs a
    model on two threads maps none, so another library's OpenMP keeps its own settings."""
    code = (f"import gemma3\nm = gemma3.load({str(TINY)!r}, n_threads=2)\n"
            "m.logits(list(range(2, 60)))\n"
            "print([l.split()[-1] for l in open('/proc/self/maps') if 'omp' in l.split()[-1]])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_regions_from_two_python_threads_give_the_serial_bits():
    """Two models run at once from two Python threads: one region holds the pool, the other runs
    on its caller alone; both give the bits a lone run gives."""
    import threading

    a, b = gemma3.load(TINY, n_threads=2), gemma3.load(TINY, n_threads=2)
    ids = [list(np.random.default_rng(i).integers(3, 500, 80)) for i in range(2)]
    want = [a.logits(ids[0]).tobytes(), b.logits(ids[1]).tobytes()]
    got: dict = {}

    def run(k, m):
        for _ in range(20):
            got.setdefault(k, set()).add(m.logits(ids[k]).tobytes())

    ts = [threading.Thread(target=run, args=(k, m)) for k, m in enumerate((a, b))]
    for t in ts:
        t.start()
    for t in ts:
        t.join(120)
    assert got == {0: {want[0]}, 1: {want[1]}}


def _random_tower(bf16: bool):
    """A one-layer tower big enough for several blocks of every parallel loop: 28 x 28 = 784
    patches (5 query blocks, 4 key blocks, 5 x 2 GEMM blocks), two heads of size 72."""
    from gemma3 import vision as V

    cfg = V.VisionConfig(image_size=392, patch_size=14, hidden_size=144, intermediate_size=300,
                         num_layers=1, num_heads=2, mm_tokens_per_image=49, text_hidden_size=40)
    rng = np.random.default_rng(5)

    def m(r, c):
        a = (rng.standard_normal((r, c)) * c ** -0.5).astype(np.float32)
        return (0, r, c, a.view(np.uint8).reshape(-1))

    def v(n, s=0.3):
        return (rng.standard_normal(n) * s).astype(np.float32)

    D, F = 144, 300
    w = {"patch_embd": m(D, 588), "patch_embd.bias": v(D), "position_embd": v(784 * D, 1.0),
         "post_ln.weight": v(D) + 1, "post_ln.bias": v(D), "mm.soft_emb_norm": v(D) + 1,
         "mm.input_projection": m(40, D)}
    for o in ("attn_q", "attn_k", "attn_v", "attn_out"):
        w[f"blk.0.{o}"], w[f"blk.0.{o}.bias"] = m(D, D), v(D)
    w["blk.0.ffn_up"], w["blk.0.ffn_up.bias"] = m(F, D), v(F)
    w["blk.0.ffn_down"], w["blk.0.ffn_down.bias"] = m(D, F), v(D)
    for o in ("ln1", "ln2"):
        w[f"blk.0.{o}.weight"], w[f"blk.0.{o}.bias"] = v(D) + 1, v(D)
    px = rng.uniform(-1, 1, (1, 3, 392, 392)).astype(np.float32)
    return V.VisionTower(cfg, w, dtype="bf16" if bf16 else "f32"), px


@pytest.mark.parametrize("bf16", [False, True])
def test_vision_tower_bitwise_identical_across_thread_counts(bf16):
    """Both compute modes of the vision tower: fused attention tasks, bf16 GEMM blocks, packing
    and LayerNorm loops partition outputs only."""
    tower, px = _random_tower(bf16)
    outs = []
    for t in (1, 2, 3):
        gemma3.set_num_threads(t)
        outs.append(tower.encode_with_hidden(px))
    gemma3.set_num_threads(0)
    for o in outs[1:]:
        assert o[0].tobytes() == outs[0][0].tobytes() and o[1].tobytes() == outs[0][1].tobytes()


def test_pool_regions_of_changing_sizes_back_to_back():
    """Regions of different team sizes one after another: a worker outside one region's team must
    neither miss the next region nor run it twice (every worker acknowledges every region)."""
    for _ in range(200):
        for nt in (4, 1, 2, 3, 5, 2):
            r = gemma3._core.pool_probe(nt, 97, 3)
            assert np.all(r["dynamic_count"] == 1) and r["team_region"] == nt
            assert r["barrier_ok"] == 1 and r["singles"] == 1
