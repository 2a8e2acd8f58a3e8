/* image.c — WebP decoding and the reference image processor's resize, in C.
 *
 * Resize: transformers' Gemma3ImageProcessor (slow/PIL path) calls Pillow's
 *   Image.resize((896, 896), BILINEAR)
 * on uint8 RGB. Pillow resamples separably (horizontal pass, then vertical, with a uint8
 * intermediate) with a triangle filter whose support is scaled by the reduction factor, so
 * downscaling averages (antialiases):
 *   scale = in / out,  fs = max(scale, 1),  support = fs
 *   centre(o) = (o + 0.5) * scale
 *   taps i in [ (int)(centre - support + 0.5), (int)(centre + support + 0.5) ) clipped to [0, in)
 *   w_i = max(0, 1 - |i - centre + 0.5| / fs),  normalised to sum 1 (in double)
 * The weights are then rounded to signed fixed point with 22 fractional bits (half away from
 * zero), each output is (2^21 + sum in_i * w_i) >> 22 clamped to [0, 255]. A pass whose size does
 * not change is skipped. Both passes: horizontal first (over only the input rows the vertical pass
 * reads), except that Pillow 13 goes vertical first when dh < sh and sh - dh > 2 (sw - dw) (rule
 * measured against PIL 13.0.0 over a grid of sizes; older Pillows are always horizontal first). Written from that description of Pillow's src/libImaging/Resample.c; the
 * tests compare against PIL.Image.resize bit for bit.
 *
 * Rescale: x * (1/255) then (x - 0.5) / 0.5, i.e. x / 127.5 - 1, channel-first.
 */
#include "vision/image.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <webp/decode.h>

#define G3_RESAMPLE_BITS 22 /* 32 - 8 - 2: 8-bit pixels, 2 bits of headroom */

static const char *vp8_status_name(VP8StatusCode s)
{
    switch (s) {
    case VP8_STATUS_OK: return "ok";
    case VP8_STATUS_OUT_OF_MEMORY: return "out of memory";
    case VP8_STATUS_INVALID_PARAM: return "invalid parameter";
    case VP8_STATUS_BITSTREAM_ERROR: return "bitstream error";
    case VP8_STATUS_UNSUPPORTED_FEATURE: return "unsupported feature";
    case VP8_STATUS_SUSPENDED: return "suspended";
    case VP8_STATUS_USER_ABORT: return "user abort";
    case VP8_STATUS_NOT_ENOUGH_DATA: return "not enough data (truncated)";
    }
    return "unknown status";
}

g3_status g3_webp_probe(const uint8_t *data, size_t size, uint64_t max_pixels,
                        g3_webp_info *info, g3_err *err)
{
    memset(info, 0, sizeof *info);
    if (max_pixels == 0 || max_pixels > G3_IMAGE_MAX_PIXELS)
        max_pixels = G3_IMAGE_MAX_PIXELS;
    if (!data || size == 0)
        return g3_fail(err, G3_ERR_FORMAT, "empty WebP data (0 bytes)");
    WebPBitstreamFeatures f;
    VP8StatusCode s = WebPGetFeatures(data, size, &f);
    if (s != VP8_STATUS_OK)
        return g3_fail(err, G3_ERR_FORMAT, "not a decodable WebP image (%zu bytes): %s", size,
                       vp8_status_name(s));
    if (f.width <= 0 || f.height <= 0)
        return g3_fail(err, G3_ERR_FORMAT, "WebP image has zero size (%d x %d)", f.width,
                       f.height);
    if (f.width > G3_IMAGE_MAX_SIDE || f.height > G3_IMAGE_MAX_SIDE ||
        (uint64_t)f.width * (uint64_t)f.height > max_pixels)
        return g3_fail(err, G3_ERR_ARG,
                       "WebP image of %d x %d pixels is too large (limits: %d per side, %llu "
                       "pixels)",
                       f.width, f.height, G3_IMAGE_MAX_SIDE, (unsigned long long)max_pixels);
    info->width = f.width;
    info->height = f.height;
    info->has_alpha = f.has_alpha;
    info->animated = f.has_animation;
    if (f.has_animation)
        return g3_fail(err, G3_ERR_UNSUPPORTED,
                       "animated WebP (%d x %d) is not decoded here; use its first frame", f.width,
                       f.height);
    return G3_OK;
}

g3_status g3_webp_decode(const uint8_t *data, size_t size, const g3_webp_info *info, int channels,
                         uint8_t *out, g3_err *err)
{
    if (channels != 3 && channels != 4)
        return g3_fail(err, G3_ERR_ARG, "WebP decode: channels must be 3 or 4, got %d", channels);
    size_t stride = (size_t)info->width * (size_t)channels;
    size_t n = stride * (size_t)info->height;
    uint8_t *r = channels == 4 ? WebPDecodeRGBAInto(data, size, out, n, (int)stride)
                               : WebPDecodeRGBInto(data, size, out, n, (int)stride);
    if (!r)
        return g3_fail(err, G3_ERR_FORMAT,
                       "WebP image data (%d x %d, %zu bytes) is truncated or corrupt",
                       info->width, info->height, size);
    return G3_OK;
}

/* ---------------------------------------------------------------------------------------------
 * Resampling
 */
typedef struct {
    int ksize;      /* taps per output (max) */
    int *first;     /* (out) first input index */
    int *count;     /* (out) number of taps */
    int32_t *w;     /* (out, ksize) fixed-point weights */
} taps;

static void taps_free(taps *t)
{
    free(t->first);
    free(t->count);
    free(t->w);
}

static double triangle(double x)
{
    x = fabs(x);
    return x < 1.0 ? 1.0 - x : 0.0;
}

static g3_status taps_build(int in, int out, taps *t, g3_err *err)
{
    memset(t, 0, sizeof *t);
    double scale = (double)in / out;
    double fs = scale < 1.0 ? 1.0 : scale;
    double support = fs; /* the triangle's support is 1, scaled */
    t->ksize = (int)ceil(support) * 2 + 1;
    double *acc = malloc((size_t)t->ksize * sizeof *acc);
    t->first = malloc((size_t)out * sizeof *t->first);
    t->count = malloc((size_t)out * sizeof *t->count);
    t->w = calloc((size_t)out * (size_t)t->ksize, sizeof *t->w);
    if (!acc || !t->first || !t->count || !t->w) {
        free(acc);
        taps_free(t);
        return g3_fail(err, G3_ERR_NOMEM, "out of memory for resize weights (%d -> %d)", in, out);
    }
    for (int o = 0; o < out; o++) {
        double centre = (o + 0.5) * scale;
        int lo = (int)(centre - support + 0.5);
        int hi = (int)(centre + support + 0.5);
        if (lo < 0)
            lo = 0;
        if (hi > in)
            hi = in;
        int n = hi - lo;
        double sum = 0.0;
        for (int k = 0; k < n; k++) {
            acc[k] = triangle((k + lo - centre + 0.5) / fs);
            sum += acc[k];
        }
        int32_t *w = &t->w[(size_t)o * (size_t)t->ksize];
        for (int k = 0; k < n; k++) {
            double v = sum != 0.0 ? acc[k] / sum : acc[k];
            double f = v * (double)(1 << G3_RESAMPLE_BITS);
            w[k] = (int32_t)(v < 0 ? f - 0.5 : f + 0.5);
        }
        t->first[o] = lo;
        t->count[o] = n;
    }
    free(acc);
    return G3_OK;
}

static inline uint8_t clamp_fixed(int32_t s)
{
    s >>= G3_RESAMPLE_BITS; /* arithmetic shift (gcc/clang): rounds towards -inf */
    return (uint8_t)(s < 0 ? 0 : s > 255 ? 255 : s);
}

/* rows [0, h) of src (w_in wide) -> dst (h, w_out), c channels */
static void pass_horizontal(const uint8_t *src, size_t sstride, int h, int c, const taps *t,
                            uint8_t *dst, int w_out)
{
    for (int y = 0; y < h; y++) {
        const uint8_t *row = src + (size_t)y * sstride;
        uint8_t *o = dst + (size_t)y * (size_t)w_out * (size_t)c;
        for (int x = 0; x < w_out; x++) {
            const int32_t *w = &t->w[(size_t)x * (size_t)t->ksize];
            const uint8_t *p = row + (size_t)t->first[x] * (size_t)c;
            for (int ch = 0; ch < c; ch++) {
                int32_t s = 1 << (G3_RESAMPLE_BITS - 1);
                for (int k = 0; k < t->count[x]; k++)
                    s += (int32_t)p[(size_t)k * (size_t)c + (size_t)ch] * w[k];
                o[(size_t)x * (size_t)c + (size_t)ch] = clamp_fixed(s);
            }
        }
    }
}

/* src (.., w*c) rows with stride; output row y reads input rows first[y] - row0 .. */
static void pass_vertical(const uint8_t *src, size_t sstride, int row0, int w, int c,
                          const taps *t, uint8_t *dst, int h_out)
{
    size_t n = (size_t)w * (size_t)c;
    for (int y = 0; y < h_out; y++) {
        const int32_t *wt = &t->w[(size_t)y * (size_t)t->ksize];
        const uint8_t *base = src + (size_t)(t->first[y] - row0) * sstride;
        uint8_t *o = dst + (size_t)y * n;
        for (size_t i = 0; i < n; i++) {
            int32_t s = 1 << (G3_RESAMPLE_BITS - 1);
            for (int k = 0; k < t->count[y]; k++)
                s += (int32_t)base[(size_t)k * sstride + i] * wt[k];
            o[i] = clamp_fixed(s);
        }
    }
}

g3_status g3_image_resize_bilinear_u8(const uint8_t *src, int sw, int sh, size_t src_stride,
                                      int c, uint8_t *dst, int dw, int dh, g3_err *err)
{
    if (sw <= 0 || sh <= 0 || dw <= 0 || dh <= 0 || c < 1 || c > 4)
        return g3_fail(err, G3_ERR_ARG, "resize: bad sizes %d x %d -> %d x %d (channels %d)", sw,
                       sh, dw, dh, c);
    if (sw > G3_IMAGE_MAX_SIDE || sh > G3_IMAGE_MAX_SIDE || dw > G3_IMAGE_MAX_SIDE ||
        dh > G3_IMAGE_MAX_SIDE)
        return g3_fail(err, G3_ERR_ARG, "resize: side longer than %d pixels", G3_IMAGE_MAX_SIDE);
    size_t drow = (size_t)dw * (size_t)c;
    int need_h = dw != sw, need_v = dh != sh;
    if (!need_h && !need_v) {
        for (int y = 0; y < sh; y++)
            memcpy(dst + (size_t)y * drow, src + (size_t)y * src_stride, drow);
        return G3_OK;
    }
    taps th = {0}, tv = {0};
    g3_status st = G3_OK;
    uint8_t *tmp = NULL;
    if (need_h && (st = taps_build(sw, dw, &th, err)))
        return st;
    if (need_v && (st = taps_build(sh, dh, &tv, err)))
        goto done;
    if (!need_v) {
        pass_horizontal(src, src_stride, sh, c, &th, dst, dw);
        goto done;
    }
    if (!need_h) {
        pass_vertical(src, src_stride, 0, sw, c, &tv, dst, dh);
        goto done;
    }
    if (dh < sh && sh - dh > 2 * (sw - dw)) {
        /* Pillow 13 runs the vertical pass first when the height shrinks by more than twice as
         * many pixels as the width (Pillow <= 12 always went horizontal first; the uint8
         * intermediate makes the order visible in the last bit) */
        tmp = malloc((size_t)dh * (size_t)sw * (size_t)c);
        if (!tmp) {
            st = g3_fail(err, G3_ERR_NOMEM, "out of memory for a %d x %d resize buffer", sw, dh);
            goto done;
        }
        pass_vertical(src, src_stride, 0, sw, c, &tv, tmp, dh);
        pass_horizontal(tmp, (size_t)sw * (size_t)c, dh, c, &th, dst, dw);
        goto done;
    }
    /* both: horizontal over the rows the vertical pass reads, into a uint8 intermediate */
    int r0 = tv.first[0];
    int r1 = tv.first[dh - 1] + tv.count[dh - 1];
    tmp = malloc((size_t)(r1 - r0) * drow);
    if (!tmp) {
        st = g3_fail(err, G3_ERR_NOMEM, "out of memory for a %d x %d resize buffer", dw, r1 - r0);
        goto done;
    }
    pass_horizontal(src + (size_t)r0 * src_stride, src_stride, r1 - r0, c, &th, tmp, dw);
    pass_vertical(tmp, drow, r0, dw, c, &tv, dst, dh);
done:
    free(tmp);
    taps_free(&th);
    taps_free(&tv);
    return st;
}

void g3_image_to_chw_f32(const uint8_t *src, int w, int h, float *dst)
{
    size_t plane = (size_t)w * (size_t)h;
    for (size_t i = 0; i < plane; i++)
        for (int ch = 0; ch < 3; ch++)
            dst[(size_t)ch * plane + i] = (float)(src[i * 3 + (size_t)ch] / 127.5 - 1.0);
}
