"""Ctrl-C: a real SIGINT sent to this process in the middle of long work raises KeyboardInterrupt,
leaves the model as a fresh one would behave, and loses no finished eval results.

Heavy C work runs with the GIL released, and Python acts on a signal only when C returns, so
every long operation must come back to Python often:

- prefill and scoring go through the C forward in chunks (``model.PREFILL_CHUNK`` tokens, the
  eval engine's ``PREFILL_TOKENS`` / ``LOGITS_ROWS``); an interrupt between chunks leaves the KV
  cache holding exactly the finished chunks, which the next call reuses;
- generation returns to Python after every token;
- the vision tower checks for signals before every layer (C checkpoint, ``g3_checkpoint``);
- eval jobs append each finished shard's results (flushed, fsynced) before starting the next.

A thread watches the operation's progress (positions in the KV cache, tokens streamed, results
written) and sends the signal once it is well under way, so the interrupt lands mid-operation on
a fast or a slow machine; each test asserts the call raised instead of completing. All models
run on one thread (the machine is shared; the reference results are bit-identical only for a
fixed thread count).
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import gemma3
from gemma3 import eval as ev
from gemma3 import vision as V
from gemma3.engine import PREFILL_CHUNK

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tests" / "fixtures" / "tiny" / "tiny"
TINY_VISION = ROOT / "tests" / "fixtures" / "tiny_vision"
LONG = 32768  # max_seq_len of the models here: a long prompt, a long generation


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    gemma3.set_num_threads(1)
    yield
    gemma3.set_num_threads(0)


def load_tiny(**kw) -> gemma3.Model:
    return gemma3.load(TINY, max_seq_len=LONG, **kw)


@dataclasses.dataclass
class Outcome:
    interrupted: bool  # KeyboardInterrupt came out of the call
    completed: bool  # the call returned (an interrupt after that would not count)
    latency: float | None  # seconds from the signal to the exception
    result: object = None


def run_interrupted(fn, when, timeout: float = 120.0) -> Outcome:
    """Runs fn() while a watcher thread sends SIGINT to this process as soon as when() is true.
    The watcher is joined before returning, so no signal can arrive after this function."""
    sent: list[float] = []
    stop = threading.Event()

    def watch():
        deadline = time.monotonic() + timeout
        while not stop.is_set() and time.monotonic() < deadline:
            if when():
                sent.append(time.perf_counter())
                os.kill(os.getpid(), signal.SIGINT)
                return
            time.sleep(0.001)

    t = threading.Thread(target=watch, daemon=True)
    completed, result = False, None
    try:
        try:
            t.start()
            result = fn()
            completed = True
        finally:
            stop.set()
            t.join()
    except KeyboardInterrupt:
        t.join()
        return Outcome(True, completed, time.perf_counter() - sent[0] if sent else None)
    return Outcome(False, completed, None, result)


def assert_mid_operation(o: Outcome, what: str) -> None:
    assert o.interrupted, f"{what}: completed before the interrupt landed (make it longer)"
    assert not o.completed, f"{what}: the interrupt landed only after the call returned"


def prompt_ids(n: int, seed: int = 0) -> list[int]:
    return [2] + np.random.default_rng(seed).integers(3, 500, n - 1).tolist()


def greedy(m, ids, n, **kw) -> list[int]:
    return m.generate(ids, max_new_tokens=n, temperature=0, return_ids=True, **kw)


# -- prefill ------------------------------------------------------------------------------------
def test_interrupt_during_prefill_keeps_finished_chunks():
    m = load_tiny()
    prompt = prompt_ids(24 * PREFILL_CHUNK)
    o = run_interrupted(lambda: greedy(m, prompt, 4), lambda: m.n_past >= 2 * PREFILL_CHUNK)
    assert_mid_operation(o, "prefill")
    # documented state: the cache holds exactly the chunks that finished, in order
    n = m.n_past
    assert 2 * PREFILL_CHUNK <= n < len(prompt) and n % PREFILL_CHUNK == 0, n
    kv = m.kv_cache
    fresh = load_tiny()
    fresh.generate(prompt[:n], max_new_tokens=0, return_ids=True)
    fkv = fresh.kv_cache
    for layer in (0, 5):  # a local ring and a global layer
        np.testing.assert_array_equal(kv[layer].positions, fkv[layer].positions)
        np.testing.assert_array_equal(kv[layer].k, fkv[layer].k)
        np.testing.assert_array_equal(kv[layer].v, fkv[layer].v)
    # the next call continues from the finished chunks and equals a fresh model's answer
    want = greedy(load_tiny(), prompt, 4)
    assert greedy(m, prompt, 4) == want


def test_interrupt_during_logits_leaves_model_usable():
    m = load_tiny()
    ids = prompt_ids(40 * 128)
    o = run_interrupted(lambda: m.logits(ids, last_only=True), lambda: m.n_past >= 512)
    assert_mid_operation(o, "logits")
    short = prompt_ids(300, seed=1)
    np.testing.assert_array_equal(m.logits(short), load_tiny().logits(short))


# -- generation ---------------------------------------------------------------------------------
def test_interrupt_during_generation_ids():
    m = load_tiny()
    prompt = prompt_ids(20)
    o = run_interrupted(lambda: greedy(m, prompt, 20000, stop_token_ids=[]),
                        lambda: m.n_past >= len(prompt) + 200)
    assert_mid_operation(o, "generation")
    assert len(prompt) + 200 <= m.n_past < len(prompt) + 20000
    assert greedy(m, prompt, 30, stop_token_ids=[]) == greedy(load_tiny(), prompt, 30,
                                                               stop_token_ids=[])


@pytest.fixture(scope="module")
def text_model_path(tiny_tok_dir) -> Path:
    """The tiny checkpoint with the Gemma 3 tokenizer, as a GGUF (conftest.py)."""
    return tiny_tok_dir / "tiny-tok.gguf"


def test_interrupt_during_streaming_chat(text_model_path):
    m = gemma3.load(text_model_path, max_seq_len=LONG)
    msgs = [{"role": "user", "content": "Count to a thousand, slowly."}]
    pieces: list[str] = []

    def consume():
        for p in m.chat(msgs, stream=True, max_new_tokens=20000, temperature=0,
                        stop_token_ids=[]):
            pieces.append(p)

    n0 = len(m.chat_ids(msgs))
    o = run_interrupted(consume, lambda: m.n_past >= n0 + 300)  # 300 tokens generated
    assert_mid_operation(o, "streaming chat")
    assert n0 + 300 <= m.n_past < n0 + 20000 and pieces
    fresh = gemma3.load(text_model_path, max_seq_len=LONG)
    kw = dict(max_new_tokens=40, temperature=0, stop_token_ids=[])
    assert m.chat(msgs, **kw) == fresh.chat(msgs, **kw)
    # sampling with a seed is reproducible after the interrupt too
    kw = dict(max_new_tokens=40, temperature=1.0, seed=3)
    assert m.chat(msgs, **kw) == fresh.chat(msgs, **kw)


def test_interrupt_during_generate_batch():
    m = load_tiny()
    m.generate(prompt_ids(50, seed=9), max_new_tokens=0, return_ids=True)  # interactive context
    n_past = m.n_past
    prompts = [prompt_ids(30, seed=s) for s in range(4)]
    t0 = time.perf_counter()
    o = run_interrupted(lambda: m.generate_batch(prompts, max_new_tokens=10000, temperature=0,
                                                 stop_token_ids=[], return_ids=True),
                        lambda: time.perf_counter() > t0 + 0.5)
    assert_mid_operation(o, "generate_batch")
    assert m.n_past == n_past  # the batch rows are separate sequences, freed on the way out
    kw = dict(max_new_tokens=12, temperature=0, stop_token_ids=[], return_ids=True)
    assert m.generate_batch(prompts, **kw) == load_tiny().generate_batch(prompts, **kw)


def test_interrupt_during_scoring():
    m = load_tiny()
    reqs = [(prompt_ids(900, seed=s), prompt_ids(200, seed=100 + s)[1:]) for s in range(64)]
    t0 = time.perf_counter()
    o = run_interrupted(lambda: m.loglikelihood_batch(reqs),
                        lambda: time.perf_counter() > t0 + 0.3)
    assert_mid_operation(o, "loglikelihood_batch")
    assert m.n_past == 0
    assert m.loglikelihood_batch(reqs[:3]) == load_tiny().loglikelihood_batch(reqs[:3])


# -- image encoding -----------------------------------------------------------------------------
def big_tower(like: V.VisionConfig, seed: int = 0) -> V.VisionTower:
    """A random SigLIP tower with the tiny_vision model's interface (4 soft tokens of width 64,
    its marker ids) but 448-pixel images and 12 layers: encoding takes long enough to be
    interrupted (about 0.1 s per image per layer... on one busy core)."""
    cfg = dataclasses.replace(like, image_size=448, hidden_size=192, intermediate_size=384,
                              num_layers=12, num_heads=4)
    rng = np.random.default_rng(seed)
    D, F, P = cfg.hidden_size, cfg.intermediate_size, cfg.patches_per_side ** 2

    def mat(r, c):
        a = (rng.standard_normal((r, c)) * c ** -0.5).astype(np.float32)
        return (0, r, c, a.view(np.uint8).reshape(-1))

    def vec(n, s=0.1):
        return (rng.standard_normal(n) * s).astype(np.float32)

    w = {"patch_embd": mat(D, 3 * cfg.patch_size ** 2), "patch_embd.bias": vec(D),
         "position_embd": vec(P * D, 0.5), "post_ln.weight": vec(D) + 1, "post_ln.bias": vec(D),
         "mm.soft_emb_norm": vec(D) + 1, "mm.input_projection": mat(cfg.text_hidden_size, D)}
    for i in range(cfg.num_layers):
        for o in ("attn_q", "attn_k", "attn_v", "attn_out"):
            w[f"blk.{i}.{o}"], w[f"blk.{i}.{o}.bias"] = mat(D, D), vec(D)
        w[f"blk.{i}.ffn_up"], w[f"blk.{i}.ffn_up.bias"] = mat(F, D), vec(F)
        w[f"blk.{i}.ffn_down"], w[f"blk.{i}.ffn_down.bias"] = mat(D, F), vec(D)
        for o in ("ln1", "ln2"):
            w[f"blk.{i}.{o}.weight"], w[f"blk.{i}.{o}.bias"] = vec(D) + 1, vec(D)
    return V.VisionTower(cfg, w)


def test_interrupt_inside_one_vision_encode_call():
    """The C checkpoint between layers: the interrupt is seen within about a layer, not after
    the call's four images."""
    m = gemma3.load(TINY_VISION / "hf")
    tower = big_tower(m.vision.config)
    px = np.random.default_rng(1).uniform(-1, 1, (4, 3, 448, 448)).astype(np.float32)
    t = time.perf_counter()
    want = tower.encode(px)
    full = time.perf_counter() - t
    t0 = time.perf_counter()
    o = run_interrupted(lambda: tower.encode(px), lambda: time.perf_counter() > t0 + full / 8)
    assert_mid_operation(o, "vision encode")
    # without the checkpoint the signal would wait for the rest of the call (7/8 of it); half
    # leaves room for a machine whose load changes between the two timings
    assert o.latency < full / 2, f"interrupt took {o.latency:.2f} s to land; encode {full:.2f} s"
    np.testing.assert_array_equal(tower.encode(px), want)


def test_interrupt_during_image_prompt_leaves_model_usable():
    """Ctrl-C while the tiny_vision model encodes the images of a prompt (through generate):
    the cache is not touched before the images are encoded, and the next call equals a fresh
    model's."""
    ref = np.load(TINY_VISION / "reference.npz")
    ids = ref["ids_two"].tolist()  # a prompt with two images of 4 soft tokens
    rng = np.random.default_rng(2)
    pics = [rng.uniform(-1, 1, (3, 448, 448)).astype(np.float32) for _ in range(2)]

    def model():
        m = gemma3.load(TINY_VISION / "hf")
        m.vision = big_tower(m.vision.config)
        return m

    m = model()
    m.generate(ids[:3], max_new_tokens=0, return_ids=True)  # the prompt's text before its images
    t0 = time.perf_counter()
    o = run_interrupted(lambda: greedy(m, ids, 5, images=pics),
                        lambda: time.perf_counter() > t0 + 0.2)
    assert_mid_operation(o, "image prompt")
    assert m.n_past == 3  # the previous context, untouched
    assert greedy(m, ids, 5, images=pics) == greedy(model(), ids, 5, images=pics)
    np.testing.assert_array_equal(m.logits(ids, images=pics), model().logits(ids, images=pics))


# -- eval jobs ----------------------------------------------------------------------------------
def write_tasks(path: Path, n: int, seed: int = 1) -> None:
    rng = np.random.default_rng(seed)

    def ids(k):
        return rng.integers(3, 500, k).tolist()

    with open(path, "w") as f:
        for i in range(n):
            ctx = [2] + ids(int(rng.integers(3, 40)))
            r = [{"type": "loglikelihood", "context": ctx, "continuation": ids(5)},
                 {"type": "multiple_choice", "context": ctx, "answer": int(rng.integers(4)),
                  "choices": [ids(int(rng.integers(1, 6))) for _ in range(4)]},
                 {"type": "generate", "prompt": ctx, "max_new_tokens": 160},
                 {"type": "perplexity", "text": [2] + ids(150), "n_ctx": 64}][i % 4]
            f.write(json.dumps({"id": f"r{i}", **r}) + "\n")


def read_lines(path: Path) -> list[dict]:
    data = path.read_bytes()
    assert not data or data.endswith(b"\n"), "a half-written last line"
    return [json.loads(x) for x in data.splitlines()]


def n_lines(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    d = tmp_path_factory.mktemp("job")
    write_tasks(d / "tasks.jsonl", 240)
    ev.run_job(str(d / "tasks.jsonl"), str(d / "full.jsonl"), str(TINY), workers=1, threads=1,
               progress=False)
    return d


def check_partial(out: Path, full: Path) -> int:
    """Every line of an interrupted run's file is a complete result equal to the full run's."""
    got = read_lines(out)
    want = {r["id"]: r for r in read_lines(full)}
    assert len({r["id"] for r in got}) == len(got), "duplicate results"
    for r in got:
        assert r == want[r["id"]], r["id"]
    return len(got)


def test_interrupt_eval_job_in_process(job):
    out = job / "inproc.jsonl"
    o = run_interrupted(lambda: ev.run_job(str(job / "tasks.jsonl"), str(out), str(TINY),
                                           workers=1, threads=1, progress=False),
                        lambda: n_lines(out) >= 16)
    assert_mid_operation(o, "eval job")
    n = check_partial(out, job / "full.jsonl")
    assert 16 <= n < 240, n
    ev.run_job(str(job / "tasks.jsonl"), str(out), str(TINY), workers=1, threads=1,
               progress=False)
    assert out.read_bytes() == (job / "full.jsonl").read_bytes()


def test_ctrl_c_on_eval_cli_with_worker_pool(job):
    """Ctrl-C in a terminal signals the whole process group: the CLI and its pool workers."""
    out = job / "pool.jsonl"
    cmd = [sys.executable, "-m", "gemma3", "eval", str(job / "tasks.jsonl"), "--out", str(out),
           "--model", str(TINY), "--threads", "1", "--workers", "2", "--no-progress"]
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         start_new_session=True)
    deadline = time.monotonic() + 120
    while p.poll() is None and n_lines(out) < 16 and time.monotonic() < deadline:
        time.sleep(0.005)
    assert p.poll() is None, "the job finished before it could be interrupted"
    os.killpg(p.pid, signal.SIGINT)
    _, err = p.communicate(timeout=60)
    err = err.decode()
    assert p.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err, err
    n = check_partial(out, job / "full.jsonl")
    assert 16 <= n < 240, n
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, timeout=300)
    assert p.returncode == 0, p.stderr.decode()
    assert out.read_bytes() == (job / "full.jsonl").read_bytes()


# ---- Ctrl-C at a chosen moment of the pool's start-up ------------------------------------------
# A sitecustomize module, on the PYTHONPATH of the CLI and so of every process it spawns, stops a
# process at one point of its start-up until the test has sent Ctrl-C to the whole process group:
# the interrupt lands in that window by construction, not by timing. Points:
#   parent_pool:   the CLI, just before it starts the pool (the job is read, no worker exists);
#   parent_in_pool: the CLI, inside the pool's start, its workers spawned (SIGINT held pending);
#   child_site:    each spawned process (workers, the resource tracker) during interpreter start;
#   child_unpickle: each spawned worker after start, before it unpickles its process object and
#                  start-up state (where a worker once printed a KeyboardInterrupt traceback);
#   child_init:    each worker inside the pool initializer, before it loads the model.

BARRIER = '''
import os, sys, time
_dir, _point = os.environ["G3_TEST_BARRIER_DIR"], os.environ["G3_TEST_BARRIER_POINT"]
_child = str(os.getppid()) != os.environ["G3_TEST_BARRIER_CLI_PARENT"]  # spawned by the CLI

def _stop(point):
    with open(os.path.join(_dir, f"{point}.{os.getpid()}"), "w"):
        pass
    t = time.monotonic() + 60
    while not os.path.exists(os.path.join(_dir, "go")) and time.monotonic() < t:
        time.sleep(0.01)

if _point == "child_site" and _child:
    _stop(_point)
elif _point == "parent_in_pool" and not _child:
    import multiprocessing.pool as _pl
    _orig_rp = _pl.Pool._repopulate_pool
    def _repopulate_pool(self):
        r = _orig_rp(self)
        _stop(_point)
        return r
    _pl.Pool._repopulate_pool = _repopulate_pool
elif _point == "child_unpickle" and _child:
    import multiprocessing.spawn as _sp
    _orig = _sp._main
    def _main(*a, **k):
        _stop(_point)
        return _orig(*a, **k)
    _sp._main = _main
elif _point in ("parent_pool", "child_init"):
    import builtins
    _imp = builtins.__import__
    def _hook(name, *a, **k):  # patch gemma3.eval once it is imported
        m = _imp(name, *a, **k)
        ev = sys.modules.get("gemma3.eval")  # patched once its functions exist
        if hasattr(ev, "_start_pool") and not getattr(ev, "_g3_barrier", False):
            ev._g3_barrier = True
            if _point == "parent_pool" and not _child:
                orig = ev._start_pool
                def _start_pool(*a, **k):
                    _stop(_point)
                    return orig(*a, **k)
                ev._start_pool = _start_pool
            elif _point == "child_init" and _child:
                orig_init = ev._worker_init
                def _worker_init(*a, **k):
                    _stop(_point)
                    return orig_init(*a, **k)
                ev._worker_init = _worker_init
        return m
    builtins.__import__ = _hook
'''


def terminal_ctrl_c(pgid: int) -> None:
    """What a terminal's Ctrl-C does — SIGINT to every process of the foreground group — in the
    order that gives a traceback its best chance: the other members first, the group leader (the
    CLI, which then stops its workers) 0.3 s later."""
    members = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(stat[2]) == pgid and int(pid) != pgid:  # field 5: process group
            members.append(int(pid))
    for pid in members:
        try:
            os.kill(pid, signal.SIGINT)
        except ProcessLookupError:
            pass
    time.sleep(0.3)
    os.kill(pgid, signal.SIGINT)
    time.sleep(0.2)  # delivered everywhere while the processes are still stopped


@pytest.mark.parametrize("point,stopped", [("parent_pool", 1), ("parent_in_pool", 1),
                                           ("child_site", 2),
                                           ("child_unpickle", 2), ("child_init", 2)])
def test_ctrl_c_at_each_moment_of_pool_start_up(job, tmp_path, point, stopped):
    """Exit code 130, one line on stderr, no traceback from any process, whatever the moment."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(BARRIER)
    marks = tmp_path / "marks"
    marks.mkdir()
    out = tmp_path / "pool.jsonl"
    env = dict(os.environ, PYTHONPATH=f"{site}{os.pathsep}{ROOT}",
               G3_TEST_BARRIER_DIR=str(marks), G3_TEST_BARRIER_POINT=point,
               G3_TEST_BARRIER_CLI_PARENT=str(os.getpid()))
    cmd = [sys.executable, "-m", "gemma3", "eval", str(job / "tasks.jsonl"), "--out", str(out),
           "--model", str(TINY), "--threads", "1", "--workers", "2", "--no-progress"]
    p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         start_new_session=True)
    deadline = time.monotonic() + 120
    while (p.poll() is None and len(list(marks.glob(f"{point}.*"))) < stopped
           and time.monotonic() < deadline):
        time.sleep(0.01)
    assert p.poll() is None, p.communicate()[1].decode()
    assert len(list(marks.glob(f"{point}.*"))) >= stopped, "the barrier was never reached"
    terminal_ctrl_c(p.pid)
    (marks / "go").touch()
    _, err = p.communicate(timeout=120)
    err = err.decode()
    time.sleep(1)  # nothing of the job may be left behind (zombies, already dead, not counted)
    leftover = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            env_ = Path(f"/proc/{pid}/environ").read_bytes()
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if str(marks).encode() in env_ and state != "Z":
            leftover.append(pid)
    assert p.returncode == 130, err
    assert err.strip() == "interrupted", err
    assert not leftover, f"a process of the job outlived it: {leftover}"
    check_partial(out, job / "full.jsonl") if out.exists() else None
