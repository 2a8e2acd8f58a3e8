"""Resources, on the tiny fixtures (a forward of a few tokens takes well under a millisecond).

* Leak loops: every main entry point called thousands of times (10,000 for the cheap ones: the
  tokenizer, logits, error paths; 2,000 for generate, run_with_cache and loglikelihood, which run
  several forwards each) keeps RSS flat after a warm-up, the argument objects' reference counts
  unchanged, and the number of GC-tracked objects unchanged. The C bindings are also driven
  directly, success and error paths, with every optional array argument.
* A max_seq_len whose KV cache cannot fit in RAM raises MemoryError before anything is built.
* close() and del release the file mappings (/proc/self/maps) of GGUF, safetensors and mmproj
  checkpoints; a KV-cache view keeps them until it dies; a closed model raises RuntimeError.

RSS is read from /proc/self/statm after gc.collect(). RSS_SLACK bounds what may move without a
leak: pymalloc arenas (256 KiB each) and glibc's heap top being kept or trimmed, NumPy's small
cache of freed data buffers. A leak of one logits array per call (8 KiB or more) shows as 80 MB,
one leaked 112-byte object per call as 1.1 MB over 10,000 calls; a leaked reference to an
argument is caught exactly by the refcount check, leaked containers by the GC object count.

Under AddressSanitizer (tools/asan.sh) RSS says nothing about leaks: freed blocks wait in a
quarantine of up to 256 MiB before reuse, so RSS grows with whatever a loop frees. There the
sanitizer's own count of live heap bytes (__sanitizer_get_current_allocated_bytes; asan.sh also
routes Python objects through malloc with PYTHONMALLOC=malloc) stands in for RSS, same slack.
"""

from __future__ import annotations

import ctypes
import gc
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest

import gemma3
from gemma3 import _core
from gemma3.tokenizer import Tokenizer

FIX = Path(__file__).parent / "fixtures"
TINY = FIX / "tiny" / "tiny"
VISION = FIX / "tiny_vision"
PAGE = os.sysconf("SC_PAGE_SIZE")
RSS_SLACK = 1 << 20  # bytes (see the module docstring)
GC_SLACK = 16  # GC-tracked objects that may come and go (module-level caches, frames)


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def _asan_live_heap() -> Callable[[], int] | None:
    """The AddressSanitizer runtime's count of live heap bytes, when it is loaded."""
    try:
        f = ctypes.CDLL(None).__sanitizer_get_current_allocated_bytes
    except AttributeError:
        return None
    f.restype, f.argtypes = ctypes.c_size_t, []
    return f


memory = _asan_live_heap() or rss  # bytes in use (see the module docstring)
MEMORY = "RSS" if memory is rss else "ASan live heap"


def tiny_tokenizer() -> Tokenizer:
    """A 512-token SentencePiece-style vocabulary for the tiny checkpoint (which ships none):
    specials, the 256 byte tokens, letters, '▁'-words and a few merges, scored by rank."""
    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
    tokens = specials + [f"<0x{b:02X}>" for b in range(256)]
    types = [3, 3, 3, 2, 3, 3] + [6] * 256  # CONTROL, UNKNOWN, BYTE
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    words = ["\u2581", *letters, *("\u2581" + c for c in letters)]
    for w in ("th", "he", "in", "is", "at", "an", "ha", "ca", "\u2581th", "\u2581the", "\u2581is",
              "\u2581in", "\u2581ca", "\u2581cat", "\u2581ha", "\u2581hat"):
        words.append(w)
    words += [f"x{i}" for i in range(512 - len(tokens) - len(words))]
    scores = np.zeros(512, np.float32)
    scores[len(tokens):] = -np.arange(len(words), dtype=np.float32)
    return Tokenizer(tokens + words, scores, np.array(types + [1] * len(words), np.int32),
                     bos_id=2, eos_id=1, pad_id=0, unk_id=3)


@pytest.fixture(scope="module")
def model():
    m = gemma3.load(TINY, n_threads=1)  # per-call overhead dominates at this size
    m.tokenizer = tiny_tokenizer()
    yield m
    m.close()
    gemma3.set_num_threads(0)


def _raises(exc: type[BaseException], fn: Callable, *args, **kw) -> Callable[[], None]:
    def call():
        try:
            fn(*args, **kw)
        except exc:
            return
        raise AssertionError(f"{fn} did not raise {exc.__name__}")

    return call


@dataclass
class Loop:
    name: str
    n: int
    call: Callable[[], Any]
    args: tuple  # objects whose reference counts must not change
    rss0: int = 0


def _measure(loop: Loop) -> tuple[int, dict, int, float]:
    """-> (memory growth in bytes, {arg index: refcount change}, GC object growth, seconds);
    memory (RSS, or ASan's live heap) after the warm-up is left in loop.rss0."""
    for _ in range(max(50, loop.n // 20)):  # warm-up: caches, pools, lazily built tables
        loop.call()
    gc.collect()
    refs0 = _refcounts(loop.args)
    objs0 = len(gc.get_objects())
    r0 = loop.rss0 = memory()
    t = time.perf_counter()
    for _ in range(loop.n):
        loop.call()
    dt = time.perf_counter() - t
    gc.collect()
    r1 = memory()
    refs = {i: b - a for i, (a, b) in enumerate(zip(refs0, _refcounts(loop.args))) if b != a}
    return r1 - r0, refs, len(gc.get_objects()) - objs0, dt


def _refcounts(objs: tuple) -> list[int]:
    return [sys.getrefcount(o) for o in objs]


def _check(loop: Loop) -> None:
    grew, refs, objs, dt = _measure(loop)
    print(f"\n{loop.name}: {loop.n} calls in {dt:.2f} s, {MEMORY} {loop.rss0 / 2**20:.1f} -> "
          f"{(loop.rss0 + grew) / 2**20:.1f} MiB ({grew / 1024:+.0f} KiB), GC objects {objs:+d}, "
          f"refcount changes {refs or 'none'}")
    assert grew <= RSS_SLACK, f"{loop.name}: {MEMORY} grew {grew / 2**20:.2f} MiB in {loop.n} calls"
    assert not refs, f"{loop.name}: argument refcounts changed {refs}"
    assert objs <= GC_SLACK, f"{loop.name}: {objs} more GC-tracked objects after {loop.n} calls"


def test_the_probes_catch_leaks():
    """The harness is not a tautology: a call that keeps one 8 KiB array per call, or one
    reference to its argument, fails it."""
    kept: list = []
    arg = np.zeros(3)
    # in a fresh interpreter: after the rest of the suite this process has tens of MB of freed
    # heap that a leak would quietly reuse, so RSS would not grow here even though it leaks
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import numpy as np, test_resources as t; "
            "kept = []; print(t._measure(t.Loop('leaky', 2000, "
            "lambda: kept.append(np.ones(2048)), ()))[0])")
    out = subprocess.run([sys.executable, "-c", code, str(Path(__file__).parent)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert int(out.stdout.split()[-1]) > RSS_SLACK
    grew, refs, objs, _ = _measure(Loop("keeps arg", 100, lambda: kept.append(arg), (arg,)))
    assert refs == {0: 100}
    grew, refs, objs, _ = _measure(Loop("keeps lists", 100, lambda: kept.append([arg]), ()))
    assert objs >= 100


# ---- the public entry points --------------------------------------------------------------------

IDS = [2, 17, 300, 41, 99]
IDS_ARR = np.array(IDS, np.int32)
BAD_IDS = [2, 17, 10**6]
TEXT = "the cat is in the hat"
CONTEXT, CONTINUATION = "the cat", " is in the hat"
BIAS = {7: 1.5, 300: -2.0}
LAYERS = [0, 5]


def _public_loops(m) -> list[Loop]:
    tok = m.tokenizer
    return [
        Loop("tokenizer.encode", 10_000, lambda: tok.encode(TEXT), (TEXT,)),
        Loop("tokenizer.decode", 10_000, lambda: tok.decode(IDS_ARR), (IDS_ARR,)),
        Loop("tokenizer.decode out-of-range id", 10_000, _raises(ValueError, tok.decode, BAD_IDS),
             (BAD_IDS,)),
        Loop("logits", 10_000, lambda: m.logits(IDS), (IDS,)),
        Loop("logits out-of-range id", 10_000, _raises(ValueError, m.logits, BAD_IDS),
             (BAD_IDS,)),
        Loop("generate", 2_000,
             lambda: m.generate(TEXT, max_new_tokens=3, temperature=0.8, seed=1,
                                repetition_penalty=1.1, logit_bias=BIAS), (TEXT, BIAS)),
        Loop("generate bad argument", 10_000, _raises(ValueError, m.generate, TEXT, top_p=3.0),
             (TEXT,)),
        Loop("run_with_cache", 2_000, lambda: m.run_with_cache(IDS, layers=LAYERS),
             (IDS, LAYERS)),
        Loop("loglikelihood", 2_000, lambda: m.loglikelihood(CONTEXT, CONTINUATION),
             (CONTEXT, CONTINUATION)),
    ]


PUBLIC = ["tokenizer.encode", "tokenizer.decode", "tokenizer.decode out-of-range id", "logits",
          "logits out-of-range id", "generate", "generate bad argument", "run_with_cache",
          "loglikelihood"]


@pytest.mark.parametrize("name", PUBLIC)
def test_entry_point_loop_keeps_memory_and_refcounts_flat(model, name):
    loops = {x.name: x for x in _public_loops(model)}
    assert sorted(loops) == sorted(PUBLIC)
    loop = loops[name]
    _check(loop)
    np.testing.assert_array_equal(model.logits(IDS), model.logits(IDS))  # still consistent


def test_core_bindings_keep_argument_refcounts(model):
    """_core.Model / Tokenizer / sample / GGUF called directly with every optional array, on the
    success and the error paths: nothing keeps a reference to an argument or leaks memory."""
    core, tok = model.engine.core, model.tokenizer._core
    E, V = model.config.hidden_size, model.config.vocab_size
    ids = np.array([2, 17, 300], np.int32)
    bad = np.array([2, 10**6], np.int32)
    embd, mask = np.zeros((3, E), np.float32), np.zeros(3, np.uint8)
    embd_bad = np.zeros((2, E), np.float32)
    seqs, lens = np.array([0], np.int32), np.array([3], np.int64)
    cap = {0: {"resid_post": np.empty(3 * E, np.float32), "heads": np.array([0, 1], np.int32),
               "pattern": np.empty(2 * 3 * 3, np.float32)}}
    cap_bad = {0: {"resid_post": np.empty(5, np.float32)}}
    x, x_bad = np.ones((2, E), np.float32), np.ones((2, E + 1), np.float32)
    logits = np.linspace(-3, 3, V, dtype=np.float32)
    rng = _core.rng_seed(1)
    hist = np.array([5, 6, 7], np.int32)
    b_ids, b_vals = np.array([7], np.int32), np.array([1.5], np.float32)
    data, floats = TEXT.encode(), np.array([1.5, 2.0])
    gguf = _core.GGUF(str(VISION / "text.gguf"))
    name = gguf.tensor_infos()[0][0]

    def forward_all():
        for kw in ({}, {"embd": embd, "embd_mask": mask}, {"seqs": seqs, "lens": lens},
                   {"capture": cap}):
            core.reset(0)
            core.forward(ids, 2, **kw)
        core.head(x, True)
        _core.sample(logits, rng, temperature=0.8, top_k=10, repetition_penalty=1.1,
                     history=hist, bias_ids=b_ids, bias_values=b_vals)
        tok.encode(data, True)
        tok.decode(ids, False)
        gguf.raw(name)  # a view that dies at once

    errors = [
        _raises(ValueError, core.forward, bad, 1),
        _raises(ValueError, core.forward, ids, 1, embd_bad, mask),
        _raises(ValueError, core.forward, ids, 1, seqs=seqs, lens=hist),
        _raises(ValueError, core.forward, ids, 0, capture=cap_bad),
        _raises(ValueError, core.head, x_bad),
        _raises(TypeError, _core.sample, logits, hist),
        _raises(ValueError, _core.sample, logits, rng, history=hist, bias_ids=b_ids,
                bias_values=logits),
        _raises(ValueError, tok.decode, bad, False),
        _raises(TypeError, tok.decode, floats, False),
        _raises(KeyError, gguf.raw, "no such tensor"),
    ]

    def all_calls():
        forward_all()
        for e in errors:
            e()

    try:
        _check(Loop("core bindings", 2_000, all_calls,
                    (ids, bad, embd, mask, embd_bad, seqs, lens, cap, cap[0], cap_bad, x, x_bad,
                     logits, rng, hist, b_ids, b_vals, data, floats, gguf)))
        gguf.close()  # no raw() view is left alive
    finally:
        model.reset()


def test_failed_core_model_init_keeps_no_reference():
    """A failed _core.Model.__init__ drops the weight arrays it had bound (a retried __init__
    used to leak the previous list of them, +1 reference per retry)."""
    from gemma3.loader import load_hf_dir

    cfg, weights, _, owners = load_hf_dir(str(TINY))
    is_global = bytes(t == "full_attention" for t in cfg.layer_types)
    broken = dict(weights)
    del broken["output_norm"]  # bound after token_embd: the failure comes with arrays held
    arr = weights["token_embd"][3]
    core = _core.Model.__new__(_core.Model)
    before = sys.getrefcount(arr)
    for _ in range(100):
        with pytest.raises(gemma3.FormatError, match="output_norm"):
            core.__init__(cfg.to_core(64), is_global, broken)
    assert sys.getrefcount(arr) == before
    assert owners


def test_config_and_role_table_calls_keep_memory_and_refcounts_flat():
    """The typed configs (built, refused for a missing / unknown / mistyped field), their dims
    and tensor_roles: no reference or memory kept per call; and a core refused for a wrong
    shape drops what it bound."""
    from gemma3.loader import load_hf_dir

    cfg, weights, _, owners = load_hf_dir(str(TINY))
    fields = {k: getattr(cfg.to_core(64), k) for k in (
        "n_vocab", "n_embd", "n_layer", "n_head", "n_head_kv", "head_dim", "n_ff", "window",
        "max_seq", "eps", "attn_scale", "embd_scale", "final_softcap", "rope_base_global",
        "rope_scale_global", "rope_base_local", "rope_scale_local")}
    missing = {k: v for k, v in fields.items() if k != "eps"}
    unknown = {**fields, "rope_base": 1e4}
    mistyped = {**fields, "n_layer": 8.0}
    is_global = bytes(t == "full_attention" for t in cfg.layer_types)
    bad = dict(weights)
    bad["blk.7.ffn_down"] = weights["blk.7.ffn_up"]  # (n_ff, n_embd) where (n_embd, n_ff) goes
    config = cfg.to_core(64)

    def calls():
        _core.TextConfig(**fields).dims
        _raises(TypeError, _core.TextConfig, **missing)()
        _raises(TypeError, _core.TextConfig, **unknown)()
        _raises(TypeError, _core.TextConfig, **mistyped)()
        _core.tensor_roles("text"), _core.tensor_roles("vision")
        _raises(gemma3.FormatError, _core.Model, config, is_global, bad, pack=False)()

    _check(Loop("configs and roles", 2_000, calls,
                (fields, missing, unknown, mistyped, config, is_global, bad,
                 weights["blk.7.ffn_up"][3])))
    assert owners


def test_refused_reinit_leaves_the_model_working(model):
    """__init__ on a live _core.Model is refused without freeing the model under its users (it
    used to free it: the next call said "model is not initialised", views pointed at freed
    memory)."""
    from gemma3.loader import load_hf_dir

    cfg, weights, _, owners = load_hf_dir(str(TINY))
    is_global = bytes(t == "full_attention" for t in cfg.layer_types)
    ref = model.logits(IDS)
    layer = model.config.layer_types.index("full_attention")
    k = model.kv_cache[layer].k.copy()
    with pytest.raises(RuntimeError, match="already initialised"):
        model.engine.core.__init__(cfg.to_core(64), is_global, weights)
    np.testing.assert_array_equal(model.kv_cache[layer].k, k)
    np.testing.assert_array_equal(model.logits(IDS), ref)
    assert owners


def test_gguf_reopen_after_close_keeps_one_path_reference():
    path = str(VISION / "text.gguf")
    f = _core.GGUF(path)
    f.close()
    before = sys.getrefcount(path)
    for _ in range(100):
        f.__init__(path)  # reopening used to leak the previous path string
        f.close()
    assert sys.getrefcount(path) == before


def test_failed_loads_leave_nothing_behind(tmp_path):
    """Malformed checkpoints, 500 times each: no descriptor, mapping, memory or reference kept."""
    bad_gguf = tmp_path / "bad.gguf"
    bad_gguf.write_bytes((VISION / "text.gguf").read_bytes()[:4000])  # tensor data past EOF
    bad_st = tmp_path / "bad_st"
    shutil.copytree(TINY, bad_st)
    data = (TINY / "model.safetensors").read_bytes()
    (bad_st / "model.safetensors").write_bytes(data[: len(data) // 2])
    paths = (bad_gguf, bad_st)

    def fail_both():
        for p in paths:
            with pytest.raises(gemma3.FormatError):
                gemma3.load(p)

    fds0 = len(os.listdir("/proc/self/fd"))
    _check(Loop("failed loads", 500, fail_both, paths))
    assert len(os.listdir("/proc/self/fd")) == fds0
    assert not _mapped(bad_gguf) and not _mapped(bad_st / "model.safetensors")


def test_load_close_loop_releases_everything(tmp_path):
    """200 load/use/close cycles of a GGUF and a safetensors checkpoint: RSS, open file
    descriptors and mappings come back to where they were."""
    gguf = shutil.copy(VISION / "text.gguf", tmp_path / "m.gguf")
    st = tmp_path / "st"
    shutil.copytree(TINY, st)

    def cycle():
        for p in (gguf, st):
            m = gemma3.load(p, n_threads=1)
            m.logits([2, 3, 4])
            m.close()

    fds0 = len(os.listdir("/proc/self/fd"))
    _check(Loop("load + logits + close", 200, cycle, (gguf, st)))
    assert len(os.listdir("/proc/self/fd")) == fds0
    assert not _mapped(gguf) and not _mapped(st / "model.safetensors")
    gemma3.set_num_threads(0)


# ---- MemoryError before allocating --------------------------------------------------------------


def test_max_seq_len_too_large_is_memoryerror_before_building(monkeypatch):
    cfg = gemma3.load(TINY, max_seq_len=16).config
    ram = os.sysconf("SC_PHYS_PAGES") * PAGE
    too_big = 1024
    while gemma3.model.kv_cache_bytes(cfg, too_big) <= ram:
        too_big *= 2

    def build_core(*a, **kw):
        raise AssertionError("the model was built: the size check came too late")

    monkeypatch.setattr(gemma3.loading, "build_core", build_core)
    r0 = memory()
    with pytest.raises(MemoryError, match=f"max_seq_len={too_big}.*lower max_seq_len"):
        gemma3.load(TINY, max_seq_len=too_big)
    with pytest.raises(MemoryError):
        gemma3.load(TINY, max_seq_len=2**62)  # would overflow a C size_t
    assert memory() - r0 < 16 << 20


def test_core_model_refuses_an_unallocatable_cache():
    """The C layer's own check (the MemoryError path under load()'s estimate): calloc of an
    impossible cache fails cleanly instead of crashing."""
    from gemma3.loader import build_core, load_hf_dir

    cfg, weights, _, owners = load_hf_dir(str(TINY))
    with pytest.raises(MemoryError, match="KV cache"):
        build_core(cfg, weights, 2**44)
    assert owners  # the mapping stays alive until here


# ---- close() and del release the mappings -------------------------------------------------------


def _mapped(path) -> bool:
    """Whether /proc/self/maps has a mapping of the file, or /proc/self/fd an open descriptor."""
    real = os.path.realpath(path)
    with open("/proc/self/maps") as f:
        if any(line.rstrip("\n").endswith(" " + real) for line in f):
            return True
    fds = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            fds.append(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            pass
    return real in fds


def _copy(kind: str, tmp: Path) -> tuple[Path, dict, list[Path]]:
    """A private copy of a fixture (so no other model in this process maps the same file):
    (path to load, load kwargs, files that must be unmapped)."""
    if kind == "safetensors":
        d = tmp / "st"
        shutil.copytree(TINY, d)
        return d, {}, [d / "model.safetensors"]
    if kind == "safetensors+vision":
        d = tmp / "hf"
        shutil.copytree(VISION / "hf", d)
        return d, {}, [d / "model.safetensors"]
    g = Path(shutil.copy(VISION / "text.gguf", tmp / "text.gguf"))
    if kind == "gguf":
        return g, {}, [g]
    mm = Path(shutil.copy(VISION / "mmproj.gguf", tmp / "mmproj.gguf"))
    return g, {"mmproj": mm}, [g, mm]


KINDS = ["gguf", "safetensors", "gguf+mmproj", "safetensors+vision"]


@pytest.mark.parametrize("kind", KINDS)
def test_close_releases_mappings_and_closed_model_raises(tmp_path, kind):
    path, kw, files = _copy(kind, tmp_path)
    m = gemma3.load(path, **kw)
    ref = m.logits([2, 3, 4])
    assert all(_mapped(f) for f in files)  # the probe sees the mapping it must see vanish
    m.close()
    gc.collect()
    assert not [f.name for f in files if _mapped(f)]
    for call in (lambda: m.logits([2, 3, 4]),
                 lambda: m.generate([2, 3], max_new_tokens=2, return_ids=True),
                 lambda: m.run_with_cache([2, 3]), lambda: m.loglikelihood([2, 3], [4]),
                 lambda: m.kv_cache[0], m.reset):
        with pytest.raises(RuntimeError, match="this model was closed"):
            call()
    if m.vision is not None:
        with pytest.raises(RuntimeError, match="this model was closed"):
            m.encode_image(np.zeros((3, 32, 32), np.float32))
    m.close()  # a second close is harmless
    assert ref.shape == (3, m.config.vocab_size)


@pytest.mark.parametrize("kind", KINDS)
def test_del_releases_mappings(tmp_path, kind):
    path, kw, files = _copy(kind, tmp_path)
    m = gemma3.load(path, **kw)
    m.logits([2, 3, 4])
    assert all(_mapped(f) for f in files)
    del m
    gc.collect()
    assert not [f.name for f in files if _mapped(f)]


def test_kv_cache_view_keeps_the_mapping_until_it_dies(tmp_path):
    path, _, files = _copy("gguf", tmp_path)
    m = gemma3.load(path)
    m.logits([2, 3, 4])
    layer = m.config.layer_types.index("full_attention")
    k = m.kv_cache[layer].k  # a global layer's K: a zero-copy view of the C cache
    assert k.base is not None
    before = k.copy()
    m.close()
    gc.collect()
    assert _mapped(files[0])  # the view keeps the C model, and with it the weights, alive
    np.testing.assert_array_equal(k, before)
    del k
    gc.collect()
    assert not _mapped(files[0])
