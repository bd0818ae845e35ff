"""The `qgguf` command: one sub-command per stage, each defined beside the code it runs."""

from __future__ import annotations

import argparse
import importlib
import sys

from qgguf import __version__
from qgguf.errors import QggufError
from qgguf.torch_env import setup as setup_torch

# Each module defines add_parser(subparsers) and sets `func` on its parsers.
COMMAND_MODULES = (
    "qgguf.llamacpp.build",
    "qgguf.llamacpp.converter",
    "qgguf.assets.fetch",
    "qgguf.doctor",
    "qgguf.calibrate.cli", "qgguf.calibrate.imatrix",
    "qgguf.convert",
    "qgguf.bench.cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qgguf", description="Fisher-optimal GGUF export for llama.cpp")
    parser.add_argument("--version", action="version", version=f"qgguf {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_torch()
    try:
        return int(args.func(args) or 0)
    except QggufError as e:
        print(f"qgguf: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("qgguf: interrupted; no partial output was kept", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
