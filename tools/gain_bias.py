"""How much each type's reconstruction shrinks the weights: importance-weighted gain Σw·x̂·x / Σw·x² − 1 beside the
relative error Σw·(x̂ − x)² / Σw·x², on real tensors of an F32 GGUF and on Student-t data.

    python tools/gain_bias.py F32.gguf --stats STATS.safetensors --tensors blk.10.ffn_gate.weight ... [--rows 1024]
        [--update-docs]

A least-squares scale on a centroid codebook gives gain − 1 = −error (the reconstruction is the weights shrunk by
their error); the NL encoders store gain-unbiased scales instead (docs/design.md, "Gain-unbiased NL scales"), and
the NL rows are shown both ways ("LS": with `unbiased=False`, the scale they stored before).
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from qgguf import formats  # noqa: E402
from qgguf.calibrate.stats import load_stats  # noqa: E402
from qgguf.docs import write_section  # noqa: E402
from qgguf.errors import QggufError  # noqa: E402
from qgguf.files import require_file  # noqa: E402
from qgguf.formats import nl  # noqa: E402

TYPES = ("Q2_K", "NL2_XS", "Q3_K", "NL3_XS", "IQ4_XS", "Q4_K", "Q5_K", "NL5_XS", "Q6_K", "NL6_XS")


def gain_and_error(fmt: formats.Format, x: np.ndarray, imp: np.ndarray, *, least_squares: bool = False
                   ) -> tuple[float, float]:
    orig = nl.NLFormat.block_scales
    if least_squares:
        nl.NLFormat.block_scales = lambda self, *a, **k: orig(self, *a, **{**k, "unbiased": False})
    try:
        y = fmt.decode(fmt.encode(x, imp), x.shape).numpy().astype(np.float64)
    finally:
        nl.NLFormat.block_scales = orig
    w = imp[None].astype(np.float64)
    x = x.astype(np.float64)
    energy = float((w * x * x).sum())
    return float((w * y * x).sum()) / energy - 1, float((w * (y - x) ** 2).sum()) / energy


def rows_for(name: str, x: np.ndarray, imp: np.ndarray) -> list[str]:
    out = []
    for t in TYPES:
        fmt = formats.get(t)
        g, e = gain_and_error(fmt, x, imp)
        cells = [name, t, f"{fmt.bpw:.4g}", f"{e:.5f}", f"{g:+.5f}", f"{g / e:+.2f}"]
        if not fmt.stock:
            gl, el = gain_and_error(fmt, x, imp, least_squares=True)
            cells += [f"{el:.5f}", f"{gl:+.5f}"]
        else:
            cells += ["", ""]
        out.append("| " + " | ".join(cells) + " |")
        print(out[-1], flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("gguf", type=Path, help="an F32 GGUF (e.g. the one `qgguf bench` keeps in its cache)")
    ap.add_argument("--stats", type=Path, required=True, help="`qgguf calibrate` statistics: the importance vectors")
    ap.add_argument("--tensors", nargs="+", required=True)
    ap.add_argument("--rows", type=int, default=1024, help="first rows of each tensor")
    ap.add_argument("--update-docs", action="store_true")
    args = ap.parse_args()
    from gguf import GGUFReader

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    try:
        require_file(args.gguf, "F32 GGUF", "give the F32 GGUF of a `qgguf bench` run (its cache folder) or of "
                     "`qgguf convert-hf --outtype f32`")
        require_file(args.stats, "statistics file", "make one with `qgguf calibrate MODEL -o STATS.safetensors`")
    except QggufError as e:
        raise SystemExit(f"gain_bias.py: {e}")
    reader = GGUFReader(str(args.gguf))
    by_name = {t.name: t for t in reader.tensors}
    stats = load_stats(args.stats)
    lines = ["| weights | type | bpw | error | gain − 1 | (gain − 1) / error | LS error | LS gain − 1 |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for name in args.tensors:
        if name not in by_name:
            raise SystemExit(f"{args.gguf}: no tensor {name!r}")
        x = np.ascontiguousarray(by_name[name].data[:args.rows], dtype=np.float32)
        lines += rows_for(name, x, stats[name].importance.astype(np.float32))
    rng = np.random.default_rng(31)
    x = rng.standard_t(5, (64, 1024)).astype(np.float32)
    lines += rows_for("Student-t (ν = 5), random importance", x, rng.gamma(1.0, 1.0, 1024).astype(np.float32))
    cmd = "python tools/gain_bias.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    body = (f"- command: `{cmd}`\n- machine: {platform.machine()} CPU; first {args.rows} rows of each tensor; "
            f"importance: the statistics' per-input-channel vectors\n\n" + "\n".join(lines) + "\n")
    if args.update_docs:
        docs = ROOT / "docs" / "benchmarks.md"
        write_section(docs, "gain-bias", "", body, heading="## Which tensors the KL model misjudges")


if __name__ == "__main__":
    main()
