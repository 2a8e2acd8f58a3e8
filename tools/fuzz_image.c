/* fuzz_image.c — libFuzzer harness for the image input path: WebP probe/decode (libwebp) and the
 * Pillow-exact bilinear resize + normalisation of csrc/vision/image.c.
 *
 * Build and run with tools/fuzz.sh image SECONDS. Every input goes through g3_webp_probe as a
 * whole (arbitrary bytes). Then, by its first bytes:
 *   "RIFF....WEBP"  decode (RGB or RGBA as the file says; RGB too for alpha files), and resize the
 *                   picture and its pan & scan crops (views into the decoded pixels with the
 *                   parent's row stride, boxes computed as gemma3.image.pan_and_scan does) to a
 *                   small size taken from the input's last bytes; to_chw on the RGB results;
 *   anything else   a raw resize: a 10-byte header gives source and destination sizes (up to and
 *                   past the 16384 limit), channels and a row padding; the pixels are the rest of
 *                   the input repeated. Out-of-range sizes must be rejected without reading src.
 * Every buffer is a heap block of exactly the promised size, so any stray read or write is an
 * ASan report. libwebp itself is the system library (not instrumented).
 */
#include <stdlib.h>
#include <string.h>

#include "vision/image.h"

#define MAX_DECODE_PIXELS (1u << 22) /* bigger pictures are probed only: keeps executions fast */
#define MAX_RAW_PIXELS (1u << 18)
#define MAX_DST_PIXELS (1u << 18)

static volatile uint8_t sink; /* defeats dead-read elimination */

static void check_failure(g3_status st, const g3_err *err)
{
    size_t len = strnlen(err->msg, sizeof err->msg);
    if (st == G3_OK || len == 0 || len == sizeof err->msg)
        __builtin_trap(); /* a failure must carry a real message */
}

/* resize src (sh, sw, c) with row stride to (dh, dw, c); normalise if c == 3 */
static void resize_one(const uint8_t *src, int sw, int sh, size_t stride, int c, int dw, int dh)
{
    uint8_t *dst = malloc((size_t)dw * (size_t)dh * (size_t)c);
    if (!dst)
        return;
    g3_err err = {{0}, 0};
    g3_status st = g3_image_resize_bilinear_u8(src, sw, sh, stride, c, dst, dw, dh, &err);
    if (st != G3_OK) {
        check_failure(st, &err);
        __builtin_trap(); /* every size here is valid: resize must succeed */
    }
    sink ^= dst[0] ^ dst[(size_t)dw * (size_t)dh * (size_t)c - 1];
    if (c == 3) {
        float *chw = malloc((size_t)dw * (size_t)dh * 3 * sizeof *chw);
        if (chw) {
            g3_image_to_chw_f32(dst, dw, dh, chw);
            if (!(chw[0] >= -1.0f && chw[0] <= 1.0f))
                __builtin_trap();
            free(chw);
        }
    }
    free(dst);
}

/* gemma3.image.pan_and_scan's boxes for an (h, w) picture; returns the count (0 or 2..max) */
static int pan_and_scan_boxes(int w, int h, int min_crop, int max_crops, int box[][4])
{
    int n_w = 1, n_h = 1;
    int lng = w >= h ? w : h, sht = w >= h ? h : w;
    if ((double)lng / sht < 1.2)
        return 0;
    int n = (int)((double)lng / sht + 0.5);
    if (lng / min_crop < n)
        n = lng / min_crop;
    n = n < 2 ? 2 : n;
    n = n > max_crops ? max_crops : n;
    if (w >= h)
        n_w = n;
    else
        n_h = n;
    int cw = (w + n_w - 1) / n_w, ch = (h + n_h - 1) / n_h;
    if ((cw < ch ? cw : ch) < min_crop)
        return 0;
    int k = 0;
    for (int y = 0; y < ch * n_h && y < h; y += ch)
        for (int x = 0; x < cw * n_w && x < w; x += cw) {
            box[k][0] = x;
            box[k][1] = y;
            box[k][2] = x + cw < w ? x + cw : w;
            box[k][3] = y + ch < h ? y + ch : h;
            k++;
        }
    return k;
}

static void fuzz_webp(const uint8_t *data, size_t size, const g3_webp_info *info)
{
    /* the sizes to resize to come from the last bytes (part of the file, so mutating them also
     * mutates the bitstream or its trailer) */
    int dw = 1 + data[size - 1] % 48, dh = 1 + data[size - 2] % 48;
    int min_crop = 1 + data[size - 3] % 64, max_crops = 2 + data[size - 4] % 7;
    if ((uint64_t)info->width * (uint64_t)info->height > MAX_DECODE_PIXELS)
        return;
    for (int pass = 0; pass < 1 + info->has_alpha; pass++) {
        int c = pass == 0 && info->has_alpha ? 4 : 3;
        size_t stride = (size_t)info->width * (size_t)c;
        uint8_t *px = malloc(stride * (size_t)info->height);
        if (!px)
            return;
        g3_err err = {{0}, 0};
        g3_status st = g3_webp_decode(data, size, info, c, px, &err);
        if (st != G3_OK) {
            check_failure(st, &err);
            free(px);
            return;
        }
        resize_one(px, info->width, info->height, stride, c, dw, dh);
        int box[8][4];
        int n = pan_and_scan_boxes(info->width, info->height, min_crop, max_crops, box);
        for (int i = 0; i < n; i++) {
            const uint8_t *v = px + (size_t)box[i][1] * stride + (size_t)box[i][0] * (size_t)c;
            resize_one(v, box[i][2] - box[i][0], box[i][3] - box[i][1], stride, c, dw, dh);
        }
        free(px);
    }
}

static int rd16(const uint8_t *p) { return p[0] | p[1] << 8; }

static void fuzz_raw(const uint8_t *data, size_t size)
{
    if (size < 10)
        return;
    int sw = rd16(data) % 16400, sh = rd16(data + 2) % 16400; /* a little past the limit */
    int dw = rd16(data + 4) % 16400, dh = rd16(data + 6) % 16400;
    int c = data[8] % 6;    /* 0 and 5 are invalid */
    int pad = data[9] % 17; /* extra bytes per source row, as a crop's parent stride */
    const uint8_t *fill = data + 10;
    size_t nfill = size - 10;
    int valid = sw >= 1 && sh >= 1 && dw >= 1 && dh >= 1 && c >= 1 && c <= 4 &&
                sw <= G3_IMAGE_MAX_SIDE && sh <= G3_IMAGE_MAX_SIDE && dw <= G3_IMAGE_MAX_SIDE &&
                dh <= G3_IMAGE_MAX_SIDE;
    if (!valid) {
        /* must be rejected before touching src or dst: give it one-byte buffers */
        uint8_t *one = malloc(1), *out = malloc(1);
        g3_err err = {{0}, 0};
        g3_status st = g3_image_resize_bilinear_u8(one, sw, sh, (size_t)sw * 4, c, out, dw, dh,
                                                   &err);
        check_failure(st, &err);
        free(one);
        free(out);
        return;
    }
    if ((uint64_t)sw * (uint64_t)sh > MAX_RAW_PIXELS || (uint64_t)dw * (uint64_t)dh > MAX_DST_PIXELS)
        return;
    size_t stride = (size_t)sw * (size_t)c + (size_t)pad;
    /* the last row is exactly sw * c long: a crop's last row ends where its parent's data may */
    size_t n = stride * (size_t)(sh - 1) + (size_t)sw * (size_t)c;
    uint8_t *src = malloc(n);
    if (!src)
        return;
    for (size_t i = 0; i < n; i++)
        src[i] = nfill ? fill[i % nfill] : (uint8_t)i;
    resize_one(src, sw, sh, stride, c, dw, dh);
    free(src);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    g3_webp_info info;
    g3_err err = {{0}, 0};
    g3_status st = g3_webp_probe(data, size, 0, &info, &err);
    if (st != G3_OK)
        check_failure(st, &err);
    else if (info.width <= 0 || info.height <= 0 || info.width > G3_IMAGE_MAX_SIDE ||
             info.height > G3_IMAGE_MAX_SIDE)
        __builtin_trap(); /* probe promised sane dimensions */
    else if (size >= 16)
        fuzz_webp(data, size, &info);
    if (size < 12 || memcmp(data, "RIFF", 4) != 0 || memcmp(data + 8, "WEBP", 4) != 0)
        fuzz_raw(data, size);
    return 0;
}
