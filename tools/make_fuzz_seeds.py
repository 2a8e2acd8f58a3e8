"""Writes the seed corpus of a fuzz target (tools/fuzz.sh): small valid inputs.

    python tools/make_fuzz_seeds.py OUT_DIR [TARGET]     # TARGET: gguf (default) or image

Seeded and deterministic. Each seed stays under a few KiB so the fuzzer can mutate it quickly.

gguf: small GGUF files made with GGUFWriter, covering every metadata value type, string arrays,
empty arrays, non-default alignment, and tensors of several types and ranks (the real 270M file is
far too large to be a seed).
image: small WebP files made with Pillow: lossy and lossless, with and without alpha, animated,
odd sizes and aspect ratios that trigger pan & scan crops.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from gemma3 import GGUFWriter


def seeds(rng: np.random.Generator) -> dict[str, bytes]:
    out = {}

    w = GGUFWriter()
    out["empty"] = w.to_bytes()

    w = GGUFWriter()
    for t, v in [("UINT8", 7), ("INT8", -7), ("UINT16", 700), ("INT16", -700), ("UINT32", 7e5),
                 ("INT32", -7e5), ("FLOAT32", 0.5), ("BOOL", True), ("UINT64", 2**40),
                 ("INT64", -(2**40)), ("FLOAT64", 0.25)]:  # fmt: skip
        w.add(f"v.{t.lower()}", int(v) if "FLOAT" not in t and t != "BOOL" else v, type=t)
    w.add("v.str", "héllo")
    w.add("v.strs", ["<pad>", "<eos>", "▁the", ""])
    w.add("v.ints", np.arange(6, dtype=np.int32))
    w.add("v.f32s", np.linspace(-1, 1, 5, dtype=np.float32))
    w.add("v.empty", np.array([], dtype=np.uint8))
    out["metadata_only"] = w.to_bytes()

    for align, types in [(32, ["F32", "F16", "Q8_0"]), (64, ["Q4_0", "Q4_K", "Q6_K", "BF16"]),
                         (16, ["Q5_0", "Q4_1", "Q5_K"])]:  # fmt: skip
        w = GGUFWriter(alignment=align)
        w.add("general.architecture", "gemma3")
        w.add("gemma3.block_count", 1)
        for i, ty in enumerate(types):
            shape = [(256,), (2, 256), (1, 2, 256), (1, 1, 1, 256)][i % 4]
            x = rng.standard_normal(shape).astype(np.float32)
            w.add_tensor(f"blk.0.{ty.lower()}.weight", x, type=ty)
        out[f"tensors_align{align}"] = w.to_bytes()

    # types without a quantizer here: raw random blocks (any bit pattern must decode safely)
    w = GGUFWriter()
    for ty, nbytes in [("Q2_K", 84), ("Q3_K", 110), ("IQ4_XS", 136), ("IQ4_NL", 18),
                       ("IQ2_XXS", 66)]:  # fmt: skip
        blk = 32 if ty == "IQ4_NL" else 256
        w.add_tensor(f"raw.{ty.lower()}", rng.integers(0, 256, 2 * nbytes, dtype=np.uint8),
                     type=ty, raw_shape=(2, blk))
    out["raw_blocks"] = w.to_bytes()

    w = GGUFWriter()
    w.add_tensor("a", np.zeros(0, np.float32))
    w.add_tensor("b", np.ones((3, 5), np.float32))
    w.add_tensor("c", np.arange(4, dtype=np.int32))
    out["odd_shapes"] = w.to_bytes()
    return out


def image_seeds(rng: np.random.Generator) -> dict[str, bytes]:
    import io

    from PIL import Image

    def webp(frames, **kw) -> bytes:
        ims = [Image.fromarray(f) for f in frames]
        b = io.BytesIO()
        ims[0].save(b, "WEBP", save_all=len(ims) > 1, append_images=ims[1:], **kw)
        return b.getvalue()

    def noise(h, w, c):
        return rng.integers(0, 256, (h, w, c), dtype=np.uint8)

    def smooth(h, w, c):  # compresses well, so larger pictures stay small files
        y, x = np.mgrid[0:h, 0:w]
        return np.stack([(x * 255 // max(w - 1, 1) + 37 * k) % 256 + 0 * y
                         for k in range(c)], axis=2).astype(np.uint8)

    return {
        "rgb_8x8_lossy.webp": webp([noise(8, 8, 3)], quality=50),
        "rgb_33x17_lossless.webp": webp([noise(17, 33, 3)], lossless=True),
        "rgba_16x12_lossy.webp": webp([noise(12, 16, 4)], quality=30),
        "rgba_9x7_lossless.webp": webp([noise(7, 9, 4)], lossless=True),
        "rgb_1x1.webp": webp([noise(1, 1, 3)], lossless=True),
        "wide_300x40.webp": webp([smooth(40, 300, 3)], quality=20),
        "tall_24x200_alpha.webp": webp([smooth(200, 24, 4)], lossless=True),
        "animated_8x8.webp": webp([noise(8, 8, 3), noise(8, 8, 3)], duration=50),
        "exact_lossless_alpha.webp": webp([noise(5, 6, 4)], lossless=True, exact=True),
    }


def main(argv: list[str]) -> int:
    if len(argv) not in (2, 3) or (len(argv) == 3 and argv[2] not in ("gguf", "image")):
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    d = Path(argv[1])
    d.mkdir(parents=True, exist_ok=True)
    target = argv[2] if len(argv) == 3 else "gguf"
    rng = np.random.default_rng(0)
    if target == "gguf":
        out = {f"{name}.gguf": data for name, data in seeds(rng).items()}
    else:
        out = image_seeds(rng)
    for name, data in out.items():
        (d / name).write_bytes(data)
        print(f"{d / name}: {len(data)} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
