"""Encoding one 896 x 896 image with the full Gemma 3 vision tower: gemma3 (f32 and bf16 modes)
vs transformers (float32, and under torch.autocast(bfloat16)) vs llama.cpp's CLIP encoder.

    python benchmarks/bench_vision.py [--threads 2] [--rounds 3] [--runs 1] [--warmup 1]
                                      [--peer-python /work/refvenv/bin/python]
                                      [--llama-python /work/llamavenv/bin/python]
                                      [--engines g3-f32 g3-bf16 hf-fp32 hf-bf16 llama-f16 ...]
                                      [--layers 27] [--out benchmarks/results/vision.md]

The tower has the real shapes (SigLIP: 27 layers, width 1152, MLP 4304, 16 heads of 72, patch
14 -> 4096 patches; projector: 4 x 4 average pool -> 256 tokens, RMSNorm, projection) with random
weights. The projection goes to width 640, the embedded 270M's, so that llama.cpp can pair the
mmproj with a real text model (its mtmd context needs one of the projector's width); the
projection is 0.2 GFLOP of the tower's 5.5 TFLOP. Two random mmproj GGUFs are written once
(~/.cache/gemma3/bench/): F32 (the f32 mode's checkpoint class) and F16 (llama.cpp's own
mmproj type; the bf16 mode's class). transformers builds the same architecture in its own
process with random weights of the same scale (timing does not depend on the values).

Method (as bench_generate.py): every measurement is a fresh process of one engine with its own
default environment (this script passes its environment on unchanged and imports no engine
itself); a process loads, encodes `--warmup` times, then times `--runs` encodes (median).
`--rounds` rounds run the engines in alternating order; the table gives the median over rounds,
GFLOP/s, and ratios. The machine's peaks are measured in the peer's process the same way: a
4096^3 torch.mm in float32 (OpenBLAS/oneDNN sgemm) and in bfloat16, at the same thread count.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

D, F, L_FULL, H, IMG, PATCH, TEXT = 1152, 4304, 27, 16, 896, 14, 640
P = (IMG // PATCH) ** 2
CACHE = Path(os.path.expanduser("~/.cache/gemma3/bench"))
ENGINES = ("g3-f32", "g3-bf16", "hf-fp32", "hf-bf16", "llama-f32", "llama-f16")


def flop(layers: int) -> float:
    per_layer = 2 * P * (4 * D * D + 2 * D * F) + 4 * P * P * D
    return layers * per_layer + 2 * P * 3 * PATCH * PATCH * D + 2 * 256 * D * TEXT


def cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    fl = set(line.split(":")[1].split())
                    keep = ["avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16",
                            "amx_tile"]
                    return " ".join(k for k in keep if k in fl)
    except OSError:
        pass
    return platform.machine()


# ---- the random checkpoints ----------------------------------------------------------------------

def mmproj_path(kind: str, layers: int) -> Path:
    return CACHE / f"mmproj-gemma3-random-{layers}l-{kind.lower()}.gguf"


def write_mmproj(path: Path, kind: str, layers: int, seed: int = 0) -> None:
    """A llama.cpp-style Gemma 3 mmproj (keys and names as gemma3.convert.hf_to_mmproj_gguf
    writes them), matrices N(0, 1/fan_in) in `kind` (F32 or F16), vectors F32."""
    import numpy as np

    from gemma3 import GGUFWriter

    rng = np.random.default_rng(seed)
    w = GGUFWriter()
    w.add("general.architecture", "clip")
    w.add("general.name", "gemma3-random-vision")
    w.add("general.file_type", {"F32": 0, "F16": 1}[kind], type="UINT32")
    w.add("clip.projector_type", "gemma3")
    w.add("clip.has_vision_encoder", True)
    w.add("clip.has_text_encoder", False)
    w.add("clip.use_gelu", True)
    k = "clip.vision."
    for key, val in (("image_size", IMG), ("patch_size", PATCH), ("embedding_length", D),
                     ("feed_forward_length", F), ("block_count", layers),
                     ("attention.head_count", H), ("projection_dim", TEXT)):
        w.add(k + key, val, type="UINT32")
    w.add(k + "attention.layer_norm_epsilon", 1e-6, type="FLOAT32")
    w.add(k + "image_mean", [0.5, 0.5, 0.5], elem_type="FLOAT32")
    w.add(k + "image_std", [0.5, 0.5, 0.5], elem_type="FLOAT32")

    def matrix(name, shape, fan_in, t=kind):
        def chunks():
            rows = shape[0]
            for r in range(0, rows, 256):
                n = min(256, rows - r)
                a = rng.standard_normal((n, *shape[1:]), dtype=np.float32) * fan_in ** -0.5
                yield a.astype({"F32": np.float32, "F16": np.float16}[t]).tobytes()
        w.add_tensor_stream(name, shape, t, chunks)

    def vec(name, n, loc=0.0, scale=0.02):
        w.add_tensor(name, (loc + rng.standard_normal(n) * scale).astype(np.float32), type="F32")

    matrix("v.patch_embd.weight", (D, 3, PATCH, PATCH), 3 * PATCH * PATCH, "F32")
    vec("v.patch_embd.bias", D)
    w.add_tensor("v.position_embd.weight",
                 (rng.standard_normal((P, D)) * 0.02).astype(np.float32), type="F32")
    for i in range(layers):
        b = f"v.blk.{i}."
        for o in ("attn_q", "attn_k", "attn_v", "attn_out"):
            matrix(b + o + ".weight", (D, D), D)
            vec(b + o + ".bias", D)
        matrix(b + "ffn_up.weight", (F, D), D)
        vec(b + "ffn_up.bias", F)
        matrix(b + "ffn_down.weight", (D, F), F)
        vec(b + "ffn_down.bias", D)
        for o in ("ln1", "ln2"):
            vec(b + o + ".weight", D, 1.0, 0.05)
            vec(b + o + ".bias", D)
    vec("v.post_ln.weight", D, 1.0, 0.05)
    vec("v.post_ln.bias", D)
    vec("mm.soft_emb_norm.weight", D, 1.0, 0.05)
    matrix("mm.input_projection.weight", (D, TEXT), D)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    w.write(tmp)
    tmp.replace(path)


# ---- workers (one engine per process) ------------------------------------------------------------

def timed(fn, runs: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def g3_worker(engine: str, layers: int, threads: int, runs: int, warmup: int) -> dict:
    import numpy as np

    import gemma3
    from gemma3 import vision as V

    gemma3.set_num_threads(threads)
    mode = engine.split("-")[1]
    path = mmproj_path("F32" if mode == "f32" else "F16", layers)
    t = time.perf_counter()
    tower = V.load_mmproj(path)  # the default mode of the file's precision class
    load = time.perf_counter() - t
    assert tower.dtype == mode, (tower.dtype, mode)
    px = np.random.default_rng(0).uniform(-1, 1, (1, 3, IMG, IMG)).astype(np.float32)
    out = {}

    def run():
        out["y"] = tower.encode(px)

    times = timed(run, runs, warmup)
    return {"times": times, "load": load, "compute": tower.compute,
            "finite": bool(np.isfinite(out["y"]).all()), "isa": gemma3._core.isa()["selected"]}


def hf_worker(engine: str, layers: int, threads: int, runs: int, warmup: int) -> dict:
    import torch
    from transformers import Gemma3Config, SiglipVisionConfig, SiglipVisionModel
    from transformers.models.gemma3.modeling_gemma3 import Gemma3MultiModalProjector

    torch.set_num_threads(threads)
    vc = SiglipVisionConfig(hidden_size=D, intermediate_size=F, num_hidden_layers=layers,
                            num_attention_heads=H, image_size=IMG, patch_size=PATCH,
                            layer_norm_eps=1e-6, hidden_act="gelu_pytorch_tanh",
                            vision_use_head=False)
    cfg = Gemma3Config(vision_config=vc.to_dict(), text_config={"hidden_size": TEXT},
                       mm_tokens_per_image=256)
    torch.manual_seed(0)
    t = time.perf_counter()
    tower = SiglipVisionModel(vc).eval()
    proj = Gemma3MultiModalProjector(cfg).eval()
    with torch.no_grad():  # the mmproj's scales: activations stay O(1) through 27 layers
        for name, p in list(tower.named_parameters()) + list(proj.named_parameters()):
            if p.ndim >= 2:
                fan_in = p[0].numel() if "mm_input" not in name else p.shape[0]
                p.normal_(0.0, fan_in ** -0.5)
            else:
                p.normal_(0.0, 0.02)
    load = time.perf_counter() - t
    px = torch.rand(1, 3, IMG, IMG) * 2 - 1
    bf16 = engine == "hf-bf16"
    out = {}

    def run():
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out["y"] = proj(tower(pixel_values=px).last_hidden_state)

    times = timed(run, runs, warmup)
    return {"times": times, "load": load, "finite": bool(torch.isfinite(out["y"]).all()),
            "torch": torch.__version__, "attn": tower.config._attn_implementation,
            "threads": torch.get_num_threads()}


def peak_worker(threads: int) -> dict:
    """The machine's matrix-product peaks as torch reaches them: 4096^3 mm, float32 and bf16."""
    import torch

    torch.set_num_threads(threads)
    n = 4096
    res = {}
    for name, dt in (("f32", torch.float32), ("bf16", torch.bfloat16)):
        a, b = torch.randn(n, n).to(dt), torch.randn(n, n).to(dt)
        times = timed(lambda: torch.mm(a, b), 3, 1)
        res[name] = 2 * n ** 3 / min(times) / 1e9
    return res


def g3_peak_worker(threads: int) -> dict:
    """Our bf16 GEMM alone at a tower shape (fc1: 4096 x 4304 x 1152), packing included."""
    import numpy as np

    import gemma3

    gemma3.set_num_threads(threads)
    rng = np.random.default_rng(0)
    a = rng.standard_normal((P, D), dtype=np.float32)
    w = rng.standard_normal((F, D), dtype=np.float32)
    gemm = gemma3._core.VisionTower.bf16_gemm
    times = timed(lambda: gemm(a, w), 3, 1)
    return {"bf16_gemm": 2 * P * F * D / min(times) / 1e9}


def llama_worker(engine: str, layers: int, threads: int, runs: int, warmup: int,
                 text_model: str) -> dict:
    """llama.cpp's CLIP encoder through libmtmd (llama_cpp.mtmd_cpp): the mmproj paired with the
    270M text model (same projection width), one 896 x 896 picture tokenized once, then
    mtmd_encode_chunk timed (the tower + projector; preprocessing is in mtmd_tokenize)."""
    import ctypes

    import numpy as np

    import llama_cpp
    from llama_cpp import mtmd_cpp as mt

    kind = "F32" if engine == "llama-f32" else "F16"
    llama_cpp.llama_backend_init()
    load_model = getattr(llama_cpp, "llama_model_load_from_file", None) or \
        llama_cpp.llama_load_model_from_file
    model = load_model(text_model.encode(), llama_cpp.llama_model_default_params())
    if not model:
        raise RuntimeError(f"llama.cpp could not load {text_model}")
    cp = mt.mtmd_context_params_default()
    cp.n_threads = threads
    cp.use_gpu = False
    cp.print_timings = False
    if hasattr(cp, "warmup"):
        cp.warmup = False
    t = time.perf_counter()
    ctx = mt.mtmd_init_from_file(str(mmproj_path(kind, layers)).encode(), model, cp)
    load = time.perf_counter() - t
    if not ctx:
        raise RuntimeError("mtmd_init_from_file failed")
    rgb = np.random.default_rng(0).integers(0, 256, (IMG, IMG, 3), dtype=np.uint8)
    data = (ctypes.c_uint8 * rgb.size).from_buffer_copy(rgb.tobytes())
    bmp = mt.mtmd_bitmap_init(IMG, IMG, data)
    chunks = mt.mtmd_input_chunks_init()
    text = mt.mtmd_input_text()
    text.text = mt.mtmd_default_marker()
    if any(f[0] == "text_len" for f in mt.mtmd_input_text._fields_):  # 0.3.36 has a length
        text.text_len = len(text.text)
    text.add_special = False
    text.parse_special = True
    bitmaps = (mt.mtmd_bitmap_p_ctypes * 1)(bmp)
    rc = mt.mtmd_tokenize(ctx, chunks, ctypes.byref(text), bitmaps, 1)
    if rc != 0:
        raise RuntimeError(f"mtmd_tokenize failed ({rc})")
    chunk = next(c for c in (mt.mtmd_input_chunks_get(chunks, i)
                             for i in range(mt.mtmd_input_chunks_size(chunks)))
                 if mt.mtmd_input_chunk_get_type(c) == mt.MTMD_INPUT_CHUNK_TYPE_IMAGE)
    if hasattr(mt, "mtmd_encode_chunk"):
        def run():
            if mt.mtmd_encode_chunk(ctx, chunk) != 0:
                raise RuntimeError("mtmd_encode_chunk failed")
    else:
        tokens = mt.mtmd_input_chunk_get_tokens_image(chunk)

        def run():
            if mt.mtmd_encode(ctx, tokens) != 0:
                raise RuntimeError("mtmd_encode failed")

    times = timed(run, runs, warmup)
    n = mt.mtmd_input_chunk_get_n_tokens(chunk)
    emb = np.ctypeslib.as_array(mt.mtmd_get_output_embd(ctx), shape=(n * TEXT,))
    return {"times": times, "load": load, "finite": bool(np.isfinite(emb).all()),
            "tokens": int(n), "version": llama_cpp.__version__}


# ---- orchestration -------------------------------------------------------------------------------

def run_worker(python: str, args: list[str]) -> dict:
    """One measurement in a fresh process with this process's environment, unchanged."""
    cmd = [python, os.path.abspath(__file__), *args]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def probe(python: str, code: str) -> tuple[bool, str]:
    p = subprocess.run([python, "-c", code], capture_output=True, text=True)
    return p.returncode == 0, (p.stdout + p.stderr).strip()[-800:]


def loadavg() -> str:
    try:
        return " ".join(open("/proc/loadavg").read().split()[:3])
    except OSError:
        return "?"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--layers", type=int, default=L_FULL)
    ap.add_argument("--engines", nargs="+", default=list(ENGINES), choices=ENGINES)
    ap.add_argument("--g3-python", default=sys.executable)
    ap.add_argument("--peer-python", default="/work/refvenv/bin/python")
    ap.add_argument("--llama-python", default="/work/llamavenv/bin/python")
    ap.add_argument("--out", default=None, help="also write the report (markdown) here")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--text-model", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    common = (a.layers, a.threads, a.runs, a.warmup)
    if a.worker:
        if a.worker == "peak":
            res = peak_worker(a.threads)
        elif a.worker == "g3-peak":
            res = g3_peak_worker(a.threads)
        elif a.worker.startswith("g3-"):
            res = g3_worker(a.worker, *common)
        elif a.worker.startswith("hf-"):
            res = hf_worker(a.worker, *common)
        else:
            res = llama_worker(a.worker, *common, a.text_model)
        print(json.dumps(res))
        return

    for kind in ("F32", "F16"):
        path = mmproj_path(kind, a.layers)
        if not path.exists():
            print(f"# writing {path} ...", flush=True)
            subprocess.run([a.g3_python, "-c", f"import sys; sys.path.insert(0, "
                            f"{str(Path(__file__).parent)!r}); import bench_vision as b; "
                            f"b.write_mmproj(b.Path({str(path)!r}), {kind!r}, {a.layers})"],
                           check=True)
    python = {e: a.g3_python if e.startswith("g3") else a.peer_python if e.startswith("hf")
              else a.llama_python for e in a.engines}
    notes = []
    engines = list(a.engines)
    llama = [e for e in engines if e.startswith("llama")]
    text_model = None
    if llama:
        ok, msg = probe(a.llama_python, "import llama_cpp, llama_cpp.mtmd_cpp as m; "
                        "print(llama_cpp.__version__, hasattr(m, 'mtmd_encode_chunk'))")
        if ok:
            ok2, text_model = probe(a.g3_python, "import gemma3; print(gemma3.default_model_path())")
            text_model = text_model.splitlines()[-1] if ok2 else None
        if not ok or not text_model:
            notes.append(f"llama.cpp not run: `{a.llama_python}` cannot drive libmtmd "
                         f"({msg.splitlines()[-1] if msg else 'no output'})")
            engines = [e for e in engines if not e.startswith("llama")]
    times = {e: [] for e in engines}
    info = {}
    loads = []
    for r in range(a.rounds):
        order = engines if r % 2 == 0 else engines[::-1]
        for e in order:
            args = ["--worker", e, "--layers", str(a.layers), "--threads", str(a.threads),
                    "--runs", str(a.runs), "--warmup", str(a.warmup)]
            if e.startswith("llama"):
                args += ["--text-model", text_model]
            loads.append(loadavg())
            try:
                res = run_worker(python[e], args)
            except RuntimeError as err:
                notes.append(f"{e} failed in round {r + 1}: {str(err).splitlines()[-1]}")
                continue
            times[e].append(statistics.median(res.pop("times")))
            info[e] = res
            print(f"# round {r + 1} {e}: {times[e][-1]:.2f} s (load {loads[-1]})", flush=True)
    loads.append(loadavg())
    peak = run_worker(a.peer_python, ["--worker", "peak", "--threads", str(a.threads)])
    g3peak = run_worker(a.g3_python, ["--worker", "g3-peak", "--threads", str(a.threads)])

    fl = flop(a.layers)
    med = {e: statistics.median(t) for e, t in times.items() if t}
    lines = [
        f"# vision tower, {a.layers} layers at {IMG} px ({fl / 1e12:.2f} TFLOP per image); "
        f"{platform.machine()} ({cpu_flags()}), {a.threads} threads; {a.rounds} rounds "
        f"alternating, {a.warmup} warm-up + {a.runs} run(s) per process",
        f"# load average during the rounds: {loads[0]} .. {loads[-1]} "
        f"(max 1-min {max(float(x.split()[0]) for x in loads if x != '?'):.1f})",
        f"# machine peaks ({a.threads} threads, torch.mm 4096^3): float32 {peak['f32']:.0f} "
        f"GFLOP/s, bf16 {peak['bf16']:.0f} GFLOP/s; our bf16 GEMM alone (4096 x 4304 x 1152, "
        f"packing included): {g3peak['bf16_gemm']:.0f} GFLOP/s",
        "",
        "| engine | median s | GFLOP/s | % of its peak | vs hf-fp32 | vs hf-bf16 | notes |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for e in engines:
        if e not in med:
            continue
        pk = peak["bf16"] if e in ("g3-bf16", "hf-bf16", "llama-f16") else peak["f32"]
        r32 = f"{med['hf-fp32'] / med[e]:.2f}" if "hf-fp32" in med else "-"
        r16 = f"{med['hf-bf16'] / med[e]:.2f}" if "hf-bf16" in med else "-"
        i = info.get(e, {})
        note = ", ".join(f"{k} {v}" for k, v in i.items() if k != "finite")
        if not i.get("finite", True):
            note += ", NON-FINITE OUTPUT"
        lines.append(f"| {e} | {med[e]:.2f} | {fl / med[e] / 1e9:.0f} | "
                     f"{100 * fl / med[e] / 1e9 / pk:.0f}% | {r32} | {r16} | {note} |")
    lines.append("")
    lines.append("per-round seconds: " + "; ".join(
        f"{e} " + " ".join(f"{t:.2f}" for t in times[e]) for e in engines if times[e]))
    lines += [f"note: {n}" for n in notes]
    report = "\n".join(lines)
    print(report)
    if a.out:
        Path(a.out).write_text(report + "\n")


if __name__ == "__main__":
    main()
