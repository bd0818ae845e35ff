"""Measure: for every tensor and every candidate type, the real error of the real encoder, and the exact bytes.

Each type in qgguf.formats encodes the tensor (with the importance vector, as export will) and decodes it; the
difference to the original weights is the error llama.cpp will see. Three averages of the squared error δ² are
kept, each a mean per weight:

    mse          plain mean of δ²
    channel_mse  Σ_j I_j·e_j / Σ_j I_j, with e_j the mean of δ² over the rows of input channel j and I_j the
                 per-channel Fisher (I_j = Σ_rows F_ij)
    fisher_mse   Σ F_ij·δ_ij² / Σ F_ij, when the per-element Fisher is given

and the predicted KL cost of the type is ΔKL = ½·ΣF·err, err the most detailed of the three available
(docs/design.md, "Measure and plan" derives it).

With the input covariance H of a 2-D tensor (calibrate --covariance) two more are kept, both under the
Kronecker-factored Fisher F ≈ c·diag(d) ⊗ H (calibrate/covariance.py; d the per-row Fisher factor, c chosen so
that the model's trace is ΣF):

    kfac_plain     Σ_r d_r·δ_r H δ_rᵀ / (Σ_r d_r · tr H) for plain rounding
    kfac_feedback  the same for error-feedback rounding (formats/feedback.py)

so that ½·ΣF·kfac = ½·c·Σ_r d_r·δ_r H δ_rᵀ, the K-FAC ΔKL. Its rows are summed with the sample's 1/π weights
(no ratio estimator: the scale energy does not describe a feedback error). Large tensors are measured on a seeded subset of rows (every GGUF type encodes
rows independently, so a row's error does not depend on which other rows are encoded), drawn with probability
proportional to each row's Fisher-weighted energy, and the sums over the sample are scaled to the whole tensor
by the ratio of error to block-scale energy, which is known exactly for every row (sample_rows, _ratio).

With a held-out split of the covariance (TensorInput.covariance_split) feedback rounding is fitted to one half of
the calibration tokens and both errors are scored on the other half's H: scored on the H it was fitted to, the
feedback error is a training error that promises about three times the KLD gain (docs/design.md). The half-data
fit is a little worse than export's full-data one, so the held-out error leans pessimistic.

Results are cached on disk (cache_dir("measure")), keyed by the tensor's bytes, the importance and Fisher bytes,
the row subset, the type, and the encoder's code (`Engine.key`: the torch kernels' source or ggml's library; a
changed encoder is measured afresh); results that hold K-FAC errors also key on formats/feedback.py and the torch
kernels' source, which feedback rounding runs on whatever the engine. On a CPU ggml's quantiser encodes the plain
rounding (formats/engines.py: same bytes, faster).
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from tqdm import tqdm

from qgguf import formats
from qgguf.errors import QggufError
from qgguf.files import atomic_output, cache_dir
from qgguf.formats import engines
from qgguf.formats.engines import Engine
from qgguf.formats.feedback import Feedback
from qgguf.hashing import code_sha256, hash_array
from qgguf.plan.planner import TensorChoices

# Rows measured per tensor by default: the estimate of every error average then stays within 2% of the full
# tensor's (docs/benchmarks.md, "Measure: row subsampling"). Smaller tensors are measured whole.
DEFAULT_MAX_ROWS = 1024
CHUNK_WEIGHTS = 1 << 22  # weights encoded at once: bounds memory on large tensors
CACHE_VERSION = 2  # bump when the estimator changes
# feedback-on-plain: plan with plain rounding's errors (the validated predictor), then round every tensor that has
# an input covariance with error feedback (the plain plan's types, better integers; measure costs what plain does)
ROUNDINGS = ("plain", "feedback", "auto", "feedback-on-plain")
# the roundings that plan with feedback rounding's K-FAC error: measured held out (a split covariance) when they can
SPLIT_ROUNDINGS = ("feedback", "auto")


@dataclass(frozen=True)
class TypeResult:
    """The error of one type on one tensor (means per weight over the measured rows) and its exact bytes."""

    type: str
    nbytes: int
    mse: float
    channel_mse: float | None = None
    fisher_mse: float | None = None
    kfac_plain: float | None = None
    kfac_feedback: float | None = None

    def dkl_err(self, rounding: str) -> tuple[float, str]:
        """(the error ΔKL is predicted from, the rounding it belongs to) under `rounding`: plain (today's error),
        feedback (the K-FAC error of feedback rounding) or auto (the lower K-FAC error of the two). Without a
        covariance both fall back to plain rounding and today's error."""
        if rounding == "plain" or self.kfac_plain is None:
            return self.err, "plain"
        fb = self.kfac_feedback if self.kfac_feedback is not None else self.kfac_plain
        if rounding == "feedback" or fb < self.kfac_plain:
            return fb, "feedback"
        return self.kfac_plain, "plain"

    @property
    def err(self) -> float:
        """The error ΔKL is predicted from: Fisher-weighted if known, else channel-weighted, else plain."""
        for e in (self.fisher_mse, self.channel_mse, self.mse):
            if e is not None:
                return e
        raise AssertionError("unreachable")


@dataclass
class TensorMeasurement:
    name: str
    shape: tuple[int, ...]
    rms: float
    rows_measured: int
    rows_total: int
    results: dict[str, TypeResult] = field(default_factory=dict)

    @property
    def n_weights(self) -> int:
        return int(np.prod(self.shape))

    def choices(self, fisher_sum: float, rounding: str = "plain") -> TensorChoices:
        """The planner's input: per type (bytes, ΔKL = ½·ΣF·err) and the rounding it was measured with."""
        if not (math.isfinite(fisher_sum) and fisher_sum >= 0):
            raise QggufError(f"{self.name}: ΣF is {fisher_sum}; recalibrate (the statistics are broken)")
        if rounding not in ROUNDINGS:
            raise QggufError(f"--rounding {rounding!r} is not one of {', '.join(ROUNDINGS)}")
        picked = {k: r.dkl_err(rounding) for k, r in self.results.items()}
        return TensorChoices(name=self.name, shape=self.shape, fisher_sum=float(fisher_sum), rms=self.rms,
                             options={k: (r.nbytes, predicted_dkl(fisher_sum, picked[k][0]))
                                      for k, r in self.results.items()},
                             rounding={k: how for k, (_, how) in picked.items()})


def predicted_dkl(fisher_sum: float, err: float) -> float:
    """ΔKL ≈ ½·ΣF·err: the second-order KL cost of a weight error with mean square `err` (Fisher-weighted)."""
    return 0.5 * float(fisher_sum) * float(err)


@dataclass
class TensorInput:
    """One tensor to measure. weights: GGUF layout (rows × row_len, or experts × rows × row_len), any device.

    importance:     what the encoder weights by (per input channel; per expert × channel for 3-D tensors).
    channel_fisher: I_j = Σ_rows F_ij for the channel-weighted error; defaults to `importance`.
    fisher:         per-element Fisher, the shape of `weights`, for the Fisher-weighted error (optional).
    covariance:     the input covariance H (row_len × row_len) of a 2-D tensor: adds the K-FAC errors of plain and
                    feedback rounding (optional).
    covariance_split: (H_a, H_b), the covariance over two disjoint halves of the calibration tokens (optional, with
                    `covariance`): feedback rounding is then fitted to H_a and both K-FAC errors are scored on H_b,
                    tokens the rounding never saw (the held-out error; calibrate --covariance-split).
    row_fisher:     the per-row Fisher factor d (rows) for those errors; all ones when absent.
    fit_tokens:     the calibration tokens behind the H feedback rounding is fitted to (H_a's with a split): they
                    set its damping (formats/feedback.py, `damping`); None: GPTQ's fixed damping.
    """

    name: str
    weights: torch.Tensor | np.ndarray
    importance: torch.Tensor | np.ndarray | None = None
    channel_fisher: torch.Tensor | np.ndarray | None = None
    fisher: torch.Tensor | np.ndarray | None = None
    covariance: torch.Tensor | np.ndarray | None = None
    row_fisher: torch.Tensor | np.ndarray | None = None
    covariance_split: tuple | None = None
    fit_tokens: int | None = None


# ------------------------------------------------------------------------------------------------ rows
def sample_rows(sizes: np.ndarray | int, max_rows: int | None, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A seeded sample of about `max_rows` rows, drawn with probability proportional to each row's size.

    Returns the sorted row indices and their weights 1/π (π: the row's inclusion probability), for the
    Horvitz–Thompson sums Σ_sample x_r/π_r ≈ Σ_all x_r. Rows larger than their share are always taken (π = 1);
    the rest are drawn systematically along the rows, so the sample is also spread evenly over heads and
    experts. Sizes are the rows' Fisher-weighted energy: the few rows that carry most of the predicted error
    are the ones measured. An int `sizes` means that many rows of equal size. All rows when they are few.
    """
    s = np.full(sizes, 1.0) if isinstance(sizes, (int, np.integer)) else np.asarray(sizes, dtype=np.float64)
    n = len(s)
    if max_rows is None or max_rows <= 0 or n <= max_rows:
        return np.arange(n), np.ones(n)
    s = s + 1e-3 * max(s.mean(), 1e-300)  # every row keeps a chance, even one whose weights carry no Fisher
    pi = np.zeros(n)
    sure = np.zeros(n, dtype=bool)
    while True:  # rows whose share of the rest reaches 1 are taken for sure; repeat for the rest
        k = max_rows - int(sure.sum())
        rest = s[~sure].sum()
        new = ~sure & (s * k >= rest)
        if not new.any() or k <= 0:
            break
        sure |= new
    pi[sure] = 1.0
    k = max_rows - int(sure.sum())
    if k > 0:
        pi[~sure] = s[~sure] * k / s[~sure].sum()
    u = np.random.default_rng([seed, n, max_rows]).random()
    c = np.cumsum(np.where(sure, 0.0, pi))
    hit = np.floor(c - u) > np.floor(np.concatenate([[0.0], c[:-1]]) - u)  # systematic: one draw per unit of π
    rows = np.flatnonzero(sure | hit)
    return rows, 1.0 / pi[rows]


def _sample_per_expert(sizes: np.ndarray, groups: int, rows_per_group: int, max_rows: int, seed: int
                       ) -> tuple[np.ndarray, np.ndarray]:
    """sample_rows within each expert of a stacked tensor, max_rows shared equally (at least one row each): every
    expert is measured, even one whose statistics carry little Fisher (a rarely routed expert's prior)."""
    k = max(1, max_rows // groups)
    rows, inv_pi = [], []
    for g in range(groups):
        r, w = sample_rows(sizes[g * rows_per_group:(g + 1) * rows_per_group], k, seed + g)
        rows.append(r + g * rows_per_group)
        inv_pi.append(w)
    return np.concatenate(rows), np.concatenate(inv_pi)


# ------------------------------------------------------------------------------------------------ cache
def _cache_file(key: str, type_name: str, engine: Engine, feedback: bool = False) -> Path:
    code = f"{engine.key(formats.get(type_name))}|{code_sha256('plan/measure.py')}"
    if feedback:  # kfac_feedback comes from feedback.py on the torch kernels' levels, whatever the plain engine
        code += f"|{formats.encoder_hash(type_name)}|{code_sha256('formats/feedback.py')}"
    h = hashlib.blake2b(f"{key}|{type_name}|{code}|v{CACHE_VERSION}".encode(), digest_size=20)
    d = h.hexdigest()
    return cache_dir("measure", d[:2]) / f"{d}.json"


def _cache_read(path: Path) -> TypeResult | None:
    try:
        return TypeResult(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return None  # absent or damaged: measure again


def _cache_write(path: Path, r: TypeResult) -> None:
    with atomic_output(path) as tmp:
        tmp.write_text(json.dumps(asdict(r)))


# ------------------------------------------------------------------------------------------------ measure
def measure_tensor(t: TensorInput, types: Sequence[str], *, max_rows: int | None = DEFAULT_MAX_ROWS,
                   seed: int = 0, cache: bool = True, device: str | torch.device | None = None,
                   engine: Engine | None = None) -> TensorMeasurement:
    """Encode and decode `t` in every type of `types` that accepts its row length; see the module docstring.
    `engine`: whose code encodes (formats.engines; default: the one for `device`)."""
    engine = engine or engines.choose(device)
    w = _tensor(t.weights)
    if device is not None:
        w = w.to(device)
    w = w.to(torch.float32)
    if w.ndim not in (2, 3):
        raise QggufError(f"{t.name}: only 2-D and 3-D tensors are quantised (this one has shape "
                         f"{tuple(w.shape)}); leave it out of the plan")
    shape = tuple(int(s) for s in w.shape)
    row_len = shape[-1]
    groups = 1 if w.ndim == 2 else shape[0]
    w3 = w.reshape(groups, -1, row_len)
    rows_per_group = w3.shape[1]
    bad_rows = (~torch.isfinite(w3)).any(dim=-1).reshape(-1)
    if bool(bad_rows.any()):
        row = int(torch.nonzero(bad_rows)[0])
        raise QggufError(f"{t.name}: row {row} of the weights (of {int(bad_rows.sum())} such rows) holds NaN or "
                         "Inf; fix the checkpoint before quantising")

    imp = _per_group(t.importance, groups, row_len, w.device, t.name, "importance")
    chf = imp if t.channel_fisher is None else _per_group(t.channel_fisher, groups, row_len, w.device, t.name,
                                                          "channel Fisher")
    fisher = None
    if t.fisher is not None:
        fisher = _tensor(t.fisher).to(w.device, torch.float32)
        if tuple(fisher.shape) != shape:
            raise QggufError(f"{t.name}: the per-element Fisher has shape {tuple(fisher.shape)}, the weights "
                             f"{shape}; use statistics computed for this model")
        fisher = fisher.reshape(groups, -1, row_len)

    n_total = groups * rows_per_group
    sizes = _row_sizes(w3, chf, fisher) if max_rows and n_total > max_rows else n_total
    if groups > 1 and max_rows and n_total > max_rows:
        rows, inv_pi = _sample_per_expert(sizes, groups, rows_per_group, max_rows, seed)
    else:
        rows, inv_pi = sample_rows(sizes, max_rows, seed)
    rms = math.sqrt(float(_energy(w3, None, 1).col.sum()) / w3.numel())
    energies: dict[int, _Energy | None] = {}
    out = TensorMeasurement(name=t.name, shape=shape, rms=rms, rows_measured=len(rows), rows_total=n_total)

    kfac = None
    if t.covariance is not None and w.ndim == 2:
        kfac = _kfac_setup(t, w, row_len)

    key = None
    if cache:
        h = hashlib.blake2b(digest_size=20)
        for a in (w, t.importance, t.channel_fisher, t.fisher, t.covariance, t.row_fisher,
                  *(t.covariance_split or ())):
            hash_array(h, a)
        h.update(f"rows={max_rows}|seed={seed}|fit_tokens={t.fit_tokens}".encode())
        key = h.hexdigest()

    fmts = [formats.get(name) for name in types]
    fmts = [f for f in fmts if f.accepts(row_len)]
    paths = {f.name: _cache_file(key, f.name, engine, kfac is not None) if key else None for f in fmts}
    cached = {f.name: _cache_read(paths[f.name]) if paths[f.name] else None for f in fmts}
    todo = [f for f in fmts if cached[f.name] is None and f.feedback] if kfac is not None else []
    if todo and kfac.fb.U is not None:  # the factor is made here, when a type needs it (none on a warm cache)
        # feedback rounding of the sampled rows in every type still to measure, at once (formats/feedback.py:
        # the types' column loops run in lockstep)
        x = w3[0].index_select(0, torch.as_tensor(rows, device=w.device))
        kfac.rows_bytes = kfac.fb.encode_many(todo, x, imp[0] if imp is not None else None, engine)
    for fmt in fmts:
        path = paths[fmt.name]
        r = cached[fmt.name]
        if r is None:
            size = _scale_block(fmt)
            if size not in energies:  # not needed when every row is measured: the sample is the tensor
                energies[size] = _energy(w3, fisher, size) if len(rows) < n_total else None
            r = _measure_type(fmt, w3, rows, inv_pi, rows_per_group, imp, chf, fisher, energies[size], shape,
                              t.name, engine, kfac)
            if path and _finite(r):
                _cache_write(path, r)
        if not _finite(r):  # e.g. a scale past fp16's range: the type cannot hold this tensor
            print(f"qgguf: {t.name}: {fmt.name} gives a non-finite error (its scales overflow); not a candidate",
                  file=sys.stderr)
            continue
        out.results[fmt.name] = r
    return out


def _finite(r: TypeResult) -> bool:
    return all(e is None or math.isfinite(e) for e in (r.mse, r.channel_mse, r.fisher_mse, r.kfac_plain,
                                                        r.kfac_feedback))


@dataclass
class _Kfac:
    """What the K-FAC errors of one 2-D tensor need: H, d, the normaliser Σ_r d_r·tr H, the feedback factor."""

    H: torch.Tensor           # float32 [n, n]
    d: torch.Tensor           # float64 [rows]
    den: float
    fb: Feedback
    rows_bytes: dict = field(default_factory=dict)  # type → feedback bytes of the sampled rows, in sample order


def _kfac_setup(t: TensorInput, w: torch.Tensor, row_len: int) -> _Kfac:
    fit = t.covariance
    if t.covariance_split is not None:  # round with one half of the tokens, score with the other
        fit, score = t.covariance_split
        if tuple(np.shape(fit)) != tuple(np.shape(score)) or tuple(np.shape(fit)) != tuple(np.shape(t.covariance)):
            raise QggufError(f"{t.name}: the held-out split's covariances do not match the input covariance's "
                             "shape; run `qgguf calibrate --covariance DIR --covariance-split` again")
    H = _tensor(t.covariance if t.covariance_split is None else score).to(w.device, torch.float32)
    if tuple(H.shape) != (row_len, row_len):
        raise QggufError(f"{t.name}: the input covariance is {tuple(H.shape)}, rows have {row_len} weights; use the "
                         "covariance computed for this model (calibrate --covariance)")
    rows = w.shape[0]
    d = (torch.ones(rows, dtype=torch.float64, device=w.device) if t.row_fisher is None
         else _tensor(t.row_fisher).to(w.device, torch.float64).reshape(-1))
    if d.numel() != rows or not bool((torch.isfinite(d) & (d >= 0)).all()):
        raise QggufError(f"{t.name}: the per-row Fisher has {d.numel()} values (rows: {rows}) or non-finite ones; "
                         "recalibrate with --covariance")
    Hf = torch.where(torch.isfinite(H), H, torch.zeros_like(H))  # NaN in H: rounding falls back, the metric skips it
    den = float(d.sum()) * float(Hf.diagonal().to(torch.float64).clamp(min=0).sum())
    if not den > 0:  # no Fisher in any row or an input that never fired: weigh by the plain error instead
        d = torch.ones_like(d)
        Hf = torch.eye(row_len, dtype=torch.float32, device=w.device)
        den = float(rows * row_len)
    return _Kfac(Hf, d, den, Feedback(fit, t.name, device=w.device, tokens=t.fit_tokens))


def _h_sum(x: torch.Tensor, y: torch.Tensor, k: _Kfac, rows: torch.Tensor, wr: torch.Tensor) -> torch.Tensor:
    """Σ over these rows of (1/π)·d_r·δ_r H δ_rᵀ, δ = y − x."""
    D = y - x
    per_row = ((D @ k.H) * D).sum(1, dtype=torch.float64)
    return (wr.reshape(-1) * k.d.index_select(0, rows) * per_row).sum()


def _tensor(a) -> torch.Tensor:
    """A torch view of an array; memory-mapped GGUF data is read-only, which is fine: nothing writes to it."""
    if isinstance(a, torch.Tensor):
        return a
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(np.ascontiguousarray(a))


def _per_group(v, groups: int, row_len: int, device, name: str, what: str) -> torch.Tensor | None:
    """A per-channel vector as groups × row_len (one row per expert, or one shared by all)."""
    if v is None:
        return None
    v = _tensor(v).to(device, torch.float32)
    if not bool((torch.isfinite(v) & (v >= 0)).all()):
        raise QggufError(f"{name}: the {what} holds NaN, Inf or negative values; the statistics file is damaged: "
                         "calibrate again")
    if v.numel() == row_len:
        return v.reshape(1, row_len).expand(groups, row_len)
    if v.numel() == groups * row_len:
        return v.reshape(groups, row_len)
    raise QggufError(f"{name}: {what} has {v.numel()} values, rows have {row_len} (× {groups} experts); "
                     "use statistics computed for this model")


@dataclass
class _Energy:
    """Scale energy a of all rows (see _scale_sq): the ratio estimator's reference."""

    col: torch.Tensor        # float64[groups, row_len]: Σ over rows of a
    fisher_x2: float | None  # Σ F·a over the tensor
    fisher: float | None     # Σ F over the tensor


def _scale_sq(x: torch.Tensor, size: int) -> torch.Tensor:
    """Per element, the square of the largest |x| in its scale block of `size` (x² itself for size 1), float64.

    The rounding error of an element follows the scale of its block, not its own value, so this is the
    quantity the error is proportional to.
    """
    x = x.to(torch.float64)
    if size == 1:
        return x * x
    a = x.abs().reshape(*x.shape[:-1], -1, size).amax(dim=-1, keepdim=True)
    return (a * a).expand(*x.shape[:-1], x.shape[-1] // size, size).reshape(x.shape)


def _energy(w3: torch.Tensor, fisher: torch.Tensor | None, size: int) -> _Energy:
    """Σ over every row of the scale energy (per group and channel; Fisher-weighted), in chunks, no encoding."""
    groups, rows, row_len = w3.shape
    per_chunk = max(1, CHUNK_WEIGHTS // row_len)
    col = torch.zeros(groups, row_len, dtype=torch.float64, device=w3.device)
    fx = torch.zeros((), dtype=torch.float64, device=w3.device)
    fs = torch.zeros((), dtype=torch.float64, device=w3.device)
    for g in range(groups):
        for r0 in range(0, rows, per_chunk):
            a = _scale_sq(w3[g, r0:r0 + per_chunk], size)
            col[g] += a.sum(dim=0)
            if fisher is not None:
                f = fisher[g, r0:r0 + per_chunk].to(torch.float64)
                fx += (f * a).sum()
                fs += f.sum()
    return _Energy(col, None if fisher is None else float(fx), None if fisher is None else float(fs))


def _row_sizes(w3: torch.Tensor, chf: torch.Tensor | None, fisher: torch.Tensor | None) -> np.ndarray:
    """Each row's Fisher-weighted energy Σ_j F_rj·x_rj² (per-channel Fisher, or plain x² without it)."""
    groups, rows, row_len = w3.shape
    per_chunk = max(1, CHUNK_WEIGHTS // row_len)
    out = torch.empty(groups, rows, dtype=torch.float64, device=w3.device)
    for g in range(groups):
        for r0 in range(0, rows, per_chunk):
            x2 = w3[g, r0:r0 + per_chunk].to(torch.float64) ** 2
            if fisher is not None:
                x2 = x2 * fisher[g, r0:r0 + per_chunk].to(torch.float64)
            elif chf is not None:
                x2 = x2 * chf[g].to(torch.float64)
            out[g, r0:r0 + per_chunk] = x2.sum(dim=1)
    return out.reshape(-1).cpu().numpy()


def _scale_block(fmt: formats.Format) -> int:
    """Weights that share one scale: the sub-block of a K-quant, else the block."""
    size = fmt.sub_block or fmt.block_size
    return size if fmt.block_size % size == 0 else fmt.block_size


def _ratio(err_s: float, energy_s: float, energy_all: float, fallback: float) -> float:
    """Σ error over all rows ≈ (Σ error / Σ energy on the sampled rows) × Σ energy of all rows.

    Every GGUF type's error scales with the square of its block scale, so the error-to-scale-energy ratio varies
    far less between rows than the error itself: rows and blocks of different scale add little sampling noise.
    With every row sampled the estimate is exact.
    """
    return err_s / energy_s * energy_all if energy_s > 0 else fallback


def _measure_type(fmt: formats.Format, w3: torch.Tensor, rows: np.ndarray, inv_pi: np.ndarray, rows_per_group: int,
                  imp: torch.Tensor | None, chf: torch.Tensor | None, fisher: torch.Tensor | None,
                  energy: _Energy | None, shape: tuple[int, ...], name: str, engine: Engine,
                  kfac: _Kfac | None = None) -> TypeResult:
    groups, _, row_len = w3.shape
    dev = w3.device
    per_chunk = max(1, CHUNK_WEIGHTS // row_len)
    col_d = torch.zeros(groups, row_len, dtype=torch.float64, device=dev)   # sampled rows: Σ δ² per channel
    col_x = torch.zeros(groups, row_len, dtype=torch.float64, device=dev)   # sampled rows: Σ a per channel
    fd = torch.zeros((), dtype=torch.float64, device=dev)                    # sampled rows: Σ F·δ²
    fx = torch.zeros((), dtype=torch.float64, device=dev)                    # sampled rows: Σ F·a
    kp = torch.zeros((), dtype=torch.float64, device=dev)                    # sampled rows: Σ d·δHδ, plain
    kf = torch.zeros((), dtype=torch.float64, device=dev)                    # the same, feedback rounding
    feedback = kfac is not None and fmt.feedback and kfac.fb.U is not None
    g_of = rows // rows_per_group
    for g in np.unique(g_of):
        sel = g_of == g
        rg, wg = rows[sel] - g * rows_per_group, inv_pi[sel]
        for r0 in range(0, len(rg), per_chunk):
            idx = torch.as_tensor(rg[r0:r0 + per_chunk], device=dev)
            wr = torch.as_tensor(wg[r0:r0 + per_chunk], device=dev)[:, None]  # 1/π: Horvitz–Thompson sums
            x = w3[g].index_select(0, idx)
            # plain rounding through the engine (ggml on a CPU); feedback rounding is feedback.py's torch code
            y = fmt.roundtrip(x, None if imp is None else imp[g], tensor=name, engine=engine)
            d2 = (y - x).to(torch.float64) ** 2
            if kfac is not None:
                kp += _h_sum(x, y, kfac, idx, wr)
                if feedback:
                    raw = kfac.rows_bytes.get(fmt.name)
                    raw = (kfac.fb.encode(fmt, x, None if imp is None else imp[g], engine) if raw is None
                           else raw[r0:r0 + per_chunk])
                    kf += _h_sum(x, fmt.decode(raw, tuple(x.shape)), kfac, idx, wr)
            x2 = _scale_sq(x, _scale_block(fmt))
            col_d[g] += (wr * d2).sum(dim=0)
            col_x[g] += (wr * x2).sum(dim=0)
            if fisher is not None:
                f = fisher[g].index_select(0, idx).to(torch.float64)
                fd += (wr * f * d2).sum()
                fx += (wr * f * x2).sum()
    if energy is None:  # every row measured
        energy = _Energy(col_x, float(fx) if fisher is not None else None,
                         float(fisher.to(torch.float64).sum()) if fisher is not None else None)
    n_all = groups * rows_per_group * row_len
    # col_d, col_x, fd, fx estimate sums over all rows; the ratio to the known energy removes most of the noise
    mse = _ratio(float(col_d.sum()), float(col_x.sum()), float(energy.col.sum()), float(col_d.sum())) / n_all
    channel_mse = None
    if chf is not None:
        c = chf.to(torch.float64)
        den = float(c.sum()) * rows_per_group  # Σ_j I_j e_j / Σ_j I_j with e_j a mean over the rows
        channel_mse = _ratio(float((c * col_d).sum()), float((c * col_x).sum()), float((c * energy.col).sum()),
                             mse * den) / den if den > 0 else mse
    fisher_mse = None
    if fisher is not None:
        fisher_mse = _ratio(float(fd), float(fx), energy.fisher_x2, mse * energy.fisher) / energy.fisher \
            if energy.fisher > 0 else mse
    kfac_plain = kfac_feedback = None
    if kfac is not None:
        kfac_plain = float(kp) / kfac.den
        kfac_feedback = float(kf) / kfac.den if feedback else kfac_plain
    return TypeResult(type=fmt.name, nbytes=int(fmt.nbytes(shape)), mse=mse, channel_mse=channel_mse,
                      fisher_mse=fisher_mse, kfac_plain=kfac_plain, kfac_feedback=kfac_feedback)


def _work(shape: tuple[int, ...], types: Sequence[str], max_rows: int | None) -> tuple[int, int]:
    """(weights encoded and decoded, weights read in whole-tensor passes) to measure one tensor of `shape`."""
    row_len, rows = shape[-1], math.prod(shape[:-1])
    fmts = [formats.get(n) for n in types if formats.get(n).accepts(row_len)]
    sampled = rows if not max_rows or rows <= max_rows else max_rows
    passes = (1 + len({_scale_block(f) for f in fmts})) * rows * row_len if sampled < rows else 0
    return len(fmts) * sampled * row_len, passes


def estimate(shapes: Sequence[tuple[int, ...]], types: Sequence[str], max_rows: int | None) -> str:
    """What measuring tensors of these shapes costs before it starts: tensors × types × rows, in weights."""
    coded = passes = 0
    for shape in shapes:
        c, p = _work(shape, types, max_rows)
        coded, passes = coded + c, passes + p
    rows_note = f"≤ {max_rows:,} rows each" if max_rows else "every row"
    return (f"measure: {len(shapes)} tensors × {len(types)} types ({rows_note}): {coded / 1e9:.3g} G weights "
            f"to encode and decode, {passes / 1e9:.3g} G weights read in whole-tensor passes")


def measure_tensors(items: Iterable[TensorInput], types: Sequence[str], *, max_rows: int | None = DEFAULT_MAX_ROWS,
                    seed: int = 0, cache: bool = True, device: str | torch.device | None = None,
                    progress: bool = True, total: int | None = None,
                    shapes: Sequence[tuple[int, ...]] | None = None) -> dict[str, TensorMeasurement]:
    """Measure a stream of tensors (one in flight at a time), with a progress bar. `shapes` (of the tensors the
    stream will give): print what it will cost before starting (`estimate`)."""
    out: dict[str, TensorMeasurement] = {}
    engine = engines.choose(device)
    if shapes is not None:
        total = len(shapes)
        if progress:
            print(f"qgguf: {estimate(shapes, types, max_rows)}", file=sys.stderr)
    # a weight read in a whole-tensor pass costs about a tenth of one encoded and decoded (SmolLM2, ggml encoder)
    work = [c + p / 10 for c, p in (_work(sh, types, max_rows) for sh in shapes)] if shapes is not None else None
    done, t0, told = 0, time.monotonic(), not progress or work is None
    with tqdm(items, total=total, desc="measure", unit="tensor", disable=not progress or None) as bar:
        for i, t in enumerate(bar):
            bar.set_postfix_str(t.name, refresh=False)
            out[t.name] = measure_tensor(t, types, max_rows=max_rows, seed=seed, cache=cache, device=device,
                                         engine=engine)
            if not told:  # once the first tensors took a few seconds: the time they predict for all (logs too)
                done += work[i]
                spent = time.monotonic() - t0
                if spent >= 10.0 and done >= 0.03 * sum(work) and i + 1 < len(work):
                    told = True
                    left = spent * (sum(work) - done) / max(done, 1)
                    print(f"qgguf: measure: the first {i + 1} tensors took {spent:.0f} s: about "
                          f"{_duration(spent + left)} for all ({engine.name} encoder; cached results are quicker)",
                          file=sys.stderr)
    return out


def _duration(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 90 else f"{seconds:.0f} s"
