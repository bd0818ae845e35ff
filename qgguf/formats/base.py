"""The format registry's base: one class per GGUF type, registered by name and ggml type id.

A format works on blocks. Subclasses implement two vectorised kernels over a batch of blocks:

    encode_blocks(x[nb, block_size] float32, w[nb, block_size] float32 | None, row_len) -> uint8[nb, type_size]
    decode_blocks(q[nb, type_size] uint8) -> float32[nb, block_size]

where `w` is the per-element importance of each weight (the per-input-channel importance tiled over rows) and the
blocks are whole rows of `row_len` weights in row order (the legacy types' importance path needs each row's σ²).
The base class does everything else: checks (NaN/Inf, row length, importance size, byte count), the reshape of a
2-D (or N-D) tensor into blocks, chunking over rows so memory stays bounded, devices, and the numpy/torch faces.
"""

from __future__ import annotations

import hashlib
import sys
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import numpy as np
import torch

from ..errors import QggufError

if TYPE_CHECKING:
    from .engines import Engine

# Rows handled per chunk are chosen so one chunk holds about this many weights (bounded memory on big tensors).
CHUNK_WEIGHTS = 1 << 22


class Format:
    """One GGUF tensor type. Class attributes describe its geometry; see the module docstring for the kernels."""

    name: ClassVar[str]            # as llama.cpp spells it: "Q4_K"
    type_id: ClassVar[int]         # ggml_type / GGMLQuantizationType value
    block_size: ClassVar[int]      # weights per block (a super-block for K-quants)
    type_size: ClassVar[int]       # bytes per block
    sub_block: ClassVar[int | None] = None  # weights per scale inside a super-block (K-quants, IQ4_XS)
    stock: ClassVar[bool] = True   # runs on unmodified llama.cpp
    quantized: ClassVar[bool] = True

    # ---------------------------------------------------------------- geometry
    @property
    def bpw(self) -> float:
        """Bits per weight, scales included."""
        return 8.0 * self.type_size / self.block_size

    def accepts(self, row_len: int) -> bool:
        return row_len > 0 and row_len % self.block_size == 0

    def row_bytes(self, row_len: int) -> int:
        self.check_row_len(row_len)
        return row_len // self.block_size * self.type_size

    def nbytes(self, shape: tuple[int, ...]) -> int:
        """Bytes of a tensor of this shape (GGUF/ggml order: the last dimension is the row)."""
        rows = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
        return rows * self.row_bytes(int(shape[-1]))

    def check_row_len(self, row_len: int, tensor: str = "tensor") -> None:
        if not self.accepts(row_len):
            raise QggufError(f"{tensor}: {self.name} needs rows whose length is a multiple of {self.block_size}, "
                             f"this one has {row_len}; pick a type with a smaller block (e.g. Q8_0, Q4_0, IQ4_NL)")

    # ---------------------------------------------------------------- kernels (subclasses)
    def encode_blocks(self, x: torch.Tensor, w: torch.Tensor | None, row_len: int) -> torch.Tensor:
        """Blocks x [nb, block_size] (whole rows of `row_len` weights, in row order) and their importance w (same
        shape, or None) to block bytes [nb, type_size]. `row_len` is for encoders that use row statistics."""
        raise NotImplementedError

    def decode_blocks(self, q: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    # ---------------------------------------------------------------- levels (error-feedback rounding)
    # A quantised type stores per weight an index L into a sorted set of level values V (0…15 for Q4_K, the
    # codebook for IQ4/NL types) and per block the scales; weight = a·V[L] + b with a, b the block's (sub-block's)
    # scale and offset. formats/feedback.py keeps a block's scales and re-chooses its indices one column at a
    # time, so it needs the indices, the (a, b) of each weight, and the bytes with other indices.
    feedback: ClassVar[bool] = False  # whether the four methods below exist

    def level_values(self, device: torch.device | str) -> torch.Tensor:
        """The level values V, float32, ascending."""
        raise NotImplementedError

    def levels(self, q: torch.Tensor) -> torch.Tensor:
        """Blocks q [nb, type_size] → the index of every weight [nb, block_size], int64."""
        raise NotImplementedError

    def with_levels(self, q: torch.Tensor, L: torch.Tensor) -> torch.Tensor:
        """The blocks q with their indices replaced by L [nb, block_size] (scales kept)."""
        raise NotImplementedError

    def grid(self, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(a, b) [nb, block_size] float32: weight i decodes as a_i·V[L_i] + b_i (equal to decode_blocks up to
        float rounding; exactly for every type but the K-quants' −m offset, which may differ in the last bit)."""
        raise NotImplementedError

    def encode_blocks_sigma(self, x: torch.Tensor, w: torch.Tensor | None, sigma2: torch.Tensor | None
                            ) -> torch.Tensor:
        """encode_blocks for blocks that are not whole rows: `sigma2` [nb] gives each block's row statistic
        where the encoder uses one (the block-32 types' importance path); others ignore it."""
        return self.encode_blocks(x, w, self.block_size)

    # ---------------------------------------------------------------- public face
    def encode(self, weights, importance=None, *, tensor: str = "tensor", device: str | torch.device | None = None,
               engine: Engine | None = None) -> np.ndarray:
        """Quantise `weights` (rows × row_len, or N-D with the row last) to raw GGUF bytes, rows × bytes-per-row.

        `importance` is an optional per-input-channel weight vector of length row_len (imatrix, per-channel
        Fisher): the encoder then minimises the importance-weighted squared error. `engine` (engines.py): whose
        code encodes, qgguf's torch kernels (None, the default) or ggml's; the bytes are the same.
        """
        return self.encode_torch(weights, importance, tensor=tensor, device=device, engine=engine).cpu().numpy()

    def encode_torch(self, weights, importance=None, *, tensor: str = "tensor",
                     device: str | torch.device | None = None, engine: Engine | None = None) -> torch.Tensor:
        x = _as_tensor(weights, device).to(torch.float32)
        if x.ndim == 0:
            raise QggufError(f"{tensor}: cannot quantise a scalar")
        row_len = int(x.shape[-1])
        self.check_row_len(row_len, tensor)
        x = x.reshape(-1, row_len)
        if not bool(torch.isfinite(x).all()):
            bad = int((~torch.isfinite(x)).sum())
            raise QggufError(f"{tensor}: {bad} weights are NaN or Inf; fix the checkpoint before quantising")
        w = None
        if importance is not None:
            w = _as_tensor(importance, x.device).to(torch.float32).reshape(-1)
            if w.numel() != row_len:
                raise QggufError(f"{tensor}: importance has {w.numel()} values but rows have {row_len}; "
                                 "use statistics computed for this tensor")
            if not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
                raise QggufError(f"{tensor}: importance has negative, NaN or Inf values")
        if engine is not None and engine.encodes(self) and x.device.type == "cpu":
            return engine.encode_rows(self, x, w)
        nb_row = row_len // self.block_size
        rows_per_chunk = max(1, CHUNK_WEIGHTS // row_len)
        out = torch.empty((x.shape[0], nb_row * self.type_size), dtype=torch.uint8, device=x.device)
        wb = None if w is None else w.reshape(1, nb_row, self.block_size)
        for r0 in range(0, x.shape[0], rows_per_chunk):
            xc = x[r0:r0 + rows_per_chunk]
            n = xc.shape[0]
            xb = xc.reshape(n * nb_row, self.block_size)
            wc = None if wb is None else wb.expand(n, nb_row, self.block_size).reshape(n * nb_row, self.block_size)
            out[r0:r0 + n] = self.encode_blocks(xb, wc, row_len).reshape(n, nb_row * self.type_size)
        return out

    def decode(self, raw, shape, *, tensor: str = "tensor", device: str | torch.device | None = None
               ) -> torch.Tensor:
        """Dequantise raw GGUF bytes to a float32 tensor of `shape` (the row last), bit-exact with ggml."""
        q = _as_tensor(raw, device)
        if q.dtype != torch.uint8:
            q = q.contiguous().view(torch.uint8) if q.is_floating_point() or q.dtype != torch.uint8 else q
        shape = tuple(int(s) for s in shape)
        expected = self.nbytes(shape)
        if q.numel() != expected:
            raise QggufError(f"{tensor}: {q.numel()} bytes given, but a {self.name} tensor of shape {shape} "
                             f"takes {expected}; the data is truncated or of another type")
        q = q.reshape(-1, self.type_size)
        rows_per_chunk = max(1, CHUNK_WEIGHTS // self.block_size)
        out = torch.empty((q.shape[0], self.block_size), dtype=torch.float32, device=q.device)
        for b0 in range(0, q.shape[0], rows_per_chunk):
            out[b0:b0 + rows_per_chunk] = self.decode_blocks(q[b0:b0 + rows_per_chunk])
        return out.reshape(shape)

    def roundtrip(self, weights, importance=None, **kw) -> torch.Tensor:
        """decode(encode(weights)): the weights as llama.cpp will see them."""
        x = _as_tensor(weights, kw.get("device"))
        q = self.encode_torch(x, importance, **kw)
        return self.decode(q, tuple(x.shape), device=q.device)

    def __repr__(self) -> str:
        return f"<{self.name} id={self.type_id} block={self.block_size} bpw={self.bpw:.4g}>"


def _as_tensor(a, device=None) -> torch.Tensor:
    if isinstance(a, torch.Tensor):
        t = a
    else:
        t = torch.from_numpy(np.ascontiguousarray(a))
    if device is not None:
        t = t.to(device)
    return t


# -------------------------------------------------------------------------------------------------- registry
_BY_NAME: dict[str, Format] = {}
_BY_ID: dict[int, Format] = {}


def register(cls: type[Format]) -> type[Format]:
    """Class decorator: one instance per type, found by name and by ggml type id."""
    fmt = cls()
    if fmt.name in _BY_NAME or fmt.type_id in _BY_ID:
        raise RuntimeError(f"format {fmt.name} (id {fmt.type_id}) registered twice")
    _BY_NAME[fmt.name] = fmt
    _BY_ID[fmt.type_id] = fmt
    return cls


def names() -> list[str]:
    """Registered type names as llama.cpp spells them, in type-id order."""
    return [f.name for f in sorted(_BY_NAME.values(), key=lambda f: f.type_id)]


def get(name: str) -> Format:
    fmt = _BY_NAME.get(str(name).upper())
    if fmt is None:
        raise QggufError(f"unknown GGUF type {name!r}; known types: {', '.join(names())}")
    return fmt


def by_id(type_id: int) -> Format:
    fmt = _BY_ID.get(int(type_id))
    if fmt is None:
        raise QggufError(f"GGUF type id {type_id} is not in qgguf's registry; known: "
                         + ", ".join(f"{f.name}={f.type_id}" for f in _BY_ID.values()))
    return fmt


def all_formats() -> list[Format]:
    return [_BY_NAME[n] for n in names()]


@lru_cache(maxsize=None)
def encoder_hash(name: str) -> str:
    """Hash of the sources a type's encoder runs (its own module and the shared base.py and common.py).

    Caches of measurements and encoded bytes key on it: an edited encoder is never served stale results, and
    editing another type's module keeps them."""
    folder = Path(__file__).parent
    module = Path(sys.modules[type(get(name)).__module__].__file__)
    h = hashlib.blake2b(digest_size=16)
    for p in sorted({folder / "base.py", folder / "common.py", module}):
        h.update(p.name.encode())
        h.update(p.read_bytes())
    return h.hexdigest()
