"""The NL family's tables in the fork, written from qgguf/formats/nl.py, where they are defined.

The codebooks (`nl.VALUES`), the index planes' widths (`nl.PLANES`) and the encoder's candidate scales
(`nl.CANDIDATES`) are needed by the fork too: by the C quantiser and CPU kernels (cpp_ext's ggml-nl.h) and by gguf-py's
dequantiser (patch 0003). Each of those files holds them between two marker lines, and only this module writes what
lies between:

    python -m qgguf.formats.nl_tables --write    # after changing a table in nl.py
    python -m qgguf.formats.nl_tables --check    # exit status 1, naming each file whose copy differs

tests/test_nl.py runs the check, so a copy edited by hand (or a table changed in nl.py without --write) fails.
In the patch the block is added lines ('+' in front), and the hunk's line count is kept right when the block grows.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from . import nl

BEGIN = "BEGIN nl tables: written from qgguf/formats/nl.py by `python -m qgguf.formats.nl_tables --write`"
END = "END nl tables"
PER_LINE = 16  # codebook values per line


def _rows(values: tuple[int, ...]) -> list[str]:
    return [", ".join(str(v) for v in values[i:i + PER_LINE]) for i in range(0, len(values), PER_LINE)]


def c_tables() -> list[str]:
    """ggml-nl.h: the codebooks, then one ggml_nl_spec per bit-width (indexed by bits; zeros where no type)."""
    out = []
    for bits, values in nl.VALUES.items():
        out.append(f"static const int8_t ggml_nl_values_{bits}[{len(values)}] = {{")
        out += [f"    {row}," for row in _rows(values)]
        out.append("};")
    out.append(f"static const ggml_nl_spec ggml_nl_specs[{max(nl.VALUES) + 1}] = {{")
    for bits in range(max(nl.VALUES) + 1):
        if bits not in nl.VALUES:
            out.append(f"    {{ 0, 0, 0, NULL, {{ 0, 0, 0 }} }},  // no {bits}-bit type")
            continue
        planes = nl.PLANES[bits]
        khi = planes[1] if len(planes) > 1 else 0
        lo, hi, step = nl.CANDIDATES[bits]
        out.append(f"    {{ {bits}, {planes[0]}, {khi}, ggml_nl_values_{bits}, {{ {lo}, {hi}, {step} }} }},")
    out.append("};")
    return out


def py_tables() -> list[str]:
    """gguf-py's quants.py: NL_VALUES and NL_PLANES."""
    def tup(values: tuple[int, ...]) -> str:
        return "(" + ",\n        ".join(_rows(values)) + ("," if len(values) == 1 else "") + ")"

    out = ["NL_VALUES: dict[int, tuple[int, ...]] = {"]
    for bits, values in nl.VALUES.items():
        out += f"    {bits}: {tup(values)},".split("\n")
    out.append("}")
    planes = ", ".join(f"{bits}: {tup(nl.PLANES[bits])}" for bits in nl.VALUES)
    out.append(f"NL_PLANES: dict[int, tuple[int, ...]] = {{{planes}}}")
    return out


@dataclass(frozen=True)
class Copy:
    path: str                          # relative to cpp_ext/
    comment: str                       # the file's comment leader, for the marker lines
    patch: bool                        # a patch: the block is added lines of one hunk
    tables: Callable[[], list[str]]    # the block's lines


COPIES = (
    Copy("overlay/ggml/src/ggml-nl.h", "//", False, c_tables),
    Copy("patches/0003-gguf-py-nl-types.patch", "#", True, py_tables),
)

_HUNK = re.compile(r"^@@ -(\d+)(?:,(\d+))? \+(\d+)(?:,(\d+))? @@(.*)$")


def _fix_hunks(lines: list[str], at: int, delta: int) -> None:
    """The block at line `at` of a patch grew by `delta` added lines: the new-side count of its hunk and the new-side
    start of the later hunks of the same file move by as much."""
    h = max(i for i in range(at) if lines[i].startswith("@@ "))
    for i in range(h, len(lines)):
        if i > h and lines[i].startswith("diff --git "):
            break
        m = _HUNK.match(lines[i])
        if not m:
            continue
        a, b, c, d, tail = m.groups()
        old = f"-{a}" + (f",{b}" if b is not None else "")
        if i == h:
            n = (int(d) if d is not None else 1) + delta
            lines[i] = f"@@ {old} +{c},{n} @@{tail}"
        else:
            lines[i] = f"@@ {old} +{int(c) + delta}" + (f",{d}" if d is not None else "") + f" @@{tail}"


def render(copy: Copy, text: str) -> str:
    """`text` (the file) with its block replaced by the tables as nl.py defines them."""
    lines = text.split("\n")
    lead = ("+" if copy.patch else "") + copy.comment + " "
    try:
        i = lines.index(lead + BEGIN)
        j = lines.index(lead + END, i)
    except ValueError:
        raise ValueError(f"{copy.path}: no '{lead}{BEGIN}' ... '{lead}{END}' block") from None
    body = [("+" if copy.patch else "") + line for line in copy.tables()]
    delta = len(body) - (j - i - 1)
    lines[i + 1:j] = body
    if copy.patch and delta:
        _fix_hunks(lines, i, delta)
    return "\n".join(lines)


def default_ext() -> Path:
    """The checkout's cpp_ext/ (beside the qgguf package)."""
    return Path(__file__).resolve().parents[2] / "cpp_ext"


def stale(ext: Path | None = None) -> list[str]:
    """The copies (paths relative to cpp_ext/) whose block differs from nl.py's tables."""
    ext = ext or default_ext()
    out = []
    for c in COPIES:
        text = (ext / c.path).read_text()
        if render(c, text) != text:
            out.append(c.path)
    return out


def write(ext: Path | None = None) -> list[str]:
    """Rewrite every stale copy; returns their paths."""
    ext = ext or default_ext()
    changed = stale(ext)
    for c in COPIES:
        if c.path in changed:
            p = ext / c.path
            p.write_text(render(c, p.read_text()))
    return changed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m qgguf.formats.nl_tables", description=__doc__.split("\n")[0])
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--write", action="store_true", help="write the tables into the fork's copies")
    mode.add_argument("--check", action="store_true", help="exit 1 if a copy differs from nl.py's tables")
    ap.add_argument("--cpp-ext", type=Path, help="the cpp_ext/ folder (default: the checkout's)")
    args = ap.parse_args(argv)
    try:
        if args.write:
            for path in write(args.cpp_ext):
                print(f"wrote {path}")
            return 0
        bad = stale(args.cpp_ext)
    except (OSError, ValueError) as e:
        print(f"nl_tables: {e}", file=sys.stderr)
        return 2
    for path in bad:
        print(f"{path}: NL tables differ from qgguf/formats/nl.py (run python -m qgguf.formats.nl_tables --write)",
              file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
