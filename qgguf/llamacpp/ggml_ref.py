"""ggml's own quantiser and dequantiser, called through ctypes from the built libggml-base.

The reference every qgguf encoder and decoder is checked against (bit-exact decode, byte-identical encode), the
baseline of the encoder speed benchmark, and the CPU encoder of measure and export (qgguf.formats.engines):
on a CPU it is 1.5–6× faster than the torch kernels, with the same bytes.
"""

from __future__ import annotations

import ctypes
import functools
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from qgguf.errors import QggufError
from qgguf.llamacpp.build import tool_path


class _TypeTraits(ctypes.Structure):
    # struct ggml_type_traits in ggml.h (pinned tree)
    _fields_ = [
        ("type_name", ctypes.c_char_p),
        ("blck_size", ctypes.c_int64),
        ("blck_size_interleave", ctypes.c_int64),
        ("type_size", ctypes.c_size_t),
        ("is_quantized", ctypes.c_bool),
        ("to_float", ctypes.c_void_p),
        ("from_float_ref", ctypes.c_void_p),
    ]


_TO_FLOAT = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.POINTER(ctypes.c_float), ctypes.c_int64)


def lib(cuda: bool | None = None) -> ctypes.CDLL:
    """libggml-base.so of the current build (`qgguf llama build`)."""
    return _load(tool_path("libggml-base.so", cuda))


@functools.lru_cache(maxsize=None)
def _load(path: Path) -> ctypes.CDLL:
    so = ctypes.CDLL(str(path))
    so.ggml_quantize_chunk.restype = ctypes.c_size_t
    so.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_float), ctypes.c_void_p,
                                       ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                                       ctypes.POINTER(ctypes.c_float)]
    so.ggml_quantize_init.argtypes = [ctypes.c_int]
    so.ggml_quantize_requires_imatrix.restype = ctypes.c_bool
    so.ggml_quantize_requires_imatrix.argtypes = [ctypes.c_int]
    so.ggml_get_type_traits.restype = ctypes.POINTER(_TypeTraits)
    so.ggml_get_type_traits.argtypes = [ctypes.c_int]
    so.ggml_row_size.restype = ctypes.c_size_t
    so.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
    if hasattr(so, "qgguf_quantize_rows_sigma2"):  # the fork's patch 0011
        so.qgguf_quantize_rows_sigma2.restype = ctypes.c_size_t
        so.qgguf_quantize_rows_sigma2.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_float), ctypes.c_void_p,
                                                  ctypes.c_int64, ctypes.c_int64, ctypes.POINTER(ctypes.c_float),
                                                  ctypes.POINTER(ctypes.c_float)]
    return so


def has_row_sigma2(so: ctypes.CDLL) -> bool:
    """Whether `so` takes the block-32 types' row statistic from the caller (cpp_ext patch 0011)."""
    return hasattr(so, "qgguf_quantize_rows_sigma2")


def traits(type_id: int) -> _TypeTraits:
    return lib().ggml_get_type_traits(type_id).contents


def row_size(type_id: int, n_per_row: int) -> int:
    return int(lib().ggml_row_size(type_id, n_per_row))


def quantize(type_id: int, x: np.ndarray, importance: np.ndarray | None = None) -> np.ndarray:
    """ggml_quantize_chunk over a whole 2-D float32 array: raw bytes, rows × row-size."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise QggufError(f"ggml reference quantize needs a 2-D array, got shape {x.shape}")
    nrows, n_per_row = x.shape
    t = traits(type_id)
    if n_per_row % t.blck_size:
        raise QggufError(f"ggml type {t.type_name.decode()} needs rows that are a multiple of {t.blck_size}")
    out = np.zeros((nrows, row_size(type_id, n_per_row)), dtype=np.uint8)
    imp = None
    if importance is not None:
        importance = np.ascontiguousarray(importance, dtype=np.float32).reshape(-1)
        if importance.size != n_per_row:
            raise QggufError(f"importance has {importance.size} values, rows have {n_per_row}")
        imp = importance.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
    lib().ggml_quantize_init(type_id)
    n = lib().ggml_quantize_chunk(type_id, x.ctypes.data_as(ctypes.POINTER(ctypes.c_float)),
                                  out.ctypes.data_as(ctypes.c_void_p), 0, nrows, n_per_row, imp)
    assert n == out.nbytes, (n, out.nbytes)
    return out


def quantize_rows(so: ctypes.CDLL, type_id: int, x: np.ndarray, importance: np.ndarray | None,
                  out: np.ndarray, threads: int, sigma2: np.ndarray | None = None) -> None:
    """ggml_quantize_chunk of the rows of a C-contiguous float32 `x` into `out` (rows × row-size uint8), split
    over `threads` threads by rows. Rows are quantised independently, so the bytes do not depend on the split;
    ctypes releases the GIL for each call, so the threads run in parallel.

    `sigma2` (float32 [rows], Q4_0/Q4_1/Q5_0/Q5_1 with importance, has_row_sigma2): each row's statistic σ² of
    the importance weight qw·sqrt(σ² + x²), in place of the row's own Σx²/n — a row here is then one block of a
    longer row whose σ² it is."""
    nrows, n_per_row = x.shape
    imp = None if importance is None else importance.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
    if sigma2 is not None and (importance is None or not has_row_sigma2(so)):
        raise QggufError("a given row statistic needs the importance and the fork's qgguf_quantize_rows_sigma2 "
                         "(patch 0011); run `qgguf llama build`")
    so.ggml_quantize_init(type_id)  # the tables of the types that have them, once, before any thread

    def run(r0: int, r1: int) -> None:
        src = x[r0:r1].ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        dst = out[r0:r1].ctypes.data_as(ctypes.c_void_p)
        if sigma2 is not None:
            n = so.qgguf_quantize_rows_sigma2(type_id, src, dst, r1 - r0, n_per_row, imp,
                                              sigma2[r0:r1].ctypes.data_as(ctypes.POINTER(ctypes.c_float)))
        else:
            n = so.ggml_quantize_chunk(type_id, src, dst, 0, r1 - r0, n_per_row, imp)
        if n != out[r0:r1].nbytes:
            raise QggufError(f"ggml_quantize_chunk wrote {n} bytes for {r1 - r0} rows, expected {out[r0:r1].nbytes}")

    # a few pieces per thread evens out rows of unequal cost; each piece is at least 64 rows
    pieces = max(1, min(nrows // 64, 4 * threads))
    bounds = np.linspace(0, nrows, pieces + 1).astype(np.int64)
    spans = [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
    if threads <= 1 or len(spans) == 1:
        for a, b in spans:
            run(a, b)
        return
    with ThreadPoolExecutor(max_workers=threads) as pool:
        for f in [pool.submit(run, a, b) for a, b in spans]:
            f.result()


def dequantize(type_id: int, raw: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """ggml's to_float of raw bytes: float32 of `shape` (the row last)."""
    raw = np.ascontiguousarray(raw, dtype=np.uint8)
    t = traits(type_id)
    if not t.to_float:
        raise QggufError(f"ggml type {t.type_name.decode()} has no to_float")
    k = int(np.prod(shape))
    out = np.empty(k, dtype=np.float32)
    _TO_FLOAT(t.to_float)(raw.ctypes.data_as(ctypes.c_void_p), out.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), k)
    return out.reshape(shape)
