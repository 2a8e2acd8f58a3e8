"""Encoding one 896 x 896 image with the full-size Gemma 3 vision tower: gemma3 vs transformers.

Random weights of the real shapes (SigLIP 27 layers, width 1152, MLP 4304, 16 heads, patch 14;
projector 4 x 4 average pool -> 256 tokens, RMSNorm, projection to 2560 = the 4B's text width),
float32, CPU. Both engines use the very same weights (ours are NumPy views of the torch
parameters) and the same thread count (gemma3.set_num_threads / torch.set_num_threads). The two
are run alternately after a warm-up each; the table gives the median and the ratio.

    python benchmarks/bench_vision.py [--threads N] [--runs 3] [--warmup 1] [--layers 27]
                                      [--dtype f32|f16|bf16|q8_0] [--attn sdpa|eager]

``--layers`` shortens the tower for a quick look (the ratio barely moves: every layer is the
same work). ``--dtype`` converts our matrices on load (transformers stays float32).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import numpy as np


def cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    fl = set(line.split(":", 1)[1].split())
                    return " ".join(x for x in ("avx2", "fma", "avx512f", "avx512bw",
                                                "avx512_vnni", "amx_tile") if x in fl)
    except OSError:
        pass
    return "?"


def build_torch(layers: int, text_width: int, attn: str):
    import torch
    from transformers import Gemma3Config, SiglipVisionConfig, SiglipVisionModel
    from transformers.models.gemma3.modeling_gemma3 import Gemma3MultiModalProjector

    vc = SiglipVisionConfig(hidden_size=1152, intermediate_size=4304, num_hidden_layers=layers,
                            num_attention_heads=16, image_size=896, patch_size=14,
                            layer_norm_eps=1e-6, hidden_act="gelu_pytorch_tanh",
                            vision_use_head=False)
    vc._attn_implementation = attn
    cfg = Gemma3Config(vision_config=vc.to_dict(), text_config={"hidden_size": text_width},
                       mm_tokens_per_image=256)
    torch.manual_seed(0)
    tower = SiglipVisionModel(vc).eval()
    proj = Gemma3MultiModalProjector(cfg).eval()
    with torch.no_grad():  # keep activations O(1) through 27 random layers
        for name, p in list(tower.named_parameters()) + list(proj.named_parameters()):
            if p.ndim >= 2:
                fan_in = p[0].numel() if "mm_input" not in name else p.shape[0]
                p.normal_(0.0, fan_in ** -0.5)
            else:
                p.normal_(0.0, 0.02)
    return tower, proj


def ours_from_torch(tower, proj, layers: int, text_width: int, dtype: str | None):
    """Our tower over the torch parameters, bound by the vision role table as a Hugging Face
    checkpoint is (gemma3.loader.hf_entry: names, +1 norm, flatten, transpose, on-load dtype)."""
    from gemma3.loader import build_weights, hf_entry
    from gemma3.vision import VisionConfig, VisionTower

    sd = {k: v.detach().numpy() for k, v in tower.state_dict().items()}
    sd.update({k: v.detach().numpy() for k, v in proj.state_dict().items()})
    # transformers 5 folds SigLIP's `vision_model.`; older versions keep it
    pre = "vision_model." if any(k.startswith("vision_model.") for k in sd) else ""

    class Arrays:  # what hf_entry reads a tensor from (an open safetensors shard)
        def array(self, name):
            return sd[name]

    where = dict.fromkeys(sd, Arrays())
    cfg = VisionConfig(num_layers=layers, text_hidden_size=text_width)
    w = build_weights("vision", cfg.to_core().dims, layers,
                      lambda r, i, shape: hf_entry(where, "torch", r, i, shape,
                                                   {"v": pre, "m": ""}, dtype))
    return VisionTower(cfg, w)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--layers", type=int, default=27)
    ap.add_argument("--text-width", type=int, default=2560)
    ap.add_argument("--dtype", default=None, choices=[None, "f32", "f16", "bf16", "q8_0"])
    ap.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"],
                    help="transformers attention implementation (default sdpa, its fastest)")
    a = ap.parse_args()
    coretype = os.environ.get("OPENBLAS_CORETYPE", "(OpenBLAS's own choice)")

    import torch

    import gemma3

    gemma3.set_num_threads(a.threads)
    torch.set_num_threads(a.threads)
    tower, proj = build_torch(a.layers, a.text_width, a.attn)
    ours = ours_from_torch(tower, proj, a.layers, a.text_width, a.dtype)
    rng = np.random.default_rng(0)
    px = rng.uniform(-1, 1, (1, 3, 896, 896)).astype(np.float32)
    px_t = torch.from_numpy(px)

    def run_ours():
        return ours.encode(px)

    def run_torch():
        with torch.no_grad():
            return proj(tower(pixel_values=px_t).last_hidden_state).numpy()

    times = {"gemma3": [], "transformers": []}
    fns = {"gemma3": run_ours, "transformers": run_torch}
    outs = {}
    for name, fn in fns.items():
        for _ in range(a.warmup):
            outs[name] = fn()
    for _ in range(a.runs):
        for name, fn in fns.items():
            t = time.perf_counter()
            outs[name] = fn()
            times[name].append(time.perf_counter() - t)
    diff = float(np.abs(outs["gemma3"] - outs["transformers"]).max())
    scale = float(np.abs(outs["transformers"]).max())
    flop = a.layers * (2 * 4096 * (4 * 1152 * 1152 + 2 * 1152 * 4304) + 4 * 4096 * 4096 * 1152)
    print(f"# {platform.processor() or platform.machine()}, flags: {cpu_flags()}; "
          f"threads {a.threads} (gemma3 {gemma3._core.get_num_threads()}, torch "
          f"{torch.get_num_threads()}); torch {torch.__version__}, attention {a.attn}; "
          f"OPENBLAS_CORETYPE {coretype}")
    print(f"# tower: {a.layers} layers x 1152 wide, 4304 MLP, 16 heads, 896 px / 14 -> 4096 "
          f"patches -> 256 tokens -> {a.text_width}; gemma3 weights {a.dtype or 'f32'}; "
          f"{a.warmup} warm-up, {a.runs} runs; {flop / 1e12:.2f} TFLOP per image")
    print(f"# max |gemma3 - transformers| = {diff:.3g} (outputs up to {scale:.3g})")
    print(f"{'engine':<14}{'median s':>10}{'min s':>10}{'GFLOP/s':>10}{'ratio':>8}")
    med_t = statistics.median(times["transformers"])
    for name in ("gemma3", "transformers"):
        med = statistics.median(times[name])
        print(f"{name:<14}{med:>10.2f}{min(times[name]):>10.2f}{flop / med / 1e9:>10.1f}"
              f"{med_t / med:>8.2f}")
    ratio = med_t / statistics.median(times["gemma3"])
    print(f"speed-up of gemma3 over transformers: {ratio:.2f}x")


if __name__ == "__main__":
    main()
