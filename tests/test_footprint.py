"""Where a model's memory goes (Model.memory) and the file pages of packed matrices.

* memory() adds up: every entry is what the C model and the loader report (packed bytes, KV
  bytes = kv_cache_bytes x sequences, run state), and ``total`` is their sum.
* After packing, the file pages of the packed matrices are dropped: a packed 270M holds one copy
  of its matrices (the packed one), not two. Decode reads only the packed copy, so generating
  from a short prompt leaves the file's pages out; with pack=False the same generation brings
  the whole file in (which shows the measure sees what it claims to). Measured in a fresh
  process each (RSS is per process; the page cache is not counted).
* GGUFFile.release drops whole pages inside the tensor only, and the bytes read afterwards are
  the file's (the private read-only mapping refaults them).
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import gemma3

TINY = Path(__file__).parent / "fixtures" / "tiny" / "tiny"
PAGE = 4096


def test_memory_adds_up_on_the_tiny():
    m = gemma3.load(TINY, n_threads=1, max_seq_len=256)
    m.generate([2, 5, 7], max_new_tokens=3, temperature=0, return_ids=True)
    mem = m.memory()
    core = m.engine.core
    assert mem["weights_packed"] == m.packed_bytes
    assert mem["kv_cache"] == gemma3.model.kv_cache_bytes(m.config, 256) * core.n_seq
    assert mem["run_state"] == core.run_bytes > 0
    assert mem["weights_mapped"] + mem["weights_owned"] > 0
    parts = [mem[k] for k in ("weights_packed", "weights_owned", "vision", "kv_cache",
                              "run_state")]
    resident = mem["weights_mapped_resident"]
    assert mem["total"] == sum(parts) + (resident if resident is not None
                                         else mem["weights_mapped"])
    m.close()


_PROBE = """
import json, sys, gemma3
m = gemma3.load(max_seq_len=4096, pack=sys.argv[1] == "1", n_threads=2)
m.generate("Hi", max_new_tokens=8, temperature=0)
print(json.dumps(m.memory()))
"""


def _probe(pack: bool) -> dict:
    try:
        gemma3.default_model_path()
    except FileNotFoundError as e:
        pytest.skip(f"the 270M GGUF is not installed: {e}")
    out = subprocess.run([sys.executable, "-c", _PROBE, "1" if pack else "0"],
                         capture_output=True, text=True, timeout=300, check=True)
    return json.loads(out.stdout.splitlines()[-1])


@pytest.mark.skipif(not gemma3._core.packed_supported(12), reason="no AVX-512 VNNI: nothing "
                    "is packed on this CPU (the float kernels read the file in place)")
def test_packed_270m_keeps_one_copy_of_its_matrices():
    packed, plain = _probe(True), _probe(False)
    mapped = packed["weights_mapped"]
    assert packed["weights_packed"] > 0.9 * mapped
    # decode read only the packed copy: the file's pages are (nearly all) out of this process
    assert packed["weights_mapped_resident"] < 0.1 * mapped
    # one copy, not two: the packed process holds little more than the unpacked one. Compared with
    # the pack=False process rather than with the file size, so that an allocator's own overhead
    # (ASan's shadow memory and quarantine in tools/asan.sh) is on both sides.
    assert packed["process_rss"] < plain["process_rss"] + 0.5 * packed["weights_packed"]
    # the measure sees pages in place: pack=False decodes from the file and holds all of it
    assert plain["weights_packed"] == 0
    assert plain["weights_mapped_resident"] > 0.9 * mapped


def test_release_drops_whole_pages_and_reading_brings_the_file_back():
    if not _has_270m():
        pytest.skip("the 270M GGUF is not installed")
    f = gemma3.GGUFFile(gemma3.default_model_path())
    try:
        name = max(f.tensors, key=lambda n: f.tensors[n].nbytes)
        t = f.tensors[name]
        before = hashlib.sha256(f.raw(name)).hexdigest()
        n = f.release(name)
        assert n % PAGE == 0 and t.nbytes - 2 * PAGE < n <= t.nbytes
        assert hashlib.sha256(f.raw(name)).hexdigest() == before
        small = min(f.tensors, key=lambda n: f.tensors[n].nbytes)
        if f.tensors[small].nbytes < PAGE:
            assert f.release(small) == 0  # no whole page inside: nothing dropped
        with pytest.raises(KeyError):
            f.release("no.such.tensor")
    finally:
        f.close()


def _has_270m() -> bool:
    try:
        gemma3.default_model_path()
        return True
    except FileNotFoundError:
        return False


def test_memory_of_a_converted_model_is_owned():
    m = gemma3.load(TINY, n_threads=1, max_seq_len=64, dtype="f32")
    mem = m.memory()
    assert mem["weights_mapped"] == 0 and mem["weights_owned"] > 0
    assert np.isfinite(m.logits([2, 3], last_only=True)).all()
    m.close()
