"""gemma3 — run and study Google's Gemma 3 models on the CPU.

The C core (``gemma3._core``) is private; this package re-exports the public API.
"""

from ._core import FormatError, UnsupportedError
from ._default import default_model_path
from .config import Gemma3Config
from .gguf import GGUFFile, GGUFWriter, TensorInfo
from .model import GenerationConfig, Model, load, set_num_threads
from .sae import SAE
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
    "SAE",
    "PromptLookup",
    "SpeculativeStats",
    "State",
    "Tokenizer",
    "default_model_path",
    "load",
    "set_num_threads",
]
__version__ = "0.1.0"
