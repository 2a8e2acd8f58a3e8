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
