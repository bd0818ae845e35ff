"""The `qgguf` command: one sub-command per stage, each defined beside the code it runs."""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import sys
import time
import traceback
from pathlib import Path

from qgguf import __version__
from qgguf.errors import QggufError, failed_step
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
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of an unexpected failure (it is always written to a file)")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_parser(sub)
    return parser


def _cause(e: BaseException) -> str:
    """The cause of an unexpected failure in words a user can act on."""
    if isinstance(e, MemoryError) or "out of memory" in str(e).lower():
        return f"out of memory ({type(e).__name__}); close other programs, or use a machine with more memory"
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
        return f"no space left on the device{f' writing {e.filename}' if e.filename else ''}; free some disk space"
    if isinstance(e, PermissionError):
        return f"permission denied{f' on {e.filename}' if e.filename else ''}; check the file's owner and mode"
    text = " ".join(str(e).split()) or "(no message)"
    return f"{type(e).__name__}: {text[:300]}"


def _write_traceback(argv: list[str]) -> Path | None:
    """The current exception's traceback in a file under the qgguf cache; its path, or None if none could be made."""
    try:
        from qgguf.files import cache_dir

        folder = cache_dir("logs")
        path = folder / f"error-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.txt"
        path.write_text("$ qgguf " + " ".join(argv) + "\n" + traceback.format_exc())
        return path
    except Exception:  # reporting the failure must not fail in turn
        return None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
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
    except Exception as e:
        where = failed_step() or args.command
        log = _write_traceback(argv)
        if args.debug:
            traceback.print_exc()
        hint = f" (traceback in {log}" + ("" if args.debug else "; --debug shows it") + ")" if log else ""
        print(f"qgguf: error: {where} failed: {_cause(e)}{hint}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
