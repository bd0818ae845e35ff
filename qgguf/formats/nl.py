"""Non-linear block types (NL*): a fixed int8 codebook per bit-width, applied to block-scaled weights.

Each type stores, per block of 32 weights, an index of `bits` bits into a sorted codebook of 2^bits int8 values
and, per block, a scale: either an fp16 scale per 32 (the `_32` layouts, like IQ4_NL) or an fp16 super-block scale
with signed 6-bit sub-block scales in a 256-weight super-block (the `_XS` layouts, like IQ4_XS). A weight decodes
as `scale · codebook[index]`.

The codebooks come from tools/nl_design.py (docs/design.md, "Formats: the new non-linear types"): levels spaced
by the cube root of the density of block-absmax-normalised weights, refined by Lloyd-Max on real normalised weights,
with -127 kept as a level because the encoder maps each block's signed maximum there (the point mass at ±1 of
absmax-normalised data).

Encoder (importance-weighted, the same algorithm as the C quantiser in cpp_ext, float op for float op so both give
the same bytes): per 32-weight block, try the inverse scales `num/max` for a fixed list of numerators around -127
(max = the block's signed absmax; numerators below -127 clip the largest weights), assign each weight its nearest
codebook value, and keep the candidate with the lowest weighted error under its least-squares scale; the block
stores the gain-unbiased scale Σw·x² / Σw·q·x of that candidate (Σw·x̂·x = Σw·x², so a block's reconstruction is
not shrunk towards zero, as a least-squares one is by its relative error).
The `_XS` layouts then quantise the 8 block scales to 6 bits against the super-block's largest one (as IQ4_XS) and
re-assign the indices with the stored scales.

Index bits are stored in planes (a 4- or 2-bit low plane and a 2- or 1-bit high plane) so that one 32-byte load and
one shift give 32 consecutive indices: within a group of G weights, byte j of a k-bit plane holds weight j + m·G·k/8
at bit m·k (G = 256/k in the super-block layouts, 32 in the block-32 layouts).
"""

from __future__ import annotations

from typing import ClassVar

import torch

from .base import Format, register
from .common import GROUP_MAX_EPS, fp16_bytes, fp16_from_bytes, fp16_round, nearest_int, seq_sum

# Type ids: far above upstream's (42 is the highest at the pinned commit) so that a file with an NL type can never be
# read as a future upstream type: 100 + bits for the _XS layouts, 110 + bits for the _32 ones (docs/design.md,
# "Formats: the new non-linear types").
TYPE_ID_XS = 100
TYPE_ID_32 = 110

# Sub-block (scale) size inside every layout; super-block size of the _XS layouts.
SUB = 32
QK_K = 256

# Bits of a sub-block scale in the _XS layouts (signed, -32..31, as IQ4_XS).
SCALE_BITS = 6

# The largest finite fp16: a block's scale is clamped to ±this (a larger one would be stored as Inf).
SCALE_MAX = 65504.0


# floor(x) is clamped to this range before the table lookup: every int8 codebook value lies well inside it.
_TABLE_LO, _TABLE_HI = -256, 255


def index_table(values: torch.Tensor) -> torch.Tensor:
    """For integer-valued sorted `values`: T[k - _TABLE_LO] = #(values <= k). Since v <= x exactly when
    v <= floor(x) for integer v, T[floor(x)] is searchsorted(values, x, right=True), at a gather's cost."""
    k = torch.arange(_TABLE_LO, _TABLE_HI + 1, dtype=torch.float32, device=values.device)
    return torch.searchsorted(values, k, right=True)


def nearest_index(values: torch.Tensor, x: torch.Tensor, table: torch.Tensor | None = None) -> torch.Tensor:
    """Index of the nearest of the sorted float32 `values` for each x, ties as ggml's best_index_int8 (the upper
    one unless x is strictly nearer the lower); ~10x fewer passes than a clamp-and-select form. `table`
    (index_table, integer-valued codebooks only) replaces the binary search."""
    n = values.numel()
    if table is None:
        mu = torch.searchsorted(values, x.contiguous(), right=True)
    else:
        mu = table[(torch.floor(x).clamp_(_TABLE_LO, _TABLE_HI) - _TABLE_LO).long()]
    mu = mu.clamp_(1, n - 1)
    # below values[0]: x - lo <= 0 < hi - x picks 0; above values[n-1]: x - lo > 0 >= hi - x picks n-1
    return mu - ((x - values[mu - 1]) < (values[mu] - x)).long()


# ------------------------------------------------------------------------------------------------ bit planes
# How a b-bit index splits into planes, low plane first (the design study also builds 1-, 4- and 8-bit types).
PLANES: dict[int, tuple[int, ...]] = {1: (1,), 2: (2,), 3: (2, 1), 4: (4,), 5: (4, 1), 6: (4, 2), 8: (4, 4)}


def plane_bits(bits: int) -> tuple[int, ...]:
    """How a `bits`-bit index splits into planes, low plane first: 2 → (2,), 3 → (2, 1), 5 → (4, 1), 6 → (4, 2)."""
    return PLANES[bits]


def pack_plane(L: torch.Tensor, k: int, group: int) -> torch.Tensor:
    """int[nb, n] of k-bit values → uint8[nb, n·k/8]: in each group of `group` values, byte j holds value
    j + m·group·k/8 at bit m·k."""
    nb, n = L.shape
    per = 8 // k
    g = L.to(torch.int32).reshape(nb, n // group, per, group // per)
    shifts = (torch.arange(per, device=L.device, dtype=torch.int32) * k).reshape(1, 1, per, 1)
    return (g << shifts).sum(dim=2).to(torch.uint8).reshape(nb, n * k // 8)  # distinct bits: sum = OR


def unpack_plane(q: torch.Tensor, k: int, group: int) -> torch.Tensor:
    """uint8[nb, n·k/8] → int32[nb, n], the inverse of pack_plane."""
    nb, m = q.shape
    n = m * 8 // k
    per = 8 // k
    g = q.to(torch.int32).reshape(nb, n // group, 1, group // per)
    shifts = (torch.arange(per, device=q.device, dtype=torch.int32) * k).reshape(1, 1, per, 1)
    return ((g >> shifts) & ((1 << k) - 1)).reshape(nb, n)


def pack_sub_scales(ls: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """uint 6-bit sub-block scales [nb, ns] → (scales_h[nb, ns/4], scales_l[nb, ns/2]) as IQ4_XS stores them:
    the low nibble of scale i in byte i/2 (odd i in the high nibble), its top 2 bits in byte i/4 at bit 2·(i%4)."""
    nb, ns = ls.shape
    lo = (ls & 0xF).to(torch.int32).reshape(nb, ns // 2, 2)
    hi = (ls >> 4).to(torch.int32).reshape(nb, ns // 4, 4)
    scales_l = (lo[:, :, 0] | (lo[:, :, 1] << 4)).to(torch.uint8)
    sh = torch.arange(4, device=ls.device, dtype=torch.int32) * 2
    scales_h = (hi << sh).sum(dim=2).to(torch.uint8)
    return scales_h, scales_l


def unpack_sub_scales(scales_h: torch.Tensor, scales_l: torch.Tensor) -> torch.Tensor:
    nb, nl = scales_l.shape
    ns = 2 * nl
    lo = torch.stack((scales_l.to(torch.int32) & 0xF, scales_l.to(torch.int32) >> 4), dim=2).reshape(nb, ns)
    sh = torch.arange(4, device=scales_h.device, dtype=torch.int32) * 2
    hi = ((scales_h.to(torch.int32).unsqueeze(-1) >> sh) & 3).reshape(nb, ns)
    return lo | (hi << 4)


# ------------------------------------------------------------------------------------------------ the format
class NLFormat(Format):
    """A non-linear type: `bits`-bit indices into `values` (sorted int8), scaled per 32 weights.

    layout "32": block = 32 weights, fp16 scale, then the index planes (2 + 4·bits bytes).
    layout "XS": block = 256 weights: fp16 super-scale d, scales_h[2], scales_l[4] (signed 6-bit scales per 32,
    stored +32), then the index planes (8 + 32·bits bytes).
    """

    stock = False
    bits: ClassVar[int]
    layout: ClassVar[str]
    values: ClassVar[tuple[int, ...]]
    # Numerators n of the candidate inverse scales n/max (max = the block's signed absmax).
    candidates: ClassVar[tuple[int, ...]]

    def __init__(self) -> None:
        v = self.values
        if len(v) != 1 << self.bits or list(v) != sorted(set(v)) or not all(-128 <= x <= 127 for x in v):
            raise ValueError(f"{self.name}: codebook must be 2^{self.bits} distinct sorted int8 values")
        self._planes = plane_bits(self.bits)

    # -------------------------------------------------------------- geometry
    @property
    def n_sub(self) -> int:
        return self.block_size // SUB

    @property
    def header_bytes(self) -> int:
        return 2 if self.layout == "32" else 2 + self.n_sub // 4 + self.n_sub // 2

    def _group(self, k: int) -> int:
        return SUB if self.layout == "32" else QK_K // k

    # -------------------------------------------------------------- encoder
    def block_scales(self, xt: torch.Tensor, wt: torch.Tensor, vals: torch.Tensor | None = None, *,
                     unbiased: bool = True) -> torch.Tensor:
        """Scale of each 32-weight block (position-major xt, wt [32, nb]): the candidate with the lowest weighted
        error under its least-squares scale Σw·q·x / Σw·q², stored as the gain-unbiased scale Σw·x² / Σw·q·x
        (`unbiased`, the encoder's choice) or as the least-squares one (the design study's Lloyd-Max loop).

        Why unbiased: with a centroid codebook the least-squares reconstruction is the weights shrunk by their
        relative error (Σw·x̂·x = Σw·x̂²), in every block the same way; such shrinkage adds up across tensors and
        layers, which the planner's per-weight ½·ΣF·err cannot see (docs/design.md, "Gain-unbiased NL scales").
        The gain-unbiased scale is kept only when it is finite and has the least-squares scale's sign (Σw·x² can
        underflow to 0 or overflow; negative importance, which encode refuses, can flip it); otherwise the block keeps
        its least-squares scale. Either is clamped to ±SCALE_MAX, the fp16 range.

        `vals` (float32, sorted) replaces the codebook: the design study trains codebooks through this search."""
        table = None
        if vals is None:
            vals = torch.tensor(self.values, dtype=torch.float32, device=xt.device)
            table = index_table(vals)
        amax = xt.abs().max(dim=0).values
        idx = xt.abs().argmax(dim=0)  # the first largest |x|, as C's strict `>`
        mx = xt.gather(0, idx.unsqueeze(0)).squeeze(0)
        zero = amax < GROUP_MAX_EPS
        mx = torch.where(zero, torch.ones_like(mx), mx)
        d = torch.zeros_like(amax)
        best = torch.zeros_like(amax)
        best_qx = torch.zeros_like(amax)
        for num in self.candidates:
            iscale = torch.tensor(float(num), dtype=torch.float32, device=xt.device) / mx
            q = vals[nearest_index(vals, iscale * xt, table)]
            wq = wt * q
            sumqx = seq_sum(wq * xt)
            sumq2 = seq_sum(wq * q)
            better = (sumq2 > 0) & (sumqx * sumqx > best * sumq2)
            d = torch.where(better, sumqx / torch.where(better, sumq2, torch.ones_like(sumq2)), d)
            best = torch.where(better, d * sumqx, best)
            best_qx = torch.where(better, sumqx, best_qx)
        if unbiased:
            found = d != 0
            sumxx = seq_sum(wt * xt * xt)
            u = sumxx / torch.where(found, best_qx, torch.ones_like(best_qx))
            ok = found & torch.isfinite(u) & (u != 0) & ((u > 0) == (d > 0))
            d = torch.where(ok, u, d)
        d = d.clamp(-SCALE_MAX, SCALE_MAX)
        return torch.where(zero, torch.zeros_like(d), d)

    def encode_blocks(self, x: torch.Tensor, w: torch.Tensor | None, row_len: int) -> torch.Tensor:
        nb = x.shape[0]
        dev = x.device
        vals = torch.tensor(self.values, dtype=torch.float32, device=dev)
        xs = x.reshape(nb * self.n_sub, SUB)
        xt = xs.t().contiguous()
        wt = torch.ones_like(xt) if w is None else w.reshape(nb * self.n_sub, SUB).t().contiguous()
        scales = self.block_scales(xt, wt)  # [nb·n_sub]
        if self.layout == "32":
            d = fp16_round(scales)
            head = fp16_bytes(d)
            dl = d
        else:
            sc = scales.reshape(nb, self.n_sub)
            idx = sc.abs().argmax(dim=1, keepdim=True)
            max_scale = sc.gather(1, idx).squeeze(1)
            max_scale = torch.where(max_scale.abs() > 0, max_scale, torch.zeros_like(max_scale))  # C keeps +0
            d = fp16_round(-max_scale / 32)
            dsafe = torch.where(d != 0, d, torch.ones_like(d))
            iscale = torch.where(d != 0, 1 / dsafe, torch.zeros_like(d))
            ls = nearest_int(iscale.unsqueeze(1) * sc).clamp_(-32, 31)
            dl = (d.unsqueeze(1) * ls).reshape(-1)
            sh, sl = pack_sub_scales((ls + 32).to(torch.int32))
            head = torch.cat((fp16_bytes(d), sh, sl), dim=1)
        dls = torch.where(dl != 0, dl, torch.ones_like(dl))
        idl = torch.where(dl != 0, 1 / dls, torch.zeros_like(dl))
        L = nearest_index(vals, idl.unsqueeze(0) * xt, index_table(vals)).t().reshape(nb, self.block_size)
        parts = [head]
        shift = 0
        for k in self._planes:
            parts.append(pack_plane((L >> shift) & ((1 << k) - 1), k, self._group(k)))
            shift += k
        return torch.cat(parts, dim=1)

    # -------------------------------------------------------------- levels (formats/feedback.py)
    feedback = True

    def level_values(self, device):
        return torch.tensor(self.values, dtype=torch.float32, device=device)

    def levels(self, q):
        return self._indices(q).long()

    def with_levels(self, q, L):
        parts = [q[:, :self.header_bytes]]
        shift = 0
        for k in self._planes:
            parts.append(pack_plane((L >> shift) & ((1 << k) - 1), k, self._group(k)))
            shift += k
        return torch.cat(parts, dim=1)

    def grid(self, q):
        a = self._sub_scales(q).repeat_interleave(SUB, 1)
        return a, torch.zeros_like(a)

    # -------------------------------------------------------------- decoder
    def _sub_scales(self, q: torch.Tensor) -> torch.Tensor:
        d = fp16_from_bytes(q[:, 0:2])
        if self.layout == "32":
            return d.unsqueeze(1)
        nh = self.n_sub // 4
        ls = unpack_sub_scales(q[:, 2:2 + nh], q[:, 2 + nh:self.header_bytes])
        return d.unsqueeze(1) * (ls - 32).to(torch.float32)  # ggml: d * (float)(ls - 32)

    def _indices(self, q: torch.Tensor) -> torch.Tensor:
        L = torch.zeros((q.shape[0], self.block_size), dtype=torch.int32, device=q.device)
        off, shift = self.header_bytes, 0
        for k in self._planes:
            nbytes = self.block_size * k // 8
            L |= unpack_plane(q[:, off:off + nbytes], k, self._group(k)) << shift
            off += nbytes
            shift += k
        return L

    def decode_blocks(self, q: torch.Tensor) -> torch.Tensor:
        nb = q.shape[0]
        vals = torch.tensor(self.values, dtype=torch.float32, device=q.device)
        dl = self._sub_scales(q)
        L = self._indices(q)
        y = vals[L].reshape(nb, self.n_sub, SUB)
        return (dl.reshape(nb, -1, 1) * y).reshape(nb, self.block_size)


def nl_class(name: str, bits: int, layout: str, values, candidates, type_id: int = -1) -> type[NLFormat]:
    """A (not registered) NL type: the design study builds candidates with this."""
    block = 32 if layout == "32" else QK_K
    header = 2 if layout == "32" else 2 + (block // SUB) // 4 + (block // SUB) // 2
    attrs = dict(name=name, type_id=type_id, bits=bits, layout=layout, values=tuple(int(v) for v in values),
                 candidates=tuple(int(c) for c in candidates), block_size=block, type_size=header + block * bits // 8,
                 sub_block=SUB if layout == "XS" else None)
    return type(name, (NLFormat,), attrs)


# ------------------------------------------------------------------------------------------------ the family
# Codebooks (tools/nl_design.py). These tables, PLANES and CANDIDATES are the one definition of the family: the
# fork's copies (ggml-nl.h for the C quantiser and kernels, patch 0003 for gguf-py) are written from them by
# `python -m qgguf.formats.nl_tables --write`, and tests/test_nl.py fails while a copy differs.
VALUES: dict[int, tuple[int, ...]] = {
    2: (-127, -45, 14, 84),
    3: (-127, -78, -46, -19, 5, 30, 59, 99),
    5: (-127, -117, -101, -90, -81, -72, -64, -57, -50, -43, -36, -30, -24, -18, -12, -6,
        0, 6, 12, 17, 24, 30, 36, 43, 50, 58, 66, 74, 83, 93, 104, 117),
    6: (-127, -123, -114, -107, -101, -96, -91, -86, -81, -77, -72, -68, -64, -60, -56, -53,
        -49, -46, -42, -39, -36, -32, -29, -26, -23, -20, -17, -14, -11, -9, -6, -3,
        0, 3, 6, 9, 11, 14, 17, 20, 23, 26, 29, 32, 36, 39, 42, 46,
        49, 53, 57, 60, 64, 68, 73, 77, 82, 87, 92, 97, 103, 109, 115, 122),
}

# Candidate inverse-scale numerators -127 - lo ... -127 + hi in steps of `step`: wide and coarse at 2 bits, where
# clipping the block's largest weights pays, narrow and fine at 5-6 bits (chosen in the design study).
CANDIDATES: dict[int, tuple[int, int, int]] = {2: (96, 16, 4), 3: (48, 8, 2), 4: (16, 8, 1), 5: (16, 8, 1),
                                              6: (8, 4, 1)}


def candidates(bits: int) -> tuple[int, ...]:
    lo, hi, step = CANDIDATES[bits]
    return tuple(range(-127 - lo, -127 + hi + 1, step))


for _bits in (2, 3, 5, 6):
    register(nl_class(f"NL{_bits}_XS", _bits, "XS", VALUES[_bits], candidates(_bits), TYPE_ID_XS + _bits))
for _bits in (2, 3, 5, 6):
    register(nl_class(f"NL{_bits}_32", _bits, "32", VALUES[_bits], candidates(_bits), TYPE_ID_32 + _bits))
