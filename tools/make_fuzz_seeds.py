"""Writes the seed corpus for tools/fuzz_gguf.c: small valid GGUF files made with GGUFWriter.

    python tools/make_fuzz_seeds.py OUT_DIR

Seeded and deterministic. Covers every metadata value type, string arrays, empty arrays,
non-default alignment, and tensors of several types and ranks. Each seed stays under a few KiB so
libFuzzer can mutate it quickly (the real 270M file is far too large to be a seed).
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


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    d = Path(argv[1])
    d.mkdir(parents=True, exist_ok=True)
    for name, data in seeds(np.random.default_rng(0)).items():
        (d / f"{name}.gguf").write_bytes(data)
        print(f"{d / name}.gguf: {len(data)} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
