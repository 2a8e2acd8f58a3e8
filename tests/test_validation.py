"""Argument validation across the public API: every bad argument raises the documented exception
(TypeError for a wrong kind of value, ValueError for a value out of range, OSError/KeyError
where documented) with a message naming the argument, and never a crash, a silent truncation
(``max_new_tokens=2.5``, ``logit_bias={1.5: ...}``) or a corrupt output file.

The models live for the whole module; the last test checks they still give a fresh model's
results after every error above. Models: the tiny checkpoint (ids only) with a small synthetic
tokenizer attached for the text paths, and the tiny vision checkpoint.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

import gemma3
from gemma3 import _core
from gemma3 import eval as ev
from gemma3 import image as gi
from gemma3 import vision as V
from gemma3.convert import hf_to_gguf
from gemma3.safetensors import SafetensorsFile

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tests" / "fixtures" / "tiny" / "tiny"
TINY_VISION = ROOT / "tests" / "fixtures" / "tiny_vision"
OK_IDS = [2, 10, 11, 12]


def small_tokenizer() -> gemma3.Tokenizer:
    """512 tokens: specials, the 256 byte tokens, then letter pieces (score-based BPE)."""
    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
    types = [3, 3, 3, 2, 3, 3]
    tokens = specials + [f"<0x{b:02X}>" for b in range(256)]
    types += [6] * 256
    pieces = ["\u2581"] + [chr(c) for c in range(ord("a"), ord("z") + 1)]
    pieces += [f"\u2581{chr(c)}" for c in range(ord("a"), ord("z") + 1)]
    pieces += [a + b for a in "aeiostr" for b in "aeinorst"]
    pieces += [f"w{i}" for i in range(512 - len(tokens) - len(pieces))]
    tokens += pieces
    types += [1] * len(pieces)
    scores = np.concatenate([np.zeros(262), -np.arange(len(pieces), dtype=np.float64)])
    return gemma3.Tokenizer(tokens, scores.astype(np.float32), np.array(types, np.int32),
                            bos_id=2, eos_id=1, pad_id=0, unk_id=3)


@pytest.fixture(scope="module")
def ns(tmp_path_factory) -> SimpleNamespace:
    d = tmp_path_factory.mktemp("validation")
    hf_to_gguf(TINY, d / "tiny.gguf")
    (d / "tasks.jsonl").write_text('{"type": "loglikelihood", "context": [2], '
                                   '"continuation": [3]}\n')
    text = gemma3.load(TINY)
    text.tokenizer = small_tokenizer()
    vis = gemma3.load(TINY_VISION / "hf")
    ref = np.load(TINY_VISION / "reference.npz")
    return SimpleNamespace(
        tm=gemma3.load(TINY), text=text, tok=text.tokenizer, vis=vis, dir=d,
        gguf=d / "tiny.gguf", px=ref["pixels_single"], vis_ids=ref["ids_single"].tolist(),
        msgs=[{"role": "user", "content": "hello"}])


def gen(m, prompt=OK_IDS, **kw):
    kw.setdefault("max_new_tokens", 2)
    return m.generate(prompt, temperature=kw.pop("temperature", 0), return_ids=True, **kw)


NAN, INF = math.nan, math.inf

# (test id, call, exception, regex the message must match: the argument's name)
CASES = [
    # gemma3.load / set_num_threads
    ("load path int", lambda n: gemma3.load(123), TypeError, "path"),
    ("load missing", lambda n: gemma3.load("/nonexistent/x.gguf"), FileNotFoundError,
     "nonexistent"),
    ("load n_threads 0", lambda n: gemma3.load(TINY, n_threads=0), ValueError, "n_threads"),
    ("load n_threads float", lambda n: gemma3.load(TINY, n_threads=1.5), ValueError,
     "n_threads"),
    ("load max_seq_len 0", lambda n: gemma3.load(TINY, max_seq_len=0), ValueError,
     "max_seq_len"),
    ("load max_seq_len float", lambda n: gemma3.load(TINY, max_seq_len=8.5), ValueError,
     "max_seq_len"),
    ("load dtype unknown", lambda n: gemma3.load(TINY, dtype="q9"), ValueError, "dtype"),
    ("load dtype int", lambda n: gemma3.load(TINY, dtype=8), TypeError, "dtype"),
    ("load mmproj int", lambda n: gemma3.load(n.gguf, mmproj=5), TypeError, "mmproj"),
    ("load mmproj missing", lambda n: gemma3.load(n.gguf, mmproj="/nonexistent.gguf"),
     FileNotFoundError, "mmproj"),
    ("set_num_threads -1", lambda n: gemma3.set_num_threads(-1), ValueError, "n_threads"),
    ("set_num_threads float", lambda n: gemma3.set_num_threads(1.5), TypeError, "n_threads"),
    ("set_num_threads str", lambda n: gemma3.set_num_threads("2"), TypeError, "n_threads"),
    # the prompt
    ("prompt None", lambda n: gen(n.tm, None), TypeError, "prompt"),
    ("prompt int", lambda n: gen(n.tm, 5), TypeError, "prompt"),
    ("prompt dict", lambda n: gen(n.tm, {2: 3}), TypeError, "prompt"),
    ("prompt id = vocab", lambda n: gen(n.tm, [2, 512]), ValueError, "token id 512"),
    ("prompt id negative", lambda n: gen(n.tm, [2, -1]), ValueError, "token id -1"),
    ("prompt id float", lambda n: gen(n.tm, [2, 1.5]), ValueError, "prompt"),
    ("prompt id bool", lambda n: gen(n.tm, [2, True]), ValueError, "prompt"),
    ("prompt float array", lambda n: gen(n.tm, np.array([2.0, 3.0])), ValueError, "prompt"),
    ("prompt 2-D array", lambda n: gen(n.tm, np.array([[2, 3], [4, 5]])), ValueError,
     "prompt"),
    ("prompt uint64 huge", lambda n: gen(n.tm, np.array([2, 2**63], np.uint64)), ValueError,
     "token id"),
    ("prompt empty", lambda n: gen(n.tm, []), ValueError, "prompt is empty"),
    ("prompt too long", lambda n: gen(n.tm, [2] * 600), ValueError, "max_seq_len"),
    ("text without tokenizer", lambda n: n.tm.generate("hi"), ValueError, "tokenizer"),
    ("images without vision", lambda n: gen(n.tm, images=[n.px]), ValueError, "vision"),
    # sampling arguments
    ("max_new_tokens -1", lambda n: gen(n.tm, max_new_tokens=-1), ValueError,
     "max_new_tokens"),
    ("max_new_tokens float", lambda n: gen(n.tm, max_new_tokens=2.5), TypeError,
     "max_new_tokens"),
    ("max_new_tokens bool", lambda n: gen(n.tm, max_new_tokens=True), TypeError,
     "max_new_tokens"),
    ("max_new_tokens str", lambda n: gen(n.tm, max_new_tokens="3"), TypeError,
     "max_new_tokens"),
    ("temperature -0.5", lambda n: gen(n.tm, temperature=-0.5), ValueError, "temperature"),
    ("temperature nan", lambda n: gen(n.tm, temperature=NAN), ValueError, "temperature"),
    ("temperature inf", lambda n: gen(n.tm, temperature=INF), ValueError, "temperature"),
    ("temperature str", lambda n: gen(n.tm, temperature="hot"), TypeError, "temperature"),
    ("temperature None", lambda n: gen(n.tm, temperature=None), TypeError, "temperature"),
    ("top_k -1", lambda n: gen(n.tm, top_k=-1), ValueError, "top_k"),
    ("top_k float", lambda n: gen(n.tm, top_k=2.5), TypeError, "top_k"),
    ("top_p 0", lambda n: gen(n.tm, top_p=0), ValueError, "top_p"),
    ("top_p 1.5", lambda n: gen(n.tm, top_p=1.5), ValueError, "top_p"),
    ("top_p nan", lambda n: gen(n.tm, top_p=NAN), ValueError, "top_p"),
    ("top_p str", lambda n: gen(n.tm, top_p="0.5"), TypeError, "top_p"),
    ("min_p -0.1", lambda n: gen(n.tm, min_p=-0.1), ValueError, "min_p"),
    ("min_p 2", lambda n: gen(n.tm, min_p=2), ValueError, "min_p"),
    ("repetition_penalty 0", lambda n: gen(n.tm, repetition_penalty=0), ValueError,
     "repetition_penalty"),
    ("repetition_penalty inf", lambda n: gen(n.tm, repetition_penalty=INF), ValueError,
     "repetition_penalty"),
    ("seed -1", lambda n: gen(n.tm, seed=-1), ValueError, "seed"),
    ("seed 2**64", lambda n: gen(n.tm, seed=2**64), ValueError, "seed"),
    ("seed float", lambda n: gen(n.tm, seed=1.5), TypeError, "seed"),
    ("stop int", lambda n: gen(n.tm, stop=5), TypeError, "stop"),
    ("stop empty string", lambda n: gen(n.tm, stop=[""]), ValueError, "stop"),
    ("stop non-str", lambda n: gen(n.tm, stop=[1]), ValueError, "stop"),
    ("logit_bias list", lambda n: gen(n.tm, logit_bias=[1, 2]), TypeError, "logit_bias"),
    ("logit_bias id = vocab", lambda n: gen(n.tm, logit_bias={512: 1.0}), ValueError,
     "logit_bias"),
    ("logit_bias id -1", lambda n: gen(n.tm, logit_bias={-1: 1.0}), ValueError, "logit_bias"),
    ("logit_bias id float", lambda n: gen(n.tm, logit_bias={1.5: 1.0}), TypeError,
     "logit_bias"),
    ("logit_bias id str", lambda n: gen(n.tm, logit_bias={"7": 1.0}), TypeError, "logit_bias"),
    ("logit_bias value str", lambda n: gen(n.tm, logit_bias={7: "x"}), TypeError,
     "logit_bias"),
    ("logit_bias value nan", lambda n: gen(n.tm, logit_bias={7: NAN}), ValueError,
     "logit_bias"),
    ("stop_token_ids int", lambda n: gen(n.tm, stop_token_ids=5), TypeError,
     "stop_token_ids"),
    ("stop_token_ids str", lambda n: gen(n.tm, stop_token_ids="12"), TypeError,
     "stop_token_ids"),
    ("stop_token_ids = vocab", lambda n: gen(n.tm, stop_token_ids=[512]), ValueError,
     "stop_token_ids"),
    ("unknown keyword", lambda n: gen(n.tm, top_q=0.5), TypeError, "top_q"),
    ("attention_layers 8", lambda n: gen(n.tm, return_attention=True, attention_layers=[8]),
     ValueError, "layer"),
    ("attention_layers float", lambda n: gen(n.tm, return_attention=True,
                                            attention_layers=[1.5]), TypeError,
     "attention_layers"),
    ("attention_heads 4", lambda n: gen(n.tm, return_attention=True, attention_heads=[4]),
     ValueError, "head"),
    ("stream temperature", lambda n: n.text.stream("hi", temperature=-1), ValueError,
     "temperature"),
    # chat
    ("chat str", lambda n: n.text.chat("hello"), ValueError, "messages"),
    ("chat empty", lambda n: n.text.chat([]), ValueError, "messages"),
    ("chat no role", lambda n: n.text.chat([{"content": "x"}]), ValueError, "role"),
    ("chat bad role", lambda n: n.text.chat([{"role": "bot", "content": "x"}]), ValueError,
     "role"),
    ("chat not alternating", lambda n: n.text.chat([{"role": "user", "content": "a"},
                                                    {"role": "user", "content": "b"}]),
     ValueError, "alternate"),
    ("chat content int", lambda n: n.text.chat([{"role": "user", "content": 5}]), TypeError,
     "content"),
    ("chat text item int", lambda n: n.text.chat(
        [{"role": "user", "content": [{"type": "text", "text": 5}]}]), TypeError, "text"),
    ("chat item type", lambda n: n.text.chat(
        [{"role": "user", "content": [{"type": "video"}]}]), ValueError, "type"),
    ("chat image without image", lambda n: n.text.chat(
        [{"role": "user", "content": [{"type": "image"}]}]), ValueError, "image"),
    ("chat top_p", lambda n: n.text.chat(n.msgs, top_p=2), ValueError, "top_p"),
    ("chat stream top_p", lambda n: n.text.chat(n.msgs, stream=True, top_p=2), ValueError,
     "top_p"),
    # generate_batch
    ("batch prompts str", lambda n: n.text.generate_batch("hello"), TypeError, "prompts"),
    ("batch settings not dicts", lambda n: n.tm.generate_batch([OK_IDS], [5]), TypeError,
     "settings"),
    ("batch settings length", lambda n: n.tm.generate_batch([OK_IDS], [{}, {}]), ValueError,
     "settings"),
    ("batch settings value", lambda n: n.tm.generate_batch([OK_IDS], [{"temperature": -1}]),
     ValueError, "temperature"),
    ("batch empty prompt", lambda n: n.tm.generate_batch([[]]), ValueError, "prompt 0"),
    ("batch bad id", lambda n: n.tm.generate_batch([[2, 999]]), ValueError, "token id 999"),
    # logits / inspection
    ("logits None", lambda n: n.tm.logits(None), TypeError, "ids"),
    ("logits float array", lambda n: n.tm.logits(np.array([2.0, 3.0])), ValueError, "ids"),
    ("logits 2-D", lambda n: n.tm.logits(np.array([[2, 3], [4, 5]])), ValueError, "ids"),
    ("logits empty", lambda n: n.tm.logits([]), ValueError, "token"),
    ("logits too long", lambda n: n.tm.logits([2] * 513), ValueError, "max_seq_len"),
    ("run_with_cache name", lambda n: n.tm.run_with_cache(OK_IDS, names=["blocks.0.foo"]),
     ValueError, "activation name"),
    ("run_with_cache layer 8", lambda n: n.tm.run_with_cache(OK_IDS, layers=[8]), ValueError,
     "layer"),
    ("run_with_cache layer float", lambda n: n.tm.run_with_cache(OK_IDS, layers=[1.5]),
     TypeError, "layers"),
    ("run_with_cache head", lambda n: n.tm.run_with_cache(OK_IDS, heads=[4]), ValueError,
     "head"),
    ("run_with_cache query_range", lambda n: n.tm.run_with_cache(OK_IDS, query_range=(3, 1)),
     ValueError, "query_range"),
    ("run_with_cache query_range int", lambda n: n.tm.run_with_cache(OK_IDS, query_range=3),
     TypeError, "query_range"),
    ("run_with_cache logits", lambda n: n.tm.run_with_cache(OK_IDS, logits="some"),
     ValueError, "logits"),
    ("run_with_cache float id", lambda n: n.tm.run_with_cache([2, 1.5]), ValueError,
     "token ids"),
    ("top_logprobs float id", lambda n: n.tm.top_logprobs([2, 3.7]), ValueError, "token ids"),
    ("top_logprobs k", lambda n: n.tm.top_logprobs(OK_IDS, k=0), ValueError, "k"),
    ("logit_lens k", lambda n: n.tm.logit_lens(OK_IDS, k=-1), ValueError, "k"),
    ("kv_cache layer", lambda n: n.tm.kv_cache[8], IndexError, "layer"),
    ("kv_cache layer str", lambda n: n.tm.kv_cache["0"], TypeError, "layer"),
    # scoring and eval
    ("loglikelihood None", lambda n: n.tm.loglikelihood(None, [3]), TypeError, "context"),
    ("loglikelihood empty", lambda n: n.tm.loglikelihood([], [3]), ValueError, "context"),
    ("loglikelihood bad id", lambda n: n.tm.loglikelihood([2], [512]), ValueError,
     "token id 512"),
    ("loglikelihood float id", lambda n: n.tm.loglikelihood([2], [1.5]), ValueError,
     "continuation"),
    ("loglikelihood text and ids", lambda n: n.text.loglikelihood("a", [3]), ValueError,
     "both"),
    ("loglikelihood_batch not pairs", lambda n: n.tm.loglikelihood_batch([[2]]), TypeError,
     "requests"),
    ("loglikelihood_batch max_seqs", lambda n: n.tm.loglikelihood_batch([([2], [3])],
                                                                        max_seqs=0),
     ValueError, "max_seqs"),
    ("rolling max_length", lambda n: n.tm.loglikelihood_rolling(OK_IDS, max_length=0),
     ValueError, "max_length"),
    ("rolling max_length float", lambda n: n.tm.loglikelihood_rolling(OK_IDS, max_length=2.5),
     TypeError, "max_length"),
    ("perplexity n_ctx 1", lambda n: n.tm.perplexity(OK_IDS * 10, 1), ValueError, "n_ctx"),
    ("perplexity n_ctx float", lambda n: n.tm.perplexity(OK_IDS * 10, 8.5), TypeError,
     "n_ctx"),
    ("perplexity n_ctx huge", lambda n: n.tm.perplexity(OK_IDS * 10, 10**6), ValueError,
     "n_ctx"),
    ("perplexity stride 0", lambda n: n.tm.perplexity(OK_IDS * 10, 8, 0, "hf"), ValueError,
     "stride"),
    ("perplexity stride float", lambda n: n.tm.perplexity(OK_IDS * 10, 8, 2.5, "hf"),
     TypeError, "stride"),
    ("perplexity protocol", lambda n: n.tm.perplexity(OK_IDS * 10, 8, protocol="gpt"),
     ValueError, "protocol"),
    ("multiple_choice no choices", lambda n: ev.multiple_choice(n.tm, OK_IDS, []), ValueError,
     "choice"),
    ("run_job workers 0", lambda n: ev.run_job(str(n.dir / "tasks.jsonl"),
                                               str(n.dir / "out.jsonl"), str(TINY), workers=0,
                                               progress=False), ValueError, "workers"),
    ("run_job threads 0", lambda n: ev.run_job(str(n.dir / "tasks.jsonl"),
                                               str(n.dir / "out.jsonl"), str(TINY), workers=1,
                                               threads=0, progress=False), ValueError,
     "threads"),
    ("run_job tasks missing", lambda n: ev.run_job(str(n.dir / "none.jsonl"),
                                                   str(n.dir / "out.jsonl")),
     FileNotFoundError, "none.jsonl"),
    # images and the vision tower
    ("encode_image without vision", lambda n: n.tm.encode_image(n.px), ValueError, "vision"),
    ("encode_image size", lambda n: n.vis.encode_image(np.zeros((3, 10, 10), np.float32)),
     ValueError, "pixel_values"),
    ("encode_image nan", lambda n: n.vis.encode_image(np.full(n.px.shape, NAN, np.float32)),
     ValueError, "pixel_values"),
    ("encode_image None", lambda n: n.vis.encode_image(None), ValueError, "image"),
    ("vision encode 5-D", lambda n: n.vis.vision.encode(n.px[None, None]), ValueError,
     "pixel_values"),
    ("vision attention layer", lambda n: n.vis.vision.attention(n.px, 2), ValueError,
     "layer"),
    ("images count", lambda n: n.vis.logits(n.vis_ids, images=[n.px, n.px]), ValueError,
     "images"),
    ("load_image int", lambda n: gi.load_image(5), ValueError, "image"),
    ("load_image bytes", lambda n: gi.load_image(b"junk"), ValueError, "image"),
    ("load_image float", lambda n: gi.load_image(np.zeros((4, 4, 3), np.float32)),
     ValueError, "uint8"),
    ("load_image alpha", lambda n: gi.load_image(np.zeros((4, 4, 3), np.uint8), alpha="x"),
     ValueError, "alpha"),
    ("pan_and_scan min_crop_size", lambda n: gi.pan_and_scan(np.zeros((4, 9, 3), np.uint8),
                                                             min_crop_size=0),
     ValueError, "min_crop_size"),
    ("pan_and_scan max_num_crops", lambda n: gi.pan_and_scan(np.zeros((4, 9, 3), np.uint8),
                                                             max_num_crops=0),
     ValueError, "max_num_crops"),
    ("pan_and_scan min_ratio", lambda n: gi.pan_and_scan(np.zeros((4, 9, 3), np.uint8),
                                                         min_ratio=0),
     ValueError, "min_ratio"),
    ("pan_and_scan not an image", lambda n: gi.pan_and_scan(5), ValueError, "img"),
    ("resize height", lambda n: gi.resize(np.zeros((4, 4, 3), np.uint8), 0, 4), ValueError,
     "height"),
    ("preprocess size 0", lambda n: gi.preprocess(np.zeros((4, 4, 3), np.uint8), size=0),
     ValueError, "size"),
    ("preprocess size float", lambda n: gi.preprocess(np.zeros((4, 4, 3), np.uint8),
                                                      size=8.5), TypeError, "size"),
    ("token_grid", lambda n: V.token_grid(np.zeros(5)), ValueError, "tokens"),
    ("token_boxes size 0", lambda n: V.token_boxes((0, 10)), ValueError, "size"),
    ("token_boxes size int", lambda n: V.token_boxes(5), TypeError, "size"),
    ("token_boxes tokens_per_side", lambda n: V.token_boxes((10, 10), 0), ValueError,
     "tokens_per_side"),
    # the tokenizer
    ("encode int", lambda n: n.tok.encode(5), TypeError, "text"),
    ("encode None", lambda n: n.tok.encode(None), TypeError, "text"),
    ("encode_array int", lambda n: n.tok.encode_array(5), TypeError, "text"),
    ("decode id = vocab", lambda n: n.tok.decode([512]), ValueError, "token id 512"),
    ("decode id -1", lambda n: n.tok.decode([-1]), ValueError, "token id -1"),
    ("decode float", lambda n: n.tok.decode([1.5]), TypeError, "ids"),
    ("decode str", lambda n: n.tok.decode("abc"), TypeError, "ids"),
    ("decode 2-D array", lambda n: n.tok.decode(np.array([[2, 3]])), ValueError, "ids"),
    ("decode nested list", lambda n: n.tok.decode([[2, 3]]), ValueError, "ids"),
    ("id_to_token range", lambda n: n.tok.id_to_token(10**6), ValueError, "token id"),
    ("id_to_token str", lambda n: n.tok.id_to_token("a"), TypeError, "token_id"),
    ("id_to_token float", lambda n: n.tok.id_to_token(1.5), TypeError, "token_id"),
    ("token_type -1", lambda n: n.tok.token_type(-1), ValueError, "token id"),
    ("token_to_id int", lambda n: n.tok.token_to_id(5), TypeError, "text"),
    ("stream push range", lambda n: n.tok.stream_decoder().push(10**6), ValueError,
     "token id"),
    ("Tokenizer bos_id", lambda n: gemma3.Tokenizer(["a"], np.zeros(1, np.float32),
                                                    np.ones(1, np.int32), bos_id=5,
                                                    eos_id=None), ValueError, "bos_id"),
    # GGUF and safetensors files
    ("GGUFFile int", lambda n: gemma3.GGUFFile(5), TypeError, "path"),
    ("GGUFFile missing", lambda n: gemma3.GGUFFile("/nonexistent.gguf"), FileNotFoundError,
     "nonexistent"),
    ("GGUFFile directory", lambda n: gemma3.GGUFFile(n.dir), OSError, "regular file"),
    ("GGUFFile raw missing", lambda n: gemma3.GGUFFile(n.gguf).raw("nope"), KeyError, "nope"),
    ("GGUFFile raw int", lambda n: gemma3.GGUFFile(n.gguf).raw(5), TypeError, "name"),
    ("GGUFFile dequantize missing", lambda n: gemma3.GGUFFile(n.gguf).dequantize("nope"),
     KeyError, "nope"),
    ("GGUFWriter alignment 3", lambda n: gemma3.GGUFWriter(3), ValueError, "alignment"),
    ("GGUFWriter alignment str", lambda n: gemma3.GGUFWriter("32"), TypeError, "alignment"),
    ("GGUFWriter key int", lambda n: gemma3.GGUFWriter().add(5, 1), TypeError, "key"),
    ("GGUFWriter key empty", lambda n: gemma3.GGUFWriter().add("", 1), ValueError, "key"),
    ("GGUFWriter value object", lambda n: gemma3.GGUFWriter().add("a", object()), TypeError,
     "object"),
    ("GGUFWriter value None", lambda n: gemma3.GGUFWriter().add("a", None), TypeError,
     "NoneType"),
    ("GGUFWriter type name", lambda n: gemma3.GGUFWriter().add("a", 1, type="FOO"),
     ValueError, "type"),
    ("GGUFWriter int > 64 bits", lambda n: gemma3.GGUFWriter().add("a", 2**70), ValueError,
     "'a'"),
    ("GGUFWriter int vs type", lambda n: gemma3.GGUFWriter().add("a", 300, type="UINT8"),
     ValueError, "'a'"),
    ("GGUFWriter nested list", lambda n: gemma3.GGUFWriter().add("a", [[1]]), TypeError,
     "nested"),
    ("GGUFWriter tensor name int", lambda n: gemma3.GGUFWriter().add_tensor(
        5, np.zeros(4, np.float32)), TypeError, "name"),
    ("GGUFWriter tensor type", lambda n: gemma3.GGUFWriter().add_tensor(
        "t", np.zeros(32, np.float32), type="Q9"), ValueError, "ggml type"),
    ("GGUFWriter tensor block", lambda n: gemma3.GGUFWriter().add_tensor(
        "t", np.zeros((2, 33), np.float32), type="Q8_0"), ValueError, "block size"),
    ("GGUFWriter tensor 5-D", lambda n: gemma3.GGUFWriter().add_tensor(
        "t", np.zeros((1,) * 5, np.float32)), ValueError, "dimensions"),
    ("GGUFWriter tensor nan", lambda n: gemma3.GGUFWriter().add_tensor(
        "t", np.full(32, NAN, np.float32), type="Q8_0"), ValueError, "nan"),
    ("GGUFWriter raw_shape bytes", lambda n: gemma3.GGUFWriter().add_tensor(
        "t", np.zeros(5, np.uint8), type="F32", raw_shape=(4,)), ValueError, "raw_shape"),
    ("GGUFWriter raw_shape negative", lambda n: gemma3.GGUFWriter().add_tensor(
        "t", np.zeros(0, np.uint8), type="F32", raw_shape=(-4,)), ValueError, "raw_shape"),
    ("GGUFWriter stream shape", lambda n: gemma3.GGUFWriter().add_tensor_stream(
        "t", (-1, 32), "F32", list), ValueError, "dimensions"),
    ("SafetensorsFile int", lambda n: SafetensorsFile(5), TypeError, "path"),
    ("SafetensorsFile raw missing", lambda n: SafetensorsFile(TINY / "model.safetensors")
     .raw("nope"), KeyError, "nope"),
    # kernels of gemma3._core that the public API calls
    ("sample top_p", lambda n: _core.sample(np.zeros(8, np.float32), _core.rng_seed(1),
                                            top_p=2.0), ValueError, "top_p=2"),
    ("sample empty logits", lambda n: _core.sample(np.zeros(0, np.float32), _core.rng_seed(1)),
     ValueError, "logits"),
    ("sample rng", lambda n: _core.sample(np.zeros(8, np.float32), np.zeros(2, np.uint64)),
     TypeError, "rng"),
    ("sample bias id", lambda n: _core.sample(np.zeros(8, np.float32), _core.rng_seed(1),
                                              bias_ids=np.array([9], np.int32),
                                              bias_values=np.ones(1, np.float32)),
     ValueError, "logit_bias"),
    ("sample history id", lambda n: _core.sample(np.zeros(8, np.float32), _core.rng_seed(1),
                                                 repetition_penalty=1.1,
                                                 history=np.array([9], np.int32)),
     ValueError, "history"),
    ("quantize block", lambda n: _core.quantize(8, np.zeros(33, np.float32)), ValueError,
     "block size"),
    ("quantize float64", lambda n: _core.quantize(8, np.zeros(32)), TypeError, "float32"),
    ("quantize strided", lambda n: _core.quantize(8, np.zeros(64, np.float32)[::2]),
     ValueError, "contiguous"),
    ("image_resize height", lambda n: _core.image_resize(np.zeros((4, 4, 3), np.uint8), 0, 4),
     ValueError, "height"),
    ("webp_decode str", lambda n: _core.webp_decode("RIFF"), TypeError, "bytes"),
]


@pytest.mark.parametrize("call, exc, pattern", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_argument(ns, call, exc, pattern):
    with pytest.raises(exc) as ei:
        r = call(ns)
        if hasattr(r, "__next__"):  # a generator: the error must not wait for the first item
            pytest.fail("returned an iterator instead of raising")
    msg = str(ei.value)
    assert re.search(pattern, msg), f"message does not name {pattern!r}: {msg}"


def test_good_arguments_still_accepted(ns):
    """The edges of every range are accepted (no over-tightening)."""
    tm = ns.tm
    assert gen(tm, max_new_tokens=0) == []
    gen(tm, temperature=0.0, top_k=0, top_p=1.0, min_p=1.0, repetition_penalty=1e-3, seed=0)
    gen(tm, temperature=np.float32(0.7), top_k=np.int64(3), seed=2**64 - 1)
    gen(tm, logit_bias={np.int64(7): -INF, 8: np.float32(2)}, stop_token_ids=np.array([1]))
    assert tm.logits(np.array([[2, 10, 11]])).shape == (3, 512)  # (1, n) as HF input_ids
    gen(tm, np.arange(2, 20, dtype=np.int16)[::3])  # strided, narrow ints
    assert ns.text.generate("hello", max_new_tokens=2, stop="x", temperature=0) is not None
    assert isinstance(ns.text.chat(ns.msgs, max_new_tokens=2, stop=("x", "y")), str)
    gemma3.GGUFWriter().add("a", 2**64 - 1)
    gemma3.GGUFWriter().add("a", -(2**63))


def test_models_still_work_after_every_error(ns):
    """Runs last: every model of this module gives a fresh model's results."""
    fresh = gemma3.load(TINY)
    ids = [2] + list(range(20, 60))
    np.testing.assert_array_equal(ns.tm.logits(ids), fresh.logits(ids))
    assert gen(ns.tm, ids, max_new_tokens=8) == gen(fresh, ids, max_new_tokens=8)
    fresh.tokenizer = small_tokenizer()
    kw = dict(max_new_tokens=8, temperature=0)
    assert ns.text.chat(ns.msgs, **kw) == fresh.chat(ns.msgs, **kw)
    assert ns.text.generate("hello", **kw) == fresh.generate("hello", **kw)
    vis = gemma3.load(TINY_VISION / "hf")
    np.testing.assert_array_equal(ns.vis.encode_image(ns.px), vis.encode_image(ns.px))
    np.testing.assert_array_equal(ns.vis.logits(ns.vis_ids, images=[ns.px]),
                                  vis.logits(ns.vis_ids, images=[ns.px]))
    gemma3.set_num_threads(0)
