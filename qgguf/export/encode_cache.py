"""The encode cache: encoded tensors kept between exports of one model at several budgets."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch

from qgguf import formats
from qgguf.formats.engines import Engine
from qgguf.files import atomic_output
from qgguf.hashing import code_sha256, hash_array

ENCODE_CACHE_VERSION = 2  # 2: each entry ends in a digest of its bytes
DIGEST_BYTES = 16


class EncodeCache:
    """Encoded tensor bytes in a folder, one file per (weights, importance, type, encoder sources; and for
    error-feedback rounding the input covariance and the feedback code)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)

    def path(self, w: torch.Tensor, importance: torch.Tensor | None, fmt: formats.Format, engine: Engine,
             covariance=None, tokens: int | None = None) -> Path:
        if covariance is None:  # plain rounding: the engine's code
            code = f"{engine.key(fmt)}|{code_sha256('export')}"
        else:  # error-feedback rounding runs the torch kernels' levels whatever the engine: that code and H
            code = (f"torch:{formats.encoder_hash(fmt.name)}|{code_sha256('export')}"
                    f"|feedback|{code_sha256('formats/feedback.py')}|tokens={tokens}")
        h = hashlib.blake2b(f"{fmt.name}|{code}|v{ENCODE_CACHE_VERSION}".encode(), digest_size=20)
        hash_array(h, w)
        hash_array(h, importance)
        if covariance is not None:
            hash_array(h, covariance)
        d = h.hexdigest()
        return self.folder / d[:2] / f"{d}.bin"

    def encode(self, fmt: formats.Format, w: torch.Tensor, importance: torch.Tensor | None, name: str,
               device: str, engine: Engine, covariance=None, tokens: int | None = None) -> np.ndarray:
        from qgguf.export.writer import encode_tensor

        path = self.path(w, importance, fmt, engine, covariance, tokens)
        nbytes = fmt.nbytes(tuple(w.shape))
        cached = self._read(path, nbytes)
        if cached is not None:
            return cached
        raw = np.ascontiguousarray(encode_tensor(fmt, w, importance, name, device, engine, covariance,
                                                 tokens)).reshape(-1)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_output(path) as tmp:
            with open(tmp, "wb") as f:
                f.write(raw.tobytes())
                f.write(_digest(raw))
        return raw

    @staticmethod
    def _read(path: Path, nbytes: int) -> np.ndarray | None:
        """The entry's bytes if it is whole: the right size and its content digest intact (else encode again)."""
        try:
            if path.stat().st_size != nbytes + DIGEST_BYTES:
                return None
            data = np.fromfile(path, dtype=np.uint8)
        except OSError:
            return None
        raw = data[:nbytes]
        return raw if data[nbytes:].tobytes() == _digest(raw) else None


def _digest(raw: np.ndarray) -> bytes:
    return hashlib.blake2b(raw.tobytes(), digest_size=DIGEST_BYTES).digest()
