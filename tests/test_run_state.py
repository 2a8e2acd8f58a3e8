"""The model's run state and profile (csrc/model/run.c, forward.c).

* Buffers are reserved at load and grown between calls when a call needs more (a chunk longer than
  512 tokens, more keys than reserved): results equal those of the same tokens fed in chunks.
* Profiling counters belong to each model: timing one model leaves another's untouched.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

import gemma3

sys.path.insert(0, str(Path(__file__).parent))
import tolerances as tol  # noqa: E402

TINY = Path(__file__).parent / "fixtures" / "tiny" / "tiny"


def test_run_state_reserved_at_load_and_grown_between_calls():
    m = gemma3.load(TINY, max_seq_len=1400)
    core = m.engine.core
    at_load = core.run_bytes
    assert at_load > 0
    ids = np.random.default_rng(0).integers(5, m.config.vocab_size, 1300).astype(np.int32)
    ids[0] = 2
    core.reset(0)
    whole = core.forward(ids, 2)  # one call of 1300 tokens: more than the 512 reserved
    assert core.run_bytes > at_load
    grown = core.run_bytes
    core.reset(0)
    parts = [core.forward(ids[s:s + 500], 2) for s in range(0, len(ids), 500)]
    assert core.run_bytes == grown  # never shrinks, no regrowth for smaller calls
    np.testing.assert_allclose(np.concatenate(parts), whole, atol=tol.TINY_LOGITS_ABS)
    assert core.n_past == len(ids)


def test_profile_is_per_model():
    a, b = gemma3.load(TINY), gemma3.load(TINY)
    a.engine.core.profile(True)
    b.engine.core.profile(False)
    a.engine.core.forward(np.asarray([2, 10, 11], np.int32), 1)
    b.engine.core.forward(np.asarray([2, 10, 11], np.int32), 1)
    pa, pb = a.engine.core.profile(False), b.engine.core.profile(False)
    assert pa["forwards"] == 1 and pa["tokens"] == 3 and pa["attention"] > 0
    assert pb["forwards"] == 0 and pb["tokens"] == 0 and pb["attention"] == 0
    assert a.engine.core.profile()["forwards"] == 0  # reading resets


def test_more_threads_after_load_grow_the_state():
    from gemma3 import _core

    m = gemma3.load(TINY)
    ids = np.asarray([2, 10, 11, 12, 13], np.int32)
    m.engine.core.reset(0)
    want = m.engine.core.forward(ids, 2)
    before, n0 = m.engine.core.run_bytes, _core.get_num_threads()
    try:
        _core.set_num_threads(n0 + 3)  # per-thread score buffers must follow
        m.engine.core.reset(0)
        got = m.engine.core.forward(ids, 2)
        assert m.engine.core.run_bytes > before
    finally:
        _core.set_num_threads(n0)
    np.testing.assert_allclose(got, want, atol=tol.TINY_LOGITS_ABS)
