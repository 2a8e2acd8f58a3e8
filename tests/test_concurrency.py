"""Threads and processes, on the tiny checkpoint (tests/fixtures/tiny/tiny, 8 layers, width 64).

* The GIL is released during a forward pass: a Python thread keeps running in the middle of one
  long C call, and does not during a C loop that holds the GIL (the control that shows the probe
  can tell the difference).
* One model used by two threads: the call that finds the model busy gets a clean RuntimeError,
  and every call that ran returns the single-threaded result (no corrupted KV cache).
* Two models in two threads give bit-identical results to the same calls made one by one.
* multiprocessing pools with the spawn and fork start methods, the model loaded in each worker,
  and under fork also a model loaded (and run on 2 OpenMP threads) in the parent before the fork:
  libgomp used to hang in such a child (csrc/threading.c releases the pool before every fork).

Thread counts are pinned to 2 (results no longer depend on them: tests/test_threads.py checks
that; the pin keeps these tests about concurrency only). Every pool wait has a timeout, so a hang
fails.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import gemma3

TINY = Path(__file__).parent / "fixtures" / "tiny" / "tiny"
THREADS = 2
POOL_TIMEOUT = 120  # seconds for a whole pool job; a healthy one takes a few
RNG = np.random.default_rng(7)
SHORT = [2, *RNG.integers(3, 512, 11).tolist()]  # < 32 tokens: the fused per-row kernels
LONG = [2, *RNG.integers(3, 512, 199).tolist()]  # >= 32 tokens: dequantized tiles + sgemm


@pytest.fixture(scope="module")
def model():
    m = gemma3.load(TINY, n_threads=THREADS)
    yield m
    gemma3.set_num_threads(0)


@pytest.fixture(scope="module")
def refs(model):
    gemma3.set_num_threads(THREADS)
    return {
        "short": model.logits(SHORT),
        "long": model.logits(LONG),
        "gen": model.generate(SHORT, max_new_tokens=8, temperature=0, return_ids=True),
    }


def _check_refs(m, refs) -> None:
    np.testing.assert_array_equal(m.logits(SHORT), refs["short"])
    np.testing.assert_array_equal(m.logits(LONG), refs["long"])
    assert m.generate(SHORT, max_new_tokens=8, temperature=0, return_ids=True) == refs["gen"]


# ---- the GIL ------------------------------------------------------------------------------------


def _ticks_inside(call) -> tuple[int, float]:
    """Runs call() on this thread while another thread timestamps its own progress; returns how
    many timestamps fall well inside the call (a margin of 4 switch intervals at both ends, where
    the GIL changes hands around the call) and the call's duration."""
    stamps: list[float] = []
    stop = threading.Event()
    started = threading.Event()

    def ticker():
        n = 0
        started.set()
        while not stop.is_set():
            n += 1
            if n % 64 == 0:
                stamps.append(time.perf_counter())

    t = threading.Thread(target=ticker, daemon=True)
    t.start()
    started.wait()
    time.sleep(0.02)
    t0 = time.perf_counter()
    call()
    t1 = time.perf_counter()
    stop.set()
    t.join()
    margin = 4 * sys.getswitchinterval()
    return sum(t0 + margin < s < t1 - margin for s in stamps), t1 - t0


def test_gil_released_during_forward():
    # one C call of 4096 tokens (~0.25 s on one thread, leaving the other core to the ticker;
    # 2048 tokens took only ~80 ms on a quiet machine, under the 0.1 s this test needs)
    m = gemma3.load(TINY, n_threads=1, max_seq_len=4096)
    try:
        ids = (np.arange(4096, dtype=np.int32) * 7919 % 509 + 3).astype(np.int32)
        inside, fwd_dt = _ticks_inside(lambda: m.engine.core.forward(ids, 1))
        print(f"\nforward of 4096 tokens: {fwd_dt * 1e3:.0f} ms, {inside} ticks of another thread "
              "inside it")
        assert fwd_dt > 0.1, "the forward was too short to tell"
        assert inside >= 10, f"no other Python thread ran during a {fwd_dt * 1e3:.0f} ms forward"

        # control: a C loop that keeps the GIL (builtin sum) lets (almost) no tick through
        n = 10**6
        while True:
            held, dt = _ticks_inside(lambda: sum(range(n)))
            if dt > 0.1:
                break
            n *= 2
        print(f"GIL-holding control: {dt * 1e3:.0f} ms, {held} ticks inside it")
        # on a loaded machine the OS may deschedule this thread around the call while the
        # ticker holds the GIL, letting a few ticks in at the edges: compare rates, not zero
        assert held / dt <= 0.25 * inside / fwd_dt, (held, dt, inside, fwd_dt)
    finally:
        m.close()
        gemma3.set_num_threads(0)


# ---- one model, two threads ---------------------------------------------------------------------


def test_one_model_two_threads_refused_cleanly_and_never_corrupted(model, refs):
    gemma3.set_num_threads(THREADS)
    errors: list[str] = []
    bad: list[str] = []
    done = {"short": 0, "long": 0}
    deadline = time.monotonic() + 20

    def worker(kind, ids, want):
        while time.monotonic() < deadline and (done[kind] < 10 or len(errors) < 10):
            try:
                got = model.logits(ids)
            except RuntimeError as e:
                errors.append(str(e))
                time.sleep(0.001)  # back off: a spinning retry would starve the other thread
                continue
            done[kind] += 1
            if not np.array_equal(got, want):
                bad.append(f"{kind}: max |diff| {np.abs(got - want).max():.3g}")

    threads = [threading.Thread(target=worker, args=("long", LONG, refs["long"])),
               threading.Thread(target=worker, args=("short", SHORT, refs["short"]))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(f"\ncalls completed {done}, refused {len(errors)}")
    assert not bad, bad[:5]
    assert errors, "the two threads never overlapped: the refusal was not exercised"
    assert all("already running a call in another thread" in e for e in errors), set(errors)
    assert done["short"] > 0 and done["long"] > 0
    _check_refs(model, refs)  # the cache is consistent afterwards


def test_c_model_refuses_reentry_while_computing(model, refs):
    """The C object's own guard (under the Python lock): a second call while a forward runs in
    another thread raises instead of touching the cache."""
    gemma3.set_num_threads(1)
    core = model.engine.core
    ids = np.asarray(LONG * 2, np.int32)  # 400 tokens, one C call
    seen: list[str] = []
    finished = threading.Event()

    def long_call():
        for _ in range(20):
            core.reset(0)
            core.forward(ids, 0)
        finished.set()

    t = threading.Thread(target=long_call)
    t.start()
    while not finished.is_set():
        try:
            core.reset(0)
        except RuntimeError as e:
            seen.append(str(e))
        time.sleep(0.001)
    t.join()
    gemma3.set_num_threads(THREADS)
    assert seen and all("another thread" in s for s in seen)
    _check_refs(model, refs)


# ---- two models, two threads --------------------------------------------------------------------


def test_two_models_in_two_threads_match_one_thread():
    gemma3.set_num_threads(THREADS)
    scaled = TINY.parent / "tiny-scaled"
    models = [gemma3.load(TINY), gemma3.load(scaled)]
    try:
        want = [(m.logits(LONG), m.logits(SHORT),
                 m.generate(SHORT, max_new_tokens=10, temperature=0, return_ids=True))
                for m in models]
        got: list[list] = [[], []]
        failures: list[BaseException] = []

        def run(i):
            try:
                for _ in range(15):
                    m = models[i]
                    got[i].append((m.logits(LONG), m.logits(SHORT),
                                   m.generate(SHORT, max_new_tokens=10, temperature=0,
                                              return_ids=True)))
            except BaseException as e:  # noqa: BLE001 - reported below
                failures.append(e)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not failures, failures
        for i in range(2):
            assert len(got[i]) == 15
            for long_l, short_l, gen in got[i]:
                np.testing.assert_array_equal(long_l, want[i][0])
                np.testing.assert_array_equal(short_l, want[i][1])
                assert gen == want[i][2]
    finally:
        for m in models:
            m.close()


# ---- processes ----------------------------------------------------------------------------------

_WORKER_MODEL = None  # set in each worker (spawn/fork) or inherited from the parent (fork)


def _init_worker(path: str) -> None:
    global _WORKER_MODEL
    _WORKER_MODEL = gemma3.load(path, n_threads=THREADS)


def _work(ids: list[int]) -> tuple[int, np.ndarray, list[int]]:
    gemma3.set_num_threads(THREADS)
    m = _WORKER_MODEL
    return (os.getpid(), m.logits(ids),
            m.generate(ids, max_new_tokens=8, temperature=0, return_ids=True))


def _run_pool(method: str, initializer=None, initargs=()) -> list:
    pool = mp.get_context(method).Pool(2, initializer, initargs)
    try:
        return pool.map_async(_work, [SHORT, LONG], chunksize=1).get(timeout=POOL_TIMEOUT)
    except mp.TimeoutError:
        pytest.fail(f"a {method!r} pool gave no answer in {POOL_TIMEOUT} s: a worker hangs")
    finally:
        pool.terminate()
        pool.join()


def _check_pool_results(results, refs) -> None:
    assert all(pid != os.getpid() for pid, _, _ in results)
    for (_, logits, gen), ids in zip(results, [SHORT, LONG], strict=True):
        want = refs["short"] if ids is SHORT else refs["long"]
        np.testing.assert_array_equal(logits, want)
        if ids is SHORT:
            assert gen == refs["gen"]


@pytest.mark.parametrize("method", ["spawn", "fork"])
def test_pool_workers_load_their_own_model(model, refs, method):
    gemma3.set_num_threads(THREADS)
    model.logits(SHORT)  # the parent has just used its OpenMP pool (the fork case that hung)
    _check_pool_results(_run_pool(method, _init_worker, (str(TINY),)), refs)
    _check_refs(model, refs)


def test_fork_pool_uses_a_model_loaded_in_the_parent(model, refs):
    global _WORKER_MODEL
    gemma3.set_num_threads(THREADS)
    _check_refs(model, refs)  # parent ran on 2 OpenMP threads and BLAS right before forking
    _WORKER_MODEL = model
    try:
        results = _run_pool("fork")
    finally:
        _WORKER_MODEL = None
    _check_pool_results(results, refs)
    _check_refs(model, refs)  # the parent's model is intact and its thread pool comes back
