/* sample.c — the sampler over the full vocabulary.
 *
 * Order (Hugging Face's logits-processor order, since the argument names are Hugging Face's):
 *   logit bias -> repetition penalty (over `history`: l < 0 ? l * r : l / r) -> temperature
 *   -> top-k -> top-p (smallest set whose probability reaches top_p, at least one token)
 *   -> min-p (keep p >= min_p * p_max) -> renormalize -> draw.
 * temperature <= 0 means greedy: the arg-max after bias and penalty (ties: lowest id).
 * The random stream is xoshiro256** seeded by splitmix64, so a seed gives the same tokens on every
 * machine and thread count.
 */
#include "kernels/sample.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/ops.h"

static uint64_t splitmix64(uint64_t *x)
{
    uint64_t z = (*x += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

void g3_rng_seed(uint64_t s[4], uint64_t seed)
{
    for (int i = 0; i < 4; i++)
        s[i] = splitmix64(&seed);
}

static inline uint64_t rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }

double g3_rng_uniform(uint64_t s[4])
{
    const uint64_t r = rotl(s[1] * 5, 7) * 9, t = s[1] << 17;
    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = rotl(s[3], 45);
    return (double)(r >> 11) * 0x1.0p-53; /* [0, 1) */
}

typedef struct {
    float logit;
    int32_t id;
} cand;

static int cand_desc(const void *a, const void *b)
{
    const cand *x = a, *y = b;
    if (x->logit != y->logit)
        return x->logit < y->logit ? 1 : -1;
    return (x->id > y->id) - (x->id < y->id);
}

static g3_status apply_bias_penalty(float *l, int64_t n, const g3_sampling *p, g3_err *err)
{
    for (int64_t i = 0; i < p->n_bias; i++)
        l[p->bias_ids[i]] += p->bias_values[i];
    if (p->repetition_penalty == 1.0f || p->n_history == 0)
        return G3_OK;
    uint8_t *seen = calloc((size_t)n, 1); /* each distinct token is penalized once */
    if (!seen)
        return g3_fail(err, G3_ERR_NOMEM, "out of memory in the sampler");
    for (int64_t i = 0; i < p->n_history; i++) {
        int32_t id = p->history[i];
        if (seen[id])
            continue;
        seen[id] = 1;
        l[id] = l[id] < 0 ? l[id] * p->repetition_penalty : l[id] / p->repetition_penalty;
    }
    free(seen);
    return G3_OK;
}

/* Selects the k largest candidates into c[0..k) sorted descending (quickselect + sort). */
static void top_k_select(cand *c, int64_t n, int64_t k)
{
    int64_t lo = 0, hi = n - 1;
    while (lo < hi) {
        cand pivot = c[(lo + hi) / 2];
        int64_t i = lo, j = hi;
        while (i <= j) {
            while (cand_desc(&c[i], &pivot) < 0)
                i++;
            while (cand_desc(&c[j], &pivot) > 0)
                j--;
            if (i <= j) {
                cand t = c[i];
                c[i++] = c[j];
                c[j--] = t;
            }
        }
        if (k - 1 <= j)
            hi = j;
        else if (k - 1 >= i)
            lo = i;
        else
            break;
    }
    qsort(c, (size_t)k, sizeof *c, cand_desc);
}

g3_status g3_sample_probs(const float *logits, int64_t n, const g3_sampling *p, float *work,
                          float *probs, int32_t *greedy, g3_err *err)
{
    for (int64_t i = 0; i < p->n_bias; i++)
        if (p->bias_ids[i] < 0 || p->bias_ids[i] >= n)
            return g3_fail(err, G3_ERR_ARG, "logit_bias token id %d is out of range (vocab %lld)",
                           p->bias_ids[i], (long long)n);
    for (int64_t i = 0; i < p->n_history; i++)
        if (p->history[i] < 0 || p->history[i] >= n)
            return g3_fail(err, G3_ERR_ARG, "history token id %d is out of range (vocab %lld)",
                           p->history[i], (long long)n);
    memcpy(work, logits, sizeof(float) * (size_t)n);
    g3_status st = apply_bias_penalty(work, n, p, err);
    if (st)
        return st;
    *greedy = g3_argmax_f32(work, n);
    if (!probs)
        return G3_OK;
    memset(probs, 0, sizeof(float) * (size_t)n);
    if (p->temperature <= 0.0f) {
        probs[*greedy] = 1.0f;
        return G3_OK;
    }
    cand *c = malloc(sizeof *c * (size_t)n);
    if (!c)
        return g3_fail(err, G3_ERR_NOMEM, "out of memory in the sampler");
    int64_t m = 0;
    for (int64_t i = 0; i < n; i++)
        if (isfinite(work[i]) || work[i] == INFINITY)
            c[m++] = (cand){work[i] / p->temperature, (int32_t)i};
    if (m == 0) { /* every logit is -inf or NaN: fall back to the arg-max */
        free(c);
        probs[*greedy] = 1.0f;
        return G3_OK;
    }
    int64_t k = (p->top_k > 0 && p->top_k < m) ? p->top_k : m;
    top_k_select(c, m, k);
    /* softmax over the k survivors (sorted descending) */
    double sum = 0.0;
    const float mx = c[0].logit;
    double *e = malloc(sizeof(double) * (size_t)k);
    if (!e) {
        free(c);
        return g3_fail(err, G3_ERR_NOMEM, "out of memory in the sampler");
    }
    for (int64_t i = 0; i < k; i++)
        sum += (e[i] = exp((double)c[i].logit - mx));
    int64_t keep = k;
    if (p->top_p < 1.0f) {
        double cum = 0.0;
        for (int64_t i = 0; i < k; i++) {
            cum += e[i] / sum;
            if (cum >= p->top_p) {
                keep = i + 1;
                break;
            }
        }
    }
    if (p->min_p > 0.0f) {
        const double thr = p->min_p * (e[0] / sum);
        int64_t j = 1;
        while (j < keep && e[j] / sum >= thr)
            j++;
        keep = j;
    }
    double s2 = 0.0;
    for (int64_t i = 0; i < keep; i++)
        s2 += e[i];
    for (int64_t i = 0; i < keep; i++)
        probs[c[i].id] = (float)(e[i] / s2);
    free(e);
    free(c);
    return G3_OK;
}

g3_status g3_sample(const float *logits, int64_t n, const g3_sampling *p, uint64_t rng[4],
                    int32_t *out, g3_err *err)
{
    float *work = malloc(sizeof(float) * (size_t)n * 2);
    if (!work)
        return g3_fail(err, G3_ERR_NOMEM, "out of memory in the sampler");
    float *probs = p->temperature > 0.0f ? work + n : NULL;
    int32_t greedy;
    g3_status st = g3_sample_probs(logits, n, p, work, probs, &greedy, err);
    if (!st) {
        *out = greedy;
        if (probs) {
            /* draw by inverse CDF in id order (deterministic for a given seed) */
            double u = g3_rng_uniform(rng), cum = 0.0;
            int64_t i = 0, last = greedy;
            for (; i < n; i++) {
                if (probs[i] <= 0.0f)
                    continue;
                last = i;
                cum += probs[i];
                if (u < cum)
                    break;
            }
            *out = (int32_t)(i < n ? i : last); /* rounding left u past the sum: take the last */
        }
    }
    free(work);
    return st;
}
