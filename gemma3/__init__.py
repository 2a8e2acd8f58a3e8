"""gemma3 — run and study Google's Gemma 3 models on the CPU.

The C core (``gemma3._core``) is private; this package re-exports the public API.
"""

from ._core import FormatError, UnsupportedError
from ._default import default_model_path
from .gguf import GGUFFile, GGUFWriter, TensorInfo

__all__ = [
    "FormatError",
    "UnsupportedError",
    "GGUFFile",
    "GGUFWriter",
    "TensorInfo",
    "default_model_path",
]
__version__ = "0.1.0"
