"""gemma3 — run and study Google's Gemma 3 models on the CPU.

The C core (``gemma3._core``) is private; this package re-exports the public API.
"""

import os as _os

# OpenMP threads that spin after a parallel region take the CPU from OpenBLAS's threads and from
# other processes; on a busy 2-core machine decode ran 3-4x slower with the default spin. Keep the
# spin short unless the user chose a policy (must be set before libgomp loads with _core).
if "OMP_WAIT_POLICY" not in _os.environ and "GOMP_SPINCOUNT" not in _os.environ:
    _os.environ["GOMP_SPINCOUNT"] = "20000"



def _openblas_coretype() -> str | None:
    """Debian's OpenBLAS 0.3.21 does not recognize recent Xeons and falls back to its Prescott
    (SSE3) kernels: sgemm ran 4x slower (pp512 53 vs 135 t/s on the 270M). Name the right kernel
    family from the CPU flags; OpenBLAS reads OPENBLAS_CORETYPE when it loads with _core."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((ln.split(":", 1)[1].split() for ln in f if ln.startswith("flags")), [])
    except OSError:
        return None
    fl = set(flags)
    if {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= fl:
        return "SkylakeX"
    if {"avx2", "fma"} <= fl:
        return "Haswell"
    return None


if "OPENBLAS_CORETYPE" not in _os.environ and (_ct := _openblas_coretype()):
    _os.environ["OPENBLAS_CORETYPE"] = _ct

from ._core import FormatError, UnsupportedError  # noqa: E402
from ._default import default_model_path  # noqa: E402
from .config import Gemma3Config
from .gguf import GGUFFile, GGUFWriter, TensorInfo
from .model import GenerationConfig, Model, load, set_num_threads
from .speculative import PromptLookup
from .speculative import Stats as SpeculativeStats
from .state import State
from .tokenizer import Tokenizer

__all__ = [
    "FormatError",
    "UnsupportedError",
    "GGUFFile",
    "GGUFWriter",
    "TensorInfo",
    "Gemma3Config",
    "GenerationConfig",
    "Model",
    "PromptLookup",
    "SpeculativeStats",
    "State",
    "Tokenizer",
    "default_model_path",
    "load",
    "set_num_threads",
]
__version__ = "0.1.0"
