"""Named numerical tolerances for the test suite, one per dtype or quant family.

Each constant says what it bounds and why the value is what it is. Other test modules add their own
constants here; keep this a plain module of constants.
"""

# ---- float formats (round-to-nearest-even: error <= half an ulp = unit roundoff * |x|) ------------
F16_REL = 2.0**-11  # half: 10 stored mantissa bits -> unit roundoff 2^-11
F16_ABS = 2.0**-25  # half subnormal spacing is 2^-24; rounding costs at most half of it
BF16_REL = 2.0**-8  # bfloat16: 7 stored mantissa bits -> unit roundoff 2^-8

# ---- legacy 32-element blocks ------------------------------------------------------------------
# The per-block worst-case bounds are computed exactly by tests/reference/quant_ref.py from the block's
# own scale (see q8_0_error_bound, sym_error_bound, minmax_error_bound); this slack only absorbs the
# float32 rounding of x/d and of d*q in the C code (a few ulps of the block's largest value).
LEGACY_BOUND_SLACK_REL = 1e-6

# ---- K-quants and IQ4_NL -----------------------------------------------------------------------
# The RMSE search (candidate scales + least-squares refit, then scales quantized to 6/8 bits against a
# half super-scale) must not do worse than the naive min/max quantizer with *continuous* scales
# (quant_ref.naive_*). Measured on normal/laplace/uniform data: 0.90-0.95 of the naive RMSE.
KQUANT_RMSE_VS_NAIVE = 1.0
# Every stored value is re-rounded to the nearest level its stored scales can represent; the only
# slack is float32 arithmetic in d*sc*q - dmin*m (relative to the block's largest magnitude).
NEAREST_LEVEL_SLACK_REL = 1e-5
# Coarse absolute sanity bound on RMSE / std(x) for gaussian data, per type (measured: Q4_K 0.072,
# Q5_K 0.036, Q6_K 0.017, IQ4_NL 0.075); ~1.3x headroom so a regression in the search shows up.
KQUANT_RMSE_OVER_STD = {"Q4_K": 0.095, "Q5_K": 0.047, "Q6_K": 0.023, "IQ4_NL": 0.10}

# ---- activation quantizers (Q8_K, Q8_1) ----------------------------------------------------------
# q = nearest(x / d) on a 255-level grid with d = amax / 127 -> error <= d / 2 (+ float32 slack).
Q8_ACT_SLACK_REL = 1e-6

# ==== kernels, sampler and whole model (tests/test_kernels.py, tests/test_model.py) ==============
# Kernels compute in float32 (with float64 sums where csrc says so); the twins in
# tests/reference/gemma3_ref.py are float64. A float32 result carries a few roundings of its
# inputs' magnitude (unit roundoff 2^-24 ~ 6e-8), so the bounds below are ~10-20 roundings,
# relative to the largest magnitude in the row.
RMSNORM_REL = 1e-6  # x * (1/sqrtf(mean + eps)) * w: 3 roundings + the float32 sqrt
ROPE_REL = 1e-6  # same float32 angle as the twin; cos/sin rounded, a*c - b*s: 3 roundings
GEGLU_REL = 2e-6  # tanhf (<= 2 ulp) inside a few float32 products
SOFTMAX_ABS = 1e-6  # probabilities <= 1: expf (1 ulp) and one scaling
LAYERNORM_REL = 1e-6  # SigLIP: (x - mean) * inv * w + b in float32 after float64 sums: 4 roundings
# The sampler's distribution: float32 output of a float64 computation, values <= 1.
SAMPLER_PROBS_ABS = 1e-6
# Chi-square acceptance for draws vs the stated distribution: the 0.999 quantile for the test's
# degrees of freedom is computed in the test; with a fixed seed the check is deterministic.
CHI2_QUANTILE = 0.999

# Whole model, float32 engine vs float32 transformers / float64 twin on the same weights. Every
# matrix product is float32 on both sides; what differs is summation order (BLAS blocking vs
# PyTorch's), which moves a logit by ~ sqrt(terms) * 2^-24 * |partial sums|. Measured on the tiny
# models (logits ~N(0, 1)): 4e-6 vs transformers, 3e-6 vs the twin; the bound leaves ~10x room.
TINY_LOGITS_ABS = 5e-5
# The same checkpoint read from safetensors and from our GGUF conversion: identical weights and
# config, so identical arithmetic; 1e-6 only allows for the float32 (1 + w) norm multiplier.
GGUF_VS_SAFETENSORS_ABS = 1e-6
# 270M (Q4_K_M dequantized to float32 on both sides; logits up to ~40 in magnitude, 18 layers,
# 720 positions): measured max |Δ| 6e-5 over the top-16 logits of every position of every
# fixture prompt. 1e-3 is ~15x that and still far below the smallest top1-top2 margins the
# greedy fixtures rely on (0.048).
# Prompts of >= 32 tokens go through the packed prefill GEMM with 24-bit activations per 32-block
# (csrc/quant/packed.c, the default where VNNI packs): measured 7.8e-5 (long_en), the same as the
# float path. Fewer activation bits were measured and rejected for the default: 16 bits per
# 32-block (two digits, 2/3 of the integer work) gives 4.7e-3 (code) and 3.9e-3 (long_en), over
# this bound; 16 bits with the third digit kept on every block within 16x of the token's largest
# gives 6.8e-4 but needs it on 75% of the blocks (no gain); 8 bits (the opt-in
# prefill_precision="int8") gives 2.8 and 96.6% top-1 agreement (benchmarks/bench_prefill.py).
REF_270M_LOGITS_ABS = 1e-3
REF_270M_LOGSUMEXP_ABS = 1e-3
# KL(ref || ours) of the softmax restricted to the reference's top-16 ids, per position.
REF_270M_TOP16_KL = 1e-6
# ==== end of kernels / model block ===============================================================

# ==== fused dequantize-and-dot block (tests/test_quant_dot.py) ===================================
# dot_f32 vs the float64 dot of the reference dequantization, relative to sum |w_i x_i|. The weights
# are exact (they are the reference's own d*q), so the only error is float32 summation: each partial
# sum is a chain of at most ~100 roundings for n <= 2560 (SIMD lanes x 4 accumulators; the scalar
# reference sums 32-element partials), each costing at most 2^-24 of the running magnitude.
# 2^-16 = 256 roundings leaves 2.5x headroom; measured errors are ~1e-8 (a few roundings).
DOT_F32_REL = 2.0**-16
# Packed integer decode kernels (tests/test_packed.py) vs their twin, relative to sum |w_i x_i|:
# the digit sums are exact integers; the float32 steps are 3 conversions + 2 FMAs per digit
# combine, one scale product and one FMA per block, i.e. a handful of 2^-24 roundings per block
# plus the accumulation over <= 80 blocks. 2^-18 leaves ~10x headroom over measured ~2e-7.
# The prefill GEMM (g3_packed_gemm) is held to the same bound against its twin (test_packed.py,
# both activation precisions, the twin quantizing as C does): its combine is exact in int32 for
# the top two digits, then 2 conversions, 1 FMA and the same scale products, i.e. fewer roundings.
PACKED_REL = 2.0**-18
# Whole 270M model, packed vs float decode kernels, max |d logit| / max |logit| per step: the
# 24-bit activation rounding (~6e-8 of each block's max) through 18 layers; measured 1.3e-6.
PACKED_MODEL_REL = 2e-5
# A context cut back and partly recomputed (tests/test_state.py) vs a fresh run of the same prefix:
# the same weights and kernels, but the tokens arrive in other chunk sizes, so a position may go
# through the packed decode kernels (chunks < 32 tokens) in one run and BLAS in the other: the
# packed-vs-float bound above, relative to max |logit|.
STATE_RECOMPUTE_REL = PACKED_MODEL_REL
# ==== end of fused dequantize-and-dot block ======================================================

# ==== interventions (tests/test_hooks.py) =========================================================
# Logits of a hooked pass (head ablation, steering, patching, SAE splice) vs transformers float32
# with the equivalent torch hook, relative to the reference's largest |logit|: the bound issue #18
# states. The plain passes already agree to ~4e-6 relative (tiny) and ~1.5e-6 (270M, 6e-5 absolute
# on logits ~40), and an intervention adds a few float32 roundings at one point. Measured: 0.7e-6 ..
# 1.2e-6 (tiny), 0.8e-6 .. 0.9e-6 (270M), 3.3e-6 for the 270M SAE splice (its reconstruction is
# a float32 product of 256 features done by NumPy's BLAS on our side, torch's on the other).
INTERVENTION_LOGITS_REL = 1e-4

# ==== vision tower, bf16 mode (tests/test_vision.py) =============================================
# bf16 GEMM (csrc/kernels/gemm_bf16.c) vs its NumPy twin, which rounds both operands to bf16
# exactly as the kernel does (RNE) and multiplies in float64: every bf16 x bf16 product is exact
# in float32, so the only error is the float32 sum of 2 terms per input pair, in order. The
# classic bound for a sum of n terms is (n - 1) u sum |terms| with u = 2^-24; the bound below takes
# n = K + 2 (the bias and the accumulated C join the sum), applied per element to sum |a_i w_i|.
BF16_GEMM_SUM_U = 2.0**-24
# Fused attention (csrc/kernels/attention_vision.c), float32 blocks vs a float64 softmax: float32
# scores (72-term dots), exp and sums over the keys; ~10 float32 roundings of O(max |v|) values.
# Measured 4e-7 with max |v| ~4.
VISION_ATTN_F32_REL = 1e-5
# bf16 blocks vs the same float64 attention of bf16-rounded q, k, v: the one extra rounding is the
# probabilities' (relative 2^-8 each before the sum z = sum p_j v_j), so |dz| <= 2^-8 sum p_j |v_j|
# <= 2^-8 max |v|; the float32 part adds the line above.
VISION_ATTN_BF16_REL = BF16_REL + VISION_ATTN_F32_REL
# Whole tower and logits in the bf16 mode vs float32 transformers, relative to the reference's
# largest magnitude: every product rounds its operands to bf16, a relative error of at most
# 2^-8 (BF16_REL) each, i.e. at most 2 BF16_REL of sum |a w| for one product; with random signs
# the errors of the tower's products partly cancel and LayerNorm / RMSNorm rescale them, so one
# product's worst case (2 BF16_REL of the output's scale) is the stated bound. Measured on the
# tiny fixture (2 layers): hidden 0.41-0.50, projected 0.62-0.82, logits 1.1-1.2 (x BF16_REL) —
# the text model's own float32 logits add no bf16 error, the image rows carry it.
VISION_BF16_REL = 2 * BF16_REL

# ==== KV cache types and the flash attention kernel (tests/test_kv_cache.py) =====================
# g3_attn_flash vs its float64 NumPy twin on the same stored K/V (the twin decodes what C stored):
# float32 scores (hd fused products), expf (<= 2 ulp) and running rescales by e^(m - m'), a
# float32 sum l over up to a few hundred keys and o accumulated over them: ~ sqrt(n) * few
# roundings of max|v|. Measured <= 6e-7 relative to max|v| on the test shapes; 10x room.
FLASH_REL = 5e-6
# The 270M reference prompts (tests/test_model.py fixtures, <= 120 tokens), kv_dtype vs the
# float32 cache: top-1 must be identical at every position for bf16 and f16 (their rounding of
# K/V, 2^-9 and 2^-12 relative, moves logits by ~1e-2 / 1e-3, below every top-1/top-2 margin of
# the fixtures); q8_0 (step amax/127 per 32 values) is measured and printed, and must stay above
# this agreement (measured 100% on the fixtures, 98.9% on a 2,500-token prompt).
KV_Q8_0_TOP1_MIN = 0.95
