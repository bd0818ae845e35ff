"""`qgguf doctor`: what qgguf finds on this machine, and for each missing piece the command that fixes it."""

from __future__ import annotations

import importlib
import importlib.metadata
import json
import platform
import shutil
import sys
from dataclasses import dataclass

from qgguf import __version__
from qgguf.files import cache_dir
from qgguf.llamacpp.build import LLAMA_CPP_COMMIT, SDIST_NAME, SDIST_VERSION, TOOLS, BuildSpec, gguf_py_matches


@dataclass
class Check:
    what: str
    ok: bool
    found: str
    fix: str = ""


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def checks() -> list[Check]:
    out = [Check("qgguf", True, f"{__version__} on Python {platform.python_version()} ({sys.executable})")]
    for dist in ("numpy", "torch", "transformers", "safetensors", "sentencepiece", "gguf", "tqdm", "matplotlib"):
        v = _version(dist)
        out.append(Check(dist, v is not None, v or "missing", "pip install -e .[test]"))
    try:
        import torch

        if torch.cuda.is_available():
            dev = f"CUDA: {torch.cuda.get_device_name(0)} (torch {torch.version.cuda})"
        else:
            dev = f"CPU only ({torch.get_num_threads()} threads); torch CUDA build: {torch.version.cuda or 'no'}"
        out.append(Check("torch device", True, dev))
    except ImportError:
        pass

    for cuda in (False, True):
        spec = BuildSpec.from_env(cuda=cuda)
        label = "llama.cpp " + ("CUDA build" if cuda else "CPU build")
        flag = " --cuda" if cuda else ""
        src = f"LLAMA_CPP_DIR={spec.user_tree}" if spec.user_tree else \
            f"{SDIST_NAME}=={SDIST_VERSION} (llama.cpp {LLAMA_CPP_COMMIT}) + cpp_ext/"
        if spec.stamp.is_file():
            info = json.loads(spec.stamp.read_text())
            missing = [t for t in TOOLS if not (spec.build_dir / "bin" / t).is_file()]
            found = f"{spec.build_dir} from {src}, patches: {', '.join(info['patches']) or 'none'}"
            if missing:
                out.append(Check(label, False, found + f"; missing tools: {', '.join(missing)}",
                                 f"qgguf llama build{flag}"))
            else:
                out.append(Check(label, True, found + f"; tools: {', '.join(TOOLS)}"))
        else:
            note = "" if not cuda else (" (needs nvcc" + (", found" if shutil.which("nvcc") else ", not found")
                                        + "; optional without a GPU)")
            out.append(Check(label, not cuda, "not built for the current cpp_ext/" + note,
                             f"qgguf llama build{flag}"))
    cpu = BuildSpec.from_env(cuda=False)
    if cpu.stamp.is_file():
        ok = gguf_py_matches(cpu)
        out.append(Check("gguf-py", ok, "the pinned tree's gguf-py" if ok else
                         "the installed gguf is not the pinned tree's (the converter needs it)", "qgguf llama build"))

    assets_dir = cache_dir("assets")
    try:
        assets = importlib.import_module("qgguf.assets.fetch")
        for name, ready, where in assets.status():
            out.append(Check(f"asset {name}", ready, where, f"qgguf fetch {name}"))
    except (ImportError, AttributeError):
        present = sorted(p.name for p in assets_dir.iterdir())
        out.append(Check("assets", bool(present), f"{assets_dir}: {', '.join(present) or 'empty'}", "qgguf fetch"))
    return out


def add_parser(sub) -> None:
    p = sub.add_parser("doctor", help="report the llama.cpp build, torch, packages and assets, with fixes")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_cmd)


def _cmd(args) -> int:
    res = checks()
    if args.json:
        print(json.dumps([c.__dict__ for c in res], indent=2))
    else:
        width = max(len(c.what) for c in res)
        for c in res:
            mark = "ok " if c.ok else "-- "
            line = f"{mark}{c.what:<{width}}  {c.found}"
            if not c.ok and c.fix:
                line += f"\n{'':>{width + 5}}fix: {c.fix}"
            print(line)
    # Doctor reports; it fails only when the essentials (the CPU build, packages) are missing.
    essential = [c for c in res if not c.ok and not c.what.startswith(("asset", "llama.cpp CUDA"))]
    return 1 if essential else 0
