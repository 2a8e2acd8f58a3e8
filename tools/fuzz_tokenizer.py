"""Atheris harness: tokenizer files -> gemma3.Tokenizer, then encode/decode of fuzzed text.

    tools/fuzz.sh tokenizer SECONDS

Input: ``FILE [SEP TEXT]`` with SEP = ``\\n--text--\\n``. FILE is

- a Hugging Face tokenizer.json (``Tokenizer.from_hf_json``), or, if it starts with ``GGUF``, a
  GGUF file whose metadata feeds ``Tokenizer.from_gguf_metadata``: the file parsers;
- if it starts with byte 1 or 2, a vocabulary description that the harness turns into a valid
  tokenizer.json (1, rank-based merges) or GGUF metadata dict (2, score-based merges), so that
  mutations reach the C tokenizer with odd vocabularies instead of dying in the JSON parser:
  items separated by 0x1F, each a flag byte then the token text (module ``_vocab_items``).
TEXT (the whole input when there is no SEP) is encoded as str without and as raw bytes with
special-token parsing, decoded back, stream-decoded, and its bytes are also decoded as int32 ids.

Checked invariants: encode returns ids in [0, vocab_size); the stream decoder's pieces join to
``decode(ids)``. Documented failures: ValueError (FormatError, JSON and UTF-8 errors included),
TypeError, NotImplementedError (UnsupportedError).
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fuzz_common  # noqa: E402

with fuzz_common.instrumented(__name__, ["gemma3"]):
    from gemma3 import GGUFFile, GGUFWriter
    from gemma3.tokenizer import Tokenizer

EXPECTED = (ValueError, TypeError, NotImplementedError)
SEP = b"\n--text--\n"

_TMP = tempfile.mkdtemp(prefix="g3-fuzz-tok-",
                        dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
atexit.register(shutil.rmtree, _TMP, ignore_errors=True)


def _vocab_items(body: bytes) -> list[tuple[int, str]]:
    """(flag, text) per 0x1F-separated item; text as UTF-8 with surrogate escapes."""
    return [(it[0], it[1:].decode("utf-8", "surrogateescape")) for it in body.split(b"\x1f") if it]


def _from_items(mode: int, body: bytes) -> Tokenizer:
    """mode 1: tokenizer.json with rank-based merges; mode 2: GGUF metadata, score-based.
    Header byte h: bit 0 byte tokens <0x00>..<0xFF>, bit 1 Prepend normalizer / add_space_prefix,
    bit 2 an unk token, bit 3 no BOS. Item flag f: f % 4 = 0 normal, 1 special (control), 2 user
    defined, 3 merge ``a b`` (mode 1; both must be tokens, a+b is added); in mode 2, f is the GGUF
    token type mod 8 (7 is invalid) and -f the score."""
    h, items = (body[0], _vocab_items(body[1:])) if body else (0, [])
    toks = ["<pad>", "<eos>"] + ([] if h & 8 else ["<bos>"]) + (["<unk>"] if h & 4 else [])
    flags = [1] * len(toks)
    if h & 1:
        toks += [f"<0x{b:02X}>" for b in range(256)]
        flags += [6 if mode == 2 else 0] * 256
    merges = []
    for f, t in items:
        if mode == 1 and f % 4 == 3:
            a, _, b = t.partition(" ")
            if a in toks and b in toks:
                merges.append([a, b])
                if a + b not in toks:
                    toks.append(a + b)
                    flags.append(0)
            continue
        toks.append(t)
        flags.append(f)
    if mode == 2:
        md = {
            "tokenizer.ggml.model": "llama",
            "tokenizer.ggml.tokens": toks,
            "tokenizer.ggml.scores": -np.asarray(flags, np.float32),
            "tokenizer.ggml.token_type": np.array(
                [3 if i < 3 else f % 8 for i, f in enumerate(flags)], np.int32),
            "tokenizer.ggml.add_space_prefix": bool(h & 2),
            "tokenizer.ggml.eos_token_id": 1,
        }
        if not h & 8:
            md["tokenizer.ggml.bos_token_id"] = 2
        if h & 4:
            md["tokenizer.ggml.unknown_token_id"] = toks.index("<unk>")
        return Tokenizer.from_gguf_metadata(md)
    vocab: dict[str, int] = {}
    added = []
    for t, f in zip(toks, flags, strict=True):
        i = vocab.setdefault(t, len(vocab))
        if f % 4 in (1, 2) and i == len(vocab) - 1:
            added.append({"id": i, "content": t, "special": f % 4 == 1})
    norm = {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}
    if h & 2:
        norm = {"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": "\u2581"}, norm]}
    j = {"added_tokens": added, "normalizer": norm,
         "model": {"type": "BPE", "byte_fallback": bool(h & 1), "vocab": vocab, "merges": merges,
                   "unk_token": "<unk>" if h & 4 else None}}
    path = os.path.join(_TMP, "tokenizer.json")
    with open(path, "w", encoding="utf-8", errors="surrogateescape") as f:
        json.dump(j, f, ensure_ascii=True)
    return Tokenizer.from_hf_json(path)


def _load(blob: bytes) -> Tokenizer:
    if blob[:1] in (b"\x01", b"\x02"):
        return _from_items(blob[0], blob[1:])
    if blob.startswith(b"GGUF"):
        path = os.path.join(_TMP, "t.gguf")
        with open(path, "wb") as f:
            f.write(blob)
        with GGUFFile(path) as g:
            return Tokenizer.from_gguf_metadata(g.metadata)
    path = os.path.join(_TMP, "tokenizer.json")
    with open(path, "wb") as f:
        f.write(blob)
    return Tokenizer.from_hf_json(path)


def one_input(data: bytes) -> None:
    blob, sep, text = data.partition(SEP)
    if not sep:
        text = data
    tok = _load(blob)
    n = len(tok)
    s = text.decode("utf-8", "replace")
    # str without special-token parsing, raw bytes (maybe not UTF-8) with it
    for t, parse_special in ((s, False), (text, True)):
        ids = tok.encode(t, add_bos=True, parse_special=parse_special)
        assert all(0 <= i < n for i in ids), f"encode gave an id outside [0, {n})"
        skip = not parse_special
        whole = tok.decode(ids, skip_special=skip)
        sd = tok.stream_decoder(skip_special=skip)
        pieces = "".join(sd.push(i) for i in ids) + sd.flush()
        assert pieces == whole, "stream decoder disagrees with decode"
    tok.token_to_id(s[:32])
    repr(tok)
    # the text's bytes as ids: in range (any sequence must decode), then as they are (may raise)
    raw = np.frombuffer(text[: len(text) // 4 * 4], "<i4")
    ids = (raw.astype(np.int64) % n).tolist()
    for skip in (True, False):
        sd = tok.stream_decoder(skip_special=skip)
        pieces = "".join(sd.push(i) for i in ids) + sd.flush()
        assert pieces == tok.decode(np.array(ids, np.int32), skip_special=skip)
    for i in ids[:8]:
        tok.id_to_token(i)
        tok.token_type(i)
    tok.decode(raw.tolist(), skip_special=False)


# ---- seeds -------------------------------------------------------------------------------------

_SPECIAL = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>",
            "<start_of_image>", "<end_of_image>", "<image_soft_token>"]
_USER = ["\n", "\n\n", "\t\t", "  ", "<h1>", "</h1>"]
_TEXT = "Hello world! <start_of_turn>user\nhi<end_of_turn>\n\n  été ▁x 😀 <h1>tag</h1>"


def _hf_json(n_bytes: int = 256, prepend: bool = False, list_merges: bool = False,
             byte_fallback: bool = True) -> bytes:
    vocab: dict[str, int] = {}
    for t in _SPECIAL:
        vocab[t] = len(vocab)
    for b in range(n_bytes):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for t in _USER:
        vocab[t] = len(vocab)
    for c in "▁abcdehilorstuwxHé!":
        vocab.setdefault(c, len(vocab))
    merges = [("▁", "w"), ("l", "l"), ("e", "ll"), ("H", "ell"), ("Hell", "o"), ("o", "r"),
              ("w", "or"), ("▁w", "or"), ("▁wor", "l"), ("▁worl", "d")]
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    added = [{"id": vocab[t], "content": t, "special": True, "normalized": False}
             for t in _SPECIAL]
    added += [{"id": vocab[t], "content": t, "special": False, "normalized": False}
              for t in _USER]
    norm = {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}
    if prepend:
        norm = {"type": "Sequence",
                "normalizers": [{"type": "Prepend", "prepend": "▁"}, norm]}
    j = {
        "version": "1.0",
        "added_tokens": added,
        "normalizer": norm,
        "model": {
            "type": "BPE", "dropout": None, "unk_token": "<unk>", "byte_fallback": byte_fallback,
            "fuse_unk": True, "vocab": vocab,
            "merges": [list(m) if list_merges else " ".join(m) for m in merges],
        },
    }
    return json.dumps(j, ensure_ascii=False).encode()


def _gguf() -> bytes:
    j = json.loads(_hf_json())
    vocab = j["model"]["vocab"]
    tokens = sorted(vocab, key=vocab.get)
    types = [3 if t in _SPECIAL else 4 if t in _USER else 6 if t.startswith("<0x") else 1
             for t in tokens]
    w = GGUFWriter()
    w.add("general.architecture", "gemma3")
    w.add("tokenizer.ggml.model", "llama")
    w.add("tokenizer.ggml.tokens", tokens)
    w.add("tokenizer.ggml.scores", -np.arange(len(tokens), dtype=np.float32))
    w.add("tokenizer.ggml.token_type", np.array(types, np.int32))
    w.add("tokenizer.ggml.bos_token_id", 2, type="UINT32")
    w.add("tokenizer.ggml.eos_token_id", 1, type="UINT32")
    w.add("tokenizer.ggml.add_bos_token", True)
    return w.to_bytes()


_ITEMS = [b"\x00" + c.encode() for c in "\u2581abcdehilorstuw\xe9H!"] + [
    b"\x01<start_of_turn>", b"\x01<end_of_turn>", b"\x02\n\n", b"\x02<h1>", b"\x03l l",
    b"\x03e ll", b"\x03" + "\u2581 w".encode()]


def seeds() -> dict[str, bytes]:
    text = _TEXT.encode()
    return {
        "bytes256.json": _hf_json() + SEP + text,
        "prepend_listmerges.json": _hf_json(n_bytes=16, prepend=True, list_merges=True)
        + SEP + text,
        "no_byte_fallback.json": _hf_json(n_bytes=0, byte_fallback=False) + SEP + text,
        "vocab.gguf": _gguf() + SEP + text,
        "items_rank.bin": b"\x01\x05" + b"\x1f".join(_ITEMS) + SEP + text,
        "items_score.bin": b"\x02\x01" + b"\x1f".join(_ITEMS[:-3]) + SEP + text,
        "items_user_overlap.bin": b"\x01\x03" + b"\x1f".join(
            [b"\x02\n", b"\x02\n\n", b"\x02\n\n\n", b"\x01<start_of_turn>", b"\x02<h", b"\x02<h1>",
             b"\x00\xe2\x96\x81", b"\x00", b"\x02", b"\x00\xff\xfe"]) + SEP + text,
    }


if __name__ == "__main__":
    fuzz_common.main(sys.modules[__name__])
