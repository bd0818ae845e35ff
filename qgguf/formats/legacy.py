"""The block-32 types: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0.

Each block holds 32 weights and an fp16 scale `d` (and an fp16 offset `m` for the _1 types):

    Q4_0  d, qs[16]            18 bytes  4.5 bpw   w = d·(q - 8)
    Q4_1  d, m, qs[16]         20 bytes  5.0 bpw   w = d·q + m
    Q5_0  d, qh[4], qs[16]     22 bytes  5.5 bpw   w = d·(q - 16), q's fifth bit in qh
    Q5_1  d, m, qh[4], qs[16]  24 bytes  6.0 bpw   w = d·q + m
    Q8_0  d, qs[32] (int8)     34 bytes  8.5 bpw   w = d·q

Encoding follows ggml's quantize_q*_0/1 (ggml-quants.c): without importance the round-to-nearest reference
(quantize_row_q*_ref); with importance the weighted search of quantize_row_q*_impl, whose per-weight weight is
importance·sqrt(σ² + x²) with σ² the mean square of the whole row. Q8_0 has no importance path in ggml, and
none here: at 8 bits the round-to-nearest error is already far below every other type's.
"""

from __future__ import annotations

import torch

from .base import Format, register
from .common import (fdiv, fp16_bytes, fp16_from_bytes, importance_weight, inv_or_zero, make_qkx3_quants,
                     make_qx_quants, pack_bits32, pack_nibbles, round_away, seq_sum, signed_absmax, trunc_u8,
                     unpack_bits32, unpack_nibbles)

QK = 32


class _Block32(Format):
    block_size = QK
    row_sigma2 = True  # the importance path reads the whole row's Σx²/n (encode_blocks_sigma takes it given)

    def encode_blocks(self, x: torch.Tensor, w: torch.Tensor | None, row_len: int) -> torch.Tensor:
        xt = x.t().contiguous()  # position-major [32, nb], see common.py
        if w is None:
            return self.encode_ref(xt)
        # the importance path weighs each weight by sqrt(σ² of its row + x²), as quantize_row_q*_impl
        return self.encode_blocks_sigma(x, w, _row_sigma2(x, row_len))

    def encode_blocks_sigma(self, x, w, sigma2):
        xt = x.t().contiguous()
        if w is None:
            return self.encode_ref(xt)
        return self.encode_weighted(xt, importance_weight(w.t(), xt, sigma2.unsqueeze(0)))

    # levels: weight = d·(index − offset) (+ m for the _1 types); the index bytes start at `_qs`
    feedback = True
    _n_levels: int
    _offset: int = 0
    _qs: int          # first byte of the indices (qh, then qs, for the 5-bit types)

    def level_values(self, device):
        return torch.arange(self._n_levels, dtype=torch.float32, device=device) - self._offset

    def levels(self, q):
        if self._n_levels == 16:
            return unpack_nibbles(q[:, self._qs:self._qs + 16]).long()
        return _join5(q[:, self._qs:self._qs + 4], q[:, self._qs + 4:self._qs + 20]).long()

    def with_levels(self, q, L):
        parts = [pack_nibbles(L)] if self._n_levels == 16 else list(_split5(L))
        return _bytes(q[:, :self._qs], *parts)

    def grid(self, q):
        a = fp16_from_bytes(q[:, 0:2]).unsqueeze(1).expand(-1, QK)  # the _1 types hold m in bytes 2-3
        b = fp16_from_bytes(q[:, 2:4]).unsqueeze(1).expand(-1, QK) if self._qs == 4 else torch.zeros_like(a)
        return a.contiguous(), b.contiguous()

    def encode_ref(self, xt: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def encode_weighted(self, xt: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


def _row_sigma2(x: torch.Tensor, row_len: int) -> torch.Tensor:
    """σ² = Σx²/n over each block's row (ggml's sum_x2/n_per_row, summed in row order), one value per block."""
    rows = x.reshape(-1, row_len).t()
    sq = (rows * rows).contiguous()
    sigma2 = fdiv(seq_sum(sq), row_len)
    return sigma2.repeat_interleave(row_len // x.shape[1])


def _bytes(*parts: torch.Tensor) -> torch.Tensor:
    return torch.cat(parts, dim=1).contiguous()


def _ref_symmetric(xt: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """quantize_row_q4_0_ref / q5_0_ref: d = max/-nmax, q = min(2·nmax-1, (int)(x/d + nmax + 0.5))."""
    mx, _ = signed_absmax(xt)
    d = fdiv(mx, -nmax)
    inv = inv_or_zero(d)
    L = trunc_u8(xt * inv + (nmax + 0.5)).clamp_(max=2 * nmax - 1)
    return d, L.t()


def _ref_affine(xt: torch.Tensor, nmax: int, clamp: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """quantize_row_q4_1_ref / q5_1_ref: d = (max - min)/nmax, m = min, q = (int)((x - min)/d + 0.5)."""
    mn = xt.min(dim=0).values
    mx = xt.max(dim=0).values
    d = fdiv(mx - mn, nmax)
    inv = inv_or_zero(d)
    L = trunc_u8((xt - mn) * inv + 0.5)
    if clamp:
        L = L.clamp_(max=nmax)
    return d, mn, L.t()


def _split5(L: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """5-bit quants → (qh[nb, 4], qs[nb, 16])."""
    return pack_bits32((L >> 4) & 1), pack_nibbles(L & 0x0F)


def _join5(qh: torch.Tensor, qs: torch.Tensor) -> torch.Tensor:
    return unpack_nibbles(qs) | (unpack_bits32(qh) << 4)


@register
class Q4_0(_Block32):
    name, type_id, type_size = "Q4_0", 2, 18
    _n_levels, _offset, _qs = 16, 8, 2

    def encode_ref(self, xt):
        d, L = _ref_symmetric(xt, 8)
        return _bytes(fp16_bytes(d), pack_nibbles(L))

    def encode_weighted(self, xt, weight):
        d, L = make_qx_quants(xt, 8, 1, weight)
        return _bytes(fp16_bytes(d), pack_nibbles(L.t()))

    def decode_blocks(self, q):
        d = fp16_from_bytes(q[:, 0:2]).unsqueeze(1)
        return (unpack_nibbles(q[:, 2:18]) - 8).to(torch.float32) * d


@register
class Q4_1(_Block32):
    name, type_id, type_size = "Q4_1", 3, 20
    _n_levels, _qs = 16, 4

    def encode_ref(self, xt):
        d, m, L = _ref_affine(xt, 15, clamp=True)
        return _bytes(fp16_bytes(d), fp16_bytes(m), pack_nibbles(L))

    def encode_weighted(self, xt, weight):
        d, the_min, L = make_qkx3_quants(xt, 15, weight, -0.9, 0.05, 36, False)
        return _bytes(fp16_bytes(d), fp16_bytes(-the_min), pack_nibbles(L.t()))

    def decode_blocks(self, q):
        d = fp16_from_bytes(q[:, 0:2]).unsqueeze(1)
        m = fp16_from_bytes(q[:, 2:4]).unsqueeze(1)
        return unpack_nibbles(q[:, 4:20]).to(torch.float32) * d + m


@register
class Q5_0(_Block32):
    name, type_id, type_size = "Q5_0", 6, 22
    _n_levels, _offset, _qs = 32, 16, 2

    def encode_ref(self, xt):
        d, L = _ref_symmetric(xt, 16)
        return _bytes(fp16_bytes(d), *_split5(L))

    def encode_weighted(self, xt, weight):
        d, L = make_qx_quants(xt, 16, 1, weight)
        return _bytes(fp16_bytes(d), *_split5(L.t()))

    def decode_blocks(self, q):
        d = fp16_from_bytes(q[:, 0:2]).unsqueeze(1)
        return (_join5(q[:, 2:6], q[:, 6:22]) - 16).to(torch.float32) * d


@register
class Q5_1(_Block32):
    name, type_id, type_size = "Q5_1", 7, 24
    _n_levels, _qs = 32, 4

    def encode_ref(self, xt):
        d, m, L = _ref_affine(xt, 31, clamp=False)  # ggml's q5_1_ref does not clamp; 31.x + 0.5 truncates to 31
        return _bytes(fp16_bytes(d), fp16_bytes(m), *_split5(L))

    def encode_weighted(self, xt, weight):
        d, the_min, L = make_qkx3_quants(xt, 31, weight, -0.9, 0.05, 36, False)
        return _bytes(fp16_bytes(d), fp16_bytes(-the_min), *_split5(L.t()))

    def decode_blocks(self, q):
        d = fp16_from_bytes(q[:, 0:2]).unsqueeze(1)
        m = fp16_from_bytes(q[:, 2:4]).unsqueeze(1)
        return _join5(q[:, 4:8], q[:, 8:24]).to(torch.float32) * d + m


@register
class Q8_0(_Block32):
    name, type_id, type_size = "Q8_0", 8, 34
    feedback = False  # rounded plainly: at 8 bits feedback has nothing to gain

    def encode_blocks(self, x, w, row_len):
        # quantize_row_q8_0_ref: d = amax/127, q = roundf(x/d); ggml ignores importance for Q8_0
        amax = x.abs().max(dim=1).values
        d = fdiv(amax, 127)
        inv = inv_or_zero(d)
        q = round_away(x * inv.unsqueeze(1)).to(torch.int8)
        return _bytes(fp16_bytes(d), q.view(torch.uint8))

    def decode_blocks(self, q):
        d = fp16_from_bytes(q[:, 0:2]).unsqueeze(1)
        return q[:, 2:34].contiguous().view(torch.int8).to(torch.float32) * d
