"""Which code encodes a tensor: qgguf's torch kernels, or ggml's own quantiser from the built fork.

Both write the same bytes for every registered quantised type: the torch kernels reproduce ggml's float
operations one for one (common.py, "Exactness"), and tests/test_formats.py, test_kquants.py and test_nl.py hold
them byte-equal to ggml's. The choice is therefore speed alone:

    ggml   on a CPU: the fork's libggml-base (ggml_quantize_chunk through ctypes), rows split over the torch thread
           count. 1.5–6× faster than the torch kernels run eagerly (docs/benchmarks.md, "Encoder speed") and it
           compiles nothing, so a first convert spends no minutes in torch.compile.
    torch  on a GPU (the kernels run there), or on a CPU without a finished `qgguf llama build`.

QGGUF_ENCODER=torch|ggml forces one (ggml only on a CPU). Caches key on `Engine.key`, so a measurement or an
encoded tensor is tied to the code that made it even though both engines agree.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import QggufError
from .base import Format, encoder_hash

ENV = "QGGUF_ENCODER"


@dataclass(frozen=True)
class Engine:
    name: str                   # "torch" or "ggml"
    library: Path | None = None  # libggml-base.so, for "ggml"

    def key(self, fmt: Format) -> str:
        """What a cached result of `fmt` made by this engine depends on: the code that encodes."""
        if self.name == "ggml" and fmt.quantized:
            return f"ggml:{_library_sha256(self.library)}"
        return f"torch:{encoder_hash(fmt.name)}"

    def encodes(self, fmt: Format) -> bool:
        """Whether ggml encodes `fmt` here (float types stay with torch: a cast, nothing to gain)."""
        return self.name == "ggml" and fmt.quantized

    def encode_rows(self, fmt: Format, x: torch.Tensor, w: torch.Tensor | None,
                    sigma2: torch.Tensor | None = None) -> torch.Tensor:
        """Rows x [n, row_len] (float32, CPU, checked by the caller) → bytes [n, row bytes], with ggml.
        `sigma2` [n]: the block-32 types' row statistic, given (see ggml_ref.quantize_rows)."""
        from qgguf.llamacpp import ggml_ref

        so = ggml_ref._load(self.library)
        xa = np.ascontiguousarray(x.numpy(), dtype=np.float32)
        wa = None if w is None else np.ascontiguousarray(w.numpy(), dtype=np.float32)
        sa = None if sigma2 is None else np.ascontiguousarray(sigma2.numpy(), dtype=np.float32)
        out = np.empty((xa.shape[0], fmt.row_bytes(xa.shape[1])), dtype=np.uint8)
        ggml_ref.quantize_rows(so, fmt.type_id, xa, wa, out, threads=max(1, torch.get_num_threads()), sigma2=sa)
        return torch.from_numpy(out)

    def takes_row_sigma2(self) -> bool:
        """Whether encode_rows accepts `sigma2` (ggml built with cpp_ext's patch 0011)."""
        if self.name != "ggml":
            return False
        from qgguf.llamacpp import ggml_ref

        return ggml_ref.has_row_sigma2(ggml_ref._load(self.library))


TORCH = Engine("torch")


def choose(device: str | torch.device | None) -> Engine:
    """The engine for encoding on `device` (see the module docstring)."""
    forced = os.environ.get(ENV, "").strip().lower()
    if forced not in ("", "auto", "torch", "ggml"):
        raise QggufError(f"{ENV}={forced!r} is not an encoder; use torch, ggml or auto")
    on_cpu = torch.device(device or "cpu").type == "cpu"
    if forced == "torch" or (not on_cpu and forced != "ggml"):
        return TORCH
    if not on_cpu:
        raise QggufError(f"{ENV}=ggml encodes on the CPU only; drop it or pass --device cpu")
    library = _cpu_library()
    if library is None:
        if forced == "ggml":
            raise QggufError(f"{ENV}=ggml needs the built fork's libggml-base.so; run `qgguf llama build`")
        return TORCH
    return Engine("ggml", library)


def _cpu_library() -> Path | None:
    from qgguf.llamacpp.build import tool_path

    try:
        return tool_path("libggml-base.so", cuda=False)
    except QggufError:
        return None


@functools.lru_cache(maxsize=None)
def _library_sha256(path: Path | None) -> str:
    from qgguf.hashing import sha256_file

    return sha256_file(Path(path))[:32]
