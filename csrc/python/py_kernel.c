/* py_kernel.c — thin bindings of single kernels (for the NumPy twins in tests/) and the sampler. */
#include "py.h"
#include "np.h"

#include "kernels/attention.h"
#include "kernels/dispatch.h"
#include "kernels/ops.h"
#include "kernels/sample.h"
#include "threading.h"

#include <omp.h>

#include <math.h>
#include <string.h>

/* float32 C-contiguous copy-or-view of obj with ndim in [lo, hi] */
static PyArrayObject *f32(PyObject *obj, int lo, int hi)
{
    return (PyArrayObject *)PyArray_FROMANY(obj, NPY_FLOAT32, lo, hi,
                                            NPY_ARRAY_IN_ARRAY | NPY_ARRAY_ENSURECOPY);
}

static PyObject *py_rmsnorm(PyObject *mod, PyObject *args)
{
    PyObject *xo, *wo;
    float eps;
    if (!PyArg_ParseTuple(args, "OOf", &xo, &wo, &eps))
        return NULL;
    PyArrayObject *x = f32(xo, 1, 2), *w = x ? f32(wo, 1, 1) : NULL;
    if (!x || !w)
        goto fail;
    int64_t n = PyArray_DIM(x, PyArray_NDIM(x) - 1);
    if (PyArray_DIM(w, 0) != n) {
        PyErr_Format(PyExc_ValueError, "weight has %zd values, rows have %lld",
                     (Py_ssize_t)PyArray_DIM(w, 0), (long long)n);
        goto fail;
    }
    int64_t rows = n ? PyArray_SIZE(x) / n : 0;
    float *xd = PyArray_DATA(x);
    for (int64_t r = 0; r < rows; r++)
        g3_rmsnorm_f32(xd + r * n, PyArray_DATA(w), xd + r * n, n, eps);
    Py_DECREF(w);
    return (PyObject *)x;
fail:
    Py_XDECREF(x);
    Py_XDECREF(w);
    return NULL;
}

/* rope(x: (T, H, D), positions: (T,) int64, base, freq_scale) */
static PyObject *py_rope(PyObject *mod, PyObject *args)
{
    PyObject *xo, *po;
    float base, scale;
    if (!PyArg_ParseTuple(args, "OOff", &xo, &po, &base, &scale))
        return NULL;
    PyArrayObject *x = f32(xo, 3, 3);
    PyArrayObject *p = x ? (PyArrayObject *)PyArray_FROMANY(po, NPY_INT64, 1, 1, NPY_ARRAY_IN_ARRAY)
                         : NULL;
    float *inv = NULL;
    if (!x || !p)
        goto fail;
    int64_t T = PyArray_DIM(x, 0), H = PyArray_DIM(x, 1), D = PyArray_DIM(x, 2);
    if (PyArray_DIM(p, 0) != T || D % 2) {
        PyErr_SetString(PyExc_ValueError, "x must be (T, H, D) with D even, positions (T,)");
        goto fail;
    }
    inv = PyMem_Malloc(sizeof(float) * (size_t)(D / 2 + 1));
    if (!inv) {
        PyErr_NoMemory();
        goto fail;
    }
    g3_rope_inv_freq(inv, D, base, scale);
    const int64_t *pos = PyArray_DATA(p);
    float *xd = PyArray_DATA(x);
    for (int64_t t = 0; t < T; t++)
        for (int64_t h = 0; h < H; h++)
            g3_rope_neox_f32(xd + (t * H + h) * D, D, pos[t], inv);
    PyMem_Free(inv);
    Py_DECREF(p);
    return (PyObject *)x;
fail:
    Py_XDECREF(x);
    Py_XDECREF(p);
    return NULL;
}

/* The float kernels of one level: 'auto' (the dispatcher's choice), 'scalar', 'avx2', 'avx512';
 * ValueError for an unknown name or a level this CPU cannot run. */
static const g3_float_kernels *kernels_for(const char *isa)
{
    if (strcmp(isa, "auto") == 0)
        return g3_fk();
    for (int l = 0; l < G3_ISA_COUNT; l++)
        if (strcmp(isa, g3_isa_name(l)) == 0) {
            const g3_float_kernels *k = g3_float_kernels_isa(l);
            if (!k)
                PyErr_Format(PyExc_ValueError, "isa '%s' is not supported by this CPU (best: %s)",
                             isa, g3_isa_name(g3_isa_cpu()));
            return k;
        }
    PyErr_Format(PyExc_ValueError, "isa must be 'auto', 'scalar', 'avx2' or 'avx512', got '%.50s'",
                 isa);
    return NULL;
}

/* (x, y) float32 copies of the same shape, or NULL with an exception */
static int same_shape_pair(PyObject *xo, PyObject *yo, int lo, int hi, const char *what,
                           PyArrayObject **x, PyArrayObject **y)
{
    *x = f32(xo, lo, hi);
    *y = *x ? f32(yo, lo, hi) : NULL;
    if (*x && *y && PyArray_SAMESHAPE(*x, *y))
        return 0;
    if (*x && *y)
        PyErr_Format(PyExc_ValueError, "%s must have the same shape", what);
    Py_CLEAR(*x);
    Py_CLEAR(*y);
    return -1;
}

static PyObject *py_geglu(PyObject *mod, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"gate", "up", "isa", NULL};
    PyObject *go, *uo;
    const char *isa = "auto";
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OO|s", kwlist, &go, &uo, &isa))
        return NULL;
    const g3_float_kernels *k = kernels_for(isa);
    PyArrayObject *g, *u;
    if (!k || same_shape_pair(go, uo, 1, 2, "gate and up", &g, &u) < 0)
        return NULL;
    k->geglu(PyArray_DATA(g), PyArray_DATA(u), PyArray_DATA(g), PyArray_SIZE(g));
    Py_DECREF(u);
    return (PyObject *)g;
}

/* gelu_bias(x (..., n), b (n)) -> gelu_tanh(x + b): SigLIP's fc1 bias and activation */
static PyObject *py_gelu_bias(PyObject *mod, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"x", "b", "isa", NULL};
    PyObject *xo, *bo;
    const char *isa = "auto";
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OO|s", kwlist, &xo, &bo, &isa))
        return NULL;
    const g3_float_kernels *k = kernels_for(isa);
    PyArrayObject *x = k ? f32(xo, 1, 2) : NULL, *b = x ? f32(bo, 1, 1) : NULL;
    if (!x || !b || PyArray_DIM(b, 0) != PyArray_DIM(x, PyArray_NDIM(x) - 1)) {
        if (x && b)
            PyErr_SetString(PyExc_ValueError, "b must have the length of x's rows");
        Py_XDECREF(x);
        Py_XDECREF(b);
        return NULL;
    }
    const int64_t n = PyArray_DIM(b, 0);
    float *d = PyArray_DATA(x);
    for (int64_t r = 0; n && r < PyArray_SIZE(x) / n; r++)
        k->gelu_bias(d + r * n, PyArray_DATA(b), n);
    Py_DECREF(b);
    return (PyObject *)x;
}

static PyObject *py_softmax(PyObject *mod, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"x", "isa", NULL};
    PyObject *xo;
    const char *isa = "auto";
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O|s", kwlist, &xo, &isa))
        return NULL;
    const g3_float_kernels *k = kernels_for(isa);
    PyArrayObject *x = k ? f32(xo, 1, 2) : NULL;
    if (!x)
        return NULL;
    int64_t n = PyArray_DIM(x, PyArray_NDIM(x) - 1);
    if (n < 1) {
        Py_DECREF(x);
        return PyErr_Format(PyExc_ValueError, "softmax needs at least one value per row");
    }
    float *d = PyArray_DATA(x);
    for (int64_t r = 0; r < PyArray_SIZE(x) / n; r++)
        k->softmax(d + r * n, n);
    return (PyObject *)x;
}

/* dot(a, b, isa='auto') -> float: the float32 dot product of attention and the small matmul */
static PyObject *py_dot(PyObject *mod, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"a", "b", "isa", NULL};
    PyObject *ao, *bo;
    const char *isa = "auto";
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OO|s", kwlist, &ao, &bo, &isa))
        return NULL;
    const g3_float_kernels *k = kernels_for(isa);
    PyArrayObject *a, *b;
    if (!k || same_shape_pair(ao, bo, 1, 1, "a and b", &a, &b) < 0)
        return NULL;
    float r = k->dot(PyArray_DATA(a), PyArray_DATA(b), PyArray_SIZE(a));
    Py_DECREF(a);
    Py_DECREF(b);
    return PyFloat_FromDouble(r);
}

/* layernorm(x (..., n), w (n), b (n), eps) -> float32 */
static PyObject *py_layernorm(PyObject *mod, PyObject *args)
{
    PyObject *xo, *wo, *bo;
    float eps;
    if (!PyArg_ParseTuple(args, "OOOf", &xo, &wo, &bo, &eps))
        return NULL;
    PyArrayObject *x = f32(xo, 1, 2), *w = x ? f32(wo, 1, 1) : NULL, *b = w ? f32(bo, 1, 1) : NULL;
    if (!x || !w || !b)
        goto fail;
    const int64_t n = PyArray_DIM(x, PyArray_NDIM(x) - 1);
    if (n < 1 || PyArray_DIM(w, 0) != n || PyArray_DIM(b, 0) != n) {
        PyErr_SetString(PyExc_ValueError, "w and b must have the (non-zero) length of x's rows");
        goto fail;
    }
    float *xd = PyArray_DATA(x);
    for (int64_t r = 0; r < PyArray_SIZE(x) / n; r++)
        g3_layernorm_f32(xd + r * n, PyArray_DATA(w), PyArray_DATA(b), xd + r * n, n, eps);
    Py_DECREF(w);
    Py_DECREF(b);
    return (PyObject *)x;
fail:
    Py_XDECREF(x);
    Py_XDECREF(w);
    Py_XDECREF(b);
    return NULL;
}

/* Parsed sampler arguments and the arrays that back them. */
typedef struct {
    PyArrayObject *logits, *hist, *bias_ids, *bias_vals;
    g3_sampling p;
} sample_args;

static void sample_args_free(sample_args *a)
{
    Py_XDECREF(a->logits);
    Py_XDECREF(a->hist);
    Py_XDECREF(a->bias_ids);
    Py_XDECREF(a->bias_vals);
}

static int parse_sampling(PyObject *kw_args, PyObject *kw, sample_args *a, PyObject **rng)
{
    static char *kwlist[] = {"logits", "rng", "temperature", "top_k", "top_p", "min_p",
                             "repetition_penalty", "history", "bias_ids", "bias_values", NULL};
    PyObject *lo, *ho = Py_None, *bio = Py_None, *bvo = Py_None;
    long long top_k = 0;
    memset(a, 0, sizeof *a);
    a->p.temperature = 1.0f;
    a->p.top_p = 1.0f;
    a->p.repetition_penalty = 1.0f;
    if (!PyArg_ParseTupleAndKeywords(kw_args, kw, "OO|fLfffOOO", kwlist, &lo, rng,
                                     &a->p.temperature, &top_k, &a->p.top_p, &a->p.min_p,
                                     &a->p.repetition_penalty, &ho, &bio, &bvo))
        return -1;
    a->p.top_k = top_k;
    if (!(a->p.top_p > 0.0f && a->p.top_p <= 1.0f) || !(a->p.min_p >= 0.0f && a->p.min_p <= 1.0f) ||
        !(a->p.repetition_penalty > 0.0f) || top_k < 0 || isnan(a->p.temperature)) {
        char msg[256]; /* PyErr_Format has no %g */
        PyOS_snprintf(msg, sizeof msg,
                      "invalid sampling arguments: need top_p in (0, 1], min_p in [0, 1], "
                      "repetition_penalty > 0, top_k >= 0, temperature not NaN (got top_p=%g, "
                      "min_p=%g, repetition_penalty=%g, top_k=%lld, temperature=%g)",
                      (double)a->p.top_p, (double)a->p.min_p, (double)a->p.repetition_penalty,
                      top_k, (double)a->p.temperature);
        PyErr_SetString(PyExc_ValueError, msg);
        return -1;
    }
    a->logits = (PyArrayObject *)PyArray_FROMANY(lo, NPY_FLOAT32, 1, 1, NPY_ARRAY_IN_ARRAY);
    if (!a->logits)
        return -1;
    if (PyArray_DIM(a->logits, 0) < 1) {
        PyErr_SetString(PyExc_ValueError, "logits must not be empty");
        return -1;
    }
    if (ho != Py_None) {
        a->hist = (PyArrayObject *)PyArray_FROMANY(ho, NPY_INT32, 1, 1, NPY_ARRAY_IN_ARRAY);
        if (!a->hist)
            return -1;
        a->p.history = PyArray_DATA(a->hist);
        a->p.n_history = PyArray_DIM(a->hist, 0);
    }
    if (bio != Py_None) {
        a->bias_ids = (PyArrayObject *)PyArray_FROMANY(bio, NPY_INT32, 1, 1, NPY_ARRAY_IN_ARRAY);
        a->bias_vals = a->bias_ids ? (PyArrayObject *)PyArray_FROMANY(bvo, NPY_FLOAT32, 1, 1,
                                                                      NPY_ARRAY_IN_ARRAY)
                                   : NULL;
        if (!a->bias_ids || !a->bias_vals)
            return -1;
        if (PyArray_DIM(a->bias_ids, 0) != PyArray_DIM(a->bias_vals, 0)) {
            PyErr_SetString(PyExc_ValueError, "bias_ids and bias_values differ in length");
            return -1;
        }
        a->p.bias_ids = PyArray_DATA(a->bias_ids);
        a->p.bias_values = PyArray_DATA(a->bias_vals);
        a->p.n_bias = PyArray_DIM(a->bias_ids, 0);
    }
    return 0;
}

/* sample(logits, rng: uint64[4] (updated in place), temperature=1, top_k=0, top_p=1, min_p=0,
 *        repetition_penalty=1, history=None, bias_ids=None, bias_values=None) -> int */
static PyObject *py_sample(PyObject *mod, PyObject *args, PyObject *kw)
{
    sample_args a;
    PyObject *rng_o = NULL;
    if (parse_sampling(args, kw, &a, &rng_o) < 0) {
        sample_args_free(&a);
        return NULL;
    }
    if (!PyArray_Check(rng_o) || PyArray_TYPE((PyArrayObject *)rng_o) != NPY_UINT64 ||
        PyArray_SIZE((PyArrayObject *)rng_o) != 4 ||
        !PyArray_ISCARRAY((PyArrayObject *)rng_o)) {
        sample_args_free(&a);
        return PyErr_Format(PyExc_TypeError, "rng must be a writable uint64 array of 4 (rng_seed)");
    }
    int32_t tok = 0;
    g3_err err = {{0}, 0};
    g3_status st;
    uint64_t *state = PyArray_DATA((PyArrayObject *)rng_o);
    Py_BEGIN_ALLOW_THREADS st = g3_sample(PyArray_DATA(a.logits), PyArray_DIM(a.logits, 0), &a.p,
                                          state, &tok, &err);
    Py_END_ALLOW_THREADS
    sample_args_free(&a);
    if (st)
        return g3_py_raise(g3_py_state(mod), st, &err, NULL);
    return PyLong_FromLong(tok);
}

/* sample_probs(logits, None, ...same) -> (probs float32 (n,), greedy int) */
static PyObject *py_sample_probs(PyObject *mod, PyObject *args, PyObject *kw)
{
    sample_args a;
    PyObject *unused = NULL;
    if (parse_sampling(args, kw, &a, &unused) < 0) {
        sample_args_free(&a);
        return NULL;
    }
    npy_intp n = PyArray_DIM(a.logits, 0);
    PyObject *probs = PyArray_SimpleNew(1, &n, NPY_FLOAT32);
    float *work = PyMem_Malloc(sizeof(float) * (size_t)n);
    if (!probs || !work) {
        Py_XDECREF(probs);
        PyMem_Free(work);
        sample_args_free(&a);
        return PyErr_NoMemory();
    }
    int32_t greedy = 0;
    g3_err err = {{0}, 0};
    g3_status st = g3_sample_probs(PyArray_DATA(a.logits), n, &a.p, work,
                                   PyArray_DATA((PyArrayObject *)probs), &greedy, &err);
    PyMem_Free(work);
    sample_args_free(&a);
    if (st) {
        Py_DECREF(probs);
        return g3_py_raise(g3_py_state(mod), st, &err, NULL);
    }
    return Py_BuildValue("(Ni)", probs, greedy);
}

static PyObject *py_rng_seed(PyObject *mod, PyObject *arg)
{
    unsigned long long seed = PyLong_AsUnsignedLongLongMask(arg);
    if (PyErr_Occurred())
        return NULL;
    npy_intp n = 4;
    PyObject *a = PyArray_SimpleNew(1, &n, NPY_UINT64);
    if (a)
        g3_rng_seed(PyArray_DATA((PyArrayObject *)a), seed);
    return a;
}

/* read_bandwidth(array) -> seconds for one parallel streaming read of the whole array (sum of
 * float32 with wide loads; the STREAM-like probe the benchmarks compare decode against) */
static PyObject *py_read_bandwidth(PyObject *mod, PyObject *arg)
{
    PyArrayObject *a = (PyArrayObject *)PyArray_FROMANY(arg, NPY_FLOAT32, 1, 1, NPY_ARRAY_IN_ARRAY);
    if (!a)
        return NULL;
    const float *d = PyArray_DATA(a);
    const int64_t n = PyArray_DIM(a, 0);
    double t = 0.0, total = 0.0;
    enum { CHUNK = 4096 }; /* 16 KiB of ones stays in L1 while the array streams through */
    float *ones = PyMem_Malloc(sizeof(float) * CHUNK);
    if (!ones) {
        Py_DECREF(a);
        return PyErr_NoMemory();
    }
    for (int i = 0; i < CHUNK; i++)
        ones[i] = 1.0f;
    Py_BEGIN_ALLOW_THREADS
    t = omp_get_wtime();
    const int nt = g3_get_threads();
#pragma omp parallel for num_threads(nt) reduction(+ : total) schedule(static)
    for (int64_t i0 = 0; i0 < n; i0 += CHUNK) {
        const int64_t len = i0 + CHUNK < n ? CHUNK : n - i0;
        /* the same 4 KiB software prefetch the packed decode kernels use (quant/packed.c), so
         * the probe is the best streaming read this machine does, not a weaker one */
        for (int64_t j = 0; j < len; j += 16)
            __builtin_prefetch(d + i0 + j + 1024, 0, 3);
        total += g3_dot_f32(d + i0, ones, len);
    }
    t = omp_get_wtime() - t;
    Py_END_ALLOW_THREADS
    PyMem_Free(ones);
    Py_DECREF(a);
    return Py_BuildValue("(dd)", t, total);
}

/* pool_probe(n_threads, n, chunk) -> dict: what the thread pool (pool.c) did with the OpenMP
 * constructs the kernels use, for tests/test_threads.py: which thread ran each index of a static
 * and a dynamic loop, how often each index ran, the team sizes seen, whether a barrier held,
 * how many threads ran a single, and the size of a nested region's team. */
static PyObject *py_pool_probe(PyObject *self, PyObject *args)
{
    int nt;
    long long n, chunk;
    if (!PyArg_ParseTuple(args, "iLL", &nt, &n, &chunk))
        return NULL;
    if (nt < 1 || nt > 256 || n < 0 || n > (1 << 24) || chunk < 1)
        return PyErr_Format(PyExc_ValueError, "pool_probe: 1 <= n_threads <= 256, 0 <= n <= 2^24, "
                            "chunk >= 1");
    npy_intp dims[1] = {(npy_intp)n};
    PyObject *st = PyArray_ZEROS(1, dims, NPY_INT32, 0);
    PyObject *dy = PyArray_ZEROS(1, dims, NPY_INT32, 0);
    PyObject *cnt = PyArray_ZEROS(1, dims, NPY_INT32, 0);
    if (!st || !dy || !cnt) {
        Py_XDECREF(st);
        Py_XDECREF(dy);
        Py_XDECREF(cnt);
        return NULL;
    }
    int32_t *so = PyArray_DATA((PyArrayObject *)st), *dn = PyArray_DATA((PyArrayObject *)dy);
    int32_t *c = PyArray_DATA((PyArrayObject *)cnt);
    int team_static = 0, team_region = 0, barrier_ok = 1, singles = 0, nested = 0;
    int arrived[256] = {0};
    Py_BEGIN_ALLOW_THREADS
#pragma omp parallel for num_threads(nt) schedule(static)
    for (long long i = 0; i < n; i++) {
        so[i] = omp_get_thread_num();
        if (i == 0)
            team_static = omp_get_num_threads();
    }
#pragma omp parallel for num_threads(nt) schedule(dynamic, chunk)
    for (long long i = 0; i < n; i++) {
        dn[i] = omp_get_thread_num();
        __atomic_fetch_add(&c[i], 1, __ATOMIC_RELAXED);
    }
#pragma omp parallel num_threads(nt)
    {
        const int t = omp_get_thread_num(), k = omp_get_num_threads();
        __atomic_store_n(&arrived[t], 1, __ATOMIC_RELEASE);
#pragma omp barrier
        for (int j = 0; j < k; j++)
            if (!__atomic_load_n(&arrived[j], __ATOMIC_ACQUIRE))
                __atomic_store_n(&barrier_ok, 0, __ATOMIC_RELAXED);
#pragma omp single
        {
            __atomic_fetch_add(&singles, 1, __ATOMIC_RELAXED);
            team_region = k;
        }
        if (t == 0) {
#pragma omp parallel num_threads(nt)
            {
                if (omp_get_thread_num() == 0)
                    nested = omp_get_num_threads();
            }
        }
    }
    Py_END_ALLOW_THREADS
    return Py_BuildValue("{sNsNsNsisisisisi}", "static_owner", st, "dynamic_owner", dy,
                         "dynamic_count", cnt, "team_static", team_static, "team_region",
                         team_region, "barrier_ok", barrier_ok, "singles", singles, "nested",
                         nested);
}

/* attn_flash(q (nq, rep, hd), k (n, hd), v (n, hd), lo (nq), hi (nq), scale, kv_type=0,
 * chunk=0, split=0) -> z (nq, rep, hd): K/V stored as kv_type (ggml id), held in two spans cut at
 * `split`, g3_attn_flash over key chunks of `chunk` (0: one) merged by g3_attn_flash_merge. The
 * test entry of the flash kernel (tests/test_kernels.py has its NumPy twin). */
static PyObject *py_attn_flash(PyObject *mod, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"q", "k", "v", "lo", "hi", "scale", "kv_type", "chunk", "split",
                             NULL};
    PyObject *qo, *ko, *vo, *loo, *hio;
    float scale;
    int kv_type = G3_TYPE_F32;
    long long chunk = 0, split = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOOOOf|iLL", kwlist, &qo, &ko, &vo, &loo, &hio,
                                     &scale, &kv_type, &chunk, &split))
        return NULL;
    PyArrayObject *q = f32(qo, 3, 3), *k = q ? f32(ko, 2, 2) : NULL, *v = k ? f32(vo, 2, 2) : NULL;
    PyArrayObject *lo = v ? (PyArrayObject *)PyArray_FROMANY(loo, NPY_INT64, 1, 1,
                                                             NPY_ARRAY_IN_ARRAY) : NULL;
    PyArrayObject *hi = lo ? (PyArrayObject *)PyArray_FROMANY(hio, NPY_INT64, 1, 1,
                                                              NPY_ARRAY_IN_ARRAY) : NULL;
    PyObject *ret = NULL;
    uint8_t *ks = NULL, *vs = NULL;
    float *o = NULL, *mm = NULL, *ll = NULL, *work = NULL;
    if (!hi)
        goto done;
    const int64_t nq = PyArray_DIM(q, 0), rep = PyArray_DIM(q, 1), hd = PyArray_DIM(q, 2);
    const int64_t n = PyArray_DIM(k, 0);
    if (PyArray_DIM(k, 1) != hd || PyArray_DIM(v, 0) != n || PyArray_DIM(v, 1) != hd ||
        PyArray_DIM(lo, 0) != nq || PyArray_DIM(hi, 0) != nq || n < 1 || nq < 1 ||
        nq * rep > G3_FA_ROWS || split < 0 || split >= n || chunk < 0) {
        PyErr_SetString(PyExc_ValueError, "attn_flash: inconsistent shapes or arguments");
        goto done;
    }
    if (!g3_kv_type_ok(kv_type, hd)) {
        PyErr_Format(PyExc_ValueError, "attn_flash: kv_type %d cannot hold head_dim %lld",
                     kv_type, (long long)hd);
        goto done;
    }
    const int64_t *lop = PyArray_DATA(lo), *hip = PyArray_DATA(hi);
    for (int64_t t = 0; t < nq; t++)
        if (lop[t] < 0 || hip[t] >= n || lop[t] > hip[t]) {
            PyErr_SetString(PyExc_ValueError, "attn_flash: need 0 <= lo <= hi < n");
            goto done;
        }
    const size_t rb = g3_row_size(kv_type, hd);
    const int64_t ch = chunk ? chunk : n, nc = (n + ch - 1) / ch, rows = nq * rep;
    ks = PyMem_Malloc(rb * (size_t)n);
    vs = PyMem_Malloc(rb * (size_t)n);
    o = PyMem_Malloc(sizeof(float) * (size_t)(nc * rows * hd));
    mm = PyMem_Malloc(sizeof(float) * (size_t)(nc * rows));
    ll = PyMem_Malloc(sizeof(float) * (size_t)(nc * rows));
    work = PyMem_Malloc(sizeof(float) * (size_t)g3_attn_flash_work(hd));
    npy_intp dims[3] = {nq, rep, hd};
    ret = PyArray_ZEROS(3, dims, NPY_FLOAT32, 0);
    if (!ks || !vs || !o || !mm || !ll || !work || !ret) {
        Py_CLEAR(ret);
        PyErr_NoMemory();
        goto done;
    }
    const g3_type_traits *tt = g3_type_get(kv_type);
    const float *kd = PyArray_DATA(k), *vd = PyArray_DATA(v);
    for (int64_t j = 0; j < n; j++) {
        tt->from_float(kd + j * hd, ks + (size_t)j * rb, hd);
        tt->from_float(vd + j * hd, vs + (size_t)j * rb, hd);
    }
    g3_kv_span sp[2];
    int nsp = 0;
    if (split > 0)
        sp[nsp++] = (g3_kv_span){ks, vs, split, kv_type, rb};
    sp[nsp++] = (g3_kv_span){ks + (size_t)split * rb, vs + (size_t)split * rb, n - split,
                             kv_type, rb};
    for (int64_t c = 0; c < nc; c++) {
        const int64_t j1 = (c + 1) * ch < n ? (c + 1) * ch : n;
        g3_attn_flash(PyArray_DATA(q), rep * hd, nq, rep, hd, scale, sp, nsp, c * ch, j1, lop,
                      hip, o + c * rows * hd, mm + c * rows, ll + c * rows, work);
    }
    g3_attn_flash_merge((int)nc, o, mm, ll, nq, rep, hd, PyArray_DATA((PyArrayObject *)ret),
                        rep * hd);
done:
    PyMem_Free(ks);
    PyMem_Free(vs);
    PyMem_Free(o);
    PyMem_Free(mm);
    PyMem_Free(ll);
    PyMem_Free(work);
    Py_XDECREF(q);
    Py_XDECREF(k);
    Py_XDECREF(v);
    Py_XDECREF(lo);
    Py_XDECREF(hi);
    return ret;
}

PyMethodDef g3_py_kernel_methods[] = {
    {"read_bandwidth", py_read_bandwidth, METH_O,
     "read_bandwidth(float32 array) -> (seconds, checksum) of a parallel streaming read"},
    {"rmsnorm", py_rmsnorm, METH_VARARGS, "rmsnorm(x (..., n), w (n), eps) -> float32"},
    {"rope", py_rope, METH_VARARGS, "rope(x (T, H, D), positions (T), base, freq_scale)"},
    {"geglu", (PyCFunction)(void (*)(void))py_geglu, METH_VARARGS | METH_KEYWORDS,
     "geglu(gate, up, isa='auto') -> gelu_tanh(gate) * up"},
    {"gelu_bias", (PyCFunction)(void (*)(void))py_gelu_bias, METH_VARARGS | METH_KEYWORDS,
     "gelu_bias(x (..., n), b (n), isa='auto') -> gelu_tanh(x + b)"},
    {"softmax", (PyCFunction)(void (*)(void))py_softmax, METH_VARARGS | METH_KEYWORDS,
     "softmax(x, isa='auto'): row-wise softmax"},
    {"dot", (PyCFunction)(void (*)(void))py_dot, METH_VARARGS | METH_KEYWORDS,
     "dot(a, b, isa='auto') -> float32 dot product"},
    {"layernorm", py_layernorm, METH_VARARGS, "layernorm(x (..., n), w (n), b (n), eps) -> float32"},
    {"sample", (PyCFunction)(void (*)(void))py_sample, METH_VARARGS | METH_KEYWORDS,
     "draw one token id"},
    {"sample_probs", (PyCFunction)(void (*)(void))py_sample_probs, METH_VARARGS | METH_KEYWORDS,
     "the filtered distribution and the greedy id"},
    {"rng_seed", py_rng_seed, METH_O, "a seeded xoshiro256** state (uint64[4])"},
    {"pool_probe", py_pool_probe, METH_VARARGS,
     "pool_probe(n_threads, n, chunk) -> dict: what the thread pool did (tests)"},
    {"attn_flash", (PyCFunction)(void (*)(void))py_attn_flash, METH_VARARGS | METH_KEYWORDS,
     "attn_flash(q, k, v, lo, hi, scale, kv_type=0, chunk=0, split=0) -> z (nq, rep, hd)"},
    {NULL, NULL, 0, NULL},
};
