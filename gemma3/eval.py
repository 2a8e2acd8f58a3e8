"""The ``python -m gemma3 eval`` job runner: a task file of records in, a results file out, on a
local process pool or Ray. The scoring functions it runs live in gemma3.scoring and are
re-exported here (``gemma3.eval.loglikelihood``, ``perplexity``, ``score_tokens`` ...).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from . import _check
from .generation import StopMatcher
from .model import Model, load
from .scoring import (  # noqa: F401  (re-exported: gemma3.eval is the documented home)
    LOGITS_ROWS, MAX_SEQS, PREFILL_TOKENS, SOFTMAX_ROWS, ChoiceScores, Perplexity, Text,
    encode_pair, loglikelihood, loglikelihood_batch, loglikelihood_rolling, multiple_choice,
    perplexity, perplexity_windows, rolling_windows, score_tokens, target_logprobs)

# -- the eval job: records in, results out ------------------------------------------------------
# A task file is JSON Lines, one record per line:
#   {"id": ..., "type": "loglikelihood", "context": str|ids, "continuation": str|ids}
#       -> {"logprob", "is_greedy", "n_tokens"}
#   {"id": ..., "type": "multiple_choice", "context": str|ids, "choices": [str|ids, ...],
#    "answer": int (optional)}
#       -> {"logprobs", "is_greedy", "pred", "pred_norm", "correct", "correct_norm"}
#   {"id": ..., "type": "perplexity", "text": str|ids, "n_ctx": int, "stride": int (optional),
#    "protocol": "llama.cpp"|"hf" (optional)}
#       -> {"ppl", "nll", "nll_sum", "n_tokens", "bits_per_byte"}
#   {"id": ..., "type": "generate", "prompt": str|ids, "max_new_tokens": int (default 64),
#    sampling arguments as Model.generate (default temperature 0: greedy), "stop": [str],
#    "expected": str (optional)}
#       -> {"text" (or "ids" for an id prompt), "n_tokens", "correct": stripped text == expected}
# Every result also has "id" and "type"; a record that fails gets "error": message.
# "id" (a string or an integer, unique in the file) defaults to the record's line number (0-based).
RECORD_TYPES = ("generate", "loglikelihood", "multiple_choice", "perplexity")
GEN_KEYS = ("max_new_tokens", "temperature", "top_k", "top_p", "min_p", "repetition_penalty",
            "seed", "stop")
SHARD = 8  # records per work unit sent to a worker


def read_tasks(path: str) -> list[dict]:
    """Records of a task file, each with an "id" (checked unique) and a known "type"."""
    import json

    recs, seen = [], set()
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n + 1}: not JSON: {e}") from None
            if not isinstance(r, dict):
                raise ValueError(f"{path}:{n + 1}: a record must be a JSON object")
            r.setdefault("id", n)
            if r.get("type") not in RECORD_TYPES:
                raise ValueError(f"{path}:{n + 1}: type must be one of {RECORD_TYPES}, got "
                                 f"{r.get('type')!r}")
            key = json.dumps(r["id"])
            if key in seen:
                raise ValueError(f"{path}:{n + 1}: duplicate id {r['id']!r}")
            seen.add(key)
            recs.append(r)
    return recs


def _text(model: Model, v):
    return v if isinstance(v, str) else [int(t) for t in v]


def run_records(model: Model, recs: Sequence[dict]) -> list[dict]:
    """Results of a shard of records, in order: the scoring requests of all its records are
    batched together, generation records decode together (generate_batch). Each result also
    carries "_tokens", the tokens its record put through the model (for tokens/s; removed before
    writing)."""
    out: list = [None] * len(recs)
    ll = [i for i, r in enumerate(recs) if r["type"] in ("loglikelihood", "multiple_choice")]
    pairs, owner = [], []
    for i in ll:
        r = recs[i]
        try:
            if r["type"] == "loglikelihood":
                ps = [encode_pair(model, _text(model, r["context"]),
                                  _text(model, r["continuation"]))]
            else:
                if not r.get("choices"):
                    raise ValueError("multiple_choice needs a non-empty 'choices' list")
                ps = [encode_pair(model, _text(model, r["context"]), _text(model, c))
                      for c in r["choices"]]
        except (KeyError, TypeError, ValueError) as e:
            out[i] = {"error": _err(e)}
            continue
        pairs += ps
        owner += [i] * len(ps)
    scored: list = []
    try:
        scored = score_tokens(model, pairs)
    except ValueError:  # one bad request (e.g. too long): score record by record
        scored = []
        for p in pairs:
            try:
                scored += score_tokens(model, [p])
            except ValueError as e:
                scored.append(e)
    per: dict[int, list] = {}
    for k, i in enumerate(owner):
        per.setdefault(i, []).append((pairs[k], scored[k]))
    for i, items in per.items():
        r = recs[i]
        bad = [s for _, s in items if isinstance(s, Exception)]
        if bad:
            out[i] = {"error": _err(bad[0])}
            continue
        toks = sum(len(c) + len(x) for (c, x), _ in items)
        lps = [float(s[0].sum()) for _, s in items]
        greedy = [bool(s[1].all()) for _, s in items]
        if r["type"] == "loglikelihood":
            out[i] = {"logprob": lps[0], "is_greedy": greedy[0],
                      "n_tokens": len(items[0][0][1]), "_tokens": toks}
        else:
            lens = [len(c) for c in r["choices"]]
            pred = int(np.argmax(lps))
            pred_norm = int(np.argmax([lp / max(n, 1) for lp, n in zip(lps, lens, strict=True)]))
            res = {"logprobs": lps, "is_greedy": greedy, "pred": pred, "pred_norm": pred_norm}
            if r.get("answer") is not None:
                res["correct"] = pred == int(r["answer"])
                res["correct_norm"] = pred_norm == int(r["answer"])
            res["_tokens"] = toks
            out[i] = res
    gens = [i for i, r in enumerate(recs) if r["type"] == "generate"]
    _run_generate(model, recs, gens, out)
    for i, r in enumerate(recs):
        if r["type"] == "perplexity":
            try:
                p = perplexity(model, _text(model, r["text"]), int(r["n_ctx"]), r.get("stride"),
                               r.get("protocol", "llama.cpp"))
                out[i] = {"ppl": p.ppl, "nll": p.nll, "nll_sum": p.nll_sum,
                          "n_tokens": p.n_tokens, "bits_per_byte": p.bits_per_byte,
                          "_tokens": p.n_windows * p.n_ctx}
            except (KeyError, TypeError, ValueError) as e:
                out[i] = {"error": _err(e)}
    return [{"id": r["id"], "type": r["type"], **o} for r, o in zip(recs, out, strict=True)]


def _err(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"


def _run_generate(model: Model, recs: Sequence[dict], idx: list[int], out: list) -> None:
    """Generation records, decoded together with Model.generate_batch (greedy results equal
    one-by-one generation exactly)."""
    ok, settings, prompts = [], [], []
    for i in idx:
        r = recs[i]
        try:
            s = {k: r[k] for k in GEN_KEYS if k in r}
            s.setdefault("max_new_tokens", 64)
            s.setdefault("temperature", 0.0)
            p = _text(model, r["prompt"])
            model.encode(p)
        except (KeyError, TypeError, ValueError) as e:
            out[i] = {"error": _err(e)}
            continue
        ok.append(i)
        settings.append(s)
        prompts.append(p)
    if not ok:
        return
    try:
        ids = model.generate_batch(prompts, settings, return_ids=True)
    except ValueError as e:
        for i in ok:
            out[i] = {"error": _err(e)}
        return
    for i, p, new, s in zip(ok, prompts, ids, settings, strict=True):
        res: dict = {"n_tokens": len(new)}
        if isinstance(p, str) and model.tokenizer is not None:
            text = model.tokenizer.decode(new)
            stops = s.get("stop") or ()
            res["text"] = StopMatcher((stops,) if isinstance(stops, str) else stops).cut(text)[0]
            if recs[i].get("expected") is not None:
                res["correct"] = res["text"].strip() == str(recs[i]["expected"]).strip()
        else:
            res["ids"] = [int(t) for t in new]
            if recs[i].get("expected") is not None:
                res["correct"] = res["ids"] == [int(t) for t in recs[i]["expected"]]
        n_prompt = len(model.encode(p))
        res["_tokens"] = n_prompt + len(new)
        out[i] = res


def read_results(path: str) -> dict:
    """Results already in a results file, by json-encoded id. A truncated or unreadable last line
    (a run killed mid-write) is cut off the file so that appending continues cleanly."""
    import json
    import os

    done: dict = {}
    if not os.path.exists(path):
        return done
    with open(path, "rb") as f:
        data = f.read()
    good = 0
    for line in data.splitlines(keepends=True):
        if not line.endswith(b"\n"):
            break
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            break
        done[json.dumps(r["id"])] = r
        good += len(line)
    if good < len(data):
        with open(path, "r+b") as f:
            f.truncate(good)
    return done


# worker-process state: one model per process, loaded once
_WORKER_MODEL = None


def _worker_init(model_path: str | None, threads: int | None, extra: dict | None = None) -> None:
    """``extra``: more arguments of load() (the adapters: ``adapter``, ``merge``)."""
    global _WORKER_MODEL
    _WORKER_MODEL = load(model_path, n_threads=threads, **(extra or {}))


def _load_extra(adapter, adapter_scale: float, merge: bool) -> dict:
    """load()'s adapter arguments for every worker: paths made absolute (a Ray actor or a pool
    process may start elsewhere), one scale for all."""
    import os

    if adapter is None or adapter == []:
        return {}
    paths = [adapter] if isinstance(adapter, (str, os.PathLike)) else list(adapter)
    scale = _check.number("adapter_scale", adapter_scale)
    return {"adapter": {os.path.abspath(os.fspath(p)): scale for p in paths},
            "merge": _check.boolean("merge", merge)}


def _pool_worker_init(model_path: str | None, threads: int | None,
                      extra: dict | None = None) -> None:
    """Pool workers leave Ctrl-C to the parent, which stops the pool. They run in process groups
    of their own (gemma3._pool), so a terminal's Ctrl-C does not reach them; a SIGINT sent to one
    directly is ignored too, as it would only print a traceback."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _worker_init(model_path, threads, extra)


def _start_pool(workers: int, model_path: str | None, threads: int | None,
                extra: dict | None = None):
    from ._pool import start_pool

    return start_pool(workers, _pool_worker_init, (model_path, threads, extra))


def _worker_run(shard: list[dict]) -> list[dict]:
    return run_records(_WORKER_MODEL, shard)


def _shards(recs: list[dict], size: int = SHARD) -> list[list[dict]]:
    return [recs[s:s + size] for s in range(0, len(recs), size)]


def summarize(recs: Sequence[dict], results: dict, elapsed: float, n_tokens: int) -> dict:
    """Accuracy (multiple_choice and generate records with an answer/expected), aggregate
    perplexity (token-weighted over perplexity records), counts and throughput of this run."""
    import json

    acc, acc_n, nll, ntok, errors = [], [], 0.0, 0, 0
    by_type: dict[str, int] = {}
    for r in recs:
        res = results.get(json.dumps(r["id"]))
        if res is None:
            continue
        by_type[r["type"]] = by_type.get(r["type"], 0) + 1
        if "error" in res:
            errors += 1
            continue
        if "correct" in res:
            acc.append(res["correct"])
        if "correct_norm" in res:
            acc_n.append(res["correct_norm"])
        if r["type"] == "perplexity":
            nll += res["nll_sum"]
            ntok += res["n_tokens"]
    return {
        "n_records": len(recs),
        "n_done": sum(by_type.values()),
        "by_type": by_type,
        "n_errors": errors,
        "accuracy": float(np.mean(acc)) if acc else None,
        "accuracy_norm": float(np.mean(acc_n)) if acc_n else None,
        "n_scored": len(acc),
        "perplexity": math.exp(nll / ntok) if ntok else None,
        "perplexity_tokens": ntok,
        "elapsed_s": round(elapsed, 3),
        "tokens": n_tokens,
        "tokens_per_s": round(n_tokens / elapsed, 2) if elapsed > 0 else None,
    }


def run_job(tasks: str, out: str, model_path: str | None = None, workers: int | None = None,
            ray_address: str | bool | None = None, threads: int | None = None,
            progress: bool = True, ray_init_kwargs: dict | None = None, adapter=None,
            adapter_scale: float = 1.0, merge_adapter: bool = False) -> dict:
    """Runs a task file into a results file (see the record format above) and returns the
    summary, also written next to ``out`` as ``<out without .jsonl>.summary.json``.

    While running, results are appended in completion order, one JSON line each, flushed and
    fsynced; records whose id is already in ``out`` are skipped, so an interrupted run resumes
    where it stopped. When every record is done the file is rewritten in input order (atomic
    rename), so an interrupted-and-resumed run ends with the same file as an uninterrupted one.

    ``workers``: processes (default: the CPU count; 1 = in this process). ``ray_address``:
    run on Ray instead (True or "" = start/attach a local Ray, a string = ``ray.init(address)``),
    one actor per worker, each loading the model once.

    ``adapter``: LoRA adapter path(s) (PEFT directory or llama.cpp LoRA GGUF) every worker loads
    with the model, at ``adapter_scale`` each, unmerged or folded in with ``merge_adapter``; the
    summary records them. A results file resumed with other adapters would mix models: use
    another ``out``."""
    import json
    import os
    import time

    if workers is not None:
        _check.integer("workers", workers, 1)
    if threads is not None:
        _check.integer("threads", threads, 1)
    extra = _load_extra(adapter, adapter_scale, merge_adapter)
    recs = read_tasks(tasks)
    done = read_results(out)
    known = {json.dumps(r["id"]) for r in recs}
    stray = [k for k in done if k not in known]
    if stray:
        raise ValueError(f"{out} holds results for ids not in {tasks} (e.g. {stray[0]}): use "
                         f"another --out")
    # fixed shards of the input (not of what is left), so a resumed run batches each record
    # exactly as an uninterrupted one; a shard with any result missing is rerun whole
    shards = [sh for sh in _shards(recs) if any(json.dumps(r["id"]) not in done for r in sh)]
    n_left = sum(json.dumps(r["id"]) not in done for sh in shards for r in sh)
    n_cpu = os.cpu_count() or 1
    if workers is None:
        workers = n_cpu
    workers = max(1, min(int(workers), max(1, len(shards))))
    if threads is None:
        threads = max(1, n_cpu // workers)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(recs), initial=len(recs) - n_left, unit="rec", desc="eval")
    t0 = time.perf_counter()
    n_tokens = 0
    ray_where = None  # where a Ray job ran (for the summary)
    with open(out, "a", encoding="utf-8") as f:
        def write(results: list[dict]) -> None:
            nonlocal n_tokens
            new = 0
            for res in results:
                n_tokens += res.pop("_tokens", 0)
                key = json.dumps(res["id"])
                if key in done:  # written before an interruption
                    continue
                f.write(json.dumps(res) + "\n")
                done[key] = res
                new += 1
            f.flush()
            os.fsync(f.fileno())
            if bar is not None:
                bar.update(new)

        if ray_address is not None and ray_address is not False:
            ray_where = _run_ray(shards, write, model_path, workers, threads, ray_address,
                                 ray_init_kwargs or {}, extra)
        elif workers == 1:
            model = load(model_path, n_threads=threads, **extra)
            for sh in shards:
                write(run_records(model, sh))
        elif shards:
            with _start_pool(workers, model_path, threads, extra) as pool:  # exit: terminate()
                for results in pool.imap_unordered(_worker_run, shards):
                    write(results)
    if bar is not None:
        bar.close()
    elapsed = time.perf_counter() - t0
    if all(json.dumps(r["id"]) in done for r in recs):
        tmp = out + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            for r in recs:
                f.write(json.dumps(done[json.dumps(r["id"])]) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out)
    summary = summarize(recs, done, elapsed, n_tokens)
    if ray_where is not None:
        summary["ray"] = ray_where
    if extra:
        summary["adapters"] = {"scales": extra["adapter"], "merged": extra["merge"]}
    with open(summary_path(out), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2)
        f.write("\n")
    return summary


def summary_path(out: str) -> str:
    base = out[:-len(".jsonl")] if out.endswith(".jsonl") else out
    return base + ".summary.json"


def _run_ray(shards, write, model_path, workers, threads, address, init_kwargs,
             extra=None) -> dict:
    """Shards on Ray actors (one model per actor), results written as they complete. Returns
    where they ran: shards completed per node id, the gemma3 each node imported, actors lost."""
    import ray

    if not ray.is_initialized():
        if isinstance(address, str) and address:
            ray.init(address=address, **init_kwargs)
        else:
            ray.init(**init_kwargs)

    @ray.remote(num_cpus=1)
    class Worker:
        def __init__(self, path, n_threads, extra):
            _worker_init(path, n_threads, extra)

        def run(self, shard):
            import gemma3

            return ray.get_runtime_context().get_node_id(), gemma3.__file__, _worker_run(shard)

    # An actor whose node or process dies takes its shard with it: the shard goes back to the
    # queue for the actors left (a shard is all-or-nothing: its results are written only when it
    # completes, so a rerun never duplicates a line). Other errors are real and propagate.
    lost = (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError,
            ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError)
    actors = [Worker.remote(model_path, threads, extra) for _ in range(max(1, workers))]
    queue = list(range(len(shards)))  # shard indices not yet done
    pending: dict = {}  # object ref -> (actor, shard index)
    where = {"shards_per_node": {}, "package_per_node": {}, "actors_lost": 0}

    def feed(actor) -> None:
        if queue:
            i = queue.pop(0)
            pending[actor.run.remote(shards[i])] = (actor, i)

    for a in actors:  # keep every actor busy with one shard at a time
        feed(a)
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        a, i = pending.pop(ready[0])
        try:
            node, package, results = ray.get(ready[0])
        except lost:
            where["actors_lost"] += 1
            queue.insert(0, i)
            actors.remove(a)
            ray.kill(a)
            if not actors:
                raise RuntimeError("every Ray worker of this job was lost") from None
            busy = {b for b, _ in pending.values()}
            for b in actors:
                if b not in busy:
                    feed(b)
            continue
        write(results)
        where["shards_per_node"][node] = where["shards_per_node"].get(node, 0) + 1
        where["package_per_node"][node] = package
        feed(a)
    for a in actors:
        ray.kill(a)
    return where


def main(argv: list[str] | None = None) -> int:
    """``python -m gemma3 eval tasks.jsonl --out results.jsonl [...]``."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m gemma3 eval", description=(
        "Run an evaluation task file (JSON Lines: generate, loglikelihood, multiple_choice, "
        "perplexity records). Results are appended as they finish; rerunning resumes."))
    add_arguments(ap)
    return run_cli(ap.parse_args(argv))


def add_arguments(ap) -> None:
    ap.add_argument("tasks", help="task file (JSON Lines)")
    ap.add_argument("--out", "-o", required=True, help="results file (JSON Lines); the summary "
                    "goes to <out>.summary.json")
    ap.add_argument("--model", "-m", default=None, help="GGUF file or HF checkpoint directory")
    ap.add_argument("--workers", type=int, default=None,
                    help="worker processes (default: CPU count; 1 = in-process)")
    ap.add_argument("--threads", type=int, default=None, help="threads per worker")
    ap.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                    help="run on Ray (no ADDRESS: a local Ray; or ray://host:port / auto)")
    ap.add_argument("--ray-runtime-env", default=None, metavar="JSON",
                    help="Ray runtime_env for the workers, e.g. '{\"py_modules\": "
                         "[\"dist/gemma3-0.1.0-cp311-cp311-manylinux_2_34_x86_64.whl\"]}' to "
                         "ship this package to a cluster as a wheel")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    ap.add_argument("--adapter", action="append", default=None, metavar="PATH",
                    help="LoRA adapter (PEFT directory or llama.cpp LoRA GGUF) every worker "
                    "applies; repeatable (several adapters at once)")
    ap.add_argument("--adapter-scale", type=float, default=1.0,
                    help="scale of each --adapter (default 1)")
    ap.add_argument("--merge-adapter", action="store_true",
                    help="fold the adapters into the weights (requantized) instead")


def run_cli(a) -> int:
    import json

    init = {}
    if a.ray_runtime_env:
        if a.ray is None:
            raise ValueError("--ray-runtime-env needs --ray")
        try:
            init["runtime_env"] = json.loads(a.ray_runtime_env)
        except json.JSONDecodeError as e:
            raise ValueError(f"--ray-runtime-env is not JSON: {e}") from None
    s = run_job(a.tasks, a.out, a.model, a.workers, a.ray, a.threads, not a.no_progress, init,
                adapter=a.adapter, adapter_scale=a.adapter_scale, merge_adapter=a.merge_adapter)
    print(json.dumps(s, indent=2))
    return 0
