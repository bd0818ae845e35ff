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


def disk_bytes(path: Path) -> int:
    """Bytes on disk under a folder (allocated blocks; symbolic links not followed: shared builds and assets)."""
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            p = Path(root) / f
            if not p.is_symlink():
                total += p.stat().st_blocks * 512
    return total


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


def _fsync(path: Path) -> None:
    """Flush a file's data to disk (a rename must never publish a file whose data is still in the page cache)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not every file system lets a folder be opened for fsync
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_outputs(outs: list[Path], inputs: list[Path] = ()) -> Iterator[list[Path]]:
    """Yield a temporary path beside each of `outs`; if the block succeeds, flush them all to disk and rename them
    into place together (in the order given), so the outputs appear as one unit.

    A failure or Ctrl-C leaves none of them behind (earlier files at those paths stay as they were).
    """
    outs = [check_output_path(o, inputs) for o in outs]
    tmps: list[Path] = []
    try:
        for out in outs:
            try:
                fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".partial", dir=out.resolve().parent)
            except OSError as e:
                raise QggufError(f"cannot write {str(out)!r}: {e.strerror}; choose another output path") from None
            os.close(fd)
            tmps.append(Path(tmp))
        yield tmps
        umask = os.umask(0)
        os.umask(umask)
        for tmp in tmps:
            os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; a finished output gets the usual mode
            if tmp.stat().st_size:
                _fsync(tmp)
        for tmp, out in zip(tmps, outs):
            os.replace(tmp, out)
        for folder in {o.resolve().parent for o in outs}:
            _fsync_dir(folder)
    finally:
        for tmp in tmps:
            if tmp.exists():
                tmp.unlink()


@contextlib.contextmanager
def atomic_output(out: Path, inputs: list[Path] = ()) -> Iterator[Path]:
    """Yield a temporary path beside `out`; flush it to disk and rename it to `out` only if the block succeeds.

    A failure or Ctrl-C leaves no partial file behind.
    """
    with atomic_outputs([out], inputs) as (tmp,):
        yield tmp


# A cache entry is used only when its seal matches: the seal is written after the entry's data is on disk, and
# records its size and (for files up to SEAL_HASH_BYTES) its content hash, so a truncated or damaged entry is
# made again rather than trusted.
SEAL_HASH_BYTES = 256 << 20


def _seal_path(path: Path) -> Path:
    return path.with_name(path.name + ".seal.json")


def _seal_of(path: Path) -> dict:
    from qgguf.hashing import sha256_file

    size = path.stat().st_size
    return {"size": size, "sha256": sha256_file(path) if size <= SEAL_HASH_BYTES else None}


def seal(path: Path, key: str = "") -> None:
    """Record that the finished file `path` is a complete cache entry (made under `key`)."""
    import json

    path = Path(path)
    with atomic_output(_seal_path(path)) as tmp:
        tmp.write_text(json.dumps({**_seal_of(path), "key": key}))


def sealed(path: Path, key: str = "") -> bool:
    """True when `path` exists and matches the seal written for it under `key`."""
    import json

    path = Path(path)
    try:
        want = json.loads(_seal_path(path).read_text())
        have = _seal_of(path)
    except (OSError, ValueError):
        return False
    return want.get("key") == key and want.get("size") == have["size"] and want.get("sha256") == have["sha256"]


def writable_folder(folder: Path, option: str) -> Path:
    """`folder`, created if missing; checked before any work so a bad path fails at once."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as e:
        raise QggufError(f"{option} {folder}: not a writable folder ({e.strerror or e}); give a folder you can "
                         "write to, or drop the option") from None
    return folder
