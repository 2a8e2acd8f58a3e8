"""The notebooks run top to bottom on the default model and their figures render.

Each notebook is executed with nbclient in memory (the committed file, with its outputs, is left
alone) by a kernel of *this* interpreter: a kernelspec pointing at ``sys.executable`` is written to
a temporary JUPYTER_PATH, so the test does not depend on which ``python3`` kernel is installed.
Every image output is decoded, saved to disk and checked to be a non-empty PNG.

Regenerate a committed notebook with its outputs:  python tests/test_notebooks.py --write
"""

from __future__ import annotations

import base64
import json
import os
import struct
import sys
import time
from pathlib import Path

import pytest

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
NAMES = ["attention_patterns.ipynb", "interventions.ipynb"]
KERNEL = "gemma3-test"
TIME_LIMIT_S = 180  # the issue: the notebook runs in under 3 minutes
CELL_TIMEOUT_S = 170


def _kernelspec_dir(root: Path) -> Path:
    """A kernelspec for the running interpreter under root/kernels/KERNEL; returns root."""
    d = root / "kernels" / KERNEL
    d.mkdir(parents=True, exist_ok=True)
    spec = {"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": f"Python ({sys.executable})", "language": "python"}
    (d / "kernel.json").write_text(json.dumps(spec))
    return root


def execute(path: Path, jupyter_path: Path):
    """-> (executed notebook, seconds). Runs with the notebooks directory as the working dir."""
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    old = os.environ.get("JUPYTER_PATH")
    os.environ["JUPYTER_PATH"] = str(_kernelspec_dir(jupyter_path)) + (
        os.pathsep + old if old else "")
    try:
        client = NotebookClient(nb, kernel_name=KERNEL, timeout=CELL_TIMEOUT_S,
                                resources={"metadata": {"path": str(path.parent)}})
        t = time.perf_counter()
        client.execute()
        return nb, time.perf_counter() - t
    finally:
        if old is None:
            os.environ.pop("JUPYTER_PATH", None)
        else:
            os.environ["JUPYTER_PATH"] = old


def png_size(data: bytes) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR; AssertionError if data is not a PNG."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG signature"
    assert data[12:16] == b"IHDR", "no IHDR chunk"
    return struct.unpack(">II", data[16:24])


def images(nb) -> list[tuple[int, bytes]]:
    """[(cell index, PNG bytes)] of every image/png output."""
    out = []
    for i, cell in enumerate(nb.cells):
        for o in cell.get("outputs", []):
            data = o.get("data", {})
            if "image/png" in data:
                out.append((i, base64.b64decode(data["image/png"])))
    return out


@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs_and_figures_render(name, tmp_path):
    pytest.importorskip("nbclient", reason="needs nbclient (pip install gemma3[test])")
    pytest.importorskip("ipykernel", reason="needs ipykernel (pip install gemma3[test])")
    pytest.importorskip("matplotlib", reason="needs matplotlib (pip install gemma3[plot])")
    import gemma3

    try:
        gemma3.default_model_path()
    except FileNotFoundError as e:
        pytest.skip(f"the notebook runs on the default model: {e}")
    nb, secs = execute(NOTEBOOKS / name, tmp_path / "jupyter")
    print(f"\n{name}: executed in {secs:.0f} s")
    errors = [(i, o.get("ename"), o.get("evalue")) for i, c in enumerate(nb.cells)
              for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors, f"cells raised: {errors}"
    imgs = images(nb)
    assert len(imgs) >= 5, f"expected the notebook's figures, found {len(imgs)} images"
    for k, (cell, data) in enumerate(imgs):
        f = tmp_path / f"cell{cell:02d}_{k}.png"
        f.write_bytes(data)
        w, h = png_size(f.read_bytes())
        assert f.stat().st_size > 2000 and w > 100 and h > 100, (
            f"cell {cell}: image {f.name} is {f.stat().st_size} bytes, {w}x{h}")
    assert secs < TIME_LIMIT_S, f"{name} took {secs:.0f} s (limit {TIME_LIMIT_S} s)"


def _write(name: str) -> None:
    import tempfile

    import nbformat

    path = NOTEBOOKS / name
    with tempfile.TemporaryDirectory() as d:
        nb, secs = execute(path, Path(d))
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                 "language": "python"}
    nbformat.write(nb, path)
    print(f"{path}: executed in {secs:.0f} s, {len(images(nb))} images, written with outputs")


if __name__ == "__main__":
    if sys.argv[1:] != ["--write"]:
        sys.exit(__doc__)
    for n in NAMES:
        _write(n)
