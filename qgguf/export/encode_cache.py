"""The encode cache: encoded tensors kept between exports of one model at several budgets."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch

from qgguf import formats
from qgguf.files import atomic_output
from qgguf.hashing import hash_array

ENCODE_CACHE_VERSION = 1


class EncodeCache:
    """Encoded tensor bytes in a folder, one file per (weights, importance, type, encoder sources)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)

    def path(self, w: torch.Tensor, importance: torch.Tensor | None, fmt: formats.Format) -> Path:
        h = hashlib.blake2b(f"{fmt.name}|{formats.encoder_hash(fmt.name)}|v{ENCODE_CACHE_VERSION}".encode(),
                            digest_size=20)
        hash_array(h, w)
        hash_array(h, importance)
        d = h.hexdigest()
        return self.folder / d[:2] / f"{d}.bin"

    def encode(self, fmt: formats.Format, w: torch.Tensor, importance: torch.Tensor | None, name: str,
               device: str) -> np.ndarray:
        path = self.path(w, importance, fmt)
        nbytes = fmt.nbytes(tuple(w.shape))
        if path.is_file() and path.stat().st_size == nbytes:  # a damaged entry is encoded again
            return np.fromfile(path, dtype=np.uint8)
        raw = np.ascontiguousarray(fmt.encode(w, importance, tensor=name, device=device)).reshape(-1)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_output(path) as tmp:
            raw.tofile(tmp)
        return raw
