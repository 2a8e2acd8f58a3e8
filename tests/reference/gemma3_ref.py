"""NumPy twins of the Gemma 3 forward pass and of its single kernels, written for clarity.

Everything accumulates in float64. Where the reference itself fixes a float32 rounding that changes
results by more than summation order could — the RoPE angle, computed in float32 as
``float32(pos) * float32(inv_freq)`` by transformers (transformers-gemma3.md §2.4) and by
csrc/kernels/rope.c — the twin rounds the same way, and says so.

Kernel twins (compare with ``gemma3._core``):
  rmsnorm(x, w, eps)              x / sqrt(mean(x^2) + eps) * w      (w is the full multiplier)
  rope(x, positions, base, freq_scale)   split-halves (NeoX) rotation of (T, H, D)
  gelu_tanh(x), geglu(gate, up)   0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) * up
  gelu_bias(x, b)                 gelu_tanh(x + b)                    (SigLIP MLP)
  layernorm(x, w, b, eps)         (x - mean) / sqrt(var + eps) * w + b  (SigLIP)
  softmax(x)                      row-wise
  sample_probs(logits, ...)       the sampler's filtered distribution, in csrc/kernels/sample.c's
                                  order: bias -> repetition penalty -> temperature -> top-k ->
                                  top-p -> min-p -> renormalize

Model twin (compare with ``gemma3.Model.logits``):
  weights = hf_weights(dir) or gguf_weights(path)     HF names, float64, norms as HF stores them (w)
  forward(weights, cfg, ids) -> (T, vocab) float64 logits, cfg a gemma3.Gemma3Config
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

# ---- kernels -----------------------------------------------------------------------------------


def rmsnorm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    """x (..., n), w (n,) the full multiplier -> (..., n) float64."""
    x = np.asarray(x, np.float64)
    ms = np.mean(x * x, axis=-1, keepdims=True)
    return x / np.sqrt(ms + eps) * np.asarray(w, np.float64)


def rope_inv_freq(d: int, base: float, freq_scale: float = 1.0) -> np.ndarray:
    """(d/2,) float32: 1 / base^(2i/d) * freq_scale, each step rounded to float32 as transformers
    does (``arange(0, d, 2).float() / d``, ``base ** that``, ``1.0 / ...``, all float32)."""
    expo = np.arange(0, d, 2, dtype=np.float32) / np.float32(d)
    powed = (np.float64(np.float32(base)) ** expo.astype(np.float64)).astype(np.float32)
    inv = (np.float32(1.0) / powed).astype(np.float32)
    return (inv * np.float32(freq_scale)).astype(np.float32)


def rope(x: np.ndarray, positions: np.ndarray, base: float, freq_scale: float = 1.0) -> np.ndarray:
    """x (T, H, D), positions (T,) -> (T, H, D) float64.

    Pair (j, j + D/2) rotates by theta = pos * inv_freq[j]; theta is formed in float32 (the
    reference's rounding: at position 32768 it moves the angle by up to ~2e-3 rad), cos/sin in
    float64."""
    x = np.asarray(x, np.float64)
    d = x.shape[-1]
    h = d // 2
    inv = rope_inv_freq(d, base, freq_scale)
    theta = (np.asarray(positions).astype(np.float32)[:, None] * inv[None, :]).astype(np.float64)
    c, s = np.cos(theta)[:, None, :], np.sin(theta)[:, None, :]
    a, b = x[..., :h], x[..., h:]
    return np.concatenate([a * c - b * s, b * c + a * s], axis=-1)


def gelu_tanh(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def geglu(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    return gelu_tanh(gate) * np.asarray(up, np.float64)


def gelu_bias(x: np.ndarray, b: np.ndarray) -> np.ndarray:
    """SigLIP's fc1 bias then GELU: gelu_tanh(x + b)."""
    return gelu_tanh(np.asarray(x, np.float64) + np.asarray(b, np.float64))


def layernorm(x: np.ndarray, w: np.ndarray, b: np.ndarray, eps: float) -> np.ndarray:
    """SigLIP LayerNorm: (x - mean) / sqrt(biased var + eps) * w + b over the last axis."""
    x = np.asarray(x, np.float64)
    mu = x.mean(axis=-1, keepdims=True)
    var = ((x - mu) ** 2).mean(axis=-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * np.asarray(w, np.float64) + np.asarray(b, np.float64)


def softmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def sample_probs(logits: np.ndarray, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                 min_p: float = 0.0, repetition_penalty: float = 1.0, history=None,
                 bias_ids=None, bias_values=None) -> tuple[np.ndarray, int]:
    """-> (probs (n,) float64, zero where filtered; greedy id after bias and penalty).

    The element-wise steps (bias add, penalty, division by the temperature) are done in float32
    like the kernel: each is one correctly rounded operation, so the twin gets the same floats;
    exp, sums and thresholds are float64. Sort order: logit descending, then id ascending."""
    lg = np.array(logits, dtype=np.float32)
    n = lg.size
    if bias_ids is not None:
        for i, v in zip(np.asarray(bias_ids), np.asarray(bias_values, np.float32), strict=True):
            lg[i] = lg[i] + v
    if repetition_penalty != 1.0 and history is not None:
        r = np.float32(repetition_penalty)
        for i in sorted(set(int(t) for t in history)):
            lg[i] = lg[i] * r if lg[i] < 0 else lg[i] / r
    greedy = int(np.argmax(lg))  # first maximum = lowest id
    probs = np.zeros(n, np.float64)
    if temperature <= 0:
        probs[greedy] = 1.0
        return probs, greedy
    ok = np.isfinite(lg) | (lg == np.inf)
    ids = np.nonzero(ok)[0]
    scaled = (lg[ids] / np.float32(temperature)).astype(np.float32)
    order = np.lexsort((ids, -scaled.astype(np.float64)))  # logit desc, id asc
    ids, scaled = ids[order], scaled[order].astype(np.float64)
    k = top_k if 0 < top_k < len(ids) else len(ids)
    ids, scaled = ids[:k], scaled[:k]
    e = np.exp(scaled - scaled[0])
    p = e / e.sum()
    keep = k
    if top_p < 1.0:
        reached = np.cumsum(p) >= np.float32(top_p)  # smallest prefix reaching top_p
        keep = int(np.argmax(reached)) + 1 if reached.any() else k
    if min_p > 0.0:
        thr = np.float32(min_p) * p[0]
        j = 1
        while j < keep and p[j] >= thr:
            j += 1
        keep = j
    probs[ids[:keep]] = e[:keep] / e[:keep].sum()
    return probs, greedy


# ---- weights -----------------------------------------------------------------------------------

HF_PREFIXES = ("model.language_model.", "language_model.model.", "model.")
GGUF_TO_HF = {
    "attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj", "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm", "attn_output": "self_attn.o_proj",
    "post_attention_norm": "post_attention_layernorm", "ffn_norm": "pre_feedforward_layernorm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
    "post_ffw_norm": "post_feedforward_layernorm",
}  # fmt: skip


def hf_weights(hf_dir) -> dict[str, np.ndarray]:
    """Single-file HF checkpoint -> {name without the text prefix: float64 array} (norms = w)."""
    from gemma3.safetensors import SafetensorsFile

    f = SafetensorsFile(Path(hf_dir) / "model.safetensors")
    prefix = next(p for p in HF_PREFIXES if f"{p}embed_tokens.weight" in f.tensors)
    return {n[len(prefix):]: f.array(n).astype(np.float64) for n in f.tensors
            if n.startswith(prefix)}


def gguf_weights(path) -> dict[str, np.ndarray]:
    """GGUF -> the same names as hf_weights, dequantized; 1 subtracted from every norm (in float64,
    so 1 + w gives back the stored multiplier exactly)."""
    from gemma3.gguf import GGUFFile

    f = GGUFFile(path)
    out = {}
    for name in f.tensors:
        base = name.removesuffix(".weight")
        a = f.dequantize(name).astype(np.float64)
        if base.endswith("norm"):
            a = a - 1.0
        if base == "token_embd":
            out["embed_tokens.weight"] = a
        elif base == "output_norm":
            out["norm.weight"] = a
        elif base == "output":
            out["lm_head.weight"] = a
        else:
            _, i, kind = base.split(".")
            out[f"layers.{i}.{GGUF_TO_HF[kind]}.weight"] = a
    return out


def hf_config(hf_dir):
    from gemma3.config import from_hf_config

    return from_hf_config(json.loads((Path(hf_dir) / "config.json").read_text()))


# ---- the model ---------------------------------------------------------------------------------


def attention(q, k, v, window: int | None, scale: float) -> np.ndarray:
    """q (T, Nq, D), k/v (T, Nk, D) -> (T, Nq, D). Query i sees key j iff 0 <= i - j (< window)."""
    T, nq, _ = q.shape
    rep = nq // k.shape[1]
    i, j = np.arange(T)[:, None], np.arange(T)[None, :]
    visible = (i - j >= 0) if window is None else (i - j >= 0) & (i - j < window)
    out = np.empty_like(q)
    for h in range(nq):
        g = h // rep  # GQA: query head h reads kv head h // (Nq / Nk)
        scores = (q[:, h] @ k[:, g].T) * scale
        scores = np.where(visible, scores, -np.inf)
        out[:, h] = softmax(scores) @ v[:, g]
    return out


def forward(w: dict[str, np.ndarray], cfg, ids) -> np.ndarray:
    """Logits (T, vocab) float64 of token ids evaluated from position 0 (transformers §2)."""
    ids = np.asarray(ids, np.int64)
    T, D, eps = len(ids), cfg.head_dim, cfg.rms_norm_eps
    pos = np.arange(T)

    def norm(x, name):  # Gemma3RMSNorm: weights stored zero-centred, multiplier 1 + w
        return rmsnorm(x, 1.0 + w[name], eps)

    emb = w["embed_tokens.weight"]
    x = emb[ids] * math.sqrt(cfg.hidden_size)
    for li, kind in enumerate(cfg.layer_types):
        p = f"layers.{li}."
        is_global = kind == "full_attention"
        h = norm(x, p + "input_layernorm.weight")
        q = (h @ w[p + "self_attn.q_proj.weight"].T).reshape(T, cfg.num_heads, D)
        k = (h @ w[p + "self_attn.k_proj.weight"].T).reshape(T, cfg.num_kv_heads, D)
        v = (h @ w[p + "self_attn.v_proj.weight"].T).reshape(T, cfg.num_kv_heads, D)
        q = norm(q, p + "self_attn.q_norm.weight")  # q/k norm before RoPE; v untouched
        k = norm(k, p + "self_attn.k_norm.weight")
        if is_global:  # linear scaling applies to global layers only
            base, fs = cfg.rope_theta, 1.0 / cfg.rope_scaling_factor
        else:
            base, fs = cfg.rope_local_base_freq, 1.0
        q, k = rope(q, pos, base, fs), rope(k, pos, base, fs)
        window = None if is_global or cfg.sliding_window <= 0 else cfg.sliding_window
        z = attention(q, k, v, window, cfg.query_pre_attn_scalar ** -0.5)
        a = z.reshape(T, -1) @ w[p + "self_attn.o_proj.weight"].T
        x = x + norm(a, p + "post_attention_layernorm.weight")
        h = norm(x, p + "pre_feedforward_layernorm.weight")
        g = h @ w[p + "mlp.gate_proj.weight"].T
        u = h @ w[p + "mlp.up_proj.weight"].T
        m = geglu(g, u) @ w[p + "mlp.down_proj.weight"].T
        x = x + norm(m, p + "post_feedforward_layernorm.weight")
    x = norm(x, "norm.weight")
    head = w.get("lm_head.weight", emb)  # tied: the unscaled embedding
    logits = x @ head.T
    if cfg.final_logit_softcapping:
        c = cfg.final_logit_softcapping
        logits = np.tanh(logits / c) * c
    return logits
