"""Budgets and the file layout: what a GGUF's bytes are made of, so that a size target is met exactly."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Iterable

import numpy as np

from qgguf.errors import QggufError

HEADER_SLACK = 512  # bytes for the metadata keys export adds to the converter's header (quantized_by, ...)
GGUF_ALIGNMENT = 32  # gguf-py's and llama.cpp's default general.alignment


@dataclass(frozen=True)
class FileLayout:
    """What the GGUF holds besides the planned tensors; planned tensors' own padding is added by the solver.

    header_bytes:  header, metadata (tokenizer included) and tensor infos, padded to the alignment.
    fixed_bytes:   data bytes of tensors that are not planned (norms and other 1-D tensors kept in F32).
    fixed_padded:  the same, each tensor padded to the alignment as it lies in the file.
    fixed_weights: their element count (llama.cpp's BPW counts every tensor).
    """

    header_bytes: int = 0
    fixed_bytes: int = 0
    fixed_padded: int = 0
    fixed_weights: int = 0
    alignment: int = GGUF_ALIGNMENT

    @classmethod
    def from_tensors(cls, header_bytes: int, fixed: Iterable[tuple[int, int]],
                     alignment: int = GGUF_ALIGNMENT) -> "FileLayout":
        """`fixed`: (nbytes, n_elements) of each tensor that is not planned."""
        fixed = list(fixed)
        return cls(header_bytes=int(header_bytes), fixed_bytes=sum(int(b) for b, _ in fixed),
                   fixed_padded=sum(padded(int(b), alignment) for b, _ in fixed),
                   fixed_weights=sum(int(n) for _, n in fixed), alignment=int(alignment))


def padded(nbytes: int, alignment: int) -> int:
    return -(-int(nbytes) // alignment) * alignment


@dataclass(frozen=True)
class Budget:
    """A budget on the whole file (--target-size) or on llama.cpp's bits per weight (--target-bpw).

    --target-size counts every byte of the file: header, metadata, tokenizer, every tensor and its alignment
    padding. --target-bpw is the figure llama.cpp prints when it loads a model: 8 × (data bytes of all tensors)
    / (elements of all tensors), so the F32 norms count too, and metadata and padding do not.
    """

    kind: str  # "size" or "bpw"
    value: float

    @classmethod
    def target_size(cls, nbytes: int | float) -> "Budget":
        if not nbytes > 0:
            raise QggufError(f"--target-size must be a positive size, not {nbytes}")
        return cls("size", float(nbytes))

    @classmethod
    def target_bpw(cls, bpw: float) -> "Budget":
        if not 0 < bpw <= 64:
            raise QggufError(f"--target-bpw must be between 0 and 64 bits per weight, not {bpw}")
        return cls("bpw", float(bpw))

    def cost(self, nbytes: np.ndarray, layout: FileLayout) -> np.ndarray:
        """What one planned tensor of `nbytes` costs against this budget."""
        if self.kind == "size":
            a = layout.alignment
            return -(-nbytes // a) * a
        return nbytes

    def capacity(self, layout: FileLayout, planned_weights: int) -> int:
        """Bytes the planned tensors may cost in all."""
        if self.kind == "size":
            return int(math.floor(self.value)) - layout.header_bytes - layout.fixed_padded
        return int(math.floor(self.value * (planned_weights + layout.fixed_weights) / 8.0)) - layout.fixed_bytes

    def describe(self, cost: float, layout: FileLayout, planned_weights: int) -> str:
        """A total cost of the planned tensors in this budget's own unit."""
        if self.kind == "size":
            total = cost + layout.header_bytes + layout.fixed_padded
            return f"{int(total):,} bytes ({total / 2**20:.2f} MiB)"
        return f"{8.0 * (cost + layout.fixed_bytes) / (planned_weights + layout.fixed_weights):.4f} bpw"

    def __str__(self) -> str:
        return f"--target-size {int(self.value):,} bytes" if self.kind == "size" else f"--target-bpw {self.value:g}"


SIZE_UNITS = {"": 1, "B": 1, "K": 1000, "KB": 1000, "KIB": 1024, "M": 1000**2, "MB": 1000**2, "MIB": 1024**2,
              "G": 1000**3, "GB": 1000**3, "GIB": 1024**3}


def parse_size(text: str, option: str = "--target-size") -> int:
    """'1.2GiB', '800MB', '123456789' → bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    unit = m.group(2).upper() if m else None
    if not m or unit not in SIZE_UNITS:
        raise QggufError(f"{option} {text!r} is not a size; write e.g. 1.2GiB, 800MB or 123456789")
    return int(float(m.group(1)) * SIZE_UNITS[unit])
