"""The non-linear 4-bit types IQ4_NL and IQ4_XS: each weight is a 4-bit index into the 16-value codebook
kvalues_iq4nl (denser near zero), times a block scale.

    IQ4_NL  block of 32: d (fp16), qs[16]                                18 bytes   4.5 bpw
    IQ4_XS  super-block of 256 = 8 sub-blocks of 32: d (fp16), scales_h (uint16, 2 high bits per sub-block),
            scales_l[4] (4 low bits per sub-block), qs[128]             136 bytes   4.25 bpw
            sub-block scale = d·(ls - 32), ls a 6-bit integer

Encoding follows ggml's quantize_row_iq4_nl_impl as quantize_iq4_nl / quantize_iq4_xs call it (ntry = 7): per
32-weight block a scale search over 16 candidates; the search weight is importance·sqrt(σ² + x²) with
σ² = 2·mean(x²) over the (super-)block, or x² without importance (ggml's own default).
"""

from __future__ import annotations

import torch

from .base import Format, register
from .common import (GROUP_MAX_EPS, KVALUES_IQ4NL, Codebook, fdiv, fp16_bytes, fp16_from_bytes, importance_weight,
                     inv_or_zero, nearest_int, pack_nibbles, seq_sum, signed_absmax, unpack_nibbles)

SUB = 32   # weights per scale
NTRY = 7   # ggml's candidate half-range for IQ4 scale search


IQ4NL = Codebook(KVALUES_IQ4NL)


def _block_scales(xt: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The best scale of each 32-weight block (position-major xt, weight [32, nb]); 0 for all-zero blocks."""
    mx, amax = signed_absmax(xt)
    zero = amax < GROUP_MAX_EPS
    mx = torch.where(zero, torch.ones_like(mx), mx)

    def sums(inv):
        q = IQ4NL.nearest(inv * xt)
        wq = weight * q
        return seq_sum(wq * xt), seq_sum(wq.mul_(q))

    d = fdiv(-mx, KVALUES_IQ4NL[0])  # ggml: -max/values[0]
    sumqx, sumq2 = sums(1 / d)
    d = torch.where(sumq2 > 0, sumqx / sumq2, torch.zeros_like(sumqx))
    best = d * sumqx
    for itry in range(-NTRY, NTRY + 1):
        sumqx, sumq2 = sums(fdiv(itry + KVALUES_IQ4NL[0], mx))
        better = (sumq2 > 0) & (sumqx * sumqx > best * sumq2)
        d = torch.where(better, sumqx / sumq2, d)
        best = torch.where(better, d * sumqx, best)
    return torch.where(zero, torch.zeros_like(d), d)


def _search_weight(xt_super: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
    """Per-weight search weight over position-major super-blocks [S, nsb]."""
    if w is None:
        return xt_super * xt_super
    sigma2 = seq_sum(xt_super * xt_super) * (2.0 / xt_super.shape[0])
    return importance_weight(w.t(), xt_super, sigma2.unsqueeze(0))


def _to_sub(t: torch.Tensor) -> torch.Tensor:
    """Position-major super-blocks [S, nsb] → position-major 32-blocks [32, nsb·S/32] (sub-blocks of a super-block
    adjacent)."""
    S, nsb = t.shape
    return t.reshape(S // SUB, SUB, nsb).permute(1, 2, 0).reshape(SUB, nsb * (S // SUB))


class _IQ4(Format):
    """Levels (formats/feedback.py): the codebook index of each weight, after a header of `_head` bytes."""

    feedback = True
    _head: int

    def level_values(self, device):
        return IQ4NL.values_tensor(device)

    def levels(self, q):
        return unpack_nibbles(q[:, self._head:]).long()

    def with_levels(self, q, L):
        return torch.cat((q[:, :self._head], pack_nibbles(L)), dim=1)

    def grid(self, q):
        a = self._sub_scales(q).repeat_interleave(SUB, 1)
        return a, torch.zeros_like(a)


@register
class IQ4_NL(_IQ4):
    name, type_id, block_size, type_size = "IQ4_NL", 20, 32, 18
    _head = 2

    def _sub_scales(self, q):
        return fp16_from_bytes(q[:, 0:2]).unsqueeze(1)

    def encode_blocks(self, x, w, row_len):
        xt = x.t().contiguous()
        scale = _block_scales(xt, _search_weight(xt, w))
        # the indices are re-chosen for the float scale (not its fp16 rounding), as ggml does
        L = IQ4NL.index(inv_or_zero(scale) * xt)
        return torch.cat((fp16_bytes(scale), pack_nibbles(L.t())), dim=1)

    def decode_blocks(self, q):
        values = IQ4NL.values_tensor(q.device)
        d = fp16_from_bytes(q[:, 0:2]).unsqueeze(1)
        return d * values[unpack_nibbles(q[:, 2:18])]


@register
class IQ4_XS(_IQ4):
    name, type_id, block_size, type_size = "IQ4_XS", 23, 256, 136
    sub_block = SUB
    _head = 8

    def encode_blocks(self, x, w, row_len):
        nsb = x.shape[0]
        nsub = self.block_size // SUB
        xt_super = x.t().contiguous()
        xt = _to_sub(xt_super).contiguous()
        weight = _to_sub(_search_weight(xt_super, w)).contiguous()
        scales = _block_scales(xt, weight).reshape(nsb, nsub)
        # super-block scale from the sub-block scale of largest magnitude; 6-bit sub-block scales in [-32, 31]
        max_scale, _ = signed_absmax(scales.t())
        d = fdiv(-max_scale, 32)
        ls = nearest_int(inv_or_zero(d).unsqueeze(1) * scales).clamp_(-32, 31)
        dl = (d.unsqueeze(1) * ls).reshape(-1)
        L = IQ4NL.index(inv_or_zero(dl) * xt)  # [32, nsb·8]
        ls = (ls + 32).to(torch.int32)
        lo = ls & 0x0F
        scales_l = (lo[:, 0::2] | (lo[:, 1::2] << 4)).to(torch.uint8)
        shifts = 2 * torch.arange(nsub, device=x.device, dtype=torch.int32)
        scales_h = ((ls >> 4) << shifts).sum(dim=1)  # distinct bit pairs: the sum is their OR
        scales_h = torch.stack((scales_h & 0xFF, scales_h >> 8), dim=1).to(torch.uint8)
        qs = pack_nibbles(L.t().reshape(nsb, self.block_size))
        return torch.cat((fp16_bytes(d), scales_h, scales_l, qs), dim=1)

    def _sub_scales(self, q):
        nsub = self.block_size // SUB
        d = fp16_from_bytes(q[:, 0:2]).unsqueeze(1)
        sh = q[:, 2].to(torch.int32) | (q[:, 3].to(torch.int32) << 8)
        sl = q[:, 4:8].to(torch.int32)
        ib = torch.arange(nsub, device=q.device)
        ls = ((sl[:, ib // 2] >> (4 * (ib % 2))) & 0x0F) | (((sh.unsqueeze(1) >> (2 * ib)) & 3) << 4)
        return d * (ls - 32).to(torch.float32)  # [nb, 8]

    def decode_blocks(self, q):
        values = IQ4NL.values_tensor(q.device)
        nsub = self.block_size // SUB
        dl = self._sub_scales(q)
        y = dl.unsqueeze(2) * values[unpack_nibbles(q[:, 8:136])].reshape(-1, nsub, SUB)
        return y.reshape(-1, self.block_size)
