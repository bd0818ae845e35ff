"""File helpers shared by every stage: atomic outputs, input and output checks, the cache folder."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator

from qgguf.errors import QggufError


def cache_dir(*parts: str) -> Path:
    """The user cache folder (QGGUF_CACHE, else $XDG_CACHE_HOME/qgguf, else ~/.cache/qgguf)."""
    root = os.environ.get("QGGUF_CACHE")
    if root:
        base = Path(root)
    else:
        xdg = os.environ.get("XDG_CACHE_HOME")
        base = (Path(xdg) if xdg else Path.home() / ".cache") / "qgguf"
    path = base.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def require_dir(path: Path, what: str, fix: str) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise QggufError(f"{what} {str(path)!r} is not a folder (or does not exist); {fix}")
    return path


def require_file(path: Path, what: str, fix: str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise QggufError(f"{what} {str(path)!r} does not exist; {fix}")
    return path


def check_output_path(out: Path, inputs: list[Path] = ()) -> Path:
    """Refuse an output that would overwrite an input or cannot be written, before any work starts."""
    out = Path(out)
    resolved = out.resolve()
    for inp in inputs:
        inp = Path(inp).resolve()
        # the input itself, or an existing file inside an input folder (a model's own weights or config)
        if resolved == inp or (inp.is_dir() and inp in resolved.parents and resolved.exists()):
            raise QggufError(f"output {str(out)!r} is the input {str(inp)!r}; choose another output path")
    parent = resolved.parent
    if not parent.is_dir():
        raise QggufError(f"cannot write {str(out)!r}: folder {str(parent)!r} does not exist; create it first")
    if not os.access(parent, os.W_OK):
        raise QggufError(f"cannot write {str(out)!r}: folder {str(parent)!r} is not writable; choose another output path")
    if resolved.is_dir():
        raise QggufError(f"cannot write {str(out)!r}: it is a folder; give a file name")
    return out


@contextlib.contextmanager
def atomic_output(out: Path, inputs: list[Path] = ()) -> Iterator[Path]:
    """Yield a temporary path beside `out`; rename it to `out` only if the block succeeds.

    A failure or Ctrl-C leaves no partial file behind.
    """
    out = check_output_path(out, inputs)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".partial", dir=out.resolve().parent)
    except OSError as e:
        raise QggufError(f"cannot write {str(out)!r}: {e.strerror}; choose another output path") from None
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_path, 0o666 & ~umask)  # mkstemp makes 0600; a finished output gets the usual mode
        os.replace(tmp_path, out)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def writable_folder(folder: Path, option: str) -> Path:
    """`folder`, created if missing; checked before any work so a bad path fails at once."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as e:
        raise QggufError(f"{option} {folder}: not a writable folder ({e.strerror or e}); give a folder you can "
                         "write to, or drop the option") from None
    return folder
