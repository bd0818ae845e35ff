"""K-quants: Q2_K, Q3_K, Q4_K, Q5_K, Q6_K — super-blocks of 256 weights whose sub-block scales are themselves
quantised against one or two fp16 super-block scales.

The encoders follow ggml's reference quantisers in ggml-quants.c step for step — quantize_row_qN_K_ref without
importance, quantize_row_qN_K_impl with it (as ggml_quantize_chunk picks) — with the same candidate-scale grids,
the same round-half-to-even rounding (ggml's nearest_int), fp16 rounding of d/dmin at the same points and the
same greedy refinements, so their importance-weighted error matches ggml's by construction. Everything is
vectorised over blocks: sub-blocks are a tensor dimension, the candidate scales another; the only Python loops
run over candidates or positions inside a sub-block (never over blocks), and those ops are element-wise on
per-sub-block state.

Speed: the candidate searches are fused by torch.compile (C++ on CPU, Triton on CUDA) for large batches, which
removes the candidate × block × sub-block intermediates; small batches and machines where compiling fails run the
same functions eagerly, in pieces so memory stays bounded. Decoding is always eager (it is bit-exact with ggml's
to_float: the same float32 operations in the same order).
"""

from __future__ import annotations

import contextvars
import functools
import os
import warnings
from typing import Callable

import numpy as np
import torch

from .base import Format, register
from .common import (GROUP_MAX_EPS, fdiv, fp16_bytes, fp16_from_bytes, fp16_round, importance_weight, nearest_int,
                     pack_nibbles, seq_sum, signed_absmax, sqrt_f32, unpack_nibbles)

QK_K = 256

# Batches of at least this many super-blocks go through torch.compile (when enabled); smaller ones run eagerly,
# which costs no compile time. QGGUF_COMPILE=0 turns compiling off, =1 forces it for every batch size.
COMPILE_MIN_BLOCKS = 1024
# Super-blocks per call of a kernel: bounds the candidate × sub-block intermediates (eager) and keeps the
# working set of the fused kernels in cache (compiled).
PIECE_BLOCKS_EAGER = 1024
PIECE_BLOCKS_COMPILED = 2048
PIECE_BLOCKS_TAIL = 256        # the compiled path's second piece size, for the rest of a tensor


def _f32(v: float) -> float:
    return float(np.float32(v))


def _grid(first: float, values: list[float]) -> list[float]:
    return [_f32(first)] + [_f32(v) for v in values]


def _pos_max(t: torch.Tensor) -> torch.Tensor:
    """max(0, largest value) along the last dim, as ggml's `if (v > m) m = v` from m = 0: +0.0, never −0.0."""
    m = t.amax(-1)
    return torch.where(m > 0, m, torch.zeros_like(m))


# ------------------------------------------------------------------------------------------ kernels
# Groups (sub-blocks, or super-blocks for the scales of scales) are laid out position-major, [n, g] (common.py's
# layout): each position of a group is a contiguous vector over groups, so sums in ggml's order are element-wise
# adds that vectorise. The float helpers come from common.py, which keeps them to ggml's float32 arithmetic.
# The searches are split into small kernels (one candidate scale, one greedy pass, a head, a tail) that the
# Python code calls in sequence; torch.compile fuses each into one loop and compiles stay short.
_use_compiled: contextvars.ContextVar[bool] = contextvars.ContextVar("qgguf_kquant_compiled", default=False)


# Inductor settings that keep ggml's float semantics: the fp16 round trips of d and dmin (otherwise fused away;
# this also turns off Triton's mul+add → FMA fusion), IEEE division in Triton, no FMA contraction and no unsafe
# math in the C++ kernels (the defaults, pinned against environment overrides).
_EXACT = {"emulate_precision_casts": True, "eager_numerics.division_rounding": True,
          "cpp.enable_floating_point_contract_flag": "off", "cpp.enable_unsafe_math_opt_flag": False}


@functools.lru_cache(maxsize=None)
def _compiled(fn: Callable) -> Callable:
    # static shapes: the pieces are padded to one size, so one compile each (and static shapes trace faster)
    return torch.compile(fn, dynamic=False, options=_EXACT)


@functools.lru_cache(maxsize=None)
def _compiled_dynamic(fn: Callable) -> Callable:
    return torch.compile(fn, dynamic=True, options=_EXACT)


def _call(fn: Callable, *args: torch.Tensor):
    return (_compiled(fn) if _use_compiled.get() else fn)(*args)


def _call_any_size(fn: Callable, *args: torch.Tensor):
    """_call for batches of varying size: one dynamic-shape compile (sizes 0 and 1 would specialise: eager)."""
    if _use_compiled.get() and args[-1].shape[0] > 1:
        return _compiled_dynamic(fn)(*args)
    return fn(*args)


@functools.lru_cache(maxsize=None)
def _qkx_kernels(nmax: int, use_mad: bool) -> tuple[Callable, Callable]:
    """make_qkx2_quants / make_qkx3_quants (identical once weights are given): x ≈ scale·l − the_min, l ∈ [0, nmax].

    `start` fits the min/max scale; `step` tries one more scale (numerator `num`) with its weighted least-squares
    scale and min, and keeps it if it lowers the weighted squared (or absolute) error. As in ggml, each try is
    taken relative to the best min so far, so the tries run in sequence. xt, wt: [n, g]; state: [g]. The state
    also keeps the iscale and min the best levels were rounded with (`li`, `lm`), to redo those levels later.
    """
    def error(xt, wt, scale, m, l):
        diff = scale * l + m - xt
        return seq_sum(wt * (diff.abs() if use_mad else diff * diff))

    def start(xt, wt):
        mn = xt.amin(0).clamp(max=0.0)
        mx = xt.amax(0)
        iscale = fdiv(nmax, mx - mn)
        scale = fdiv(1, iscale)
        best = error(xt, wt, scale, mn, torch.clamp(nearest_int(iscale * (xt - mn)), 0, nmax))
        return mn, mx, seq_sum(wt), seq_sum(wt * xt), scale, best, iscale

    def step(xt, wt, sum_w, sum_x, mx, m, scale, best, li, lm, num):
        iscale = num / (mx - m)
        l = torch.clamp(nearest_int(iscale * (xt - m)), 0, nmax)
        wl = wt * l
        s_l = seq_sum(wl)
        s_l2 = seq_sum(wl * l)
        s_xl = seq_sum(wl * xt)
        det = sum_w * s_l2 - s_l * s_l
        this_scale = (sum_w * s_xl - sum_x * s_l) / det
        this_min = (s_l2 * sum_x - s_l * s_xl) / det
        clip = this_min > 0                                           # a positive offset is not allowed
        this_scale = torch.where(clip, s_xl / s_l2, this_scale)
        this_min = torch.where(clip, torch.zeros_like(this_min), this_min)
        err = error(xt, wt, this_scale, this_min, l)
        better = (det > 0) & (err < best)
        return (torch.where(better, this_scale, scale), torch.where(better, this_min, m),
                torch.where(better, err, best), torch.where(better, iscale, li), torch.where(better, m, lm))

    return start, step


def _qkx_quants(xt: torch.Tensor, wt: torch.Tensor, nmax: int, rmin: float, rdelta: float, nstep: int,
                use_mad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """make_qkx2/3_quants over groups xt, wt [n, g]: returns scale [g], the_min [g] (≥ 0), and [2, g]: the iscale
    and min that give the search's levels as clamp(round(iscale·(x − min)), 0, nmax) (ggml keeps those levels
    in sub-blocks whose quantised scale is 0; they decode the same whatever they are)."""
    start, step = _qkx_kernels(nmax, use_mad)
    mn, mx, sum_w, sum_x, scale, best, li = _call(start, xt, wt)
    nums = xt.new_tensor([_f32(_f32(_f32(rmin) + _f32(rdelta) * _f32(i)) + nmax) for i in range(nstep + 1)])
    m, lm = mn, mn
    for i in range(nstep + 1):
        scale, m, best, li, lm = _call(step, xt, wt, sum_w, sum_x, mx, m, scale, best, li, lm, nums[i])
    flat = mx == mn
    zero = torch.zeros_like(scale)
    return (torch.where(flat, zero, scale), -torch.where(flat, mn, m),
            torch.stack([torch.where(flat, zero, li), torch.where(flat, zero, lm)], 0))


@functools.lru_cache(maxsize=None)
def _qx_kernel(nmax: int) -> Callable:
    """make_qx_quants with rmse_type 1: symmetric x ≈ scale·q, q ∈ [−nmax, nmax−1], weights w.

    xt, wt: [n, g]. Tries 19 scales around −nmax/max (a candidate dimension: l is [n, C, g]) and keeps the one
    maximising (Σwxq)²/Σwq² by ggml's sequential scan (strict improvement). Returns scale [g], the chosen
    candidate [g], the candidate iscales [C, g] and the all-zero mask [g].
    """
    nums = _grid(-nmax, [-(_f32(nmax + _f32(_f32(0.1) * i))) for i in range(-9, 10) if i])

    def search(xt, wt):
        mx, amax = signed_absmax(xt)
        iscale = xt.new_tensor(nums).unsqueeze(-1) / mx               # [C, g]
        l = torch.clamp(nearest_int(iscale * xt.unsqueeze(1)), -nmax, nmax - 1)
        slx = seq_sum((wt * xt).unsqueeze(1) * l)
        sl2 = seq_sum((wt.unsqueeze(1) * l) * l)
        zero_f = torch.zeros_like(mx)
        s = torch.where(sl2[0] != 0, slx[0] / sl2[0], zero_f)
        best = s * slx[0]
        pick = torch.zeros_like(mx, dtype=torch.long)
        for c in range(1, len(nums)):
            take = (sl2[c] > 0) & (slx[c] * slx[c] > best * sl2[c])
            s = torch.where(take, slx[c] / sl2[c], s)
            best = torch.where(take, s * slx[c], best)
            pick = torch.where(take, torch.full_like(pick, c), pick)
        zero = amax < GROUP_MAX_EPS
        return torch.where(zero, zero_f, s), pick, iscale, zero

    return search


def _qx_quants(xt: torch.Tensor, wt: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """make_qx_quants (rmse_type 1) over groups xt, wt [n, g]: scale [g] and the iscale of the chosen levels
    [g], NaN for an all-zero group (see _qx_levels)."""
    s, pick, iscale, zero = _call(_qx_kernel(nmax), xt, wt)
    ib = iscale.gather(0, pick[None]).squeeze(0)
    return s, torch.where(zero, torch.full_like(ib, float("nan")), ib)


def _qx_levels(x: torch.Tensor, ib: torch.Tensor, nmax: int) -> torch.Tensor:
    """make_qx_quants' levels L = q + nmax from the chosen iscale; 0 for an all-zero group (NaN iscale)."""
    L = torch.clamp(nearest_int(ib * x), -nmax, nmax - 1) + nmax
    return torch.where(torch.isnan(ib), torch.zeros_like(L), L)


@functools.lru_cache(maxsize=None)
def _greedy_pass(lo: float | None, hi: float, need_old_sl2: bool) -> Callable:
    """One of ggml's greedy passes (make_q3_quants, make_qp_quants): for each position in turn, move its level to
    the one the current least-squares scale asks for, if that raises (Σwxl)²/Σwl². make_qp_quants also requires
    the sum without the position to stay positive (`need_old_sl2`). Returns the new levels, sums, and which
    groups changed."""
    def run(xt, wt, Lt, sumlx, suml2):
        cols = list(Lt.unbind(0))
        for i in range(len(cols)):
            xi, wi, li = xt[i], wt[i], cols[i]
            wxi = wi * xi
            slx = sumlx - wxi * li
            sl2 = suml2 - (wi * li) * li
            new_l = torch.clamp(nearest_int(xi * sl2 / slx), lo, hi)
            slx_n = slx + wxi * new_l
            sl2_n = sl2 + (wi * new_l) * new_l
            ok = (slx > 0) & (new_l != li) & (slx_n * slx_n * suml2 > sumlx * sumlx * sl2_n)
            ok = ok & (sl2 > 0) if need_old_sl2 else ok & (sl2_n > 0)
            cols[i] = torch.where(ok, new_l, li)
            sumlx = torch.where(ok, slx_n, sumlx)
            suml2 = torch.where(ok, sl2_n, suml2)
        new_Lt = torch.stack(cols, 0)
        # (compared afterwards: or-ing the accept masks inside the chain makes the fused kernel 3x slower)
        return new_Lt, sumlx, suml2, (new_Lt != Lt).any(0)

    return run


def _greedy_sums(xt: torch.Tensor, wt: torch.Tensor, Lt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return seq_sum((wt * xt) * Lt), seq_sum((wt * Lt) * Lt)


def _greedy(xt: torch.Tensor, wt: torch.Tensor, Lt: torch.Tensor, lo: float | None, hi: float,
            need_old_sl2: bool, sums: tuple[torch.Tensor, torch.Tensor] | None = None
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ggml's (up to) 5 greedy passes on xt, wt, Lt [n, g] (and Σwxl, Σwl² if already known); returns Lt,
    Σwxl, Σwl² [g].

    A group that a pass leaves unchanged stays unchanged (ggml's early exit), so each later pass runs only on the
    groups the previous one changed — a few percent of them after the first pass."""
    run = _greedy_pass(lo, hi, need_old_sl2)
    sumlx, suml2 = _call(_greedy_sums, xt, wt, Lt) if sums is None else sums
    Lt, sumlx, suml2, changed = _call(run, xt, wt, Lt, sumlx, suml2)
    idx = changed.nonzero().squeeze(1)
    for _ in range(4):
        if idx.numel() == 0:
            break
        args = (xt.index_select(1, idx), wt.index_select(1, idx), Lt.index_select(1, idx),
                sumlx.index_select(0, idx), suml2.index_select(0, idx))
        new_l, new_sx, new_s2, changed = _call_any_size(run, *args)
        Lt.index_copy_(1, idx, new_l)
        sumlx.index_copy_(0, idx, new_sx)
        suml2.index_copy_(0, idx, new_s2)
        idx = idx[changed]
    return Lt, sumlx, suml2


@functools.lru_cache(maxsize=None)
def _q3_start(nmax: int) -> Callable:
    def start(xt, mx):
        Lt = torch.clamp(nearest_int(fdiv(-nmax, mx) * xt), -nmax, nmax - 1)
        wt = xt * xt
        return wt, Lt, *_greedy_sums(xt, wt, Lt)
    return start


def _q3_quants(xt: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """make_q3_quants with do_rmse: symmetric, weights x², then the greedy passes. xt: [n, g] → scale [g], the
    levels Lt [n, g] and max |x| [g]."""
    # the max is its own kernel: fused with the levels, it would be recomputed for every position
    mx, amax = _call(signed_absmax, xt)
    wt, Lt, sumlx, suml2 = _call(_q3_start(nmax), xt, mx)
    Lt, sumlx, suml2 = _greedy(xt, wt, Lt, -nmax, nmax - 1, False, (sumlx, suml2))
    s = torch.where(suml2 > 0, sumlx / suml2, torch.zeros_like(sumlx))
    return torch.where(amax < GROUP_MAX_EPS, torch.zeros_like(s), s), Lt, amax


@functools.lru_cache(maxsize=None)
def _qp_kernel(nmax: int) -> Callable:
    """make_qp_quants' scale search: 9 scales around nmax/max, the first with the least weighted squared error.
    xt, wt: [n, g] → levels Lt [n, g] for the chosen scale, and max [g]."""
    nums = _grid(nmax, [_f32(_f32(_f32(0.1) * i) + nmax) for i in range(-4, 5) if i])

    def search(xt, wt):
        mx = xt.amax(0).clamp(min=0.0)
        iscale = xt.new_tensor(nums).unsqueeze(-1) / mx               # [C, g]
        l = nearest_int(iscale * xt.unsqueeze(1))                     # [n, C, g]
        l = torch.cat([l[:, :1], l[:, 1:].clamp(max=nmax)], 1)        # the first try is not clamped in ggml
        diff = xt.unsqueeze(1) - fdiv(1, iscale) * l
        mse = seq_sum((wt.unsqueeze(1) * diff) * diff)                # [C, g]
        best = mse.argmin(0, keepdim=True)                            # first minimum = ggml's strict `<` scan
        return nearest_int(iscale.gather(0, best) * xt).clamp(max=nmax), mx

    return search


def _qp_quants(x: torch.Tensor, w: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """make_qp_quants: the sub-block scales (or mins) x ≥ 0 of each super-block as scale·L, L ∈ [0, nmax],
    weights w. x, w: [nb, n] (n = 8 or 16 sub-blocks). Returns scale [nb] and L [nb, n]."""
    xt, wt = x.t().contiguous(), w.t().contiguous()
    Lt, mx = _call(_qp_kernel(nmax), xt, wt)
    Lt, sumlx, suml2 = _greedy(xt, wt, Lt, None, nmax, True)
    s = torch.where(suml2 > 0, sumlx / suml2, torch.zeros_like(sumlx))
    zero = mx < GROUP_MAX_EPS
    return torch.where(zero, torch.zeros_like(s), s), torch.where(zero, torch.zeros_like(Lt), Lt).t()


# ------------------------------------------------------------------------------------------ packing helpers
def _pack_2bit(L: torch.Tensor) -> torch.Tensor:
    """[nb, 256] values 0..3 → [nb, 64]: byte 32h+l holds L[128h + 32k + l] at bits 2k."""
    q = L.to(torch.uint8).reshape(-1, 2, 4, 32)
    return (q[:, :, 0] | (q[:, :, 1] << 2) | (q[:, :, 2] << 4) | (q[:, :, 3] << 6)).reshape(-1, 64)


def _unpack_2bit(q: torch.Tensor) -> torch.Tensor:
    """Inverse of _pack_2bit: [nb, 64] → [nb, 256] uint8."""
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=q.device).reshape(1, 1, 4, 1)
    return ((q.reshape(-1, 2, 1, 32) >> shifts) & 3).reshape(-1, QK_K)


def _pack_high_bits(bits: torch.Tensor) -> torch.Tensor:
    """[nb, 256] values 0..1 → [nb, 32]: bit j of byte m is bits[32j + m] (Q3_K's hmask, Q5_K's qh)."""
    h = bits.to(torch.uint8).reshape(-1, 8, 32)
    q = h[:, 0]
    for j in range(1, 8):
        q = q | (h[:, j] << j)
    return q


def _unpack_high_bits(q: torch.Tensor) -> torch.Tensor:
    """Inverse of _pack_high_bits: [nb, 32] → [nb, 256] uint8."""
    shifts = torch.arange(8, dtype=torch.uint8, device=q.device).reshape(1, 8, 1)
    return ((q.unsqueeze(1) >> shifts) & 1).reshape(-1, QK_K)


def _pack_scales_k4(ls: torch.Tensor, lm: torch.Tensor) -> torch.Tensor:
    """Q4_K/Q5_K's 12 bytes of 6-bit sub-block scales and mins (the inverse of ggml's get_scale_min_k4)."""
    ls = ls.to(torch.uint8)
    lm = lm.to(torch.uint8)
    lo_s, hi_s = ls[:, :4], ls[:, 4:]
    lo_m, hi_m = lm[:, :4], lm[:, 4:]
    return torch.cat([lo_s | ((hi_s >> 4) << 6), lo_m | ((hi_m >> 4) << 6), (hi_s & 0xF) | ((hi_m & 0xF) << 4)], 1)


def _unpack_scales_k4(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    a, b, c = q[:, 0:4], q[:, 4:8], q[:, 8:12]
    sc = torch.cat([a & 63, (c & 0xF) | ((a >> 6) << 4)], 1)
    mn = torch.cat([b & 63, (c >> 4) | ((b >> 6) << 4)], 1)
    return sc, mn


def _pack_scales_q3(l6: torch.Tensor) -> torch.Tensor:
    """Q3_K's 12 bytes of sixteen 6-bit scales: low nibbles in bytes 0-7, high 2-bit pairs in bytes 8-11."""
    l6 = l6.to(torch.uint8)
    low = (l6[:, :8] & 0xF) | ((l6[:, 8:] & 0xF) << 4)
    h = (l6 >> 4).reshape(-1, 4, 4)                                   # [nb, j//4, j%4]
    high = h[:, 0] | (h[:, 1] << 2) | (h[:, 2] << 4) | (h[:, 3] << 6)
    return torch.cat([low, high], 1)


def _unpack_scales_q3(q: torch.Tensor) -> torch.Tensor:
    """[nb, 12] → sixteen signed scales (6-bit value − 32) as int16."""
    low = torch.cat([q[:, :8] & 0xF, q[:, :8] >> 4], 1)
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=q.device).reshape(1, 4, 1)
    high = ((q[:, 8:12].reshape(-1, 1, 4) >> shifts) & 3).reshape(-1, 16)
    return (low | (high << 4)).to(torch.int16) - 32


# ------------------------------------------------------------------------------------------ encoders
# Each encoder is a head (sub-block weights), the scale searches above, and a tail (quantise the sub-block scales,
# requantise the weights with them, pack the bytes). Heads and tails are element-wise over blocks and are
# compiled as single kernels too.

def _groups(x: torch.Tensor, n: int) -> torch.Tensor:
    """[nb, 256] → the transposed groups [n, nb·256/n] the searches work on."""
    return x.reshape(-1, n).t().contiguous()


@functools.lru_cache(maxsize=None)
def _head_importance(n: int, sigma_factor: float) -> Callable:
    """ggml's _impl weighting: importance · sqrt(σ² + x²), σ² = factor·Σx²/256 over the super-block. x, w:
    [nb, 256] → the weights [nb, 256] and their per-sub-block sums sw [nb, 256/n]. (The transposition to groups
    is left to the caller: done inside a fused kernel it costs more than the rest of it.)"""
    def head(x, w):
        sigma2 = (sigma_factor * seq_sum((x * x).t())) / QK_K
        weight = importance_weight(w, x, sigma2.unsqueeze(-1))
        return weight, seq_sum(weight.reshape(x.shape[0], QK_K // n, n).permute(2, 0, 1))
    return head


def _importance_groups(x: torch.Tensor, w: torch.Tensor, n: int, sigma_factor: float
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """xt, wt [n, g] and sw [nb, 256/n] for the _impl encoders."""
    weight, sw = _call(_head_importance(n, sigma_factor), x, w)
    return _groups(x, n), _groups(weight, n), sw


def _head_q45_ref(xt: torch.Tensor) -> torch.Tensor:
    """quantize_row_q{4,5}_K_ref's weights: rms of the sub-block + |x|. xt [32, g] → wt [32, g]."""
    return sqrt_f32(seq_sum(xt * xt) / 32) + xt.abs()


def _search_levels(x: torch.Tensor, lk: torch.Tensor, n: int, nmax: int) -> torch.Tensor:
    """The levels of _qkx_quants' chosen try, [nb, 256/n, n] (ggml keeps them where a sub-block's scale is 0)."""
    li, lm = lk[0].reshape(x.shape[0], -1, 1), lk[1].reshape(x.shape[0], -1, 1)
    return torch.clamp(nearest_int(li * (x.reshape(x.shape[0], -1, n) - lm)), 0, nmax)


def _requant_q2(x: torch.Tensor, sc: torch.Tensor, d: torch.Tensor, dmin: torch.Tensor, lk: torch.Tensor
                ) -> torch.Tensor:
    xs = x.reshape(-1, 16, 16)
    dd = d.unsqueeze(-1) * (sc & 0xF).to(torch.float32)
    dm = dmin.unsqueeze(-1) * (sc >> 4).to(torch.float32)
    L = torch.clamp(nearest_int((xs + dm.unsqueeze(-1)) / dd.unsqueeze(-1)), 0, 3)
    L = torch.where((dd == 0).unsqueeze(-1), _search_levels(x, lk, 16, 3), L).reshape(-1, QK_K)
    return torch.cat([sc.to(torch.uint8), _pack_2bit(L), fp16_bytes(d), fp16_bytes(dmin)], 1)


def _tail_q2_ref(x: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, lk: torch.Tensor) -> torch.Tensor:
    scales, mins = scales.reshape(-1, 16), mins.reshape(-1, 16)
    max_scale = _pos_max(scales)
    max_min = _pos_max(mins)
    has_s, has_m = max_scale > 0, max_min > 0
    ls = nearest_int(fdiv(15, max_scale).unsqueeze(-1) * scales)
    lm = nearest_int(fdiv(15, max_min).unsqueeze(-1) * mins)
    ls = torch.where(has_s.unsqueeze(-1), ls, torch.zeros_like(ls)).to(torch.int32)
    lm = torch.where(has_m.unsqueeze(-1), lm, torch.zeros_like(lm)).to(torch.int32)
    d = torch.where(has_s, fp16_round(max_scale / 15.0), torch.zeros_like(max_scale))
    dmin = torch.where(has_m, fp16_round(max_min / 15.0), torch.zeros_like(max_min))
    return _requant_q2(x, (ls & 0xFF) | ((lm << 4) & 0xFF), d, dmin, lk)


def _tail_q2_imp(x: torch.Tensor, ls: torch.Tensor, lm: torch.Tensor, dm: torch.Tensor, mm: torch.Tensor,
                 lk: torch.Tensor) -> torch.Tensor:
    return _requant_q2(x, (ls.to(torch.int32) | (lm.to(torch.int32) << 4)) & 0xFF, fp16_round(dm), fp16_round(mm), lk)


def _encode_q2_k(x: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
    nb = x.shape[0]
    if w is None:        # quantize_row_q2_K_ref
        xt = _groups(x, 16)
        scales, mins, lk = _qkx_quants(xt, xt.abs(), 3, -0.5, 0.1, 15, True)
        return _call(_tail_q2_ref, x, scales, mins, lk)
    # quantize_row_q2_K_impl
    xt, wt, sw = _importance_groups(x, w, 16, 1.0)
    scales, mins, lk = _qkx_quants(xt, wt, 3, -0.9, 0.05, 36, False)
    dm, ls = _qp_quants(scales.reshape(nb, 16), sw, 15)
    mm, lm = _qp_quants(mins.reshape(nb, 16), sw, 15)
    return _call(_tail_q2_imp, x, ls, lm, dm, mm, lk)


def _requant_q3(x: torch.Tensor, l6: torch.Tensor, d: torch.Tensor, fallback: torch.Tensor) -> torch.Tensor:
    nb = x.shape[0]
    dd = d.unsqueeze(-1) * (l6 - 32)
    L = torch.clamp(nearest_int(x.reshape(nb, 16, 16) / dd.unsqueeze(-1)), -4, 3) + 4
    L = torch.where((dd == 0).unsqueeze(-1), fallback, L).reshape(nb, QK_K).to(torch.uint8)
    return torch.cat([_pack_high_bits(L >> 2), _pack_2bit(L & 3), _pack_scales_q3(l6), fp16_bytes(d)], 1)


def _tail_q3_ref(x: torch.Tensor, scales: torch.Tensor, Lt: torch.Tensor, amax: torch.Tensor) -> torch.Tensor:
    nb = x.shape[0]
    # make_q3_quants' levels, kept where a sub-block's scale is 0; an all-zero sub-block has levels 0
    fallback = torch.where((amax < GROUP_MAX_EPS).reshape(nb, 16, 1), torch.zeros_like(x.reshape(nb, 16, 16)),
                           Lt.t().reshape(nb, 16, 16) + 4)
    scales = scales.reshape(-1, 16)
    max_scale, _ = signed_absmax(scales.t())
    nz = max_scale != 0
    iscale = fdiv(-32, max_scale)
    l6 = torch.clamp(nearest_int(iscale.unsqueeze(-1) * scales), -32, 31) + 32
    l6 = torch.where(nz.unsqueeze(-1), l6, torch.zeros_like(l6))
    return _requant_q3(x, l6, torch.where(nz, fp16_round(fdiv(1, iscale)), torch.zeros_like(max_scale)), fallback)


def _tail_q3_imp(x: torch.Tensor, ib: torch.Tensor, d_block: torch.Tensor, ib_block: torch.Tensor,
                 scales: torch.Tensor) -> torch.Tensor:
    nb = x.shape[0]
    l6 = _qx_levels(scales.reshape(nb, 16), ib_block.unsqueeze(-1), 32)
    fallback = _qx_levels(x.reshape(nb, 16, 16), ib.reshape(nb, 16, 1), 4)
    return _requant_q3(x, l6, fp16_round(d_block), fallback)


def _encode_q3_k(x: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
    nb = x.shape[0]
    if w is None:        # quantize_row_q3_K_ref
        return _call(_tail_q3_ref, x, *_q3_quants(_groups(x, 16), 4))
    # quantize_row_q3_K_impl
    xt, wt, sw = _importance_groups(x, w, 16, 2.0)
    scales, ib = _qx_quants(xt, wt, 4)
    d_block, ib_block = _qx_quants(scales.reshape(nb, 16).t().contiguous(), sw.t().contiguous(), 32)
    return _call(_tail_q3_imp, x, ib, d_block, ib_block, scales)


@functools.lru_cache(maxsize=None)
def _tail_q45(nmax: int, ref: bool) -> Callable:
    """Q4_K/Q5_K: 6-bit sub-block scales and mins (ref: against their maxima; impl: given by make_qp_quants),
    requantisation against them, packing."""
    def tail(x, scales, mins, d_block, m_block, lk):
        nb = x.shape[0]
        if ref:
            scales, mins = scales.reshape(nb, 8), mins.reshape(nb, 8)
            max_scale = _pos_max(scales)
            max_min = _pos_max(mins)
            inv_s = torch.where(max_scale > 0, fdiv(63, max_scale), torch.zeros_like(max_scale))
            inv_m = torch.where(max_min > 0, fdiv(63, max_min), torch.zeros_like(max_min))
            # uint8_t ls = nearest_int(...): the int wraps modulo 256 before MIN(63, ·)
            ls = (nearest_int(inv_s.unsqueeze(-1) * scales).to(torch.int32) & 0xFF).clamp(max=63)
            lm = (nearest_int(inv_m.unsqueeze(-1) * mins).to(torch.int32) & 0xFF).clamp(max=63)
            d, dmin = fp16_round(max_scale / 63.0), fp16_round(max_min / 63.0)
        else:
            ls, lm = scales.to(torch.int32), mins.to(torch.int32)
            d, dmin = fp16_round(d_block), fp16_round(m_block)
        dd = d.unsqueeze(-1) * ls.to(torch.float32)
        dm = dmin.unsqueeze(-1) * lm.to(torch.float32)
        L = torch.clamp(nearest_int((x.reshape(nb, 8, 32) + dm.unsqueeze(-1)) / dd.unsqueeze(-1)), 0, nmax)
        L = torch.where((dd == 0).unsqueeze(-1), _search_levels(x, lk, 32, nmax), L)
        L = L.reshape(nb, QK_K).to(torch.uint8)
        head = [fp16_bytes(d), fp16_bytes(dmin), _pack_scales_k4(ls, lm)]
        if nmax == 15:
            return torch.cat(head + [pack_nibbles(L, 64)], 1)
        return torch.cat(head + [_pack_high_bits(L >> 4), pack_nibbles(L & 0xF, 64)], 1)
    return tail


def _encode_q45_k(x: torch.Tensor, w: torch.Tensor | None, nmax: int, rmin: float, rdelta: float,
                  nstep: int) -> torch.Tensor:
    """Q4_K and Q5_K share everything but nmax, the ref search grid and the high bit."""
    nb = x.shape[0]
    if w is None:        # quantize_row_q{4,5}_K_ref
        xt = _groups(x, 32)
        scales, mins, lk = _qkx_quants(xt, _call(_head_q45_ref, xt), nmax, rmin, rdelta, nstep, False)
        return _call(_tail_q45(nmax, True), x, scales, mins, scales, mins, lk)
    # quantize_row_q{4,5}_K_impl
    xt, wt, sw = _importance_groups(x, w, 32, 2.0)
    scales, mins, lk = _qkx_quants(xt, wt, nmax, -0.9, 0.05, 36, False)
    d_block, ls = _qp_quants(scales.reshape(nb, 8), sw, 63)
    m_block, lm = _qp_quants(mins.reshape(nb, 8), sw, 63)
    return _call(_tail_q45(nmax, False), x, ls, lm, d_block, m_block, lk)


def _encode_q4_k(x: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
    return _encode_q45_k(x, w, 15, -1.0, 0.1, 20)


def _encode_q5_k(x: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
    return _encode_q45_k(x, w, 31, -0.5, 0.1, 15)


def _tail_q6(x: torch.Tensor, scales: torch.Tensor, ib: torch.Tensor) -> torch.Tensor:
    nb = x.shape[0]
    scales = scales.reshape(nb, 16)
    max_scale, max_abs = signed_absmax(scales.t())
    zero = max_abs < GROUP_MAX_EPS
    iscale = fdiv(-128, max_scale)
    d = torch.where(zero, torch.zeros_like(max_scale), fp16_round(fdiv(1, iscale)))
    sc = nearest_int(iscale.unsqueeze(-1) * scales).clamp(max=127)
    sc = torch.where(zero.unsqueeze(-1), torch.zeros_like(sc), sc)
    dd = d.unsqueeze(-1) * sc
    L = torch.clamp(nearest_int(x.reshape(nb, 16, 16) / dd.unsqueeze(-1)), -32, 31) + 32
    L = torch.where((dd == 0).unsqueeze(-1), _qx_levels(x.reshape(nb, 16, 16), ib.reshape(nb, 16, 1), 32), L)
    L = torch.where(zero[:, None, None], torch.zeros_like(L), L).reshape(nb, QK_K).to(torch.uint8)
    # ql: the low 4 bits in ggml's nibble layout over groups of 128; qh: the high 2 bits as Q2_K's quants
    return torch.cat([pack_nibbles(L & 0xF, 128), _pack_2bit(L >> 4), sc.to(torch.int8).view(torch.uint8),
                      fp16_bytes(d)], 1)


def _encode_q6_k(x: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
    # quantize_row_q6_K_ref weights by x² (make_qx_quants with no weights); _impl by the importance alone
    xt = _groups(x, 16)
    scales, ib = _qx_quants(xt, xt * xt if w is None else _groups(w, 16), 32)
    return _call(_tail_q6, x, scales, ib)


# ------------------------------------------------------------------------------------------ running encoders
_compile_broken = False


def _compile_mode() -> str:
    v = os.environ.get("QGGUF_COMPILE", "auto").strip().lower()
    return {"0": "off", "false": "off", "no": "off", "off": "off", "1": "on", "true": "on", "on": "on"}.get(v, "auto")


# Each kernel's code is shared by the types' constants (nmax, weighted or not) and two piece shapes, so one
# process compiles it more than dynamo's default 8 times; past the limit dynamo warns and runs it eagerly.
RECOMPILE_LIMIT = 64


def _recompile_room():
    cfg = torch._dynamo.config
    name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"  # torch < 2.6
    return cfg.patch({name: max(getattr(cfg, name), RECOMPILE_LIMIT)})


def _run_encoder(fn: Callable, x: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
    """Run an encoder over x [nb, 256] in pieces, its kernels compiled for large batches."""
    global _compile_broken
    mode = _compile_mode()
    if not _compile_broken and mode != "off" and (mode == "on" or x.shape[0] >= COMPILE_MIN_BLOCKS):
        token = _use_compiled.set(True)
        try:
            with _recompile_room():
                return _in_pieces(fn, x, w, PIECE_BLOCKS_COMPILED, pad=True)
        except Exception as e:  # no C++ compiler / Triton: the eager path gives the same bytes, slower
            _compile_broken = True
            first = (str(e).strip().splitlines() or [""])[0][:200]
            warnings.warn(f"qgguf: torch.compile failed ({type(e).__name__}: {first}); K-quant encoding falls "
                          "back to eager PyTorch (slower). Set QGGUF_COMPILE=0 to skip the attempt.")
        finally:
            _use_compiled.reset(token)
    return _in_pieces(fn, x, w, PIECE_BLOCKS_EAGER)


def _piece_bounds(nb: int, piece: int, pad: bool) -> list[tuple[int, int, int]]:
    """(start, blocks, padded size) of each piece. With `pad`, full pieces of `piece` blocks and then pieces of
    PIECE_BLOCKS_TAIL for the rest, the last one padded: compiled kernels see two shapes only (one compile
    each; static shapes trace several times faster) and padding wastes < PIECE_BLOCKS_TAIL blocks."""
    bounds, b = [], 0
    while b < nb:
        size = piece if (not pad or nb - b >= piece) else min(piece, PIECE_BLOCKS_TAIL)
        k = min(size, nb - b)
        bounds.append((b, k, size if pad else k))
        b += k
    return bounds


def _in_pieces(fn: Callable, x: torch.Tensor, w: torch.Tensor | None, piece: int, pad: bool = False
               ) -> torch.Tensor:
    """fn over pieces of at most `piece` blocks (see _piece_bounds), so memory stays bounded."""
    outs = []
    for b, k, size in _piece_bounds(x.shape[0], piece, pad):
        xp = x[b:b + k]
        wp = None if w is None else w[b:b + k]
        if size > k:
            xp = torch.cat([xp, xp.new_zeros(size - k, QK_K)])
            wp = None if wp is None else torch.cat([wp, wp.new_zeros(size - k, QK_K)])
        outs.append(fn(xp, wp)[:k])
    return torch.cat(outs, 0)


# ------------------------------------------------------------------------------------------ formats
class _KQuant(Format):
    block_size = QK_K
    feedback = True
    _encoder: Callable
    _n_levels: int
    _offset: int = 0  # level value = index − offset

    def level_values(self, device):
        return torch.arange(self._n_levels, dtype=torch.float32, device=device) - self._offset

    def encode_blocks(self, x: torch.Tensor, w: torch.Tensor | None, row_len: int) -> torch.Tensor:
        return _run_encoder(type(self)._encoder, x.contiguous(), None if w is None else w.contiguous())


@register
class Q2_K(_KQuant):
    """16 sub-blocks of 16: x ≈ d·s·q − dmin·m, q 2-bit, s and m 4-bit. 84 bytes, 2.625 bpw."""

    name, type_id, type_size, sub_block = "Q2_K", 10, 84, 16
    _encoder = staticmethod(_encode_q2_k)

    def decode_blocks(self, q: torch.Tensor) -> torch.Tensor:
        sc, qs = q[:, :16], q[:, 16:80]
        d = fp16_from_bytes(q[:, 80:82]).unsqueeze(-1)
        dmin = fp16_from_bytes(q[:, 82:84]).unsqueeze(-1)
        dl = (d * (sc & 0xF).to(torch.float32)).unsqueeze(-1)
        ml = (dmin * (sc >> 4).to(torch.float32)).unsqueeze(-1)
        L = _unpack_2bit(qs).reshape(-1, 16, 16).to(torch.float32)
        return (dl * L - ml).reshape(-1, QK_K)

    _n_levels = 4

    def levels(self, q):
        return _unpack_2bit(q[:, 16:80]).long()

    def with_levels(self, q, L):
        return torch.cat([q[:, :16], _pack_2bit(L), q[:, 80:84]], 1)

    def grid(self, q):
        sc = q[:, :16]
        d, dmin = fp16_from_bytes(q[:, 80:82]).unsqueeze(-1), fp16_from_bytes(q[:, 82:84]).unsqueeze(-1)
        a = (d * (sc & 0xF).to(torch.float32)).repeat_interleave(16, 1)
        return a, -(dmin * (sc >> 4).to(torch.float32)).repeat_interleave(16, 1)


@register
class Q3_K(_KQuant):
    """16 sub-blocks of 16: x ≈ d·s·q, q 3-bit signed (2 low bits + a high-bit mask), s 6-bit. 110 bytes, 3.4375 bpw."""

    name, type_id, type_size, sub_block = "Q3_K", 11, 110, 16
    _encoder = staticmethod(_encode_q3_k)

    def decode_blocks(self, q: torch.Tensor) -> torch.Tensor:
        hmask, qs, sc = q[:, :32], q[:, 32:96], q[:, 96:108]
        d = fp16_from_bytes(q[:, 108:110]).unsqueeze(-1)
        dl = (d * _unpack_scales_q3(sc).to(torch.float32)).unsqueeze(-1)
        L = _unpack_2bit(qs).to(torch.int16) - ((_unpack_high_bits(hmask) ^ 1).to(torch.int16) << 2)
        return (dl * L.to(torch.float32).reshape(-1, 16, 16)).reshape(-1, QK_K)

    _n_levels, _offset = 8, 4  # index = high bit·4 + low 2 bits, value = index − 4

    def levels(self, q):
        return (_unpack_high_bits(q[:, :32]).long() << 2) | _unpack_2bit(q[:, 32:96]).long()

    def with_levels(self, q, L):
        return torch.cat([_pack_high_bits(L >> 2), _pack_2bit(L & 3), q[:, 96:110]], 1)

    def grid(self, q):
        d = fp16_from_bytes(q[:, 108:110]).unsqueeze(-1)
        a = (d * _unpack_scales_q3(q[:, 96:108]).to(torch.float32)).repeat_interleave(16, 1)
        return a, torch.zeros_like(a)


class _Q45(_KQuant):
    sub_block = 32

    def grid(self, q):
        d, m = self._scales(q)
        return d.squeeze(-1).repeat_interleave(32, 1), -m.squeeze(-1).repeat_interleave(32, 1)

    def _scales(self, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        d = fp16_from_bytes(q[:, 0:2]).unsqueeze(-1)
        dmin = fp16_from_bytes(q[:, 2:4]).unsqueeze(-1)
        sc, mn = _unpack_scales_k4(q[:, 4:16])
        return (d * sc.to(torch.float32)).unsqueeze(-1), (dmin * mn.to(torch.float32)).unsqueeze(-1)


@register
class Q4_K(_Q45):
    """8 sub-blocks of 32: x ≈ d·s·q − dmin·m, q 4-bit, s and m 6-bit. 144 bytes, 4.5 bpw."""

    name, type_id, type_size = "Q4_K", 12, 144
    _encoder = staticmethod(_encode_q4_k)

    def decode_blocks(self, q: torch.Tensor) -> torch.Tensor:
        d, m = self._scales(q)
        L = unpack_nibbles(q[:, 16:144], 64).reshape(-1, 8, 32).to(torch.float32)
        return (d * L - m).reshape(-1, QK_K)

    _n_levels = 16

    def levels(self, q):
        return unpack_nibbles(q[:, 16:144], 64).long()

    def with_levels(self, q, L):
        return torch.cat([q[:, :16], pack_nibbles(L, 64)], 1)


@register
class Q5_K(_Q45):
    """8 sub-blocks of 32: x ≈ d·s·q − dmin·m, q 5-bit (4 low bits + 1 high bit), s and m 6-bit. 176 bytes, 5.5 bpw."""

    name, type_id, type_size = "Q5_K", 13, 176
    _encoder = staticmethod(_encode_q5_k)

    def decode_blocks(self, q: torch.Tensor) -> torch.Tensor:
        d, m = self._scales(q)
        high = _unpack_high_bits(q[:, 16:48]) << 4
        L = (unpack_nibbles(q[:, 48:176], 64) | high).reshape(-1, 8, 32).to(torch.float32)
        return (d * L - m).reshape(-1, QK_K)

    _n_levels = 32

    def levels(self, q):
        return (unpack_nibbles(q[:, 48:176], 64) | (_unpack_high_bits(q[:, 16:48]).to(torch.int32) << 4)).long()

    def with_levels(self, q, L):
        return torch.cat([q[:, :16], _pack_high_bits(L >> 4), pack_nibbles(L & 0xF, 64)], 1)


@register
class Q6_K(_KQuant):
    """16 sub-blocks of 16: x ≈ d·s·q, q 6-bit signed (4 low + 2 high bits), s 8-bit signed. 210 bytes, 6.5625 bpw."""

    name, type_id, type_size, sub_block = "Q6_K", 14, 210, 16
    _encoder = staticmethod(_encode_q6_k)

    def decode_blocks(self, q: torch.Tensor) -> torch.Tensor:
        ql, qh, sc = q[:, :128], q[:, 128:192], q[:, 192:208]
        d = fp16_from_bytes(q[:, 208:210]).unsqueeze(-1)
        dl = (d * sc.contiguous().view(torch.int8).to(torch.float32)).unsqueeze(-1)
        L = ((unpack_nibbles(ql, 128) | (_unpack_2bit(qh) << 4)) - 32).to(torch.float32).reshape(-1, 16, 16)
        return (dl * L).reshape(-1, QK_K)

    _n_levels, _offset = 64, 32

    def levels(self, q):
        return (unpack_nibbles(q[:, :128], 128) | (_unpack_2bit(q[:, 128:192]).to(torch.int32) << 4)).long()

    def with_levels(self, q, L):
        return torch.cat([pack_nibbles(L & 0xF, 128), _pack_2bit(L >> 4), q[:, 192:210]], 1)

    def grid(self, q):
        d = fp16_from_bytes(q[:, 208:210]).unsqueeze(-1)
        a = (d * q[:, 192:208].contiguous().view(torch.int8).to(torch.float32)).repeat_interleave(16, 1)
        return a, torch.zeros_like(a)
