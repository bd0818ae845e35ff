"""Numeric helpers shared by the quantised formats, written to reproduce ggml's float32 arithmetic exactly.

Layout. The search kernels work on *position-major* blocks: a tensor `xt[n, nb]` holds `nb` blocks of `n` weights
each, one block per column (`x[nb, n].t().contiguous()`). Element-wise work is then over contiguous rows, and a sum
over a block is a sequence of `n - 1` whole-row additions (see `seq_sum`).

Exactness. ggml-quants.c is compiled without -ffast-math and without FMA, so each of its float operations is one
IEEE float32 operation and its loops sum in index order. torch's element-wise float32 ops are IEEE-exact on CPU and
CUDA, so writing every expression with the same operand order, and summing blocks in index order, gives the same
scales and the same quants as ggml (byte-identical output), on the CPU and on a GPU alike. Traps: torch evaluates
`python_float / tensor` (and, on CUDA, `tensor / python_float`) as a multiplication by a reciprocal, two roundings
(use `fdiv`), and its vectorised CPU sqrt is not correctly rounded (use `sqrt_f32`).

Compiled kernels. The K-quants run these helpers inside torch.compile'd kernels as well (kquants._EXACT keeps the
generated code to the same float32 operations), so the helpers stay plain tensor ops that trace: one version of
each serves the eager encoders and the compiled ones.
"""

from __future__ import annotations

import numpy as np
import torch

# ggml's GROUP_MAX_EPS: a block whose largest |x| is below this is all zero.
GROUP_MAX_EPS = 1e-15

# kvalues_iq4nl (ggml-common.h): the non-linear 4-bit codebook of IQ4_NL / IQ4_XS.
KVALUES_IQ4NL = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)


# ------------------------------------------------------------------------------------------------ fp16 scales
def fp16_round(d: torch.Tensor) -> torch.Tensor:
    """float32 → fp16 → float32 (round to nearest even, as GGML_FP32_TO_FP16)."""
    return d.to(torch.float16).to(torch.float32)


def fp16_bytes(d: torch.Tensor) -> torch.Tensor:
    """float32[nb] → uint8[nb, 2]: the little-endian fp16 scale as stored in a block."""
    return d.to(torch.float16).reshape(-1, 1).view(torch.uint8)


def fp16_from_bytes(b: torch.Tensor) -> torch.Tensor:
    """uint8[nb, 2] → float32[nb]."""
    return b.contiguous().view(torch.float16).reshape(-1).to(torch.float32)


# ------------------------------------------------------------------------------------------------ rounding
def nearest_int(v: torch.Tensor) -> torch.Tensor:
    """ggml's nearest_int (the 1.5·2^23 trick) for |v| ≤ 4194303, the range ggml asserts: round half to even."""
    return torch.round(v)


def nearest_int_exact(v: torch.Tensor) -> torch.Tensor:
    """ggml's nearest_int bit for bit on any input, Inf and NaN included (as float32).

    Only needed where an inverse scale can overflow (blocks of subnormal weights), where ggml's trick returns
    -4194304 for ±Inf and 0 for NaN rather than failing.
    """
    bits = (v + 12582912.0).view(torch.int32)
    return ((bits & 0x007FFFFF) - 0x00400000).to(torch.float32)


def round_away(v: torch.Tensor) -> torch.Tensor:
    """C's roundf: round half away from zero, exactly (v + 0.5 would round twice)."""
    t = torch.trunc(v)
    return t + torch.where((v - t).abs() >= 0.5, torch.sign(v), torch.zeros_like(v))


def trunc_u8(v: torch.Tensor) -> torch.Tensor:
    """C's float → (u)int8 conversion of a non-negative value: truncation toward zero, as int32."""
    return torch.trunc(v).to(torch.int32)


def fdiv(a: torch.Tensor | float, b: torch.Tensor | float) -> torch.Tensor:
    """a / b as one IEEE float32 division (C's `a/b`) when one side is a Python number.

    torch otherwise multiplies by a reciprocal (two roundings): for `number / tensor` everywhere, and on CUDA for
    `tensor / number`. The number becomes a 0-d float32 tensor on the other operand's device.
    """
    if not isinstance(a, torch.Tensor):
        a = torch.tensor(float(a), dtype=torch.float32, device=b.device)
    if not isinstance(b, torch.Tensor):
        b = torch.tensor(float(b), dtype=torch.float32, device=a.device)
    return a / b


def inv_or_zero(d: torch.Tensor) -> torch.Tensor:
    """ggml's `id = d ? 1.0f/d : 0.0f` (`1 / tensor` is torch's reciprocal, one IEEE division, times 1: exact)."""
    return torch.where(d != 0, 1 / d, torch.zeros_like(d))


def sqrt_f32(v: torch.Tensor) -> torch.Tensor:
    """Correctly rounded float32 sqrt (C's sqrtf) of non-negative float32 v, as a float64 root rounded to float32.

    torch's vectorised CPU sqrt is not correctly rounded (it differs from sqrtf in the last bit on ~17% of
    inputs), which changes ggml's importance weights. Rounding twice is harmless here: a square root rounded to
    p' ≥ 2p + 2 bits and then to p bits is the correctly rounded p-bit root (float64: 53 ≥ 2·24 + 2); checked on
    every non-negative float32. Plain element-wise ops, so it also runs inside the K-quants' compiled kernels.
    """
    return torch.sqrt(v.to(torch.float64)).to(torch.float32)


def importance_weight(w: torch.Tensor, x: torch.Tensor, sigma2: torch.Tensor) -> torch.Tensor:
    """ggml's importance-path weight of each x: `qw[j] * sqrtf(sigma2 + x[j]*x[j])` (sigma2 broadcast to x).

    The quantize_row_*_impl functions each take σ² over their own span (row, block or super-block)."""
    return w * sqrt_f32(sigma2 + x * x)


# ------------------------------------------------------------------------------------------------ block reductions
def _seq_sum_loop(t: torch.Tensor) -> torch.Tensor:
    rows = t.unbind(0)  # one call for all views: cheaper than indexing position by position
    acc = rows[0].clone()
    for r in rows[1:]:  # over the positions of one block (a constant), never over blocks
        acc += r
    return acc


def _numpy_sums_in_order() -> bool:
    """Whether numpy's add.reduce over axis 0 of a C-contiguous float32 array adds the rows in index order (its
    inner loop runs along the contiguous axis, out[j] += x[i, j]; pairwise summation is only used along a
    contiguous reduced axis). Checked once on values spread over 40 binades, where another order shows."""
    g = torch.Generator().manual_seed(0)
    for n, m in ((2, 2), (3, 5), (16, 7), (33, 64), (256, 9), (32, 1000)):
        x = torch.randn(n, m, generator=g) * torch.exp(torch.rand(n, m, generator=g) * 40 - 20)
        if not np.array_equal(_seq_sum_loop(x).numpy().view(np.uint32),
                              np.add.reduce(x.numpy(), axis=0).view(np.uint32)):
            return False
    return True


_NUMPY_IN_ORDER = _numpy_sums_in_order()


def seq_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over dim 0 in index order, in float32: ggml's `for (i...) s += t[i]` bit for bit.

    On the CPU numpy's add.reduce does the same additions in one call (checked at import, see
    _numpy_sums_in_order): 10-20× less overhead on the narrow blocks error-feedback rounding encodes one block
    column at a time. Traced (torch.compile), on other devices and with fewer than two sums: the loop."""
    if (_NUMPY_IN_ORDER and t.device.type == "cpu" and t.dtype == torch.float32 and t.ndim >= 2
            and t.shape[0] > 1 and t[0].numel() >= 2 and not t.requires_grad
            and not torch.compiler.is_compiling()):
        return torch.from_numpy(np.add.reduce(t.contiguous().numpy(), axis=0))
    return _seq_sum_loop(t)


def signed_absmax(xt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(max, amax) over dim 0: amax = largest |x|, max = that element with its sign.

    ggml's scan `if (ax > amax) { amax = ax; max = x; }` from amax = max = 0, position by position as element-wise
    ops over the blocks (several times faster than argmax + gather eagerly, and one fused loop under
    torch.compile): the first of equal maxima wins, and an all-zero block gives max = +0.
    """
    amax = xt[0].abs()
    mx = torch.where(amax > 0, xt[0], torch.zeros_like(amax))  # the scan's first step, from max = +0
    for i in range(1, xt.shape[0]):  # over the positions of one block (a constant), never over blocks
        a = xt[i].abs()
        gt = a > amax
        mx = torch.where(gt, xt[i], mx)
        amax = torch.where(gt, a, amax)
    return mx, amax


def best_index_int8(values: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """ggml's best_index_int8: index of the nearest codebook value (sorted float32 `values`), ties as ggml."""
    n = values.numel()
    mu = torch.searchsorted(values, x.contiguous(), right=True).clamp_(1, n - 1)
    lo = values[mu - 1]
    hi = values[mu]
    idx = torch.where(x - lo < hi - x, mu - 1, mu)
    idx = torch.where(x <= values[0], torch.zeros_like(idx), idx)
    return torch.where(x >= values[n - 1], torch.full_like(idx, n - 1), idx)


class Codebook:
    """A sorted integer codebook (e.g. kvalues_iq4nl) with a fast, exact nearest-value lookup.

    ggml picks index mu-1 over mu when `x - v[mu-1] < v[mu] - x` in float32. For kvalues_iq4nl this equals
    `x < (v[mu-1] + v[mu])/2` exactly: near a midpoint both differences are exact in float32, and elsewhere they
    are too far apart for rounding to swap them. The midpoints are half-integers, so the index is a function of
    floor(2x): one table lookup instead of a binary search. The constructor checks the equivalence against
    best_index_int8 on every float within 256 ulps of every midpoint, so a codebook where it fails is refused.
    """

    def __init__(self, values: tuple[int, ...]):
        self.values = tuple(int(v) for v in values)
        self.lo, self.hi = 2 * self.values[0], 2 * self.values[-1]
        mids2 = [a + b for a, b in zip(self.values, self.values[1:])]  # 2·midpoint
        self._index = [sum(m <= h for m in mids2) for h in range(self.lo, self.hi + 1)]
        self._cache: dict[tuple[str, torch.device], torch.Tensor] = {}
        self._verify(mids2)

    def _verify(self, mids2: list[int]) -> None:
        mid = torch.tensor(mids2, dtype=torch.float32) / 2
        near = (mid.view(torch.int32).unsqueeze(1) + torch.arange(-256, 257, dtype=torch.int32)).view(torch.float32)
        x = torch.cat((near.reshape(-1), torch.tensor(self.values, dtype=torch.float32)))
        x = x[torch.isfinite(x)]
        if not torch.equal(self.index(x).long(), best_index_int8(self.values_tensor("cpu"), x)):
            raise ValueError(f"codebook {self.values}: the midpoint table differs from best_index_int8")

    def _table(self, kind: str, device: torch.device) -> torch.Tensor:
        key = (kind, device)
        if key not in self._cache:
            idx = torch.tensor(self._index, dtype=torch.int64)
            vals = torch.tensor(self.values, dtype=torch.float32)
            t = {"index": idx.to(torch.uint8), "value": vals[idx], "values": vals}[kind]
            self._cache[key] = t.to(device)
        return self._cache[key]

    def values_tensor(self, device) -> torch.Tensor:
        return self._table("values", torch.device(device))

    def _slot(self, x: torch.Tensor) -> torch.Tensor:
        return torch.floor(x * 2.0).clamp_(self.lo, self.hi).sub_(self.lo).to(torch.int64)

    def index(self, x: torch.Tensor) -> torch.Tensor:
        """best_index_int8(values, x) for every element, as uint8."""
        return self._table("index", x.device)[self._slot(x)]

    def nearest(self, x: torch.Tensor) -> torch.Tensor:
        """values[best_index_int8(values, x)] for every element, as float32."""
        return self._table("value", x.device)[self._slot(x)]


# ------------------------------------------------------------------------------------------------ scale searches
def make_qx_quants(xt: torch.Tensor, nmax: int, rmse_type: int, qw: torch.Tensor | None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """ggml's make_qx_quants, batched over blocks: symmetric quants in [-nmax, nmax-1] with one scale.

    xt, qw: [n, nb] position-major. Returns (scale[nb] float32, L[n, nb] int32 in [0, 2·nmax-1]).
    The 18 candidate inverse scales -(nmax + 0.1·is)/max are tried in ggml's order; a candidate replaces the best
    only when strictly better, so ties resolve as in ggml.
    """
    mx, amax = signed_absmax(xt)
    zero = amax < GROUP_MAX_EPS
    mx_safe = torch.where(zero, torch.ones_like(mx), mx)

    def quants(iscale):
        return nearest_int(xt * iscale).clamp_(-nmax, nmax - 1)

    def done(d, l):
        return torch.where(zero, 0.0, d), torch.where(zero, 0.0, l + nmax).to(torch.int32)

    iscale = fdiv(-nmax, mx_safe)
    if rmse_type == 0:
        return done(1 / iscale, quants(iscale))
    return_early = rmse_type < 0
    rmse_type = abs(rmse_type)
    if qw is not None:
        w = qw
    elif rmse_type == 1:
        w = xt * xt
    elif rmse_type == 2:
        w = torch.ones_like(xt)
    elif rmse_type == 3:
        w = xt.abs()
    else:
        w = xt.abs().sqrt()
    wx = w * xt
    buf = torch.empty_like(xt)

    def sums(l):
        sumlx = seq_sum(torch.mul(wx, l, out=buf))
        suml2 = seq_sum(torch.mul(w, l, out=buf).mul_(l))  # (w·l)·l, ggml's order
        return sumlx, suml2

    l = quants(iscale)
    sumlx, suml2 = sums(l)
    scale = torch.where(suml2 != 0, sumlx / suml2, torch.zeros_like(sumlx))
    if return_early:
        return done(torch.where(suml2 > 0, 0.5 * (scale + 1 / iscale), 1 / iscale), l)
    best = scale * sumlx
    best_iscale = iscale  # the quants are a function of the inverse scale: keep it, not them
    for i in (*range(-9, 0), *range(1, 10)):  # ggml's candidate order
        iscale = -(nmax + torch.tensor(0.1, dtype=torch.float32) * i).to(xt.device) / mx_safe
        sumlx, suml2 = sums(quants(iscale))
        better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        best_iscale = torch.where(better, iscale, best_iscale)
        scale = torch.where(better, sumlx / suml2, scale)
        best = torch.where(better, scale * sumlx, best)
    return done(scale, quants(best_iscale))


def make_qkx3_quants(xt: torch.Tensor, nmax: int, weights: torch.Tensor | None, rmin: float, rdelta: float,
                     nstep: int, use_mad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ggml's make_qkx3_quants, batched over blocks: affine quants in [0, nmax] with a scale and a min ≤ 0.

    xt, weights: [n, nb] position-major (weights None → x²). Returns (scale[nb], the_min[nb], L[n, nb] int32),
    the_min being ggml's positive `-min` (the block offset is -the_min).
    """
    f32 = torch.float32
    dev = xt.device
    w = xt * xt if weights is None else weights
    sum_w = seq_sum(w)
    sum_x = seq_sum(w * xt)
    mn = xt.min(dim=0).values.clamp(max=0.0)
    mx = xt.max(dim=0).values
    flat = mx <= mn
    rng = torch.where(flat, torch.ones_like(mx), mx - mn)

    def err(scale, L, m):
        diff = (L * scale).add_(m).sub_(xt)  # ((scale·L) + min) - x, ggml's order
        diff = diff.abs_() if use_mad else diff.mul_(diff)
        return seq_sum(diff.mul_(w))

    def quants(iscale, m):
        v = (xt - m).mul_(iscale)
        if not bool(torch.isfinite(iscale).all()):  # a block of subnormals: 1/range overflows, as in ggml
            return nearest_int_exact(v).clamp_(0, nmax)
        return v.round_().clamp_(0, nmax)  # nearest_int(iscale·(x - min))

    iscale = fdiv(nmax, rng)
    scale = 1 / iscale
    best_mad = err(scale, quants(iscale, mn), mn)
    m = mn
    # the quants are a function of (inverse scale, min in use): keep those of the best candidate, not the quants
    best_iscale, best_m = iscale, mn
    if nstep >= 1:
        for i in range(nstep + 1):
            # as in ggml, range and offset are those of the best candidate so far, not of the block's min
            rng = torch.where(flat, torch.ones_like(mx), mx - m)
            step = (torch.tensor(rmin, dtype=f32) + torch.tensor(rdelta, dtype=f32) * i + nmax).to(dev)
            iscale = step / rng
            la = quants(iscale, m)
            wl = w * la
            sum_l, sum_l2, sum_xl = seq_sum(wl), seq_sum(wl * la), seq_sum(wl.mul_(xt))
            D = sum_w * sum_l2 - sum_l * sum_l
            ok = D > 0
            Ds = torch.where(ok, D, torch.ones_like(D))
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / Ds
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / Ds
            pos = this_min > 0
            this_min = torch.where(pos, torch.zeros_like(this_min), this_min)
            this_scale = torch.where(pos, sum_xl / sum_l2, this_scale)
            mad = err(this_scale, la, this_min)
            better = ok & (mad < best_mad)
            best_iscale = torch.where(better, iscale, best_iscale)
            best_m = torch.where(better, m, best_m)
            best_mad = torch.where(better, mad, best_mad)
            scale = torch.where(better, this_scale, scale)
            m = torch.where(better, this_min, m)
    L = quants(best_iscale, best_m)
    scale = torch.where(flat, 0.0, scale)
    m = torch.where(flat, mn, m)
    L = torch.where(flat, 0.0, L)
    return scale, -m, L.to(torch.int32)


# ------------------------------------------------------------------------------------------------ bit packing
def pack_nibbles(L: torch.Tensor, group: int = 32) -> torch.Tensor:
    """int[nb, k·group] in 0..15 → uint8[nb, k·group/2]: per group, byte j = L[j] | L[j + group/2] << 4.

    ggml's 4-bit layouts: group 32 in the block-32 types (q4_0, iq4_nl) and IQ4_XS, 64 in Q4_K/Q5_K, and 128 in
    the low 4 bits of Q6_K."""
    nb, n = L.shape
    g = L.to(torch.uint8).reshape(nb, n // group, 2, group // 2)
    return (g[:, :, 0] | (g[:, :, 1] << 4)).reshape(nb, n // 2)


def unpack_nibbles(qs: torch.Tensor, group: int = 32) -> torch.Tensor:
    """uint8[nb, k·group/2] → int32[nb, k·group], the inverse of pack_nibbles."""
    nb, m = qs.shape
    g = qs.reshape(nb, 2 * m // group, 1, group // 2).to(torch.int32)
    return torch.cat((g & 0x0F, g >> 4), dim=2).reshape(nb, 2 * m)


def pack_bits32(bits: torch.Tensor) -> torch.Tensor:
    """int[nb, 32] of 0/1 → uint8[nb, 4]: a little-endian uint32 with bit j = bits[j] (q5's qh)."""
    nb = bits.shape[0]
    b = bits.to(torch.uint8).reshape(nb, 4, 8)
    shifts = torch.arange(8, device=bits.device, dtype=torch.int32)
    # distinct bits: the sum of the shifted bits is their OR
    return (b.to(torch.int32) << shifts).sum(dim=2).to(torch.uint8)


def unpack_bits32(qh: torch.Tensor) -> torch.Tensor:
    """uint8[nb, 4] → int32[nb, 32], the inverse of pack_bits32."""
    shifts = torch.arange(8, device=qh.device, dtype=torch.int32)
    return ((qh.to(torch.int32).unsqueeze(-1) >> shifts) & 1).reshape(qh.shape[0], 32)
