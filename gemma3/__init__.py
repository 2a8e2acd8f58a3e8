from gemma3._core import FormatError, UnsupportedError
