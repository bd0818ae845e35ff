"""How qgguf sets torch up for every command: torch.compile's kernels cached under the qgguf cache, and torch's
notices that are noise on a CPU machine kept off the terminal.

Nothing here imports torch: `setup()` runs before any command does, and only sets environment variables and a
logging filter that torch reads when it gets there.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

from qgguf.files import cache_dir

# torch.utils.cpp_extension logs this when it is imported (torch.compile does) on a machine with nvcc or CUDA_HOME
# but no CUDA device: on a CPU run it only says that CUDA is not used, which the user asked for.
_CUDA_HOME_NOTICE = "No CUDA runtime is found"


class _DropCudaHomeNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_CUDA_HOME_NOTICE)


def compile_cache_dir() -> Path:
    """Where torch.compile keeps its kernels: TORCHINDUCTOR_CACHE_DIR if the user set it, else under the qgguf cache
    (torch's own default is a folder in /tmp, which a reboot or a tmp cleaner empties)."""
    env = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    return Path(env) if env else cache_dir("torch-compile")


def setup() -> None:
    """Point torch.compile's caches at compile_cache_dir() and drop the CUDA_HOME notice."""
    # inductor reads the variable when it first compiles; its FX graph cache (on by default) lives under it too
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(compile_cache_dir()))
    logger = logging.getLogger("torch.utils.cpp_extension")
    if not any(isinstance(f, _DropCudaHomeNotice) for f in logger.filters):
        logger.addFilter(_DropCudaHomeNotice())


def _warm_marker(key: str) -> Path:
    import torch

    digest = hashlib.blake2b(f"{torch.__version__}\n{key}".encode(), digest_size=8).hexdigest()
    return compile_cache_dir() / f"qgguf-warm-{digest}"


def compile_is_warm(key: str) -> bool:
    """Whether a run with these encoders (key: their source hash) and this torch already filled the kernel cache.

    A marker file is the cheap test: asking inductor means compiling. A cache emptied behind the marker's back only
    makes the promised quick run slow, never wrong."""
    return _warm_marker(key).is_file()


def mark_compile_warm(key: str) -> None:
    marker = _warm_marker(key)
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.touch()
