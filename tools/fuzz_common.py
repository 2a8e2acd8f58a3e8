"""Shared driver of the Python (atheris) fuzz harnesses tools/fuzz_<target>.py.

A harness module defines

    EXPECTED: tuple of exception types   the documented failures of the entry point
    one_input(data: bytes) -> None        feeds the bytes through the entry point; raises
                                          AssertionError when a promised invariant breaks
    seeds() -> dict[str, bytes]           small valid inputs, written by --make-seeds

imports the code under test inside ``with fuzz_common.instrumented(__name__, [packages]):`` (atheris
adds coverage feedback to those packages when the module runs as the fuzzer) and ends with
``if __name__ == "__main__": fuzz_common.main(sys.modules[__name__])``.

    python tools/fuzz_<target>.py --make-seeds DIR       # write the seeds
    python tools/fuzz_<target>.py [libFuzzer args...]    # fuzz (tools/fuzz.sh passes the args)

Any exception outside EXPECTED (AssertionError included), a crash or a hang is a finding: atheris
writes the input to the artifact directory. tests/test_fuzz_regressions.py imports the same
modules and runs their regression files through :func:`run_one`.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from types import ModuleType


def instrumented(module_name: str, packages: list[str]):
    """Context for the harness's imports: atheris instruments ``packages`` (coverage feedback for
    their Python code; tools/fuzz.sh builds the C extension with coverage of its own) when the
    harness runs as the fuzzer; a no-op when imported (tests, --make-seeds)."""
    if module_name != "__main__" or "--make-seeds" in sys.argv:
        return contextlib.nullcontext()
    import atheris

    return atheris.instrument_imports(include=packages)


def run_one(harness: ModuleType, data: bytes) -> None:
    """One input through the harness: expected exceptions are swallowed, anything else raised."""
    try:
        harness.one_input(data)
    except harness.EXPECTED:
        pass


def main(harness: ModuleType) -> None:
    argv = sys.argv
    if len(argv) == 3 and argv[1] == "--make-seeds":
        d = Path(argv[2])
        d.mkdir(parents=True, exist_ok=True)
        for name, data in harness.seeds().items():
            (d / name).write_bytes(data)
            print(f"{d / name}: {len(data)} bytes")
        return
    import atheris

    # libFuzzer re-executes argv[0] for -merge: the executable wrapper fuzz.sh writes, not the .py
    argv = [os.environ.get("G3_FUZZ_SELF", argv[0]), *argv[1:]]
    atheris.Setup(argv, lambda data: run_one(harness, data))
    atheris.Fuzz()
