#!/usr/bin/env python3
"""CPU speed of the NL types' matrix-vector kernels against the nearest stock types.

    python tools/nl_bench.py                  # MUL_MAT 4096 x 14336 by 1 column (token generation) and 8 columns
    python tools/nl_bench.py --batch 1

Runs the built fork's `test-backend-ops perf -b CPU -o MUL_MAT` on the matrices of its perf suite (m = 4096,
k = 14336, the activations quantised to Q8_0 / Q8_K inside the op) and prints, per type, microseconds per op and
the weight bytes streamed per second. Each NL type is paired with the stock type nearest in bits per weight.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qgguf import formats  # noqa: E402
from qgguf.llama import tool_path  # noqa: E402

PAIRS = (("NL2_XS", "Q2_K"), ("NL2_32", "Q2_K"), ("NL3_XS", "Q3_K"), ("NL3_32", "Q3_K"), ("NL5_XS", "Q5_K"),
         ("NL5_32", "Q5_0"), ("NL6_XS", "Q6_K"), ("NL6_32", "Q6_K"), ("IQ4_XS", "Q4_K"))
M, K = 4096, 14336

LINE = re.compile(r"MUL_MAT\(type_a=(\w+),type_b=f32,m=4096,n=(\d+),k=14336,.*?\):\s+(\d+) runs -\s+([\d.]+) us/run")


def run(types: list[str], batch: int) -> dict[str, float]:
    pat = f"type_a=({'|'.join(t.lower() for t in types)}),type_b=f32,m=4096,n={batch},k=14336,"
    cmd = [str(tool_path("test-backend-ops")), "perf", "-b", "CPU", "-o", "MUL_MAT", "-p", pat]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if res.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{(res.stdout + res.stderr)[-2000:]}")
    out = {}
    for m in LINE.finditer(res.stdout):
        if int(m.group(2)) == batch:
            out[m.group(1).upper()] = float(m.group(4))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, nargs="*", default=[1, 8], help="activation columns (tokens)")
    args = ap.parse_args(argv)
    types = sorted({t for p in PAIRS for t in p})
    # test-backend-ops runs the CPU backend on half the hardware threads (1 on a 2-core machine)
    print(f"test-backend-ops perf -b CPU -o MUL_MAT, m={M} k={K}, {max(1, (os.cpu_count() or 2) // 2)} thread(s)\n")
    for bs in args.batch:
        us = run(types, bs)
        print(f"| NL type | bpw | µs/op | GB/s of weights | stock type | bpw | µs/op | NL time / stock time |  (n={bs})")
        print("|---|---|---|---|---|---|---|---|")
        for a, b in PAIRS:
            fa, fb = formats.get(a), formats.get(b)
            if a not in us or b not in us:
                print(f"| {a} | – | missing in the output | | {b} | | | |")
                continue
            gbs = fa.nbytes((M, K)) / us[a] / 1e3
            print(f"| {a} | {fa.bpw:.4g} | {us[a]:.0f} | {gbs:.2f} | {b} | {fb.bpw:.4g} | {us[b]:.0f} | "
                  f"{us[a] / us[b]:.2f} |")
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
