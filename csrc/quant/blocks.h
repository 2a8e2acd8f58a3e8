/* blocks.h — byte layouts of the ggml quantized block formats, and the scalar reference kernels.
 *
 * Each struct is one block of a row: a row of n elements of type T is n / QK_T consecutive blocks.
 * Layouts follow the published GGUF/ggml format (reference digest §2); offsets are asserted below so
 * a layout mistake fails at compile time. Conventions decided here:
 *   - `half` fields are IEEE binary16 bit patterns stored as uint16_t (convert with g3_fp16_to_fp32).
 *   - Structs are packed (alignment 1): a block may start at any byte of a mapped file or a Python
 *     buffer, so kernels may read fields of a block at any address without undefined behaviour.
 *   - Multi-byte fields are little-endian; the core assumes a little-endian host (x86-64).
 *   - In every 32-element group packed as nibbles, element j (0..15) is the LOW nibble of qs[j] and
 *     element j + 16 is the HIGH nibble of qs[j].
 */
#ifndef G3_QUANT_BLOCKS_H
#define G3_QUANT_BLOCKS_H

#include <stddef.h>
#include <stdint.h>

#include "g3.h"

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "gemma3 reads GGUF blocks in place and requires a little-endian host"
#endif

#define G3_PACKED __attribute__((packed))

#define G3_QK4_0 32
#define G3_QK4_1 32
#define G3_QK5_0 32
#define G3_QK5_1 32
#define G3_QK8_0 32
#define G3_QK8_1 32
#define G3_QK4_NL 32
#define G3_QK_K 256        /* elements per K-quant super-block */
#define G3_K_SCALE_SIZE 12 /* bytes of packed 6-bit scales/mins in Q4_K and Q5_K */

/* ---- legacy 32-element blocks ------------------------------------------------------------------ */

/* y = d * (q - 8), q in 0..15 */
typedef struct G3_PACKED {
    uint16_t d;                 /* half */
    uint8_t qs[G3_QK4_0 / 2];   /* (16,) nibbles */
} g3_block_q4_0;
_Static_assert(sizeof(g3_block_q4_0) == 18, "q4_0 block size");

/* y = d * q + m, q in 0..15 */
typedef struct G3_PACKED {
    uint16_t d;                 /* half */
    uint16_t m;                 /* half */
    uint8_t qs[G3_QK4_1 / 2];   /* (16,) nibbles */
} g3_block_q4_1;
_Static_assert(sizeof(g3_block_q4_1) == 20, "q4_1 block size");

/* y = d * (q - 16), q = nibble | (bit j of qh) << 4 */
typedef struct G3_PACKED {
    uint16_t d;                 /* half */
    uint8_t qh[4];              /* little-endian uint32: bit j = 5th bit of element j */
    uint8_t qs[G3_QK5_0 / 2];   /* (16,) nibbles */
} g3_block_q5_0;
_Static_assert(sizeof(g3_block_q5_0) == 22, "q5_0 block size");

/* y = d * q + m, q in 0..31 */
typedef struct G3_PACKED {
    uint16_t d;                 /* half */
    uint16_t m;                 /* half */
    uint8_t qh[4];              /* little-endian uint32: bit j = 5th bit of element j */
    uint8_t qs[G3_QK5_1 / 2];   /* (16,) nibbles */
} g3_block_q5_1;
_Static_assert(sizeof(g3_block_q5_1) == 24, "q5_1 block size");

/* y = d * q */
typedef struct G3_PACKED {
    uint16_t d;                 /* half */
    int8_t qs[G3_QK8_0];        /* (32,) */
} g3_block_q8_0;
_Static_assert(sizeof(g3_block_q8_0) == 34, "q8_0 block size");

/* activations for Q4_1/Q5_1 dot products: y = d * q, s = d * sum(q) */
typedef struct G3_PACKED {
    uint16_t d;                 /* half */
    uint16_t s;                 /* half: d * sum(qs) */
    int8_t qs[G3_QK8_1];        /* (32,) */
} g3_block_q8_1;
_Static_assert(sizeof(g3_block_q8_1) == 36, "q8_1 block size");

/* y = d * kvalues_iq4nl[q] (non-uniform 4-bit grid) */
typedef struct G3_PACKED {
    uint16_t d;                 /* half */
    uint8_t qs[G3_QK4_NL / 2];  /* (16,) nibbles indexing g3_kvalues_iq4nl */
} g3_block_iq4_nl;
_Static_assert(sizeof(g3_block_iq4_nl) == 18, "iq4_nl block size");

/* The IQ4_NL / IQ4_XS grid: 16 int8 levels, denser near zero. */
static const int8_t g3_kvalues_iq4nl[16] = {
    -127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113,
};

/* ---- K-quants: 256-element super-blocks of 16 or 32-element sub-blocks --------------------------- */

/* 16 sub-blocks of 16: y = d*(sc & 15)*q - dmin*(sc >> 4), q in 0..3 */
typedef struct G3_PACKED {
    uint8_t scales[G3_QK_K / 16]; /* (16,) low nibble scale, high nibble min */
    uint8_t qs[G3_QK_K / 4];      /* (64,) 2-bit quants, 4 per byte */
    uint16_t d;                   /* half: super-block scale of the scales */
    uint16_t dmin;                /* half: super-block scale of the mins */
} g3_block_q2_k;
_Static_assert(sizeof(g3_block_q2_k) == 84, "q2_k block size");

/* 16 sub-blocks of 16: y = d*(s - 32)*(q - (hbit ? 0 : 4)), s 6-bit, q 2 low bits */
typedef struct G3_PACKED {
    uint8_t hmask[G3_QK_K / 8];   /* (32,) high bit of each quant; SET means no -4 */
    uint8_t qs[G3_QK_K / 4];      /* (64,) low 2 bits, 4 per byte */
    uint8_t scales[12];           /* 16 6-bit scales: low nibbles in bytes 0..7, high 2 bits in 8..11 */
    uint16_t d;                   /* half */
} g3_block_q3_k;
_Static_assert(sizeof(g3_block_q3_k) == 110, "q3_k block size");

/* 8 sub-blocks of 32: y = d*sc*q - dmin*m, sc/m 6-bit, q in 0..15 */
typedef struct G3_PACKED {
    uint16_t d;                       /* half */
    uint16_t dmin;                    /* half */
    uint8_t scales[G3_K_SCALE_SIZE];  /* 8 scales + 8 mins, 6 bits each (see g3_get_scale_min_k4) */
    uint8_t qs[G3_QK_K / 2];          /* (128,) nibbles: chunk c of 64 = 32 bytes, low then high */
} g3_block_q4_k;
_Static_assert(sizeof(g3_block_q4_k) == 144, "q4_k block size");

/* as Q4_K with a 5th bit per quant, q in 0..31 */
typedef struct G3_PACKED {
    uint16_t d;                       /* half */
    uint16_t dmin;                    /* half */
    uint8_t scales[G3_K_SCALE_SIZE];  /* as Q4_K */
    uint8_t qh[G3_QK_K / 8];          /* (32,) bit 2c / 2c+1 of qh[l]: low / high nibble of chunk c */
    uint8_t qs[G3_QK_K / 2];          /* (128,) as Q4_K */
} g3_block_q5_k;
_Static_assert(sizeof(g3_block_q5_k) == 176, "q5_k block size");

/* 16 sub-blocks of 16: y = d*sc*(q - 32), sc int8, q 6-bit */
typedef struct G3_PACKED {
    uint8_t ql[G3_QK_K / 2];      /* (128,) low 4 bits */
    uint8_t qh[G3_QK_K / 4];      /* (64,) high 2 bits, 4 per byte */
    int8_t scales[G3_QK_K / 16];  /* (16,) */
    uint16_t d;                   /* half */
} g3_block_q6_k;
_Static_assert(sizeof(g3_block_q6_k) == 210, "q6_k block size");

/* activations for K-quant dot products: y = d * q; d is a float, not a half */
typedef struct G3_PACKED {
    float d;
    int8_t qs[G3_QK_K];            /* (256,) */
    int16_t bsums[G3_QK_K / 16];   /* (16,) sum of each group of 16 quants */
} g3_block_q8_k;
_Static_assert(sizeof(g3_block_q8_k) == 292, "q8_k block size");

/* 8 sub-blocks of 32: y = d*(ls - 32)*kvalues_iq4nl[q], ls 6-bit */
typedef struct G3_PACKED {
    uint16_t d;                   /* half */
    uint16_t scales_h;            /* high 2 bits of ls, 2 bits per sub-block */
    uint8_t scales_l[G3_QK_K / 64]; /* (4,) low 4 bits of ls, 2 sub-blocks per byte */
    uint8_t qs[G3_QK_K / 2];      /* (128,) nibbles, 16 bytes per sub-block, low then high */
} g3_block_iq4_xs;
_Static_assert(sizeof(g3_block_iq4_xs) == 136, "iq4_xs block size");

_Static_assert(offsetof(g3_block_q5_1, qs) == 8, "q5_1 layout");
_Static_assert(offsetof(g3_block_q3_k, d) == 108, "q3_k layout");
_Static_assert(offsetof(g3_block_q5_k, qs) == 48, "q5_k layout");
_Static_assert(offsetof(g3_block_q6_k, d) == 208, "q6_k layout");
_Static_assert(offsetof(g3_block_q8_k, bsums) == 260, "q8_k layout");
_Static_assert(offsetof(g3_block_iq4_xs, qs) == 8, "iq4_xs layout");

/* Unpacks the 6-bit scale and min of sub-block j (0..7) of a Q4_K/Q5_K super-block:
 * bytes 0-3 hold scales 0-3 (low 6 bits) and the top 2 bits of scales 4-7; bytes 4-7 the same for
 * mins; bytes 8-11 the low 4 bits of scale (low nibble) and min (high nibble) 4-7. */
static inline void g3_get_scale_min_k4(int j, const uint8_t *q, uint8_t *sc, uint8_t *m)
{
    if (j < 4) {
        *sc = q[j] & 63;
        *m = q[j + 4] & 63;
    } else {
        *sc = (uint8_t)((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4));
        *m = (uint8_t)((q[j + 4] >> 4) | ((q[j] >> 6) << 4));
    }
}

/* ---- scalar reference kernels (ref.c) -------------------------------------------------------------
 * The slow, obvious versions: kept forever as the oracle for SIMD variants and as their fallback.
 * dequant: src holds n / blck blocks (any alignment), dst n floats; n % blck == 0.
 * quant: src n floats (finite for block types), dst n / blck blocks. */
void g3_dequant_f32_ref(const void *src, float *dst, int64_t n);
void g3_dequant_f16_ref(const void *src, float *dst, int64_t n);
void g3_dequant_bf16_ref(const void *src, float *dst, int64_t n);
void g3_dequant_q4_0_ref(const void *src, float *dst, int64_t n);
void g3_dequant_q4_1_ref(const void *src, float *dst, int64_t n);
void g3_dequant_q5_0_ref(const void *src, float *dst, int64_t n);
void g3_dequant_q5_1_ref(const void *src, float *dst, int64_t n);
void g3_dequant_q8_0_ref(const void *src, float *dst, int64_t n);
void g3_dequant_q2_k_ref(const void *src, float *dst, int64_t n);
void g3_dequant_q3_k_ref(const void *src, float *dst, int64_t n);
void g3_dequant_q4_k_ref(const void *src, float *dst, int64_t n);
void g3_dequant_q5_k_ref(const void *src, float *dst, int64_t n);
void g3_dequant_q6_k_ref(const void *src, float *dst, int64_t n);
void g3_dequant_iq4_nl_ref(const void *src, float *dst, int64_t n);
void g3_dequant_iq4_xs_ref(const void *src, float *dst, int64_t n);

void g3_quant_f32_ref(const float *src, void *dst, int64_t n);
void g3_quant_f16_ref(const float *src, void *dst, int64_t n);
void g3_quant_bf16_ref(const float *src, void *dst, int64_t n);
void g3_quant_q4_0_ref(const float *src, void *dst, int64_t n);
void g3_quant_q4_1_ref(const float *src, void *dst, int64_t n);
void g3_quant_q5_0_ref(const float *src, void *dst, int64_t n);
void g3_quant_q5_1_ref(const float *src, void *dst, int64_t n);
void g3_quant_q8_0_ref(const float *src, void *dst, int64_t n);
void g3_quant_q8_1_ref(const float *src, void *dst, int64_t n);
void g3_quant_q4_k_ref(const float *src, void *dst, int64_t n);
void g3_quant_q5_k_ref(const float *src, void *dst, int64_t n);
void g3_quant_q6_k_ref(const float *src, void *dst, int64_t n);
void g3_quant_q8_k_ref(const float *src, void *dst, int64_t n);
void g3_quant_iq4_nl_ref(const float *src, void *dst, int64_t n);

/* ---- fused dequantize-and-dot, float32 activations (dot_ref.c) ------------------------------------
 * sum_i dequant(w)[i] * x[i] over one row: w holds n / blck blocks (any alignment), x n floats,
 * n % blck == 0. The references dequantize a block (or 32 elements of a float format) into a stack
 * buffer with the to_float reference, so the products use exactly the reference weights. */
float g3_dot_f32_f32_ref(const void *w, const float *x, int64_t n);
float g3_dot_f16_f32_ref(const void *w, const float *x, int64_t n);
float g3_dot_bf16_f32_ref(const void *w, const float *x, int64_t n);
float g3_dot_q4_0_f32_ref(const void *w, const float *x, int64_t n);
float g3_dot_q4_1_f32_ref(const void *w, const float *x, int64_t n);
float g3_dot_q5_0_f32_ref(const void *w, const float *x, int64_t n);
float g3_dot_q5_1_f32_ref(const void *w, const float *x, int64_t n);
float g3_dot_q8_0_f32_ref(const void *w, const float *x, int64_t n);
float g3_dot_q2_k_f32_ref(const void *w, const float *x, int64_t n);
float g3_dot_q3_k_f32_ref(const void *w, const float *x, int64_t n);
float g3_dot_q4_k_f32_ref(const void *w, const float *x, int64_t n);
float g3_dot_q5_k_f32_ref(const void *w, const float *x, int64_t n);
float g3_dot_q6_k_f32_ref(const void *w, const float *x, int64_t n);
float g3_dot_iq4_nl_f32_ref(const void *w, const float *x, int64_t n);
float g3_dot_iq4_xs_f32_ref(const void *w, const float *x, int64_t n);

/* ---- ISA variants (dot_avx2.c: avx2+fma+f16c; dot_avx512.c: avx512f/bw/vl/dq+f16c) ---------------
 * Only called after select_kernels() checked the CPU. to_float variants are bit-identical to the
 * references (same d*q products, no FMA contraction); dot variants use those same weights and FMA
 * them into several accumulators, so they differ from the reference only by summation order. */
#define G3_ISA_KERNELS(isa)                                                                       \
    void g3_dequant_f16_##isa(const void *src, float *dst, int64_t n);                            \
    void g3_dequant_bf16_##isa(const void *src, float *dst, int64_t n);                           \
    void g3_dequant_q4_0_##isa(const void *src, float *dst, int64_t n);                           \
    void g3_dequant_q5_0_##isa(const void *src, float *dst, int64_t n);                           \
    void g3_dequant_q8_0_##isa(const void *src, float *dst, int64_t n);                           \
    void g3_dequant_q4_k_##isa(const void *src, float *dst, int64_t n);                           \
    void g3_dequant_q6_k_##isa(const void *src, float *dst, int64_t n);                           \
    float g3_dot_f32_f32_##isa(const void *w, const float *x, int64_t n);                         \
    float g3_dot_f16_f32_##isa(const void *w, const float *x, int64_t n);                         \
    float g3_dot_bf16_f32_##isa(const void *w, const float *x, int64_t n);                        \
    float g3_dot_q4_0_f32_##isa(const void *w, const float *x, int64_t n);                        \
    float g3_dot_q5_0_f32_##isa(const void *w, const float *x, int64_t n);                        \
    float g3_dot_q8_0_f32_##isa(const void *w, const float *x, int64_t n);                        \
    float g3_dot_q4_k_f32_##isa(const void *w, const float *x, int64_t n);                        \
    float g3_dot_q6_k_f32_##isa(const void *w, const float *x, int64_t n);
G3_ISA_KERNELS(avx2)
G3_ISA_KERNELS(avx512)

/* Kernel ISA levels and the CPU / G3_ISA selection live in the dispatcher. */
#include "kernels/dispatch.h"

/* The traits entry holding only the scalar references (traits.c), whatever g3_type_get selected:
 * the oracle that ISA variants are tested against. */
const g3_type_traits *g3_type_get_ref(int type);

/* The traits entry as it would be selected on a CPU whose best ISA is `isa` (types without a variant
 * at that level keep the next lower one), or NULL if this CPU cannot run `isa`. */
const g3_type_traits *g3_type_get_isa(int type, int isa);

/* The ISA of the kernel picked for one slot of a type (which: 0 = to_float, 1 = dot_f32; -1 if
 * the slot is NULL). */
int g3_type_kernel_isa(int type, int which);

#endif /* G3_QUANT_BLOCKS_H */
