/* packed.c — repacking weights into 16-row groups and the AVX-512 VNNI matrix-vector product over
 * them (layout and numerics in packed.h). Packing is scalar and runs once per matrix at load. */
#include "quant/packed.h"

#include <float.h>
#include <immintrin.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include "quant/blocks.h"

/* ---- what each type becomes -------------------------------------------------------------------- */

enum { V_BYTES, V_NIB, V_NIB5, V_NIB6 }; /* how codes are stored */
#define VALUES_BYTES(v) ((size_t)((v) == V_BYTES ? 512 : (v) == V_NIB ? 256 : (v) == V_NIB5 ? 320 : 384))
enum { S_HALF, S_K4, S_K6 };        /* how scales are stored */

typedef struct {
    int vmode, smode, offset; /* w = scale * (u - offset) (S_K4: no offset, mins instead) */
    size_t src_block;         /* bytes of one source block */
    int src_elems;            /* elements of one source block */
} pack_kind;

static int kind_of(int type, pack_kind *k)
{
    switch (type) {
    case G3_TYPE_Q8_0: *k = (pack_kind){V_BYTES, S_HALF, 128, sizeof(g3_block_q8_0), 32}; return 1;
    case G3_TYPE_Q4_0: *k = (pack_kind){V_NIB, S_HALF, 8, sizeof(g3_block_q4_0), 32}; return 1;
    case G3_TYPE_Q5_0: *k = (pack_kind){V_NIB5, S_HALF, 16, sizeof(g3_block_q5_0), 32}; return 1;
    case G3_TYPE_Q4_K: *k = (pack_kind){V_NIB, S_K4, 0, sizeof(g3_block_q4_k), 256}; return 1;
    case G3_TYPE_Q5_K: *k = (pack_kind){V_NIB5, S_K4, 0, sizeof(g3_block_q5_k), 256}; return 1;
    case G3_TYPE_Q6_K: *k = (pack_kind){V_NIB6, S_K6, 32, sizeof(g3_block_q6_k), 256}; return 1;
    default: return 0;
    }
}

/* The kernels specialized per type: CALL(vmode, smode, offset) with constants, so that each
 * type's inlined kernel keeps only its own unpacking (the same fields as kind_of). */
#define FOR_PACKED_TYPE(type, CALL)                                                             \
    switch (type) {                                                                             \
    case G3_TYPE_Q8_0: CALL(V_BYTES, S_HALF, 128); break;                                       \
    case G3_TYPE_Q4_0: CALL(V_NIB, S_HALF, 8); break;                                           \
    case G3_TYPE_Q5_0: CALL(V_NIB5, S_HALF, 16); break;                                         \
    case G3_TYPE_Q4_K: CALL(V_NIB, S_K4, 0); break;                                             \
    case G3_TYPE_Q5_K: CALL(V_NIB5, S_K4, 0); break;                                            \
    case G3_TYPE_Q6_K: CALL(V_NIB6, S_K6, 32); break;                                           \
    }

static size_t values_bytes(int vmode) { return VALUES_BYTES(vmode); }
/* K-quant super-block headers: float d[16] (+ float dmin[16]) for Q4_K/Q5_K, the file's half d[16]
 * for Q6_K (its packed record is then exactly the file's 6.5625 bits per weight) */
static size_t header_bytes(int smode) { return smode == S_K4 ? 256 : smode == S_K6 ? 32 : 0; }
/* bytes of a block's scale fields after its values: S_K4 keeps them in the super-block header */
static size_t scale_bytes(int smode) { return smode == S_K4 ? 0 : 32; }

int g3_pack_supported(int type)
{
    pack_kind k;
    return kind_of(type, &k) && g3_isa_vnni(); /* the dispatcher: AVX-512 selected + VNNI */
}

/* ---- packing ----------------------------------------------------------------------------------- */

/* One 32-column block of one row as codes and scale fields. */
typedef struct {
    uint8_t u[32];
    uint16_t dh;        /* S_HALF: the block's half scale */
    uint8_t sc, m;      /* S_K4: 6-bit scale and min of the sub-block */
    int8_t sc6[2];      /* S_K6: scales of the two 16-column halves */
    float d, dmin;      /* K-quants: the super-block's scales */
} block_codes;

static void codes_of(int type, const uint8_t *row, int64_t b, block_codes *o)
{
    switch (type) {
    case G3_TYPE_Q8_0: {
        const g3_block_q8_0 *q = (const g3_block_q8_0 *)row + b;
        for (int l = 0; l < 32; l++)
            o->u[l] = (uint8_t)(q->qs[l] + 128);
        o->dh = q->d;
        break;
    }
    case G3_TYPE_Q4_0: {
        const g3_block_q4_0 *q = (const g3_block_q4_0 *)row + b;
        for (int l = 0; l < 16; l++) {
            o->u[l] = q->qs[l] & 0xF;
            o->u[l + 16] = q->qs[l] >> 4;
        }
        o->dh = q->d;
        break;
    }
    case G3_TYPE_Q5_0: {
        const g3_block_q5_0 *q = (const g3_block_q5_0 *)row + b;
        uint32_t qh;
        memcpy(&qh, q->qh, 4);
        for (int l = 0; l < 16; l++) {
            o->u[l] = (uint8_t)((q->qs[l] & 0xF) | ((qh >> l) & 1) << 4);
            o->u[l + 16] = (uint8_t)((q->qs[l] >> 4) | ((qh >> (l + 16)) & 1) << 4);
        }
        o->dh = q->d;
        break;
    }
    case G3_TYPE_Q4_K:
    case G3_TYPE_Q5_K: {
        const int j = (int)(b % 8), c = j / 2, hi = j % 2;
        const uint8_t *scales, *qs, *qh = NULL;
        uint16_t d, dmin;
        if (type == G3_TYPE_Q4_K) {
            const g3_block_q4_k *q = (const g3_block_q4_k *)row + b / 8;
            scales = q->scales, qs = q->qs, d = q->d, dmin = q->dmin;
        } else {
            const g3_block_q5_k *q = (const g3_block_q5_k *)row + b / 8;
            scales = q->scales, qs = q->qs, qh = q->qh, d = q->d, dmin = q->dmin;
        }
        for (int l = 0; l < 32; l++) {
            int v = hi ? qs[32 * c + l] >> 4 : qs[32 * c + l] & 0xF;
            if (qh)
                v |= ((qh[l] >> j) & 1) << 4;
            o->u[l] = (uint8_t)v;
        }
        g3_get_scale_min_k4(j, scales, &o->sc, &o->m);
        o->d = g3_fp16_to_fp32(d);
        o->dmin = g3_fp16_to_fp32(dmin);
        break;
    }
    case G3_TYPE_Q6_K: {
        const g3_block_q6_k *q = (const g3_block_q6_k *)row + b / 8;
        const int h = (int)(b % 8) / 4, qi = (int)(b % 8) % 4;
        const uint8_t *ql = q->ql + 64 * h + (qi % 2 ? 32 : 0), *qh = q->qh + 32 * h;
        for (int l = 0; l < 32; l++) {
            int low = qi < 2 ? ql[l] & 0xF : ql[l] >> 4;
            o->u[l] = (uint8_t)(low | ((qh[l] >> (2 * qi)) & 3) << 4);
        }
        o->sc6[0] = q->scales[8 * h + 2 * qi];
        o->sc6[1] = q->scales[8 * h + 2 * qi + 1];
        o->d = g3_fp16_to_fp32(q->d);
        break;
    }
    }
}

/* Writes block codes c of row r (0..15) into a group's block record at p (header excluded). */
static void put_block(const pack_kind *k, uint8_t *p, int r, const block_codes *c)
{
    if (k->vmode == V_BYTES) {
        for (int j = 0; j < 8; j++)
            memcpy(p + 64 * j + 4 * r, c->u + 4 * j, 4);
    } else {
        for (int j = 0; j < 4; j++)
            for (int q = 0; q < 4; q++) {
                const uint8_t lo = c->u[4 * j + q], hi = c->u[16 + 4 * j + q];
                p[64 * j + 4 * r + q] = (uint8_t)((lo & 0xF) | (hi & 0xF) << 4);
                if (k->vmode == V_NIB5)
                    p[256 + 4 * r + q] |= (uint8_t)(((lo >> 4) & 1) << j | ((hi >> 4) & 1) << (4 + j));
                if (k->vmode == V_NIB6) { /* bits 4-5 of chunk j's codes at bits 2j, 2j + 1 */
                    p[256 + 4 * r + q] |= (uint8_t)(((lo >> 4) & 3) << (2 * j));
                    p[320 + 4 * r + q] |= (uint8_t)(((hi >> 4) & 3) << (2 * j));
                }
            }
    }
    uint8_t *s = p + values_bytes(k->vmode);
    if (k->smode == S_HALF) {
        memcpy(s + 2 * r, &c->dh, 2);
    } else if (k->smode == S_K6) {
        s[r] = (uint8_t)c->sc6[0];
        s[16 + r] = (uint8_t)c->sc6[1];
    } /* S_K4: in the super-block header (put_k4_scales) */
}

/* S_K4: the 6-bit scale and min of row r's block j (0..7) of the super-block whose header is at
 * h: low 4 bits of both in byte 64 + 16 j + r, the top 2 bits of each in row r's nibble of the
 * 8 bytes at 192 + 8 j (quant/packed.h) */
static void put_k4_scales(uint8_t *h, int j, int r, const block_codes *c)
{
    h[64 + 16 * j + r] = (uint8_t)((c->sc & 0xF) | (c->m & 0xF) << 4);
    h[192 + 8 * j + r / 2] |= (uint8_t)(((c->sc >> 4) | (c->m >> 4) << 2) << (4 * (r % 2)));
}

/* Adds block c of a row to its squared norms: sc2 += sum of c_i^2, sm2 += sum of m_i^2
 * (g3_packed.row_bound). */
static void block_norms(const pack_kind *k, const block_codes *c, double *sc2, double *sm2)
{
    double s = 0.0;
    if (k->smode == S_K6) {
        for (int h = 0; h < 2; h++) {
            const double sc = (double)c->d * c->sc6[h];
            for (int l = 16 * h; l < 16 * h + 16; l++)
                s += (sc * (c->u[l] - k->offset)) * (sc * (c->u[l] - k->offset));
        }
    } else {
        const double sc = k->smode == S_K4 ? (double)c->d * c->sc : (double)g3_fp16_to_fp32(c->dh);
        for (int l = 0; l < 32; l++)
            s += (sc * (c->u[l] - k->offset)) * (sc * (c->u[l] - k->offset));
        if (k->smode == S_K4)
            *sm2 += 32.0 * ((double)c->dmin * c->m) * ((double)c->dmin * c->m);
    }
    *sc2 += s;
}

g3_status g3_pack(int type, const uint8_t *data, int64_t rows, int64_t cols, size_t row_bytes,
                  int threads, int bounds, g3_packed **out, g3_err *err)
{
    pack_kind k;
    *out = NULL;
    if (!kind_of(type, &k))
        return g3_fail(err, G3_ERR_UNSUPPORTED, "no packed kernel for type %s",
                       g3_type_get(type)->name);
    if (rows < 1 || cols < 1 || cols % k.src_elems || row_bytes != (size_t)(cols / k.src_elems) * k.src_block)
        return g3_fail(err, G3_ERR_ARG, "cannot pack a (%lld, %lld) %s matrix", (long long)rows,
                       (long long)cols, g3_type_get(type)->name);
    g3_packed *P = calloc(1, sizeof *P);
    if (!P)
        return g3_fail(err, G3_ERR_NOMEM, "out of memory");
    P->type = type;
    P->rows = rows;
    P->cols = cols;
    P->groups = (rows + G3_PACK_ROWS - 1) / G3_PACK_ROWS;
    P->nb = cols / 32;
    const size_t rec = values_bytes(k.vmode) + scale_bytes(k.smode), hdr = header_bytes(k.smode);
    P->group_bytes = (size_t)P->nb * rec + (size_t)(P->nb / 8) * hdr;
    if ((uint64_t)P->groups > SIZE_MAX / 2 / P->group_bytes) {
        free(P);
        return g3_fail(err, G3_ERR_NOMEM, "matrix too large to pack");
    }
    const size_t total = (size_t)P->groups * P->group_bytes;
    /* large matrices on 2 MiB pages where the kernel allows it (THP "madvise" mode): a decode
     * step streams every byte, and 4 KiB pages cost a TLB miss every 4 KiB */
    const size_t huge = (size_t)2 << 20, align = total >= 2 * huge ? huge : 64;
    const size_t alloc = (total + align - 1) / align * align;
    P->data = aligned_alloc(align, alloc);
#ifdef MADV_HUGEPAGE
    if (P->data && align == huge && !getenv("G3_NO_HUGEPAGES"))
        madvise(P->data, alloc, MADV_HUGEPAGE); /* advice only: failure changes nothing */
#endif
    if (!P->data) {
        free(P);
        return g3_fail(err, G3_ERR_NOMEM, "out of memory packing a (%lld, %lld) %s matrix (%zu bytes)",
                       (long long)rows, (long long)cols, g3_type_get(type)->name, total);
    }
    memset(P->data, 0, total);
    if (bounds && !(P->row_bound = malloc(sizeof(float) * (size_t)rows))) {
        g3_packed_free(P);
        return g3_fail(err, G3_ERR_NOMEM, "out of memory");
    }
    int finite = 1;
#pragma omp parallel for num_threads(threads > 0 ? threads : 1) schedule(static) reduction(&&:finite)
    for (int64_t g = 0; g < P->groups; g++) {
        uint8_t *p = P->data + (size_t)g * P->group_bytes;
        double sc2[G3_PACK_ROWS] = {0}, sm2[G3_PACK_ROWS] = {0};
        uint8_t *hp = p; /* the current super-block's header, written before its 8 records */
        for (int64_t b = 0; b < P->nb; b++) {
            if (hdr && b % 8 == 0)
                hp = p, p += hdr;
            for (int r = 0; r < G3_PACK_ROWS && g * G3_PACK_ROWS + r < rows; r++) {
                block_codes c;
                codes_of(type, data + (size_t)(g * G3_PACK_ROWS + r) * row_bytes, b, &c);
                put_block(&k, p, r, &c);
                if (k.smode == S_K4)
                    put_k4_scales(hp, (int)(b % 8), r, &c);
                if (P->row_bound)
                    block_norms(&k, &c, &sc2[r], &sm2[r]);
                if (hdr && b % 8 == 0) { /* the file's halves, exactly */
                    const uint16_t dh = g3_fp32_to_fp16(c.d);
                    memcpy(hp + 2 * r, &dh, 2);
                    if (k.smode == S_K4) {
                        const uint16_t mh = g3_fp32_to_fp16(c.dmin);
                        memcpy(hp + 32 + 2 * r, &mh, 2);
                    }
                }
            }
            p += rec;
        }
        for (int r = 0; P->row_bound && r < G3_PACK_ROWS && g * G3_PACK_ROWS + r < rows; r++) {
            /* sqrt is correctly rounded; the 1 + 2^-40 covers the double sums' roundings */
            const double v = (sqrt(sc2[r]) + sqrt(sm2[r])) * (1.0 + 0x1p-40);
            float f = (float)v;
            if (f < v)
                f = nextafterf(f, INFINITY);
            P->row_bound[g * G3_PACK_ROWS + r] = f;
            finite = finite && isfinite(f);
        }
    }
    if (!finite) {
        free(P->row_bound);
        P->row_bound = NULL;
    }
    *out = P;
    return G3_OK;
}

void g3_packed_free(g3_packed *p)
{
    if (p) {
        free(p->row_bound);
        free(p->data);
        free(p);
    }
}

/* ---- activations ------------------------------------------------------------------------------- */

size_t g3_xq_bytes(int64_t cols)
{
    const int64_t nb = cols / 32;
    return (size_t)cols * 3 + (size_t)nb * (2 * sizeof(float) + 6 * sizeof(int32_t)) + 64;
}

void g3_xq_init(g3_xq *xq, int64_t cols, void *buf)
{
    uint8_t *p = buf;
    xq->cols = cols;
    xq->nb = cols / 32;
    xq->scale = (float *)p;
    p += sizeof(float) * (size_t)xq->nb;
    xq->xsum = (float *)p;
    p += sizeof(float) * (size_t)xq->nb;
    xq->dsum = (int32_t *)p;
    p += sizeof(int32_t) * 6 * (size_t)xq->nb;
    for (int i = 0; i < 3; i++, p += cols)
        xq->digit[i] = (int8_t *)p;
}

#define TGT __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,f16c,fma")))
#define INL static inline __attribute__((always_inline, target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,f16c,fma")))
/* Sanitized builds (setup.py's G3_SANITIZE, tools/asan.sh). The prefill GEMM's inner loop
 * broadcasts one 4-byte digit group per VNNI instruction, and ASan's check on each of those loads
 * made a sanitized 200-token prefill of the 270M take 33 s, where the sanitized float path takes
 * 1 s (the sanitized suite then ran past CI's time). So in those builds the GEMM is compiled uninstrumented (NOSAN) and checks,
 * once per call, every region it will read or write against ASan's shadow memory (check_region):
 * all its accesses fall inside those regions, so an out-of-bounds or freed block is still
 * reported, with the offending address, before the kernel runs. */
#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#define NOSAN __attribute__((no_sanitize("address,undefined")))
static void check_region(const void *p, size_t n, int is_write)
{
    void *bad = __asan_region_is_poisoned((void *)p, n);
    if (bad)
        __asan_report_error(__builtin_return_address(0), __builtin_frame_address(0),
                            __builtin_frame_address(0), bad, is_write, 1);
}
#else
#define NOSAN
#endif

/* V_NIB6: bits 2j, 2j + 1 of a plane byte moved to bits 4-5 (masked with 0x30 by the caller; a
 * 16-bit shift of at most 4 cannot bring a neighbouring byte's bits there) */
#define SH6(X, j) ((j) < 3 ? _mm512_slli_epi16((X), (4 - 2 * (j)) & 7) : _mm512_srli_epi16((X), 2))

/* A K-quant super-block header at p (quant/packed.h): the file's half d[16] and, for Q4_K/Q5_K,
 * dmin[16] (then the 8 blocks' scales, k4_scales). Returns the record after it. */
INL const uint8_t *super_header(const uint8_t *p, const int smode, __m512 *d, __m512 *dmin)
{
    *d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p));
    if (smode == S_K4)
        *dmin = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(p + 32)));
    return p + header_bytes(smode);
}

/* S_K4: the 16 rows' 6-bit scales and mins of block j of the super-block whose header is at h,
 * as int32 (put_k4_scales' layout) */
INL void k4_scales(const uint8_t *h, int j, __m512i *sc, __m512i *m)
{
    const __m128i m4 = _mm_set1_epi8(0x0F), m2 = _mm_set1_epi8(0x03);
    const __m128i lo = _mm_loadu_si128((const __m128i *)(h + 64 + 16 * j));
    const __m128i hb = _mm_loadl_epi64((const __m128i *)(h + 192 + 8 * j));
    /* row r's nibble: byte r / 2, low nibble for even r */
    const __m128i nib = _mm_unpacklo_epi8(_mm_and_si128(hb, m4), _mm_and_si128(_mm_srli_epi16(hb, 4), m4));
    const __m128i s = _mm_or_si128(_mm_and_si128(lo, m4), _mm_slli_epi16(_mm_and_si128(nib, m2), 4));
    const __m128i mm = _mm_or_si128(_mm_and_si128(_mm_srli_epi16(lo, 4), m4),
                                    _mm_slli_epi16(_mm_and_si128(_mm_srli_epi16(nib, 2), m2), 4));
    *sc = _mm512_cvtepu8_epi32(s);
    *m = _mm512_cvtepu8_epi32(mm);
}

/* Balanced base-256 digits of X (|X| <= G3_PACK_LIM): X = 65536*D2 + 256*D1 + D0, D in -128..127 */
INL void digits(__m512i X, __m512i D[3])
{
    const __m512i c128 = _mm512_set1_epi32(128), m255 = _mm512_set1_epi32(255);
    D[0] = _mm512_sub_epi32(_mm512_and_si512(_mm512_add_epi32(X, c128), m255), c128);
    X = _mm512_srai_epi32(_mm512_sub_epi32(X, D[0]), 8);
    D[1] = _mm512_sub_epi32(_mm512_and_si512(_mm512_add_epi32(X, c128), m255), c128);
    D[2] = _mm512_srai_epi32(_mm512_sub_epi32(X, D[1]), 8);
}

TGT void g3_xq_prepare(g3_xq *xq, const float *x) { g3_xq_prepare_digits(xq, x, 3); }

/* The largest |X| with n signed base-256 digits: 127 * (1 + 256 + ...). */
static const int32_t digit_lim[4] = {0, 127, 127 * 257, G3_PACK_LIM};

TGT void g3_xq_prepare_digits(g3_xq *xq, const float *x, int ndig)
{
    const int32_t L = digit_lim[ndig < 1 ? 1 : ndig > 3 ? 3 : ndig];
    const __m512 lim = _mm512_set1_ps((float)L);
    const __m512i ilim = _mm512_set1_epi32(L);
    for (int64_t b = 0; b < xq->nb; b++) {
        const __m512 v0 = _mm512_loadu_ps(x + 32 * b), v1 = _mm512_loadu_ps(x + 32 * b + 16);
        const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
        xq->xsum[b] = _mm512_reduce_add_ps(_mm512_add_ps(v0, v1));
        float s = amax / (float)L, inv = amax > 0 ? (float)L / amax : 0.0f;
        const __mmask16 nan = _mm512_cmp_ps_mask(v0, v0, _CMP_UNORD_Q) |
                              _mm512_cmp_ps_mask(v1, v1, _CMP_UNORD_Q);
        if (nan || !isfinite(amax)) /* propagate as the float path would */
            s = NAN, inv = 0.0f;
        xq->scale[b] = s;
        const __m512 vi = _mm512_set1_ps(inv);
        for (int h = 0; h < 2; h++) {
            __m512i X = _mm512_cvtps_epi32(_mm512_min_ps(_mm512_max_ps(_mm512_mul_ps(h ? v1 : v0, vi),
                                                                       _mm512_sub_ps(_mm512_setzero_ps(), lim)), lim));
            X = _mm512_max_epi32(_mm512_min_epi32(X, ilim), _mm512_sub_epi32(_mm512_setzero_si512(), ilim));
            __m512i D[3];
            digits(X, D);
            for (int p = 0; p < 3; p++) {
                _mm_storeu_si128((__m128i *)(xq->digit[p] + 32 * b + 16 * h), _mm512_cvtepi32_epi8(D[p]));
                xq->dsum[6 * b + 3 * h + p] = _mm512_reduce_add_epi32(D[p]);
            }
        }
    }
}

double g3_xq_distance(const g3_xq *a, const g3_xq *b)
{
    double s = 0.0;
    for (int64_t blk = 0; blk < a->nb; blk++) {
        const double sa = a->scale[blk], sb = b->scale[blk];
        for (int64_t i = 32 * blk; i < 32 * blk + 32; i++) {
            const double xa = sa * (65536.0 * a->digit[2][i] + 256.0 * a->digit[1][i] + a->digit[0][i]);
            const double xb = sb * (65536.0 * b->digit[2][i] + 256.0 * b->digit[1][i] + b->digit[0][i]);
            s += (xa - xb) * (xa - xb);
        }
    }
    return sqrt(s);
}

/* Float rounding of v +- b is at most 2^-24 of the result (plus the smallest subnormal): the
 * ends are pushed out by 2^-22 of themselves and 2^-126. */
TGT float g3_bound_rows(float *v, const float *bound, float rad, int64_t n)
{
    const __m512 r = _mm512_set1_ps(rad), rel = _mm512_set1_ps(0x1p-22f), tiny = _mm512_set1_ps(0x1p-126f);
    const __m512 big = _mm512_set1_ps(FLT_MAX);
    __m512 lo = _mm512_set1_ps(-INFINITY);
    __mmask16 bad = 0;
    for (int64_t i = 0; i < n; i += 16) {
        const __mmask16 k = n - i >= 16 ? 0xFFFF : (__mmask16)((1u << (n - i)) - 1);
        const __m512 y = _mm512_maskz_loadu_ps(k, v + i), b = _mm512_mul_ps(_mm512_maskz_loadu_ps(k, bound + i), r);
        __m512 h = _mm512_add_ps(y, b), l = _mm512_sub_ps(y, b);
        h = _mm512_add_ps(h, _mm512_fmadd_ps(_mm512_abs_ps(h), rel, tiny));
        l = _mm512_sub_ps(l, _mm512_fmadd_ps(_mm512_abs_ps(l), rel, tiny));
        bad |= _mm512_mask_cmp_ps_mask(k, _mm512_abs_ps(h), big, _CMP_NLE_UQ) |
               _mm512_mask_cmp_ps_mask(k, _mm512_abs_ps(l), big, _CMP_NLE_UQ);
        _mm512_mask_storeu_ps(v + i, k, h);
        lo = _mm512_mask_max_ps(lo, k, lo, l);
    }
    return bad ? NAN : _mm512_reduce_max_ps(lo);
}

TGT int g3_any_at_least(const float *v, int64_t n, float thr)
{
    const __mmask16 k = n >= 16 ? 0xFFFF : (__mmask16)((1u << n) - 1);
    return _mm512_mask_cmp_ps_mask(k, _mm512_maskz_loadu_ps(k, v), _mm512_set1_ps(thr), _CMP_GE_OQ) != 0;
}

/* ---- the product ------------------------------------------------------------------------------- *
 *
 * One kernel, group_product, multiplies one group (16 rows) by up to NTMAX tokens; decode
 * (one token), a verify pass (a few) and prefill (8 at a time) are its specializations, so a
 * row's arithmetic is the same whichever of them computes it: the results are bit-identical
 * between g3_packed_matvec, g3_packed_matmat and g3_packed_gemm at the same activations.
 *
 * Per 32-column block, the codes are loaded and unpacked once and multiplied by every token of
 * the tile. The digit sums are exact integers, combined in int32 where they fit: with 24-bit
 * activations the top two digits as A21 = 256 * A2 + A1 - offset * (256 * X2 + X1)
 * (|A21| < 2^29), the lowest as A0 - offset * X0, then S = A21 + A0 / 256 in float (an exact
 * scaling) times 256 * s: two conversions and one FMA per 16 rows, token and block. With 16-bit
 * activations (two digits) the sum is 256 * A1 + A0 - offset * (256 * X1 + X0), with 8-bit (one)
 * A0 - offset * X0, each converted once. A token's result depends on its own activations only,
 * never on the other tokens of its tile or on which rows or thread the call covers. */

INL __m512i bcast4(const int8_t *p)
{
    int32_t v;
    memcpy(&v, p, 4);
    return _mm512_set1_epi32(v);
}

/* Software prefetch distance in bytes for the streaming kernels (decode, verify): the hardware
 * prefetchers stop at 4 KiB page boundaries and ramp up again after each; asking for the record
 * 4 KiB ahead keeps the stream going (LM head of the 270M file, one thread: 19 ms without, 13 ms
 * with). The prefill GEMM reuses each group for every token tile and only asks for the next
 * group's record. */
#ifndef G3_PACK_PREFETCH
#define G3_PACK_PREFETCH 4096
#endif

/* Tokens a prefill tile multiplies against one group's unpacked block. */
#ifndef G3_GEMM_NT
#define G3_GEMM_NT 8
#endif

/* y[t][rows of group g] for the nt (<= NTMAX, a constant) tokens xq[0..nt), y row stride ldy.
 * ndig: 1 (8-bit activations: digit 0 only), 2 (16-bit: digits 1 and 0) or 3 (24-bit: digits
 * 2, 1 and 0). STREAM: the group is read once (prefetch every record ahead) rather than held in
 * cache for many tiles. */
NOSAN INL void group_product(const g3_packed *P, const g3_xq *xq, const int nt, int64_t g, float *y,
                             int64_t ldy, const int vmode, const int smode, const int offset,
                             const int ndig, const int NTMAX, const int STREAM)
{
    const size_t vb = VALUES_BYTES(vmode);
    const __m512i m4 = _mm512_set1_epi8(0x0F), b4 = _mm512_set1_epi8(0x10);
    const __m512i b6 = _mm512_set1_epi8(0x30);
    const uint8_t *p = P->data + (size_t)g * P->group_bytes;
    const int8_t *dg[G3_PACK_MAX_TOKENS][3];
    __m512 yacc[G3_PACK_MAX_TOKENS];
    for (int t = 0; t < NTMAX; t++) {
        const g3_xq *x = &xq[t < nt ? t : 0];
        for (int q = 0; q < 3; q++)
            dg[t][q] = x->digit[q];
        yacc[t] = _mm512_setzero_ps();
    }
    const __m512 inv256 = _mm512_set1_ps(1.0f / 256.0f);
    const int two = smode == S_K6; /* halves kept apart (their own scales) */
    /* one token alone, or two digits: each digit's sum in two dependency chains (half the
     * vpdpbusd latency in a row), added exactly before the combine; with three digits the
     * tokens of a tile interleave enough chains (splitting measured no faster there) */
    const int split = !two && (NTMAX == 1 || ndig == 2);
    __m512 dsup = _mm512_setzero_ps(), dminsup = dsup;
    const uint8_t *hdr = p;                     /* the current super-block's header */
    const uint8_t *pf = p + G3_PACK_PREFETCH; /* STREAM: the next line to ask for */
    for (int64_t b = 0; b < P->nb; b++) {
        if (smode != S_HALF && b % 8 == 0)
            hdr = p, p = super_header(p, smode, &dsup, &dminsup);
        const int64_t col = 32 * b;
        if (STREAM && G3_PACK_PREFETCH > 0) { /* every line once, this block's record 4 KiB on */
            for (; pf < p + G3_PACK_PREFETCH + vb + scale_bytes(smode); pf += 64)
                _mm_prefetch((const char *)pf, _MM_HINT_T0);
        } else if (G3_PACK_PREFETCH > 0) { /* the next group's record, for the first token tile */
            _mm_prefetch((const char *)p + P->group_bytes, _MM_HINT_T1);
        }
        /* the block's codes, 8 vectors of 16 rows x 4 columns (V_BYTES: u[j] covers columns
         * 4j..4j+3; nibbles: u[2j] columns 4j.., u[2j + 1] columns 16 + 4j..) */
        __m512i u[8];
        if (vmode == V_BYTES) {
#pragma GCC unroll 8
            for (int j = 0; j < 8; j++)
                u[j] = _mm512_loadu_si512(p + 64 * j);
        } else {
            const __m512i H = vmode >= V_NIB5 ? _mm512_loadu_si512(p + 256) : _mm512_setzero_si512();
            const __m512i H6 = vmode == V_NIB6 ? _mm512_loadu_si512(p + 320) : _mm512_setzero_si512();
#pragma GCC unroll 4
            for (int j = 0; j < 4; j++) {
                const __m512i v = _mm512_loadu_si512(p + 64 * j);
                __m512i lo = _mm512_and_si512(v, m4), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), m4);
                if (vmode == V_NIB5) {
                    lo = _mm512_or_si512(lo, _mm512_and_si512(_mm512_slli_epi16(H, 4 - j), b4));
                    hi = _mm512_or_si512(hi, _mm512_and_si512(_mm512_srli_epi16(H, j), b4));
                }
                if (vmode == V_NIB6) {
                    lo = _mm512_or_si512(lo, _mm512_and_si512(SH6(H, j), b6));
                    hi = _mm512_or_si512(hi, _mm512_and_si512(SH6(H6, j), b6));
                }
                u[2 * j] = lo;
                u[2 * j + 1] = hi;
            }
        }
        p += vb;
        /* the block's scales, shared by every token */
        __m512 d = _mm512_setzero_ps(), sc0 = d, sc1 = d, mn = d;
        if (smode == S_HALF) {
            d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p));
        } else if (smode == S_K4) {
            __m512i si, mi;
            k4_scales(hdr, (int)(b % 8), &si, &mi);
            sc0 = _mm512_mul_ps(dsup, _mm512_cvtepi32_ps(si));
            mn = _mm512_mul_ps(dminsup, _mm512_cvtepi32_ps(mi));
        } else {
            sc0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)));
            sc1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(p + 16))));
        }
        p += scale_bytes(smode);
#pragma GCC unroll 16
        for (int t = 0; t < NTMAX; t++) {
            if (t >= nt)
                break;
            const g3_xq *x = &xq[t];
            const int32_t *ds = x->dsum + 6 * b;
            /* h2, h1: digits 2 and 1 (ndig 3, 2) or chain 0 of digit 0 (ndig 1) of half h (or
             * chain h, split); l0: digit 0 (or its chain 1, ndig 1) */
            __m512i h2[2], h1[2], l0[2];
            for (int q = 0; q < 2; q++)
                h2[q] = h1[q] = l0[q] = _mm512_setzero_si512();
#define DPH(hf, uu, c)                                                                                   \
    do {                                                                                                 \
        if (ndig == 1 && ((c) / 4) % 2) { /* two chains, summed exactly in the combine */               \
            l0[hf] = _mm512_dpbusd_epi32(l0[hf], (uu), bcast4(dg[t][0] + (c)));                          \
        } else if (ndig == 1) {                                                                          \
            h1[hf] = _mm512_dpbusd_epi32(h1[hf], (uu), bcast4(dg[t][0] + (c)));                          \
        } else {                                                                                         \
            if (ndig == 3)                                                                               \
                h2[hf] = _mm512_dpbusd_epi32(h2[hf], (uu), bcast4(dg[t][2] + (c)));                      \
            h1[hf] = _mm512_dpbusd_epi32(h1[hf], (uu), bcast4(dg[t][1] + (c)));                          \
        }                                                                                                \
    } while (0)
#define DPL(hf, uu, c) (l0[hf] = _mm512_dpbusd_epi32(l0[hf], (uu), bcast4(dg[t][0] + (c))))
            if (vmode == V_BYTES) {
#pragma GCC unroll 8
                for (int j = 0; j < 8; j++)
                    DPH(two ? j >= 4 : split && j % 2, u[j], col + 4 * j);
                if (ndig >= 2) {
#pragma GCC unroll 8
                    for (int j = 0; j < 8; j++)
                        DPL(two ? j >= 4 : split && j % 2, u[j], col + 4 * j);
                }
            } else {
#pragma GCC unroll 4
                for (int j = 0; j < 4; j++) {
                    DPH(0, u[2 * j], col + 4 * j);
                    DPH(two || split, u[2 * j + 1], col + 16 + 4 * j);
                }
                if (ndig >= 2) {
#pragma GCC unroll 4
                    for (int j = 0; j < 4; j++) {
                        DPL(0, u[2 * j], col + 4 * j);
                        DPL(two || split, u[2 * j + 1], col + 16 + 4 * j);
                    }
                }
            }
#undef DPH
#undef DPL
            if (split) { /* the chains' sums, exactly */
                h2[0] = _mm512_add_epi32(h2[0], h2[1]);
                h1[0] = _mm512_add_epi32(h1[0], h1[1]);
                l0[0] = _mm512_add_epi32(l0[0], l0[1]);
            }
            /* the exact integer sums as float, per half (or both halves in [0]) */
            __m512 S[2];
            for (int hf = 0; hf < (two ? 2 : 1); hf++) {
                const int32_t *dh = ds + 3 * hf, *dh1 = two ? NULL : ds + 3;
                const int32_t X0 = dh[0] + (dh1 ? dh1[0] : 0), X1 = dh[1] + (dh1 ? dh1[1] : 0),
                              X2 = dh[2] + (dh1 ? dh1[2] : 0);
                /* ndig 1: A0 - offset X0; 2: 256 A1 + A0 - offset (256 X1 + X0) (|.| < 2^29,
                 * exact); 3: A21, with A0 added below in float */
                __m512i A = ndig == 1   ? _mm512_add_epi32(h1[hf], l0[hf])
                            : ndig == 2 ? _mm512_add_epi32(_mm512_slli_epi32(h1[hf], 8), l0[hf])
                                        : _mm512_add_epi32(_mm512_slli_epi32(h2[hf], 8), h1[hf]);
                if (offset)
                    A = _mm512_sub_epi32(A, _mm512_set1_epi32(offset * (ndig == 1 ? X0 : ndig == 2 ? 256 * X1 + X0
                                                                                                 : 256 * X2 + X1)));
                S[hf] = _mm512_cvtepi32_ps(A);
                if (ndig == 3) {
                    __m512i L = l0[hf];
                    if (offset)
                        L = _mm512_sub_epi32(L, _mm512_set1_epi32(offset * X0));
                    S[hf] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(L), inv256, S[hf]);
                }
            }
            /* x ~ s * (256 * (256 D2 + D1) + D0) (ndig 3), s * (256 D1 + D0) (2), s * D0 (1) */
            const __m512 xs = _mm512_set1_ps(ndig == 3 ? 256.0f * x->scale[b] : x->scale[b]);
            __m512 acc = yacc[t];
            if (smode == S_HALF) {
                acc = _mm512_fmadd_ps(S[0], _mm512_mul_ps(d, xs), acc);
            } else if (smode == S_K4) {
                acc = _mm512_fmadd_ps(S[0], _mm512_mul_ps(sc0, xs), acc);
                acc = _mm512_fnmadd_ps(mn, _mm512_set1_ps(x->xsum[b]), acc);
            } else {
                acc = _mm512_fmadd_ps(_mm512_fmadd_ps(S[1], sc1, _mm512_mul_ps(S[0], sc0)),
                                      _mm512_mul_ps(dsup, xs), acc);
            }
            yacc[t] = acc;
        }
    }
    const int64_t r0 = g * G3_PACK_ROWS, n = P->rows - r0 < G3_PACK_ROWS ? P->rows - r0 : G3_PACK_ROWS;
    for (int t = 0; t < nt; t++)
        _mm512_mask_storeu_ps(y + (size_t)t * ldy + r0, (__mmask16)((1u << n) - 1), yacc[t]);
}

/* Groups [g0, g1) for T tokens, NTMAX at a time (the tile loop outside the group loop: prefill
 * holds the caller's few groups in L2 while the tiles pass; the streaming callers take all their
 * tokens in one tile, so the weights are read once). */
NOSAN INL void product_kind(const g3_packed *P, const g3_xq *xq, int T, int64_t g0, int64_t g1,
                            float *y, const int vmode, const int smode, const int offset,
                            const int ndig, const int NTMAX, const int STREAM)
{
    for (int t0 = 0; t0 < T; t0 += NTMAX) {
        const int nt = T - t0 < NTMAX ? T - t0 : NTMAX;
        for (int64_t g = g0; g < g1; g++)
            group_product(P, xq + t0, nt, g, y + (size_t)t0 * P->rows, P->rows, vmode, smode,
                          offset, ndig, NTMAX, STREAM);
    }
}

#if defined(__SANITIZE_ADDRESS__)
/* what product_kind touches for tokens [0, T) and groups [g0, g1), for check_region */
static void check_regions(const g3_packed *P, const g3_xq *xq, int T, int64_t g0, int64_t g1,
                          const float *y, int ndig)
{
    if (T <= 0 || g1 <= g0)
        return;
    check_region(P->data + (size_t)g0 * P->group_bytes, (size_t)(g1 - g0) * P->group_bytes, 0);
    check_region(xq, sizeof *xq * (size_t)T, 0);
    const int64_t r0 = g0 * G3_PACK_ROWS, r1 = g1 * G3_PACK_ROWS < P->rows ? g1 * G3_PACK_ROWS : P->rows;
    for (int t = 0; t < T; t++) {
        const size_t nb = (size_t)P->nb;
        for (int q = 0; q < ndig; q++)
            check_region(xq[t].digit[q], 32 * nb, 0);
        check_region(xq[t].dsum, sizeof(int32_t) * 6 * nb, 0);
        check_region(xq[t].scale, sizeof(float) * nb, 0);
        check_region(xq[t].xsum, sizeof(float) * nb, 0);
        check_region(y + (size_t)t * P->rows + r0, sizeof(float) * (size_t)(r1 - r0), 1);
    }
}
#define CHECK_REGIONS(P, xq, T, g0, g1, y, ndig) check_regions(P, xq, T, g0, g1, y, ndig)
#else
#define CHECK_REGIONS(P, xq, T, g0, g1, y, ndig) ((void)0)
#endif

NOSAN TGT void g3_packed_matvec(const g3_packed *P, const g3_xq *xq, int64_t g0, int64_t g1, float *y)
{
    CHECK_REGIONS(P, xq, 1, g0, g1, y, 3);
#define MATVEC(v, sm, o) product_kind(P, xq, 1, g0, g1, y, v, sm, o, 3, 1, 1)
    FOR_PACKED_TYPE(P->type, MATVEC)
#undef MATVEC
}

/* A verify pass of speculative decoding (or any few-token call) multiplies the same weights by T
 * activation vectors: each block's codes are loaded and unpacked once and multiplied by every
 * token while the next blocks stream in, so T tokens cost about one pass as long as T times the
 * integer work fits under the memory time. */
NOSAN TGT void g3_packed_matmat_digits(const g3_packed *P, const g3_xq *xq, int T, int64_t g0,
                                       int64_t g1, float *y, int ndig)
{
    CHECK_REGIONS(P, xq, T, g0, g1, y, ndig == 1 ? 1 : 3);
#define MATMAT(v, sm, o) product_kind(P, xq, T, g0, g1, y, v, sm, o, nd, G3_PACK_MAX_TOKENS, 1)
    if (ndig == 1) {
        const int nd = 1;
        FOR_PACKED_TYPE(P->type, MATMAT)
    } else {
        const int nd = 3;
        FOR_PACKED_TYPE(P->type, MATMAT)
    }
#undef MATMAT
}

TGT void g3_packed_matmat(const g3_packed *P, const g3_xq *xq, int T, int64_t g0, int64_t g1,
                          float *y)
{
    g3_packed_matmat_digits(P, xq, T, g0, g1, y, 3);
}

/* ---- prompt processing: many tokens per weight block ---------------------------------------------
 *
 * A prefill chunk multiplies each weight by T >= 32 activation rows, so the integer work, not the
 * weight stream, is the cost: each 32-column block of a group is unpacked once and multiplied by a
 * register tile of G3_GEMM_NT tokens, and the caller walks tiles so that a block of groups stays
 * in L2 while the tokens stream (matmul.c). */

TGT void g3_xq_prepare_prefill(g3_xq *xq, const float *x, int mode)
{
    g3_xq_prepare_digits(xq, x, mode); /* a G3_PREFILL_* is its digit count */
}

NOSAN TGT void g3_packed_gemm(const g3_packed *P, const g3_xq *xq, int T, int64_t g0, int64_t g1,
                              float *y, int mode)
{
    CHECK_REGIONS(P, xq, T, g0, g1, y, mode); /* a G3_PREFILL_* is its digit count */
#define GEMM(v, sm, o) product_kind(P, xq, T, g0, g1, y, v, sm, o, nd, G3_GEMM_NT, 0)
    if (mode == G3_PREFILL_8BIT) {
        const int nd = 1;
        FOR_PACKED_TYPE(P->type, GEMM)
    } else if (mode == G3_PREFILL_16BIT) {
        const int nd = 2;
        FOR_PACKED_TYPE(P->type, GEMM)
    } else {
        const int nd = 3;
        FOR_PACKED_TYPE(P->type, GEMM)
    }
#undef GEMM
}
