"""Model's chat methods (a mixin of gemma3.model.Model): the Gemma chat format rendered by
gemma3.chat, images expanded by gemma3.multimodal, generation as Model.generate's."""

from __future__ import annotations

from typing import Any

from . import chat as _chat
from . import generation as _gen
from . import hooks as _hooks
from . import multimodal as _mm
from . import speculative as _spec


class ChatMethods:
    """chat / chat_ids; the host class provides config, tokenizer, vision and _stream."""

    def chat(self, messages: list[dict[str, Any]], *, stream: bool = False,
             pan_and_scan: bool = False, **kwargs):
        """Replies to a conversation (``[{"role": "user"|"assistant"|"system", "content": ...}]``).

        Uses the Gemma chat format; the KV cache of the previous turn is reused when the
        conversation extends it (images included, compared by their pixels). Content may be a
        list of items ``{"type": "text", "text": ...}`` / ``{"type": "image", "image": ...}``.
        Returns the reply text, or an iterator of pieces with ``stream=True``. Keyword
        arguments as :meth:`generate`.
        """
        hk = _hooks.plan(self.config, kwargs.pop("fwd_hooks", None))
        spec = _spec.options(self, kwargs)
        gc = _gen.settings(self.config.vocab_size, **kwargs)
        ids, mm = self._chat_prompt(messages, pan_and_scan)
        it = self._stream(ids, mm, gc, hk, spec)
        return it if stream else "".join(it)

    def chat_ids(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True
                 ) -> list[int]:
        """Token ids of the rendered conversation (with BOS; images expanded to their
        soft-token runs)."""
        return self._chat_prompt(messages, False, add_generation_prompt)[0]

    def _chat_prompt(self, messages: list[dict[str, Any]], pan_and_scan: bool,
                     add_generation_prompt: bool = True) -> tuple[list[int], list]:
        if self.tokenizer is None:
            raise ValueError("chat needs a tokenizer")
        segs, images = _chat.render(messages, add_generation_prompt)
        return _mm.chat_prompt(segs, images, pan_and_scan, self.vision, self.tokenizer)
