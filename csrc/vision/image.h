/* image.h — image input for the vision tower: WebP decoding (libwebp) and the reference image
 * processor's resize + rescale.
 *
 * Images are interleaved uint8 (h, w, c) with a row stride in bytes, so a crop is a pointer and a
 * stride into its parent (no copy). The resize reproduces Pillow's Image.resize(..., BILINEAR)
 * on 8-bit images bit-exactly (see image.c); to_chw turns (h, w, 3) uint8 into the model's
 * (3, h, w) float32 input x / 127.5 - 1.
 */
#ifndef G3_IMAGE_H
#define G3_IMAGE_H

#include "g3.h"

#define G3_IMAGE_MAX_SIDE 16384
/* Hard limits (16384^2 is also the most a WebP header can declare); callers pass a lower pixel
 * limit to g3_webp_probe, as the Python layer does (gemma3.image.MAX_PIXELS). */
#define G3_IMAGE_MAX_PIXELS (1ull << 28)

typedef struct {
    int width, height;
    int has_alpha;
    int animated;
} g3_webp_info;

/* Reads the WebP header; validates the dimensions against G3_IMAGE_MAX_SIDE and max_pixels
 * (0 or anything above G3_IMAGE_MAX_PIXELS means G3_IMAGE_MAX_PIXELS), before any pixel memory
 * exists: a few dozen bytes can declare a 16384 x 16384 picture. */
g3_status g3_webp_probe(const uint8_t *data, size_t size, uint64_t max_pixels,
                        g3_webp_info *info, g3_err *err);
/* Decodes into out (height, width, channels) with channels 3 (RGB) or 4 (RGBA, not
 * premultiplied); info must come from g3_webp_probe of the same data. */
g3_status g3_webp_decode(const uint8_t *data, size_t size, const g3_webp_info *info, int channels,
                         uint8_t *out, g3_err *err);

/* Pillow-exact BILINEAR resize of src (sh, sw, c) with row stride src_stride bytes into a
 * contiguous dst (dh, dw, c). c in 1..4. */
g3_status g3_image_resize_bilinear_u8(const uint8_t *src, int sw, int sh, size_t src_stride,
                                      int c, uint8_t *dst, int dw, int dh, g3_err *err);

/* (h, w, 3) uint8 (contiguous) -> (3, h, w) float32, x / 127.5 - 1. */
void g3_image_to_chw_f32(const uint8_t *src, int w, int h, float *dst);

#endif
