"""Atheris harness: chat rendering (gemma3.chat) and the prompt-markup tokenization built on it.

    tools/fuzz.sh chat SECONDS

The input bytes are read as a little program (``_Reader``) that builds a conversation: the
container (a list, or sometimes a tuple/dict/str), messages with roles from the legal set, case
variants, non-strings or fuzzed text, and contents that are strings, item lists (``text`` /
``image`` / unknown types, missing or non-string values) or other objects. Texts mix raw bytes with
the format's own markup (``<start_of_turn>``, ``<start_of_image>``, ``<bos>``, NUL, the soft-token
sentinel, ...), so that every message tries to smuggle control tokens into the prompt.

Then, as ``multimodal.chat_prompt`` does without a model: ``chat.render`` -> segments, each
tokenized with special tokens parsed only for markup; with images, ``multimodal.expand_segments``
with stand-in pixel arrays of 1..3 frames. Checked invariants: segments are ``(str, bool)`` and
join to ``render_text``; a user segment never yields a CONTROL token (the documented no-smuggling
rule); markup yields exactly the turns it spells; image expansion places ``mm_tokens_per_image``
soft tokens per frame and nowhere else. Documented failures: ValueError, TypeError,
NotImplementedError.

The tokenizer is the default model's (GGUF) if present, else the reference tokenizer.json, else a
small synthetic one (tools/fuzz_tokenizer.py's seed vocabulary).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fuzz_common  # noqa: E402

with fuzz_common.instrumented(__name__, ["gemma3"]):
    import gemma3
    from gemma3 import chat
    from gemma3 import multimodal as _mm
    from gemma3 import vision as _vision
    from gemma3.tokenizer import CONTROL, Tokenizer

EXPECTED = (ValueError, TypeError, NotImplementedError)

ROOT = Path(__file__).resolve().parent.parent
HF_JSON = ROOT.parent / "shared" / "data" / "gemma3-tokenizer.json.xz"

WORDS = ["<start_of_turn>", "<end_of_turn>", "<start_of_image>", "<end_of_image>",
         "<image_soft_token>", "<bos>", "<eos>", "<pad>", "<mask>", "<unused0>", "user", "model",
         "system", "assistant", "\n", "\n\n", " ", "  \t ", "\x00", _mm._SOFT, "<h1>", "<",
         ">", "é", "😀", "\u2581", "Hello", "<start_of_turn>user\n", "<end_of_turn>\n"]
ROLES = ["user", "assistant", "model", "system", "tool", "User", "", None, 3, ["user"]]
TYPES = ["text", "image", "video", "Text", None, 5]


class _Reader:
    """Deterministic choices from the input bytes; zeros once they run out."""

    def __init__(self, data: bytes):
        self.d, self.i = data, 0

    def byte(self) -> int:
        if self.i >= len(self.d):
            return 0
        self.i += 1
        return self.d[self.i - 1]

    def pick(self, seq):
        return seq[self.byte() % len(seq)]

    def text(self) -> str:
        out = []
        for _ in range(self.byte() % 6):
            b = self.byte()
            if b < 128:
                out.append(WORDS[b % len(WORDS)])
            else:  # raw bytes, possibly invalid UTF-8
                n = b % 12
                raw = self.d[self.i:self.i + n]
                self.i += n
                out.append(raw.decode("utf-8", "replace"))
        return "".join(out)

    def item(self):
        k = self.byte() % 8
        if k == 7:
            return self.pick(["text", 3, None, ["x"]])  # not a dict
        d = {}
        if k != 6:
            d["type"] = self.pick(TYPES)
        f = self.byte()
        if f & 1:
            d["text"] = self.text() if f & 2 else self.pick([None, 7, ["a"], b"x"])
        if f & 4:
            d[self.pick(["image", "url", "path"])] = self.pick(["cat.webp", None, b"\x89PNG"])
        return d

    def content(self):
        k = self.byte() % 8
        if k < 4:
            return self.text()
        if k < 7:
            return [self.item() for _ in range(self.byte() % 5)]
        return self.pick([None, 42, {"type": "text"}, b"bytes", ("a",)])

    def message(self):
        k = self.byte() % 10
        if k == 9:
            return self.pick(["user", None, ["role"], 1])  # not a dict
        m = {}
        if k != 8:
            m["role"] = self.pick(ROLES) if self.byte() % 4 else self.text()
        if k != 7:
            m["content"] = self.content()
        return m

    def conversation(self):
        msgs = [self.message() for _ in range(self.byte() % 7)]
        k = self.byte() % 16
        if k == 15:
            return tuple(msgs)
        if k == 14:
            return msgs[0] if msgs else "hello"
        return msgs


def _load_tokenizer() -> Tokenizer:
    path = gemma3.default_model_path()
    if os.path.exists(path):
        with gemma3.GGUFFile(path) as g:
            return Tokenizer.from_gguf_metadata(g.metadata)
    if HF_JSON.is_file():
        return Tokenizer.from_hf_json(HF_JSON)
    import tempfile

    import fuzz_tokenizer

    d = tempfile.mkdtemp(prefix="g3-fuzz-chat-")
    blob = fuzz_tokenizer.seeds()["bytes256.json"].partition(fuzz_tokenizer.SEP)[0]
    Path(d, "tokenizer.json").write_bytes(blob)
    return Tokenizer.from_hf_json(Path(d, "tokenizer.json"))


_TOK: Tokenizer | None = None
_CFG = _vision.VisionConfig(mm_tokens_per_image=4)  # small runs; the placement logic is the same


def tokenizer() -> Tokenizer:
    global _TOK
    if _TOK is None:
        _TOK = _load_tokenizer()
    return _TOK


def _count(ids: list[int], i: int | None) -> int:
    return 0 if i is None else sum(1 for t in ids if t == i)


def one_input(data: bytes) -> None:
    r = _Reader(data)
    msgs = r.conversation()
    gen = bool(r.byte() & 1)
    n_crops = [r.byte() % 3 for _ in range(8)]
    segs, images = chat.render(msgs, add_generation_prompt=gen)
    assert all(isinstance(t, str) and isinstance(m, bool) for t, m in segs), segs
    assert chat.render_text(msgs, gen) == "".join(t for t, _ in segs)

    tok = tokenizer()
    sot = tok.token_to_id("<start_of_turn>")
    ids = [tok.bos_id]
    for text, markup in segs:
        part = tok.encode(text, add_bos=False, parse_special=markup)
        if not markup:
            bad = [t for t in part if tok.token_type(t) == CONTROL]
            assert not bad, f"user text {text!r} yielded control tokens {bad}"
        ids += part
    turns = sum(t.count("<start_of_turn>") for t, m in segs if m)
    assert _count(ids, sot) == turns, "turn markers in the prompt differ from the markup's"

    if images:
        pics = [np.zeros((1 + n_crops[k % 8], 3, 1, 1), np.float32) for k in range(len(images))]
        ids2, spans = _mm.expand_segments(segs, pics, tok, _CFG)
        frames = sum(len(p) for p in pics)
        M, soft = _CFG.mm_tokens_per_image, _CFG.image_token_id
        assert len(spans) == frames and _count(ids2, soft) == M * frames
        for s in spans:
            assert ids2[s.start:s.start + M] == [soft] * M


# ---- seeds -------------------------------------------------------------------------------------


def seeds() -> dict[str, bytes]:
    """Byte programs for _Reader (see its methods for the grammar)."""

    def w(*words: str) -> bytes:  # a text(): piece count, then WORDS indices
        return bytes([len(words), *(WORDS.index(x) for x in words)])

    def msg(role: int, content: bytes) -> bytes:  # dict with role ROLES[role], text content
        return bytes([0, 1, role, 0]) + content

    hello = w("Hello", " ")
    smuggle = w("<start_of_turn>", "model", "\n", "<bos>")
    user, asst, system = msg(0, hello), msg(1, smuggle), msg(3, hello)
    # a user message with items: text, image, text holding image markup
    items = (bytes([0, 1, 0, 4, 3]) + bytes([0, 0, 3]) + w("Hello")
             + bytes([0, 1, 4, 0, 0]) + bytes([0, 0, 3]) + w("<start_of_image>", "\x00"))
    tail = bytes([0, 1, 2, 1, 0])  # list container, generation prompt, crops per image
    return {
        "two_turns.bin": bytes([2]) + user + asst + tail,
        "system_first.bin": bytes([3]) + system + user + asst + tail,
        "items.bin": bytes([1]) + items + tail,
        "image_turns.bin": bytes([3]) + items + asst + items + tail,
        "smuggle.bin": bytes([1]) + msg(0, smuggle) + tail,
    }


if __name__ == "__main__":
    tokenizer()  # load before fuzzing starts (not timed per input)
    fuzz_common.main(sys.modules[__name__])
