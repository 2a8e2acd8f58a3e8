"""The user-facing model: a thin facade over the engine (gemma3.engine: the C model, its lock,
the KV sequences and the feed protocol), generation (gemma3.generation), prompts with images
(gemma3.multimodal), scoring (gemma3.scoring) and inspection (gemma3.inspect).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from . import _check, _core
from . import adapters as _adapters
from . import generation as _gen
from . import hooks as _hooks
from . import inspect as _inspect
from . import loading as _loading
from . import multimodal as _mm
from . import sae as _sae
from . import scoring as _scoring
from . import speculative as _spec
from . import state as _state
from .config import Gemma3Config
from .conversation import ChatMethods
from .engine import PREFILL_CHUNK, Engine  # noqa: F401  (PREFILL_CHUNK: re-exported)
from .generation import Generation, GenerationConfig  # noqa: F401  (re-exported)
from .loading import check_cache_fits, kv_cache_bytes, open_checkpoint  # noqa: F401
from .loading import set_num_threads  # noqa: F401  (re-exported: gemma3.set_num_threads)
from .tokenizer import Tokenizer


class Model(ChatMethods):
    """A loaded Gemma 3 model. Create with :func:`gemma3.load`."""

    def __init__(self, core: _core.Model, config: Gemma3Config, tokenizer: Tokenizer | None,
                 path: str, owners: Any, max_seq_len: int, footprint: Any = None):
        self.config = config
        self.tokenizer = tokenizer
        self.path = path
        self.max_seq_len = max_seq_len
        self._owners = owners  # file mappings the weights point into
        self._footprint = footprint or _loading.Footprint()  # where the weights live
        self.engine = Engine(core, config, max_seq_len)  # owns the C model (gemma3.engine)
        self.adapters = _adapters.AdapterSet(config, self.engine.set_lora)

    @property
    def vision(self):
        """The vision tower (gemma3.vision.VisionTower), or None for text-only models."""
        return self.engine.vision

    @vision.setter
    def vision(self, tower) -> None:
        self.engine.vision = tower

    def reset(self) -> None:
        """Forget the cached context."""
        with self.engine.exclusive():
            self.engine.reset()

    @property
    def n_past(self) -> int:
        """Positions in the KV cache."""
        return self.engine.core.n_past

    @property
    def packed_bytes(self) -> int:
        """Bytes of weights repacked for the integer kernels (0: ``pack=False``, no VNNI)."""
        return self.engine.core.packed_bytes

    def memory(self) -> dict[str, int | None]:
        """Bytes by kind: ``weights_mapped`` (read in place from the checkpoint file; page cache,
        shared) and ``weights_mapped_resident`` (of those, pages this process holds now; None off
        Linux), ``weights_packed`` (the integer kernels' copies: the file pages of packed
        matrices are dropped after packing), ``weights_owned`` (converted on load), ``vision``,
        ``kv_cache`` (reserved by every sequence; touched as used), ``run_state`` (forward
        buffers), ``total`` (their sum, mapped counted as resident) and ``process_rss``."""
        return _loading.memory(self.engine, self._footprint, self.vision)

    def encode(self, prompt: str | Sequence[int], add_bos: bool = True) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this checkpoint has no tokenizer: pass token ids")
            return self.tokenizer.encode(prompt, add_bos=add_bos)
        ids = _check.as_ids(prompt, what="prompt")
        self.engine.check_ids(ids)
        return ids

    def _ids(self, prompt: str | Sequence[int], what: str, flatten: bool = False) -> list[int]:
        """Text tokenized with BOS, or ids as ints (their values are checked when fed)."""
        if isinstance(prompt, str):
            return self.encode(prompt)
        return _check.as_ids(prompt, flatten, what)

    def _prompt(self, prompt: str | Sequence[int], images: Sequence[Any] | None,
                pan_and_scan: bool, what: str = "prompt", flatten: bool = False
                ) -> tuple[list[int], list]:
        """-> (ids, image spans) (see gemma3.multimodal.prompt_with_images)."""
        if images is None:
            return self._ids(prompt, what, flatten), []
        if not isinstance(prompt, str):
            prompt = _check.as_ids(prompt, flatten, what)
        return _mm.prompt_with_images(prompt, images, pan_and_scan, self.vision, self.tokenizer)

    def logits(self, ids: Sequence[int] | np.ndarray | str, last_only: bool = False, *,
               images: Sequence[Any] | None = None, pan_and_scan: bool = False) -> np.ndarray:
        """Logits of a sequence evaluated from an empty context.

        Returns ``(n_tokens, vocab) float32``, or ``(vocab,)`` with ``last_only=True``.
        A string is tokenized with BOS. ``images`` as in :meth:`generate`.
        """
        ids, mm = self._prompt(ids, images, pan_and_scan, "ids", flatten=True)
        if not ids:
            raise ValueError("logits() needs at least one token")
        with self.engine.exclusive():
            if last_only:
                return self.engine.evaluate(ids, 1, mm=mm)[0]
            return self.engine.evaluate(ids, 2, mm=mm)

    def encode_image(self, image: Any, pan_and_scan: bool = False) -> np.ndarray:
        """The projected soft-token embeddings of one picture: ``(M, n_embd)`` float32 (M = 256
        for the released models), or ``(1 + n_crops, M, n_embd)`` with ``pan_and_scan=True``.
        These are what replace the ``<image_soft_token>`` rows, unscaled."""
        return _mm.encode_image(self.vision, image, pan_and_scan)

    def stream(self, prompt: str | Sequence[int], *, images: Sequence[Any] | None = None,
               pan_and_scan: bool = False, fwd_hooks=None, **kwargs) -> Iterator[str]:
        """Yields text pieces as they are generated (never a broken UTF-8 sequence).

        Arguments as :meth:`generate`, checked when called (not at the first piece). Stop
        strings end the stream; their text is not yielded.
        """
        spec = _spec.options(self, kwargs)
        gc = _gen.settings(self.config.vocab_size, **kwargs)
        hk = _hooks.plan(self.config, fwd_hooks)
        ids, mm = self._prompt(prompt, images, pan_and_scan)
        if self.tokenizer is None:
            raise ValueError("streaming text needs a tokenizer (pass return_ids=True to "
                             "generate() for token ids)")
        return self._stream(ids, mm, gc, hk, spec)

    def _stream(self, ids: list[int], mm: list, gc: GenerationConfig, hooks=None, spec=None
                ) -> Iterator[str]:
        return _gen.stream_text(self._generate_ids(ids, gc, mm=mm, hooks=hooks, spec=spec),
                                self.tokenizer, gc.stop)

    def _generate_ids(self, ids: list[int], gc: GenerationConfig, attn=None, attn_out=None,
                      mm=None, hooks=None, spec=None) -> Iterator[int]:
        stops = _gen.stop_ids(gc, self.config.eos_token_id, self.tokenizer)
        if spec is not None:
            if hooks is not None:
                raise ValueError("fwd_hooks cannot be combined with draft= (speculative) yet")
            return _spec.generate_ids(self.engine, ids, gc, stops, spec, mm)
        return _gen.generate_ids(self.engine, ids, gc, stops, attn, attn_out, mm, hooks)

    def generate(self, prompt: str | Sequence[int], *, max_new_tokens: int = 256,
                 temperature: float = 1.0, top_k: int = 64, top_p: float = 0.95,
                 min_p: float = 0.0, repetition_penalty: float = 1.0, seed: int | None = None,
                 stop: Sequence[str] = (), logit_bias: dict[int, float] | None = None,
                 stop_token_ids: Sequence[int] | None = None, return_ids: bool = False,
                 return_attention: bool = False, attention_layers: Sequence[int] | None = None,
                 attention_heads: Sequence[int] | None = None,
                 images: Sequence[Any] | None = None, pan_and_scan: bool = False,
                 fwd_hooks=None, draft: Any = None, num_draft_tokens: int = 5,
                 stats: Any = None, num_return_sequences: int = 1):
        """Generates a continuation of ``prompt`` (text, tokenized with BOS, or token ids).

        ``images`` (models with a vision tower): one per ``<start_of_image>`` in a text prompt
        (expanded as the reference processor does, ``pan_and_scan`` adding crops), or filling
        the runs of image-token ids of an id prompt; pictures (paths, bytes, PIL, uint8 arrays)
        or pixel_values ``(n, 3, S, S)`` float32.

        Defaults follow Gemma 3's published generation config (temperature 1, top-k 64,
        top-p 0.95); ``temperature=0`` is greedy. Stops on ``<eos>``/``<end_of_turn>``, on any
        of ``stop`` (the stop text is not included) or after ``max_new_tokens``.
        Returns the text, or the new token ids with ``return_ids=True``.

        With ``return_attention=True`` returns a :class:`Generation` (text, ids, attention) where
        ``attention[i][layer]`` is the ``(heads, n_ctx)`` attention of the query that predicted
        new token ``i`` over the whole context before it (``attention_layers``/``_heads`` select;
        default all).

        ``fwd_hooks``: ``[(name or filter, fn)]`` applied at every forward call (gemma3.hooks).

        Speculative decoding (gemma3.speculative): ``draft="prompt_lookup"`` (or a
        ``PromptLookup(max_ngram, min_ngram)``) or another loaded Model sharing the tokenizer,
        ``num_draft_tokens`` (1..30) per verify pass; greedy output equals plain greedy, sampled
        output has the plain distribution. ``stats``: a ``speculative.Stats`` filled in place.

        ``num_return_sequences=n``: a list of n continuations, decoded together from one
        computation of the prompt (sequence i samples with ``seed + i``).
        """
        kw = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                  top_p=top_p, min_p=min_p, repetition_penalty=repetition_penalty, seed=seed,
                  stop=stop, logit_bias=logit_bias, stop_token_ids=stop_token_ids)
        sk = dict(draft=draft, num_draft_tokens=num_draft_tokens, stats=stats)
        if type(num_return_sequences) is not int or num_return_sequences != 1:
            return _gen.return_sequences(self, self._ids, prompt, num_return_sequences, return_ids,
                                         kw, dict(images=images, fwd_hooks=fwd_hooks, draft=draft,
                                                  return_attention=return_attention))
        if not (return_attention or return_ids):
            return "".join(self.stream(prompt, images=images, pan_and_scan=pan_and_scan,
                                       fwd_hooks=fwd_hooks, **kw, **sk))
        spec = _spec.options(self, sk)
        if spec is not None and return_attention:
            raise ValueError("return_attention is not available with draft= (speculative)")
        attn = _inspect.attention_selection(self.config, attention_layers, attention_heads) \
            if return_attention else None
        gc = _gen.settings(self.config.vocab_size, **kw)
        hk = _hooks.plan(self.config, fwd_hooks)
        p_ids, mm = self._prompt(prompt, images, pan_and_scan)
        if attn is None:
            return list(self._generate_ids(p_ids, gc, mm=mm, hooks=hk, spec=spec))
        att: list = []
        ids = list(self._generate_ids(p_ids, gc, attn, att, mm=mm, hooks=hk))
        return Generation(_gen.visible_text(self.tokenizer, ids), ids, att)

    # -- batches -----------------------------------------------------------------------------
    def generate_batch(self, prompts: Sequence[str | Sequence[int]],
                       settings: Sequence[dict[str, Any]] | None = None, *,
                       return_ids: bool = False, **kwargs) -> list:
        """Generates continuations of several prompts, decoding them together: one forward
        call per step reads the weights once for every active sequence.

        ``kwargs`` are :meth:`generate`'s sampling arguments, shared by all prompts;
        ``settings`` optionally gives one dict per prompt overriding them (its own seed,
        temperature, stop strings, max_new_tokens...). Each sequence stops on its own. Greedy
        results equal one-by-one :meth:`generate` exactly. Returns texts (or id lists).
        """
        return _gen.run_batch(self, self._ids, prompts, settings, return_ids, kwargs)

    # -- scoring (gemma3.scoring) ---------------------------------------------------------------
    def loglikelihood(self, context: str | Sequence[int], continuation: str | Sequence[int]
                      ) -> tuple[float, bool]:
        """(sum log-probability of ``continuation`` given ``context``, whether greedy decoding
        would produce it). Text is tokenized as lm-eval-harness does (see gemma3.eval); runs on
        extra KV sequences, leaving the interactive context alone."""
        return _scoring.loglikelihood(self, context, continuation)

    def loglikelihood_batch(self, requests: Sequence[tuple[Any, Any]], **kwargs
                            ) -> list[tuple[float, bool]]:
        """:meth:`loglikelihood` of many (context, continuation) pairs, several per forward call;
        pairs with the same context (multiple-choice answers) share its KV cache."""
        return _scoring.loglikelihood_batch(self, requests, **kwargs)

    def loglikelihood_rolling(self, text: str | Sequence[int], max_length: int | None = None
                              ) -> float:
        """Log-likelihood of a whole text in disjoint windows (lm-eval-harness semantics)."""
        return _scoring.loglikelihood_rolling(self, text, max_length)

    def perplexity(self, text: str | Sequence[int], n_ctx: int, stride: int | None = None,
                   protocol: str = "llama.cpp"):
        """Token perplexity and bits per byte under ``protocol`` "llama.cpp" (llama-perplexity)
        or "hf" (the Hugging Face strided-window recipe); returns gemma3.eval.Perplexity."""
        return _scoring.perplexity(self, text, n_ctx, stride, protocol)

    # -- LoRA adapters (gemma3.adapters; ``model.adapters``: loaded, active, merged) ----------
    def load_adapter(self, path: str | os.PathLike, name: str | None = None,
                     scale: float = 1.0) -> str:
        """Loads a LoRA adapter (PEFT directory or llama.cpp LoRA GGUF) unmerged and activates
        it at ``scale`` next to the active ones. Returns its name (default: the file name)."""
        return self.adapters.load(path, name, scale)

    def set_adapters(self, scales: dict[str, float] | None) -> None:
        """Exactly these loaded adapters active, ``{name: scale}`` ({} or None: the base model).
        Changing them empties the KV cache."""
        self.adapters.set(scales)

    def unload_adapter(self, name: str) -> None:
        """Deactivates and forgets a loaded adapter."""
        self.adapters.unload(name)

    # -- looking inside (gemma3.inspect) -------------------------------------------------------
    @property
    def kv_cache(self) -> _inspect.KVCache:
        """The cached context's K/V per layer, in position order (see gemma3.inspect)."""
        return _inspect.kv_cache(self.engine)

    def run_with_cache(self, text_or_ids: str | Sequence[int], names: Sequence[str] | None = None,
                       layers: Sequence[int] | None = None, heads: Sequence[int] | None = None,
                       query_range: tuple[int, int] | None = None, logits: str = "all",
                       images: Sequence[Any] | None = None, pan_and_scan: bool = False,
                       saes: Sequence[Any] = ()
                       ) -> tuple[np.ndarray | None, dict[str, np.ndarray]]:
        """Runs a prompt from an empty context recording activations (TransformerLens names,
        listed in gemma3.inspect). Selects by ``names``, ``layers``, attention ``heads`` and a
        ``query_range`` (rows of the attention maps). ``logits``: "all" (n_tokens, vocab),
        "last" (vocab,) or "none". ``images`` as in :meth:`generate`. Returns (logits, cache
        dict). ``saes`` (gemma3.SAE) add their features as ``<hook>.hook_sae_acts_post``."""
        ids, mm = self._prompt(text_or_ids, images, pan_and_scan, "token ids")
        names = _sae.cache_names(names, saes) if saes else names
        lg, cache = _inspect.run_with_cache(self.engine, ids, mm, names, layers, heads,
                                            query_range, logits)
        return lg, _sae.add_acts(cache, saes) if saes else cache

    def run_with_hooks(self, text_or_ids: str | Sequence[int], fwd_hooks=(), logits: str = "all",
                       images: Sequence[Any] | None = None, pan_and_scan: bool = False
                       ) -> np.ndarray | None:
        """Runs a prompt from an empty context in one forward pass through ``fwd_hooks``
        (``[(name or name filter, fn)]``; TransformerLens semantics, see gemma3.hooks) and
        returns its logits as :meth:`run_with_cache` does."""
        ids, mm = self._prompt(text_or_ids, images, pan_and_scan, "token ids")
        return _hooks.run_with_hooks(self.engine, ids, mm, fwd_hooks, logits)

    def logit_lens(self, text_or_ids: str | Sequence[int], k: int = 5,
                   layers: Sequence[int] | None = None) -> dict[int, tuple[np.ndarray, np.ndarray]]:
        """Each layer's residual stream (after the block) through the final norm and the LM
        head: ``{layer: (top_ids (n_tokens, k) int64, top_logprobs (n_tokens, k) float32)}``."""
        layers = list(range(self.config.num_layers)) if layers is None else list(layers)
        names = [f"blocks.{L}.hook_resid_post" for L in layers]
        _, cache = self.run_with_cache(text_or_ids, names=names, logits="none")
        return _inspect.logit_lens(self.engine, cache, layers, k)

    def top_logprobs(self, text_or_ids: str | Sequence[int], k: int = 5
                     ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k next-token log-probabilities at every position, computed chunk by chunk
        (never a full (n_tokens, vocab) matrix): (ids (n, k) int64, logprobs (n, k) float32)."""
        return _inspect.top_logprobs(self.engine, self._ids(text_or_ids, "token ids"), k)

    # -- KV state (gemma3.state) -------------------------------------------------------------
    def save_state(self, path: str | os.PathLike | None = None) -> _state.State:
        """The cached context as a State (also written to ``path``: a versioned file tied to this
        model). Later prompts extending a live State reuse its cache."""
        return _state.save(self.engine, path, _state.model_info(self.config))

    def load_state(self, state: _state.State | str | os.PathLike) -> None:
        """Makes the cached context a saved State or state file (validated before use)."""
        _state.restore(self.engine, state)

    def fork(self, n: int) -> list[_state.State]:
        """n States of the cached context sharing one copy of its bytes (best-of-N: load each
        and continue)."""
        return _state.fork(self.engine, _check.integer("n", n, 1))

    def close(self) -> None:
        """Releases the weights, the KV cache and the vision tower (and the file mappings once
        no view of the cache or the file is alive). The model cannot be used afterwards."""
        self.engine.close()
        self._owners = None

    def __enter__(self) -> Model:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        c = self.config
        return (f"<gemma3.Model {c.name or os.path.basename(self.path)!r}: {c.num_layers} layers, "
                f"width {c.hidden_size}, vocab {c.vocab_size}, max_seq_len {self.max_seq_len}>")


def load(path: str | os.PathLike | None = None, *, n_threads: int | None = None,
         max_seq_len: int | None = None, dtype: str | None = None,
         mmproj: str | os.PathLike | None = None, pack: bool | None = None,
         adapter: Any = None, merge: bool = False, vision_dtype: str | None = None,
         kv_dtype: str = "f32", prefill_precision: str = "exact") -> Model:
    """Loads a Gemma 3 checkpoint: a GGUF file, or a Hugging Face checkpoint directory.

    Vision (``model.vision``, None for text-only models): a multimodal HF directory brings its
    SigLIP tower; a text GGUF takes llama.cpp's vision file with ``mmproj="mmproj.gguf"``.
    ``vision_dtype``: "bf16" or "f32" tower compute (default: the file's precision class,
    gemma3.vision.vision_dtype). With no path, the embedded default model (Gemma 3 270M) is used.
    ``n_threads``: threads for compute (default: all cores). ``max_seq_len``: positions the
    KV cache holds (default: the model's context length, at most 32768). ``dtype``: convert
    weights on load ("q8_0", "q4_0", "q4_k", "q6_k", "f16", "bf16", "f32"); by default GGUF
    weights are used as stored and HF weights as float32.

    ``pack``: with AVX-512 VNNI, repack Q8_0, Q4_0, Q5_0, Q4_K, Q5_K and Q6_K matrices into
    16-row groups for the integer kernels (24-bit activations: logits as the float kernels' to
    ~1e-6; faster decoding and prompts), as a second copy (``model.packed_bytes``); default: when
    it takes <= half the free memory. ``prefill_precision``: "exact" (24-bit
    prompt activations), or the faster opt-ins "int16" and "int8" (README: their agreement).
    ``kv_dtype``: the KV cache's type, "f32", "bf16", "f16" or "q8_0" (README: memory, fidelity).

    ``adapter``: LoRA adapter path(s) (PEFT directory or llama.cpp LoRA GGUF; a list, or
    ``{path: scale}``), applied unmerged (:meth:`Model.load_adapter`), or with ``merge=True``
    folded into the weights, requantized (the error is in ``model.adapters.merged``).
    """
    plan = _adapters.LoadPlan(adapter, merge)
    core, cfg, tok, path, owners, n, vision, footprint = open_checkpoint(
        path, n_threads, max_seq_len, dtype, mmproj, pack, plan.prepare, vision_dtype, kv_dtype,
        prefill_precision)
    model = Model(core, cfg, tok, path, owners, n, footprint)
    model.vision = vision
    return plan.attach(model)

