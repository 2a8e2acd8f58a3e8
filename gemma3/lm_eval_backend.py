"""lm-eval-harness backend: ``--model gemma3 --model_args path=...``.

lm-eval (0.4.x) finds models only through its registry, filled by imports; it has no entry-point
plugin group for models. Importing this module registers "gemma3", so run the harness through

    python -m gemma3.lm_eval_backend --model gemma3 --model_args path=model.gguf --tasks ...

(the same arguments as ``lm_eval``; this module registers the model and hands over to lm-eval's
own CLI), or from Python: ``import gemma3.lm_eval_backend`` then
``lm_eval.simple_evaluate(model="gemma3", model_args="path=...", ...)``.

Model arguments: ``path`` (GGUF file or HF directory; default the embedded 270M), ``threads``,
``max_seq_len``, ``max_length`` (the window for rolling log-likelihood and the left-truncation
length; default max_seq_len), ``seqs`` (KV sequences scored together per forward call, default
16), ``adapter`` (a LoRA adapter: PEFT directory or llama.cpp LoRA GGUF; several joined with
``;``), ``adapter_scale`` (default 1), ``merge_adapter`` (fold it into the weights; default
False). lm-eval's own ``--batch_size`` is accepted and ignored: batching is by sequences here and
changes no number.

BOS: Gemma needs ``<bos>`` first. Contexts are encoded with BOS and continuations are the tail of
the whole encoding (lm-eval's ``_encode_pair``), an empty context becomes ``[<bos>]``, rolling
windows start from ``<bos>`` (``prefix_token_id``), and ``generate_until`` prompts get BOS.
Scoring goes through :mod:`gemma3.eval`, so the numbers equal ``python -m gemma3 eval``'s.
"""

from __future__ import annotations

import sys

from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from tqdm import tqdm

from . import eval as _eval
from .model import Model, load


@register_model("gemma3")
class Gemma3LM(TemplateLM):
    def __init__(self, path: str | None = None, threads: int | None = None,
                 max_seq_len: int | None = None, max_length: int | None = None,
                 seqs: int | None = None, batch_size: int | str | None = None,
                 model: Model | None = None, adapter: str | None = None,
                 adapter_scale: float | str = 1.0, merge_adapter: bool | str = False,
                 **kwargs) -> None:
        super().__init__()
        if model is None:  # model: an already loaded gemma3.Model (Python use only)
            if isinstance(merge_adapter, str):  # model_args arrive as text
                merge_adapter = merge_adapter.strip().lower() in ("1", "true", "yes")
            paths = [p for p in adapter.split(";") if p] if adapter else None
            extra = _eval._load_extra(paths, float(adapter_scale), bool(merge_adapter))
            model = load(path, n_threads=int(threads) if threads else None,
                         max_seq_len=int(max_seq_len) if max_seq_len else None, **extra)
        self.model = model
        if self.model.tokenizer is None:
            raise ValueError("the gemma3 lm-eval backend needs a checkpoint with a tokenizer")
        self.tokenizer = self.model.tokenizer
        self._max_length = int(max_length) if max_length else self.model.max_seq_len
        self._seqs = max(1, int(seqs)) if seqs else _eval.MAX_SEQS

    # -- what TemplateLM needs -----------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return int(self.tokenizer.eos_id)

    @property
    def prefix_token_id(self) -> int:
        return int(self.tokenizer.bos_id)  # Gemma conditions on <bos>, not on <eos>

    @property
    def max_length(self) -> int:
        return self._max_length

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kw) -> list[int]:
        add_bos = add_special_tokens is not False
        ids = self.tokenizer.encode(string, add_bos=add_bos)
        if add_bos and len(ids) > 1 and ids[1] == ids[0] == self.tokenizer.bos_id:
            ids = ids[1:]  # the string already began with "<bos>"
        return ids

    def tok_decode(self, tokens, **kw) -> str:
        return self.tokenizer.decode(tokens)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kw
                              ) -> list[tuple[float, bool]]:
        pairs = [(list(c), list(x)) for _, c, x in requests]
        with tqdm(total=len(pairs), disable=disable_tqdm, desc="gemma3 loglikelihood") as bar:
            res = _eval.score_tokens(self.model, pairs, max_seqs=self._seqs, progress=bar)
        out = []
        for (key, _, _), (lp, g) in zip(requests, res, strict=True):
            r = (float(lp.sum()), bool(g.all()))
            if key is not None and hasattr(self, "cache_hook"):
                self.cache_hook.add_partial("loglikelihood", key, r)
            out.append(r)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        out = []
        for req in tqdm(requests, disable=disable_tqdm, desc="gemma3 rolling"):
            (text,) = req.args
            tokens = self.tok_encode(text, add_special_tokens=False)
            wins = _eval.rolling_windows(tokens, self.prefix_token_id, self.max_length)
            lp = float(sum(s.sum() for s, _ in _eval.score_tokens(self.model, wins,
                                                                   max_seqs=self._seqs)))
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), lp)
            out.append(lp)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy by default (lm-eval's convention: ``do_sample`` false); ``until`` strings stop
        and are cut; ``max_gen_toks`` bounds the length. Requests decode together in batches."""
        out: list[str] = [""] * len(requests)
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="gemma3 generate")
        for s in range(0, len(requests), self._seqs):
            chunk = requests[s:s + self._seqs]
            prompts, settings = [], []
            for req in chunk:
                context, gen_kwargs = req.args
                kw = dict(gen_kwargs or {})
                until = kw.pop("until", None) or []
                until = [until] if isinstance(until, str) else list(until)
                do_sample = kw.pop("do_sample", False)
                temperature = float(kw.pop("temperature", 0.0) or 0.0)
                st = {"max_new_tokens": int(kw.pop("max_gen_toks", 256)),
                      "temperature": temperature if do_sample else 0.0,
                      "stop": [u for u in until if u]}
                for k in ("top_k", "top_p", "seed"):
                    if k in kw:
                        st[k] = kw[k]
                ids = self.tok_encode(context)
                room = self.model.max_seq_len - st["max_new_tokens"] - 1
                prompts.append(ids[-room:] if room > 0 and len(ids) > room else ids)
                settings.append(st)
            texts = self.model.generate_batch(prompts, settings)
            for k, (req, text) in enumerate(zip(chunk, texts, strict=True)):
                out[s + k] = text
                self.cache_hook.add_partial("generate_until", req.args, text)
            bar.update(len(chunk))
        bar.close()
        return out


def main(argv: list[str] | None = None) -> None:
    """lm-eval's CLI with the gemma3 model registered."""
    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
