"""Content hashes: of files, folders and arrays. Every cache key and every record of what made a result is built
from these, so that equal content gives equal keys on any machine and any path."""

from __future__ import annotations

import functools
import hashlib
import sys
from pathlib import Path

import numpy as np


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def folder_sha256(folder: Path, progress: bool = True) -> str:
    """sha256 over every file of a folder (relative name and content hash, in name order; hidden files skipped)."""
    from tqdm import tqdm

    h = hashlib.sha256()
    files = sorted(p for p in Path(folder).rglob("*") if p.is_file() and not p.name.startswith("."))
    for p in tqdm(files, desc="hash model", unit="file", disable=None if progress else True, leave=False,
                  file=sys.stderr):
        h.update(str(p.relative_to(folder)).encode() + b"\0" + sha256_file(p).encode() + b"\n")
    return h.hexdigest()


def hash_array(h, a) -> None:
    """Feed an array's shape and float32 bytes (or a marker for None) to hash `h`."""
    import torch

    if a is None:
        h.update(b"none")
        return
    t = a.detach().to("cpu", torch.float32).contiguous() if isinstance(a, torch.Tensor) else \
        torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))
    h.update(repr(tuple(t.shape)).encode())
    h.update(t.numpy().reshape(-1).view(np.uint8))  # the bytes in place: no second copy of a large tensor


PACKAGE = Path(__file__).resolve().parent


def files_sha256(files: list[Path], root: Path) -> str:
    """sha256 over files (their paths relative to `root`, and their bytes), in path order."""
    h = hashlib.sha256()
    for p in sorted(files):
        h.update(p.relative_to(root).as_posix().encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()


@functools.lru_cache(maxsize=None)
def code_sha256(*parts: str) -> str:
    """The hash of qgguf's own code behind a result: every .py file under the named parts of the package
    (folders or modules, e.g. "calibrate", "models.py"), with the versions of the libraries it computes with.

    Cache keys and records include it, so a result made by other code is never taken for today's."""
    import importlib.metadata

    files: list[Path] = []
    for part in parts:
        p = PACKAGE / part
        files += sorted(p.rglob("*.py")) if p.is_dir() else [p]
    libs = []
    for dist in ("torch", "transformers", "numpy", "gguf"):
        try:
            libs.append(f"{dist}={importlib.metadata.version(dist)}")
        except importlib.metadata.PackageNotFoundError:
            libs.append(f"{dist}=none")
    return hashlib.sha256((files_sha256(files, PACKAGE) + "|" + ",".join(libs)).encode()).hexdigest()


def package_sha256() -> str:
    """The hash of all of qgguf's code: what a bench row made by `qgguf convert` depends on."""
    return code_sha256(".")


def checkout_commit() -> str | None:
    """The git commit of the checkout qgguf runs from ("+dirty" when it has uncommitted changes), or None."""
    import subprocess

    root = PACKAGE.parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "qgguf", "cpp_ext"],
                               cwd=root, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return None
    return head.stdout.strip() + ("+dirty" if dirty else "")
