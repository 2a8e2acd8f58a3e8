"""Gemma 3 tokenizer: text <-> token ids, built from GGUF metadata or a Hugging Face tokenizer.json.

The work is done by ``gemma3._core.Tokenizer`` (csrc/text/tokenizer.c):

* user-defined tokens (newline/space/tab runs, HTML tags, ...) are split out of the raw text first,
  leftmost-longest; control tokens (``<bos>``, ``<start_of_turn>``, ...) only with
  ``parse_special=True`` — otherwise their text is tokenized as ordinary text;
* every other fragment has ``' '`` replaced by ``'▁'`` (U+2581) and is merged bottom-up: by token
  score (GGUF, SentencePiece style) or by merge rank (tokenizer.json, Hugging Face BPE);
* characters that are not tokens fall back to byte tokens ``<0xXX>``.

Ids match the Hugging Face ``tokenizers`` reference for both sources (tests/test_tokenizer.py).
"""

from __future__ import annotations

import codecs
import json
import lzma
from collections.abc import Iterable, Mapping
from os import PathLike
from pathlib import Path

import numpy as np

from gemma3 import _check, _core

__all__ = ["Tokenizer", "StreamDecoder"]

# GGUF tokenizer.ggml.token_type values
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


def _is_byte_token(text: str) -> bool:
    return (
        len(text) == 6
        and text.startswith("<0x")
        and text.endswith(">")
        and all(c in "0123456789ABCDEFabcdef" for c in text[3:5])
    )


IMAGE_MARKUP = ("<start_of_image>", "<end_of_image>", "<image_soft_token>")


def _text_bytes(text: str | bytes) -> bytes:
    if isinstance(text, bytes):
        return text
    if not isinstance(text, str):
        raise TypeError(f"text must be a str or bytes, got {type(text).__name__}")
    return text.encode("utf-8")


class StreamDecoder:
    """Incremental detokenizer: ``push(id)`` returns the text that is complete so far.

    Bytes of a character split over several byte-fallback tokens are held back until the
    character is complete, so every returned piece is valid text; ``flush()`` returns what is left
    (an unfinished sequence becomes U+FFFD). The concatenation of all pieces equals
    ``tokenizer.decode(ids, skip_special)``.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = True):
        self._tok = tokenizer
        self._render = not skip_special
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        return self._utf8.decode(self._tok._core.decode([token_id], self._render))

    def flush(self) -> str:
        out = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        return out


def _read_json(opener, path: Path):
    """Parsed JSON of a file; malformed text (syntax, UTF-8, xz, nesting depth) -> FormatError."""
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            return json.load(f)
    except (ValueError, RecursionError, lzma.LZMAError, EOFError) as e:
        raise _core.FormatError(f"{path}: not valid JSON ({e})") from None


def _expect(value, kind: type, what: str, path: Path):
    """value if it is a ``kind`` (a JSON object/array/string), else FormatError naming it."""
    if not isinstance(value, kind):
        names = {dict: "an object", list: "an array", str: "a string"}
        raise _core.FormatError(
            f"{path}: {what} must be {names[kind]}, got {type(value).__name__}"
        )
    return value


def _expect_id(value, what: str, path: Path) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise _core.FormatError(f"{path}: {what} must be a non-negative integer, got {value!r}")


class Tokenizer:
    """Gemma 3 tokenizer.

    Build with :meth:`from_gguf_metadata` or :meth:`from_hf_json`. ``encode`` returns a list of
    ints; ``decode`` accepts any iterable of ints or an integer ndarray.
    """

    def __init__(
        self,
        tokens: list[str],
        scores: np.ndarray,
        types: np.ndarray,
        *,
        bos_id: int | None,
        eos_id: int | None,
        pad_id: int | None = None,
        unk_id: int | None = None,
        add_bos: bool = True,
        add_space_prefix: bool = False,
        merges: np.ndarray | None = None,
    ):
        """tokens: (n,) texts; scores: (n,) float32; types: (n,) int32 GGUF token types;
        merges: (m, 2) int32 token-id pairs in rank order (rank-based BPE) or None (score-based)."""
        self._tokens = list(tokens)
        self._types = np.ascontiguousarray(types, dtype=np.int32)
        self._core = _core.Tokenizer(
            # surrogateescape: GGUF strings that are not UTF-8 arrive as surrogate escapes
            [t.encode("utf-8", "surrogateescape") for t in self._tokens],
            np.ascontiguousarray(scores, dtype=np.float32),
            self._types,
            merges,
        )
        n = len(self._tokens)
        for name, v in (
            ("bos_id", bos_id),
            ("eos_id", eos_id),
            ("pad_id", pad_id),
            ("unk_id", unk_id),
        ):
            if v is not None and not 0 <= v < n:
                raise ValueError(f"{name} {v} out of range for a vocabulary of size {n}")
        self._bos_id, self._eos_id, self._pad_id, self._unk_id = bos_id, eos_id, pad_id, unk_id
        self.add_bos = bool(add_bos)
        self.add_space_prefix = bool(add_space_prefix)
        self._eot_id = self.token_to_id("<end_of_turn>")
        # Image markers are markup in Gemma 3 (special in the reference tokenizer.json) even where
        # a GGUF types them USER_DEFINED (then decode renders them, as llama.cpp does); generated
        # text leaves them out (Model.stream), so a text model that emits one prints nothing.
        self.markup_ids = frozenset(
            i for i in (self.token_to_id(t) for t in IMAGE_MARKUP) if i is not None
        )

    # ---- construction -------------------------------------------------------------------------

    @classmethod
    def from_gguf_metadata(cls, metadata: Mapping) -> Tokenizer:
        """From GGUF key/value metadata (``tokenizer.ggml.*`` keys, as ``GGUFFile.metadata``)."""
        model = metadata.get("tokenizer.ggml.model", "llama")
        if model != "llama":
            raise _core.UnsupportedError(
                f"tokenizer.ggml.model {model!r}: only 'llama' (SentencePiece BPE) is supported"
            )
        try:
            tokens = metadata["tokenizer.ggml.tokens"]
        except KeyError:
            raise _core.FormatError("GGUF metadata has no tokenizer.ggml.tokens") from None
        if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
            raise _core.FormatError(
                f"tokenizer.ggml.tokens must be an array of strings, got {type(tokens).__name__}"
            )
        n = len(tokens)
        scores = metadata.get("tokenizer.ggml.scores")
        scores = np.zeros(n, np.float32) if scores is None else np.asarray(scores, np.float32)
        types = metadata.get("tokenizer.ggml.token_type")
        types = np.full(n, NORMAL, np.int32) if types is None else np.asarray(types, np.int32)
        if scores.shape != (n,) or types.shape != (n,):
            raise _core.FormatError(
                f"tokenizer.ggml.scores {scores.shape} / token_type {types.shape} do not match "
                f"{n} tokens"
            )

        def get_id(key):
            v = metadata.get(key)
            return None if v is None else int(v)

        return cls(
            tokens,
            scores,
            types,
            bos_id=get_id("tokenizer.ggml.bos_token_id"),
            eos_id=get_id("tokenizer.ggml.eos_token_id"),
            pad_id=get_id("tokenizer.ggml.padding_token_id"),
            unk_id=get_id("tokenizer.ggml.unknown_token_id"),
            add_bos=bool(metadata.get("tokenizer.ggml.add_bos_token", True)),
            add_space_prefix=bool(metadata.get("tokenizer.ggml.add_space_prefix", False)),
        )

    @classmethod
    def from_hf_json(cls, path: str | PathLike) -> Tokenizer:
        """From a Hugging Face ``tokenizer.json`` (a file, ``.json.xz``, or a checkpoint directory).

        BPE vocab + merges (rank-based merging, as ``tokenizers`` does) + added tokens (special ->
        CONTROL, others -> USER_DEFINED) + byte fallback. A ``tokenizer_config.json`` beside it
        supplies ``add_bos_token`` if present.
        """
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        opener = lzma.open if path.suffix == ".xz" else open
        j = _read_json(opener, path)
        if not isinstance(j, dict):
            raise _core.FormatError(f"{path}: top level is {type(j).__name__}, expected an object")
        model = j.get("model") or {}
        _expect(model, dict, "model", path)
        if model.get("type") != "BPE":
            raise _core.UnsupportedError(f"{path}: model type {model.get('type')!r}, expected BPE")
        if model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
            raise _core.UnsupportedError(f"{path}: BPE with subword prefix/suffix is not supported")
        add_space_prefix = cls._check_normalizer(j.get("normalizer"), path)

        vocab: dict[str, int] = _expect(model.get("vocab"), dict, "model.vocab", path)
        for text, i in vocab.items():
            _expect_id(i, f"model.vocab[{text!r}]", path)
        added = _expect(j.get("added_tokens") or [], list, "added_tokens", path)
        for k, a in enumerate(added):
            _expect(a, dict, f"added_tokens[{k}]", path)
            _expect_id(a.get("id"), f"added_tokens[{k}].id", path)
            _expect(a.get("content"), str, f"added_tokens[{k}].content", path)
        ids = [*vocab.values(), *(a["id"] for a in added)]
        if not ids:
            raise _core.FormatError(f"{path}: empty vocabulary (model.vocab and added_tokens)")
        n = 1 + max(ids)
        if n > len(ids):  # ids are dense: a larger one is corrupt (and would allocate that much)
            raise _core.FormatError(
                f"{path}: token id {n - 1} out of range for {len(ids)} vocabulary entries"
            )
        tokens = [""] * n
        types = np.full(n, UNUSED, np.int32)
        byte_fallback = bool(model.get("byte_fallback"))
        for text, i in vocab.items():
            tokens[i] = text
            types[i] = BYTE if byte_fallback and _is_byte_token(text) else NORMAL
        for a in added:
            tokens[a["id"]] = a["content"]
            types[a["id"]] = CONTROL if a.get("special") else USER_DEFINED

        merges = _expect(model.get("merges") or [], list, "model.merges", path)
        pairs = np.empty((len(merges), 2), np.int32)
        for r, m in enumerate(merges):
            pair = m.split(" ", 1) if isinstance(m, str) else m
            if (
                not isinstance(pair, list)
                or len(pair) != 2
                or not all(isinstance(t, str) and t in vocab for t in pair)
            ):
                raise _core.FormatError(
                    f"{path}: model.merges[{r}] = {m!r}: expected 'a b' or [a, b] of vocab tokens"
                )
            pairs[r] = vocab[pair[0]], vocab[pair[1]]

        add_bos = True
        config = path.with_name("tokenizer_config.json")
        if config.is_file():
            cfg = _read_json(open, config)
            add_bos = bool(cfg.get("add_bos_token", True) if isinstance(cfg, dict) else True)

        def find(text):
            i = vocab.get(text)
            if i is None:
                i = next((a["id"] for a in added if a["content"] == text), None)
            return i

        return cls(
            tokens,
            np.zeros(n, np.float32),
            types,
            bos_id=find("<bos>"),
            eos_id=find("<eos>"),
            pad_id=find("<pad>"),
            unk_id=find(_expect(model["unk_token"], str, "model.unk_token", path))
            if model.get("unk_token")
            else None,
            add_bos=add_bos,
            add_space_prefix=add_space_prefix,
            merges=pairs,
        )

    @staticmethod
    def _check_normalizer(norm, path) -> bool:
        """Accepts Replace(' ' -> '▁') optionally with Prepend('▁'); returns add_space_prefix."""
        steps = [] if norm is None else _expect(norm, dict, "normalizer", path).get(
            "normalizers", [norm]
        )
        replace = prepend = False
        for s in _expect(steps, list, "normalizer.normalizers", path):
            _expect(s, dict, "normalizer step", path)
            pattern = s.get("pattern")
            if (
                s.get("type") == "Replace"
                and isinstance(pattern, dict)
                and pattern.get("String") == " "
                and s.get("content") == "\u2581"
            ):
                replace = True
            elif s.get("type") == "Prepend" and s.get("prepend") == "\u2581":
                prepend = True
            else:
                raise _core.UnsupportedError(f"{path}: unsupported normalizer step {s}")
        if not replace:
            raise _core.UnsupportedError(f"{path}: expected a normalizer replacing ' ' by '\u2581'")
        return prepend

    # ---- properties ---------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return len(self._tokens)

    @property
    def bos_id(self) -> int | None:
        return self._bos_id

    @property
    def eos_id(self) -> int | None:
        return self._eos_id

    @property
    def eot_id(self) -> int | None:
        """``<end_of_turn>`` (106 for Gemma 3), found by its text."""
        return self._eot_id

    @property
    def pad_id(self) -> int | None:
        return self._pad_id

    @property
    def unk_id(self) -> int | None:
        return self._unk_id

    def token_to_id(self, text: str) -> int | None:
        i = self._core.find(_check.string("text", text).encode("utf-8"))
        return None if i < 0 else i

    def id_to_token(self, token_id: int) -> str:
        """The stored text of a token, e.g. ``'▁world'`` or ``'<0x0A>'``."""
        return self._core.token_bytes(self._check_id(token_id)).decode("utf-8", "replace")

    def token_type(self, token_id: int) -> int:
        """GGUF token type: 1 NORMAL, 2 UNKNOWN, 3 CONTROL, 4 USER_DEFINED, 5 UNUSED, 6 BYTE."""
        return int(self._types[self._check_id(token_id)])

    def is_special(self, token_id: int) -> bool:
        return self.token_type(token_id) in (CONTROL, UNKNOWN, UNUSED)

    def _check_id(self, token_id) -> int:
        i = _check.integer("token_id", token_id)
        if not 0 <= i < len(self._tokens):
            raise ValueError(
                f"token id {i} out of range for a vocabulary of size {len(self._tokens)}"
            )
        return i

    # ---- encode / decode ----------------------------------------------------------------------

    def encode(
        self, text: str | bytes, add_bos: bool = True, parse_special: bool = False
    ) -> list[int]:
        """Token ids of ``text``; ``add_bos`` prepends BOS if the vocabulary asks for it.

        ``parse_special=False`` tokenizes the text of control tokens (``<bos>``,
        ``<start_of_turn>``, ...) as ordinary text; ``True`` maps it to the control token, which is
        what Hugging Face ``tokenizers`` always does. User-defined tokens are always split out.
        """
        data = _text_bytes(text)
        if self.add_space_prefix and data:
            data = b" " + data
        ids = self._core.encode(data, parse_special).tolist()
        if add_bos and self.add_bos and self._bos_id is not None:
            ids.insert(0, self._bos_id)
        return ids

    def encode_array(self, text: str | bytes, parse_special: bool = False) -> np.ndarray:
        """``(n,) int32`` ids, no BOS — the zero-copy variant of :meth:`encode`."""
        return self._core.encode(_text_bytes(text), parse_special)

    def decode_bytes(self, ids: Iterable[int] | np.ndarray, skip_special: bool = True) -> bytes:
        if isinstance(ids, (str, bytes)):
            raise TypeError(f"ids must be token ids (a list or 1-D array of int), got "
                            f"{type(ids).__name__}")
        if not isinstance(ids, np.ndarray):
            ids = list(ids)
            if any(isinstance(t, (list, tuple, np.ndarray)) for t in ids):
                raise ValueError("ids must be a flat sequence of token ids, got a nested one")
        elif ids.ndim != 1:
            raise ValueError(f"ids must be 1-D, got an array of shape {ids.shape}")
        return self._core.decode(ids, not skip_special)

    def decode(self, ids: Iterable[int] | np.ndarray, skip_special: bool = True) -> str:
        """Text of ``ids``; control tokens (BOS, ``<end_of_turn>``, ...) are dropped when
        ``skip_special``. Invalid UTF-8 from stray byte tokens becomes U+FFFD."""
        return self.decode_bytes(ids, skip_special).decode("utf-8", "replace")

    def stream_decoder(self, skip_special: bool = True) -> StreamDecoder:
        """An incremental decoder: ``.push(id) -> str`` and ``.flush() -> str``."""
        return StreamDecoder(self, skip_special)

    def __len__(self) -> int:
        return len(self._tokens)

    def __repr__(self) -> str:
        return (
            f"Tokenizer(vocab_size={self.vocab_size}, bos_id={self.bos_id}, "
            f"eos_id={self.eos_id}, eot_id={self.eot_id})"
        )
