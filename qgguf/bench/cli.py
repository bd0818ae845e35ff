"""`qgguf bench`: qgguf's files against stock llama-quantize presets, from the command line."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from qgguf.bench.config import (
    AUTO_TARGET_MARGIN,
    BenchConfig,
    DEFAULT_CALIB,
    DEFAULT_CHUNKS,
    DEFAULT_IMATRIX_CHUNKS,
    DEFAULT_TEXT,
    KLD_ATTEMPTS,
    PRESETS,
    config_from_args,
)
from qgguf.bench.reference import Reference, reference
from qgguf.bench.report import print_summary
from qgguf.bench.run import run_bench
from qgguf.calibrate.covariance import DEFAULT_WEIGHTING, WEIGHTINGS
from qgguf.calibrate.runner import DEFAULT_TOKENS
from qgguf.errors import QggufError
from qgguf.llamacpp.runner import Tools
from qgguf.plan.measure import ROUNDINGS
from qgguf.plan.rules import PALETTES


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="measure qgguf against stock llama-quantize presets (KLD, PPL, bpw, speed)")
    p.add_argument("model", help="Hugging Face model folder, or a model asset name (e.g. smollm2-135m)")
    p.add_argument("-o", "--out", type=Path, required=True, help="output folder (rows, logs, results, plot)")
    p.add_argument("--text", default=DEFAULT_TEXT, help=f"evaluation text file or asset (default {DEFAULT_TEXT})")
    p.add_argument("--calib", default=DEFAULT_CALIB,
                   help=f"calibration text for the imatrix, file or asset (default {DEFAULT_CALIB})")
    p.add_argument("--ctx", type=int, default=512, help="tokens per chunk (default 512)")
    p.add_argument("--chunks", type=int, default=DEFAULT_CHUNKS,
                   help=f"chunks of the text to score (default {DEFAULT_CHUNKS})")
    p.add_argument("--imatrix-chunks", type=int, default=DEFAULT_IMATRIX_CHUNKS,
                   help=f"chunks of the calibration text for the imatrix (default {DEFAULT_IMATRIX_CHUNKS})")
    p.add_argument("--calib-tokens", type=int, default=DEFAULT_TOKENS,
                   help=f"tokens of the calibration text for qgguf calibrate (default {DEFAULT_TOKENS})")
    p.add_argument("--presets", nargs="+", default=list(PRESETS), metavar="TYPE",
                   help="llama-quantize presets (default: " + " ".join(PRESETS) + ")")
    p.add_argument("--targets", nargs="*", default=["auto"], metavar="BPW",
                   help=f"bpw targets of the qgguf sweep, besides the preset sizes (default auto: "
                   f"{AUTO_TARGET_MARGIN:g} bpw below the smallest preset and above the largest; none: no sweep)")
    p.add_argument("--sizes", nargs="*", default=None, metavar="TYPE",
                   help="presets whose exact file size qgguf is matched at (default: every preset)")
    p.add_argument("--palettes", nargs="+", default=list(PALETTES), choices=PALETTES,
                   help="qgguf palettes (default: both; extended is skipped while it does not exist)")
    p.add_argument("--rounding", dest="roundings", nargs="+", default=["plain"], choices=ROUNDINGS,
                   help="how qgguf rows choose their integers (qgguf convert --rounding), one series each "
                   "(default plain; feedback and auto calibrate the input covariance too)")
    p.add_argument("--covariance-weight", default=DEFAULT_WEIGHTING, choices=WEIGHTINGS,
                   help="with a non-plain --rounding: how the calibration weighs each token's x xᵀ in the input "
                        f"covariance (qgguf calibrate --covariance-weight; default {DEFAULT_WEIGHTING})")
    p.add_argument("--plain-rows", action="store_true", help="also quantise each preset without the imatrix")
    p.add_argument("--no-qgguf", dest="qgguf_rows", action="store_false", help="stock rows only")
    p.add_argument("--gpu", action="store_true", help="run on the CUDA build (-ngl 999) and measure pp512/tg128")
    p.add_argument("-t", "--threads", type=int, default=0, help="CPU threads (default: all cores)")
    p.add_argument("--stats", type=Path, default=None,
                   help="calibration statistics for qgguf convert (default: `qgguf calibrate` on --calib, cached)")
    p.add_argument("--convert-arg", dest="convert_args", action="append", default=[], metavar="ARG",
                   help="extra argument for qgguf convert (repeat for several)")
    p.add_argument("--redo", action="append", default=[], metavar="GLOB",
                   help="re-measure rows whose id matches (e.g. 'qgguf-*'); others are reused")
    p.add_argument("--keep-gguf", action="store_true", help="keep the quantised files in OUT/gguf/")
    p.add_argument("--timeout", type=float, default=None, help="seconds one tool run may take")
    p.add_argument("--attempts", type=int, default=KLD_ATTEMPTS,
                   help=f"runs of llama-perplexity per file when its output is cut short (default {KLD_ATTEMPTS})")
    p.add_argument("--update-docs", action="store_true", help="write the table and plot into docs/benchmarks.md")
    p.add_argument("--docs", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--cache", type=Path, default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=_cmd)


def open_bench(argv: list[str]) -> tuple[BenchConfig, dict, Tools, Reference]:
    """A finished bench's folder, from `qgguf bench`'s own arguments (tools that study a bench take the same):
    its config, its results, the tools and its (cached) reference."""
    ap = argparse.ArgumentParser(prog="qgguf")
    add_parser(ap.add_subparsers(dest="cmd"))
    cfg = config_from_args(ap.parse_args(["bench", *argv]))
    path = cfg.out / "results.json"
    if not path.is_file():
        raise QggufError(f"no bench results in {cfg.out}; run `qgguf bench` with the same options first")
    tools = Tools(cuda=cfg.gpu, threads=cfg.threads)
    return cfg, json.loads(path.read_text()), tools, reference(cfg, tools, cfg.out / "logs")


def _cmd(args) -> int:
    cfg = config_from_args(args)
    results = run_bench(cfg)
    results["out"] = str(cfg.out)
    print_summary(results)
    return 1 if results["failed"] else 0
