"""Unquantised types: F32, F16, BF16."""

from __future__ import annotations

import torch

from .base import Format, register


class _Float(Format):
    block_size = 1
    quantized = False
    dtype: torch.dtype

    def encode_blocks(self, x, w, row_len):
        return self._to(x).reshape(-1, 1).contiguous().view(torch.uint8).reshape(x.shape[0], self.type_size)

    def decode_blocks(self, q):
        return q.contiguous().view(self.dtype).to(torch.float32).reshape(-1, 1)

    def _to(self, x):
        return x.to(self.dtype)


@register
class F32(_Float):
    name, type_id, type_size, dtype = "F32", 0, 4, torch.float32


@register
class F16(_Float):
    name, type_id, type_size, dtype = "F16", 1, 2, torch.float16


@register
class BF16(_Float):
    """ggml rounds to nearest even (and keeps NaN quiet), as torch's cast does."""

    name, type_id, type_size, dtype = "BF16", 30, 2, torch.bfloat16
