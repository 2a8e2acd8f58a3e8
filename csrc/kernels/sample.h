/* sample.h — sampling parameters and the sampler (sample.c). */
#ifndef G3_SAMPLE_H
#define G3_SAMPLE_H

#include "g3.h"

typedef struct {
    float temperature;        /* <= 0: greedy */
    int64_t top_k;            /* <= 0: off */
    float top_p;              /* >= 1: off */
    float min_p;              /* <= 0: off */
    float repetition_penalty; /* 1: off */
    const int32_t *history;   /* (n_history) tokens the penalty applies to */
    int64_t n_history;
    const int32_t *bias_ids;  /* (n_bias) */
    const float *bias_values; /* (n_bias) added to the logits */
    int64_t n_bias;
} g3_sampling;

void g3_rng_seed(uint64_t state[4], uint64_t seed);
double g3_rng_uniform(uint64_t state[4]);

/* The distribution the sampler draws from (probs, n floats, zero where filtered) and the greedy
 * token after bias and penalty. work: n floats of scratch. probs may be NULL (greedy only). */
g3_status g3_sample_probs(const float *logits, int64_t n, const g3_sampling *p, float *work,
                          float *probs, int32_t *greedy, g3_err *err);
g3_status g3_sample(const float *logits, int64_t n, const g3_sampling *p, uint64_t rng[4],
                    int32_t *out, g3_err *err);

#endif
