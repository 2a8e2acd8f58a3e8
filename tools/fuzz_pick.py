"""Picks a small regression set from a fuzz corpus: greedy cover of libFuzzer's merge features.

    python tools/fuzz_pick.py CONTROL_FILE OUT_DIR [N] [MAX_BYTES]

CONTROL_FILE is what ``-merge=1 -merge_control_file=F`` leaves: the inputs, and for each the
coverage edges and features it added (``COV i ...``, ``FT i ...``). The merge runs inputs
smallest first and credits an edge or feature to the first input that hits it, so the cover below
is an approximation (tools/fuzz.sh measures the coverage of the chosen set afterwards). Repeatedly
takes the input that adds the most edges not yet covered, then features, then the smaller file,
until N inputs (default 40) or nothing new; inputs larger than MAX_BYTES (default 16384) are
skipped. Copies them to OUT_DIR as ``corpus-<sha1[:12]>`` and removes older ``corpus-*`` files
there (named regression inputs stay).
tools/fuzz.sh TARGET --pick runs this into tests/data/fuzz_regressions/TARGET/ (N: 50 files
there in all).
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path


def parse(control: Path, kind: str = "FT") -> dict[Path, set[int]]:
    """Input -> its features (kind "FT") or covered edges ("COV")."""
    lines = control.read_text().splitlines()
    n = int(lines[0])
    files = [Path(p) for p in lines[2:2 + n]]
    out: dict[Path, set[int]] = {}
    for ln in lines[2 + n:]:
        parts = ln.split()
        if parts and parts[0] == kind:
            out[files[int(parts[1])]] = {int(x) for x in parts[2:]}
    return out


def pick(feats: dict[Path, set[int]], edges: dict[Path, set[int]], n: int,
         max_bytes: int) -> list[Path]:
    """Greedy: most new edges first, then most new features, then the smaller file."""
    cand = [p for p in feats if p.is_file() and p.stat().st_size <= max_bytes]
    got_f: set[int] = set()
    got_e: set[int] = set()
    out: list[Path] = []

    def gain(p: Path) -> tuple[int, int, int]:
        return (len(edges.get(p, set()) - got_e), len(feats[p] - got_f), -p.stat().st_size)

    while cand and len(out) < n:
        best = max(cand, key=gain)
        if gain(best)[:2] == (0, 0):
            break
        cand.remove(best)
        got_f |= feats[best]
        got_e |= edges.get(best, set())
        out.append(best)
    return out


def main(argv: list[str]) -> int:
    if len(argv) not in (3, 4, 5):
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    control, out_dir = Path(argv[1]), Path(argv[2])
    n = int(argv[3]) if len(argv) > 3 else 40
    max_bytes = int(argv[4]) if len(argv) > 4 else 16384
    feats, cov = parse(control), parse(control, "COV")
    chosen = pick(feats, cov, n, max_bytes)
    total = set().union(*feats.values()) if feats else set()
    got = set().union(*(feats[p] for p in chosen)) if chosen else set()
    edges = set().union(*cov.values()) if cov else set()
    got_e = set().union(*(cov.get(p, set()) for p in chosen)) if chosen else set()
    print(f"{len(chosen)} of {len(feats)} inputs, credited with features {len(got)} of "
          f"{len(total)}, edges {len(got_e)} of {len(edges)}")
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob("corpus-*"):
        old.unlink()
    for p in chosen:
        data = p.read_bytes()
        (out_dir / f"corpus-{hashlib.sha1(data).hexdigest()[:12]}").write_bytes(data)
    print(f"{len(chosen)} inputs ({sum(p.stat().st_size for p in chosen)} bytes) -> {out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
