"""Error-feedback rounding (GPTQ / LDLQ) into the registry's own GGUF blocks.

Plain rounding (Format.encode) chooses every weight's level on its own. With the input covariance H = E[x xᵀ] of
the layer, the output error of row r is δ_r H δ_rᵀ, and rounding the input channels one after the other lets the
channels not yet rounded absorb the error of those already rounded. For each row (all rows at once, as tensors):

    H + λI = U D Uᵀ, U unit upper-triangular,   λ = (DAMP + DAMP_PER_INPUT · n / N) · mean diag(H)
    for each block of the type, in row order (a super-block for the K-quants and _XS types):
        choose the block's scales from the current weights with the type's own scale search (Format.encode of
        the block, with the same importance as plain rounding; the block's indices come with it)
        for each column j of the block:
            w_j → its level under those fixed scales: the encoder's own index if no earlier column moved w_j,
                  else the nearest level (Format.levels / grid / level_values)
            e_j = ŵ_j − W_j (against the original weight);   w_k −= e_j · U_jk for the columns k > j
        write the block with its new indices (Format.with_levels): the same layout, scales and decoders

This is LDLQ (QuIP): with δ = W − Ŵ, δ(H + λI)δᵀ = Σ_k D_k (δ_k + Σ_{j<k} δ_j U_jk)², and the column loop makes
each term as small as the grid allows given the columns before it. It rounds as GPTQ does (the two are the same
algorithm: QuIP's equivalence theorem), but GPTQ's factor, the Cholesky factor of (H + λI)⁻¹, costs a Cholesky
and a triangular inverse, U one Cholesky: half the factorisation, which dominates wide inputs (an ffn_down's).

Damping. H is estimated from N calibration tokens; with n inputs it carries about n²/2 numbers fitted to them, and
rounding fitted to a noisy H over-fits: on the held-out tokens the error grows, and for Qwen2.5-Coder-1.5B's ffn_down
(n = 8,960) from 4,096 tokens GPTQ's λ = 0.01·mean diag(H) leaves feedback rounding 1.4–1.8× worse than plain
rounding. λ therefore grows with n/N, the inputs per calibration token (docs/design.md, "Damping"): the constants
come from held-out K-FAC errors of Qwen tensors (n = 1,536 and 8,960; N = 4,096 and 16,384), where this rule is
on average within 0.3 % of each tensor's best λ. Without a token count (`tokens=None`) λ is GPTQ's DAMP alone.

The updates come in three tiers of that one algebra (GPTQ's lazy batch updates, two deep): the columns after a batch
of LAZY_COLUMNS get the batch's errors e against W through U as one matrix product; inside the batch each column
passes on its rounding residual w_j − ŵ_j through V = U⁻¹ of the batch's diagonal block (GPTQ's own form, which keeps
float32 precision: the errors against W grow with the feedback and cancel), column by column within groups of
PUSH_COLUMNS and as one product to the rest of the batch. `encode_many` rounds one tensor in several types at
once (measure): each type keeps its own copy of the weights and grid, and one set of vector operations per column
serves them all; the bytes are those of `encode`, type by type. Why it is exact for a diagonal H: U is then the
identity, every update is a zero, no column moves, and each block gets plain rounding's scales and indices — byte
for byte what Format.encode writes (tests/test_feedback.py checks it for every type).

Fallbacks (one log line per tensor, then plain rounding or a reduced problem, never NaN scales):
  - H with NaN or Inf, or every diagonal entry zero (an input that never fired): plain rounding.
  - Channels whose H_jj is zero (never fired, or a zero input column): taken out of the coupling (their row and
    column of H set to zero and their diagonal to the mean), so they are rounded on their own and pass no error.
  - H singular after damping (rank-deficient beyond λ, e.g. a constant or duplicated input column with λ → 0):
    λ grows tenfold up to three times; if the factorisation still fails, plain rounding.
  - Weights that leave the finite range during the updates: plain rounding.
Q8_0 and the float types have no levels here (Format.feedback is False) and are always rounded plainly.
"""

from __future__ import annotations

import hashlib
import math
import sys
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import QggufError
from .base import Format
from .engines import Engine
from .common import fdiv, seq_sum

DAMP = 0.01          # λ's floor: DAMP · mean diag(H), GPTQ's default percdamp
DAMP_PER_INPUT = 0.75  # λ's share per input per calibration token: (DAMP + DAMP_PER_INPUT · n/N) · mean diag(H)
DAMP_GROWTH = 10.0   # λ ← 10·λ when the damped H still does not factorise
DAMP_TRIES = 3
LAZY_COLUMNS = 256   # columns whose updates stay inside the batch; a multiple of every block size (32, 256)
PUSH_COLUMNS = 32    # inside a batch, columns updated one by one; the rest of the batch gets their sum as a product


def damping(n: int, tokens: int | None) -> float:
    """λ / mean diag(H) for an H of n inputs estimated from `tokens` calibration tokens (None: unknown)."""
    if tokens is not None and tokens < 1:
        raise ValueError(f"an input covariance from {tokens} tokens")
    return DAMP + (DAMP_PER_INPUT * n / tokens if tokens else 0.0)


def _log(name: str, msg: str) -> None:
    print(f"qgguf: {name}: {msg}", file=sys.stderr)


@dataclass
class _Factor:
    """What one input covariance gives every tensor that reads it: the unit upper-triangular factor U of its damped
    H = U D Uᵀ."""

    U: torch.Tensor | None = None        # float32, unit upper-triangular; None: rounded plainly (see fallback)
    diag: torch.Tensor | None = None     # diag(H), dead channels zeroed: the default importance
    damping: float | None = None
    fallback: str | None = None          # why H is unusable
    events: list[str] = field(default_factory=list)


# Tensors that read one input (q/k/v, gate/up) share its factor: the last few are kept, keyed by H's content.
# Factors over FACTOR_CACHE_FLOATS (an ffn_down's, read by one tensor only) are not kept: memory stays one H.
FACTOR_CACHE_SIZE = 2
FACTOR_CACHE_FLOATS = 1 << 26
_factors: OrderedDict[tuple, _Factor] = OrderedDict()


def _factor_key(H: torch.Tensor, damp: float) -> tuple:
    h = hashlib.blake2b(H.detach().cpu().contiguous().numpy().reshape(-1).view(np.uint8), digest_size=16)
    return (h.hexdigest(), tuple(H.shape), str(H.dtype), str(H.device), damp)


def _factorise(H: torch.Tensor, damp: float) -> _Factor:
    """U of H + λI = U D Uᵀ with the fallbacks of the module docstring (H square, any float dtype; in float64).

    An ffn_down's H is 8,960² float64 (640 MB): each pass over it costs about as much as a tenth of the Cholesky,
    so the checks read it without making a copy, the rest works in place on one reversed copy, and each matrix is
    let go as soon as it is spent (the factorisation's peak is two such matrices)."""
    H = H.to(torch.float64)
    if not bool(torch.isfinite(H.sum())) and not bool(torch.isfinite(H).all()):  # the sum: one pass, no copy
        return _Factor(fallback="its input covariance holds NaN or Inf")
    d = H.diagonal().clone()
    dead = d <= 0
    if bool(dead.all()):
        return _Factor(fallback="its input never fired in calibration (H = 0)")
    f = _Factor()
    mean = float(d[~dead].mean())
    f.diag = torch.where(dead, torch.zeros_like(d), d).to(torch.float32)
    # P(H + λI)P with P the order reversal, symmetrised: (P H P + P Hᵀ P) / 2, one new matrix
    Hr = torch.add(H, H.T).flip(0, 1).mul_(0.5)
    del H
    if bool(dead.any()):
        dr = dead.flip(0)
        Hr[dr, :] = 0
        Hr[:, dr] = 0
        Hr[dr, dr] = mean
        f.events.append(f"{int(dead.sum())} input channel(s) never fired: rounded on their own")
    lam = damp * mean
    # P(H + λI)P = L Lᵀ gives H + λI = R Rᵀ with R = P L P upper, and U = R / diag(R) column by column
    # (D = diag(R)²): one Cholesky, nothing inverted
    Hr.diagonal().add_(lam)
    for attempt in range(DAMP_TRIES + 1):
        L, info = torch.linalg.cholesky_ex(Hr)
        if int(info) == 0:
            ld = L.diagonal().clone()
            if bool((ld > 0).all()):
                U = L.div_(ld).to(torch.float32)                       # column c of L over L_cc
                if bool(torch.isfinite(U.sum())):
                    del Hr, L
                    U = U.flip(0, 1)
                    break
        if attempt < DAMP_TRIES:
            Hr.diagonal().add_(lam * (DAMP_GROWTH - 1))
            lam *= DAMP_GROWTH
    else:
        f.fallback = f"its damped input covariance does not factorise (λ up to {lam:.3g}): rank-deficient"
        return f
    if attempt:
        f.events.append(f"H is rank-deficient: damping raised to λ = {lam:.3g}")
    f.damping = lam
    f.U = U
    return f


class Feedback:
    """The unit upper-triangular factor U of one tensor's damped H = U D Uᵀ, used for every type; factorised on
    first use, and shared with the other tensors that read the same input (FACTOR_CACHE_SIZE).

    H: the input covariance (n × n, any float dtype, any device), from `tokens` calibration tokens (they set the
    damping, see `damping`; `damp` gives λ / mean diag(H) directly instead). `importance`: the per-input-channel
    weight the plain encoder uses (the Fisher importance); None → diag(H). `fallback` holds the reason when the
    tensor is rounded plainly (H unusable)."""

    def __init__(self, H, name: str = "tensor", damp: float | None = None, device: torch.device | str | None = None,
                 log: bool = True, tokens: int | None = None):
        self.name = name
        H = torch.as_tensor(H)
        if device is not None:
            H = H.to(device)
        if H.ndim != 2 or H.shape[0] != H.shape[1]:
            raise ValueError(f"{name}: H must be square, not {tuple(H.shape)}")
        self.n = int(H.shape[0])
        damp = damping(self.n, tokens) if damp is None else float(damp)
        self._H, self._damp, self._log = H, damp, log
        self._f: _Factor | None = None

    def _factor(self) -> _Factor:
        if self._f is None:
            key = _factor_key(self._H, self._damp) if self.n * self.n <= FACTOR_CACHE_FLOATS else None
            f = _factors.get(key) if key else None
            if f is None:
                f = _factorise(self._H, self._damp)
                if key:
                    _factors[key] = f
                    while len(_factors) > FACTOR_CACHE_SIZE:
                        _factors.popitem(last=False)
            else:
                _factors.move_to_end(key)
            self._f, self._H = f, None
            if self._log:
                if f.fallback:
                    _log(self.name, f"{f.fallback}; plain rounding instead of error feedback")
                for e in f.events:
                    _log(self.name, f"error feedback: {e}")
        return self._f

    @property
    def U(self) -> torch.Tensor | None:
        return self._factor().U

    @property
    def diag(self) -> torch.Tensor | None:
        return self._factor().diag

    @property
    def damping(self) -> float | None:
        return self._factor().damping

    @property
    def fallback(self) -> str | None:
        return self._factor().fallback

    @property
    def events(self) -> list[str]:
        return self._factor().events

    # ------------------------------------------------------------------------------------------ encoding
    def encode(self, fmt: Format, weights: torch.Tensor, importance: torch.Tensor | None = None,
               engine: Engine | None = None) -> torch.Tensor:
        """Raw GGUF bytes [rows, bytes per row] of `weights` (rows × n) in `fmt`, rounded with error feedback
        (plain rounding for types without levels and when H is unusable). `engine`: see encode_many."""
        return self.encode_many([fmt], weights, importance, engine)[fmt.name]

    def encode_many(self, fmts: list[Format], weights: torch.Tensor, importance: torch.Tensor | None = None,
                    engine: Engine | None = None) -> dict[str, torch.Tensor]:
        """encode() for several types at once: the same bytes per type, but their column loops run in lockstep,
        one set of vector operations over all types' copies of the rows (measure tries every type).

        `engine` (formats/engines.py): with ggml's, on a CPU, each block's scale search runs in ggml (the block-32
        Q4_0 … Q5_1, whose importance reads the whole row's Σx², through the fork's entry point that takes it
        given): the same bytes, without torch's per-call overhead on one block column."""
        W = torch.as_tensor(weights).to(torch.float32)
        if self.U is not None:
            W = W.to(self.U.device)
        imp = importance
        if imp is None and self.diag is not None:
            imp = self.diag
        out = {f.name: fmt_plain(f, W, imp, self.name) for f in fmts if self.U is None or not f.feedback}
        todo = [f for f in fmts if f.name not in out]
        if not todo:
            return out
        imp = torch.as_tensor(imp).to(W.device, torch.float32).reshape(-1)
        rows, n = W.shape
        for f in todo:
            f.check_row_len(n, self.name)
        if n != self.n:
            raise ValueError(f"{self.name}: rows of {n} weights, H of {self.n} channels")
        if not bool(torch.isfinite(W).all()):
            raise QggufError(f"{self.name}: weights hold NaN or Inf; fix the checkpoint before quantising")
        if imp.numel() != n or not bool(torch.isfinite(imp).all()) or bool((imp < 0).any()):
            raise QggufError(f"{self.name}: importance must be {n} finite non-negative values")
        # types in groups whose copies of the weights stay within LOCKSTEP_FLOATS
        per = max(1, LOCKSTEP_FLOATS // max(1, rows * n))
        for g0 in range(0, len(todo), per):
            group = todo[g0:g0 + per]
            res = _feedback(group, W, imp, self.U, engine)
            for f in group:
                if res[f.name] is None:
                    _log(self.name, f"{f.name}: weights left the finite range during error feedback; plain rounding")
                    res[f.name] = fmt_plain(f, W, imp, self.name)
            out.update(res)
        return {f.name: out[f.name] for f in fmts}


LOCKSTEP_FLOATS = 1 << 26  # weights held by one lockstep group (its types' copies of the rows): 256 MiB


def fmt_plain(fmt: Format, W: torch.Tensor, imp: torch.Tensor | None, name: str) -> torch.Tensor:
    return fmt.encode_torch(W, imp, tensor=name)


def _row_sigma2(W: torch.Tensor) -> torch.Tensor:
    """Σx²/n of each row in row order (the block-32 types' importance path, as legacy._row_sigma2)."""
    return fdiv(seq_sum((W * W).t().contiguous()), W.shape[1])


def _block_engine(fmt: Format, engine: Engine | None, dev: torch.device) -> tuple[Engine | None, bool]:
    """(`engine` when it can choose `fmt`'s block scales, whether it needs the row statistic σ² given): a block
    is a whole ggml row for the types whose encoder reads only the block; the block-32 Q4_0 … Q5_1 read the
    whole row's σ², which the fork's patch 0011 takes from the caller."""
    if engine is None or dev.type != "cpu" or not engine.encodes(fmt):
        return None, False
    if type(fmt).encode_blocks_sigma is Format.encode_blocks_sigma:
        return engine, False
    if getattr(fmt, "row_sigma2", False) and engine.takes_row_sigma2():
        return engine, True
    return None, False


def _feedback(fmts: list[Format], W: torch.Tensor, imp: torch.Tensor, U: torch.Tensor,
              engine: Engine | None = None) -> dict[str, torch.Tensor | None]:
    """Error-feedback rounding of W in every type of `fmts`, lockstep. Each type k has its own copy of the
    weights (channel-major, Wt[k]: a column is a contiguous vector over the rows) and its own grid; per column the
    same few vector operations update all of them."""
    rows, n = W.shape
    T, dev = len(fmts), W.device
    # uniform grids first: their nearest level is arithmetic, the codebooks' a count (types are keyed by name)
    uniform = {f.name: _uniform(f, dev) for f in fmts}
    fmts = sorted(fmts, key=lambda f: not uniform[f.name])
    nu = sum(uniform.values())
    sigma2 = _row_sigma2(W)  # of the weights as given: the statistic plain rounding uses
    by = [_block_engine(f, engine, dev) for f in fmts]
    Wt = W.t().contiguous().unsqueeze(0).repeat(T, 1, 1)              # [T, n, rows]: the targets
    vals = [f.level_values(dev) for f in fmts]
    lo = torch.tensor([float(v[0]) for v in vals[:nu]], device=dev).unsqueeze(1)    # [nu, 1]: the grids' ends
    hi = torch.tensor([float(v[-1]) for v in vals[:nu]], device=dev).unsqueeze(1)
    # the codebooks' levels and the midpoints between them, padded to the longest (with +inf midpoints, never
    # passed): a value's nearest level is the number of midpoints below it, ties going to the lower level
    cb = vals[nu:]
    kmax = max([v.numel() for v in cb], default=2)
    Vcb = torch.zeros((T - nu, kmax), device=dev)
    mids = torch.full((T - nu, 1, kmax - 1), float("inf"), device=dev)
    for k, v in enumerate(cb):
        Vcb[k, :v.numel()] = v
        mids[k, 0, :v.numel() - 1] = (v[:-1] + v[1:]) / 2
    lazy = max(max(f.block_size for f in fmts), LAZY_COLUMNS)
    step = math.gcd(PUSH_COLUMNS, min(f.block_size for f in fmts))  # block boundaries and group ends both fall on it
    out = {f.name: torch.empty((rows, n // f.block_size, f.type_size), dtype=torch.uint8, device=dev)
           for f in fmts}
    bad = [False] * T
    blocks: list[tuple | None] = [None] * T                            # each type's open block: (b0, q)
    for c0 in range(0, n, lazy):
        c1 = min(c0 + lazy, n)
        m = c1 - c0
        W0b = W[:, c0:c1].t().contiguous()                             # [m, rows]: the errors are against these
        # each type's grid over this lazy batch, filled as its blocks open
        A = torch.zeros((T, m, rows), device=dev)
        Bo = torch.zeros_like(A)
        IA = torch.zeros_like(A)
        V0 = torch.zeros_like(A)
        X0 = torch.zeros_like(A)
        got = torch.zeros_like(A)                                      # the chosen level values
        E = torch.empty_like(A)                                        # errors against W: for the later batches
        Rs = torch.empty_like(A)                                       # rounding residuals: inside the batch
        # each column's update of its push group, written into one buffer (a fresh product per column is a large
        # allocation whose page faults cost more than the arithmetic for wide tensors)
        D = torch.empty((T, PUSH_COLUMNS, rows), device=dev)
        # Inside the batch the columns pass on their rounding residuals through V = U⁻¹ of the batch's diagonal
        # block (GPTQ's form, from the batch's targets W̃ = W + g·V, g the earlier batches' pull); the columns after
        # the batch get its errors against W through U. Pushing the errors against W inside the batch too is the
        # same algebra, but those errors grow with the feedback and cancel, and in float32 that rounds ~0.4 % worse.
        Vb = torch.linalg.solve_triangular(U[c0:c1, c0:c1].double(), torch.eye(m, dtype=torch.float64, device=dev),
                                           upper=True, unitriangular=True).float()
        if c0:
            Wt[:, c0:c1] = torch.matmul(Vb.t(), Wt[:, c0:c1] - W0b).add_(W0b)
        for g0 in range(c0, c1, PUSH_COLUMNS):                         # push groups
            g1 = min(g0 + PUSH_COLUMNS, c1)
            for s0 in range(g0, g1, step):                             # blocks open and end on these
                s1 = min(s0 + step, g1)
                for k, f in enumerate(fmts):                               # blocks opening here: their grids
                    B = f.block_size
                    if s0 % B or bad[k]:
                        continue
                    xbt = Wt[k, s0:s0 + B]                                 # [B, rows]
                    if not bool(torch.isfinite(xbt).all()):
                        bad[k] = True
                        continue
                    eng, with_sigma2 = by[k]
                    if eng is not None:
                        q = eng.encode_rows(f, xbt.t().contiguous(), imp[s0:s0 + B].contiguous(),
                                            sigma2 if with_sigma2 else None)
                    else:
                        q = f.encode_blocks_sigma(xbt.t().contiguous(),
                                                  imp[s0:s0 + B].expand(rows, B).contiguous(), sigma2)
                    a, b = f.grid(q)
                    sl = slice(s0 - c0, s0 - c0 + B)
                    A[k, sl] = a.t()
                    Bo[k, sl] = b.t()
                    # a zero scale: every level decodes to b; 1/a = 0 gives t = 0, any level, the same bytes
                    IA[k, sl] = torch.where(a != 0, 1 / torch.where(a != 0, a, torch.ones_like(a)),
                                            torch.zeros_like(a)).t()
                    V0[k, sl] = vals[k][f.levels(q)].t()                   # the plain encoder's level values
                    X0[k, sl] = xbt
                    blocks[k] = (s0, q)
                for j in range(s0, s1):
                    jj = j - c0
                    w = Wt[:, j]                                           # [T, rows]
                    t = (w - Bo[:, jj]).mul_(IA[:, jj])
                    # the nearest level, ties to the lower one: on a uniform grid ⌈t − ½⌉ clamped to it
                    near = torch.empty_like(t)
                    if nu:
                        torch.clamp(t[:nu].sub(0.5).ceil_(), lo, hi, out=near[:nu])
                    if nu < T:
                        i = (t[nu:].unsqueeze(-1) > mids).sum(-1)
                        torch.gather(Vcb, 1, i, out=near[nu:])
                    # moved by feedback: the nearest level of the block's fixed grid, else the encoder's own level
                    v = torch.where(w != X0[:, jj], near, V0[:, jj], out=got[:, jj])
                    w_hat = torch.addcmul(Bo[:, jj], A[:, jj], v)
                    torch.sub(w_hat, W0b[jj], out=E[:, jj])
                    r = torch.sub(w, w_hat, out=Rs[:, jj])
                    if j + 1 < g1:
                        d = torch.mul(Vb[jj, jj + 1:g1 - c0].view(1, -1, 1), r.unsqueeze(1),
                                      out=D[:, :g1 - j - 1])
                        Wt[:, j + 1:g1].sub_(d)
                for k, f in enumerate(fmts):  # blocks that end here: their bytes with the new levels
                    B = f.block_size
                    if bad[k] or blocks[k] is None or blocks[k][0] + B != s1:
                        continue
                    b0, q = blocks[k]
                    got_k = got[k, b0 - c0:b0 - c0 + B].t().contiguous()
                    if not bool(torch.isfinite(got_k).all()):
                        bad[k] = True
                        continue
                    L = torch.searchsorted(vals[k], got_k)                 # exact: they are levels
                    out[f.name][:, b0 // B] = f.with_levels(q, L)
            if g1 < c1:  # the group's residuals to the rest of the batch, as one product
                Wt[:, g1:c1].baddbmm_(Vb[g0 - c0:g1 - c0, g1 - c0:].t().expand(T, -1, -1), Rs[:, g0 - c0:g1 - c0],
                                      alpha=-1.0)
        if c1 < n:
            Wt[:, c1:].baddbmm_(U[c0:c1, c1:].t().expand(T, -1, -1), E, alpha=-1.0)
    # every target the loop rounded (a codebook's level count turns a non-finite one into a finite level)
    bad = [b or not bool(torch.isfinite(Wt[k]).all()) for k, b in enumerate(bad)]
    return {f.name: None if bad[k] else out[f.name].reshape(rows, -1) for k, f in enumerate(fmts)}


def _uniform(fmt: Format, dev: torch.device) -> bool:
    """Whether the type's levels are consecutive integers (the K-quants and Q4_0 … Q5_1; not the codebooks)."""
    v = fmt.level_values(dev)
    return bool(torch.equal(v, v[0] + torch.arange(v.numel(), dtype=v.dtype, device=dev)))


def h_error(W: torch.Tensor, W_hat: torch.Tensor, H: torch.Tensor, row_weight: torch.Tensor | None = None
            ) -> torch.Tensor:
    """Σ_r d_r · δ_r H δ_rᵀ per row (float64 [rows]; d = 1 without `row_weight`), δ = W_hat − W."""
    D = (W_hat.to(torch.float64) - W.to(torch.float64))
    per_row = ((D @ H.to(torch.float64)) * D).sum(1)
    return per_row if row_weight is None else per_row * row_weight.to(torch.float64)
