"""Plan: one GGUF type per tensor, minimising the predicted KL divergence under a size budget.

Input: for every planned tensor its candidate types, each with exact bytes and predicted ΔKL (from measure).
The problem is a multiple-choice knapsack: choose one option per tensor (or per group of tied tensors) so that
Σ bytes ≤ budget and Σ ΔKL is least. The solver:

1. Lagrangian relaxation: the lower convex hull of each tensor's (bytes, ΔKL) points; the hull segments of all
   tensors, sorted by ΔKL saved per byte, are taken in that order from every tensor's cheapest option while they
   fit. The efficiency of the first segment that does not fit is the Lagrange multiplier λ (ΔKL per byte).
2. Greedy fill: the bytes left are spent on the single changes (any option, on the hull or not) with the best
   ΔKL saved per byte, until none fits.
3. Exchange pass: a downgrade of one tensor paired with an upgrade of another, when the pair fits and lowers
   Σ ΔKL; then fill again. Repeated until nothing improves.

The module is numpy only and knows nothing of models: measure makes the candidates, export reads `Plan.types`.
Besides the solver: the paper's continuous bit allocation, llama-quantize's `--tensor-type` syntax (overrides and
the `--tensor-type-file` that reproduces a stock plan), the plan JSON, a summary table and a heat map.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np

from .errors import QggufError
from .files import atomic_output

PLAN_VERSION = 1
_TOL = 1e-12  # a change must lower Σ ΔKL by more than this fraction of it to count (rounding noise)
GGUF_ALIGNMENT = 32  # gguf-py's and llama.cpp's default general.alignment


# ------------------------------------------------------------------------------------------------ inputs
@dataclass(frozen=True)
class TensorChoices:
    """One planned tensor: its candidate types with (bytes, predicted ΔKL), and the statistics behind them.

    `shape` is in GGUF/ggml order (the row last). `fisher_sum` is ΣF over the tensor's weights, `rms` the RMS of
    its weights; both only feed the continuous allocation and the report (NaN when unknown).
    """

    name: str
    shape: tuple[int, ...]
    options: Mapping[str, tuple[int, float]]
    fisher_sum: float = math.nan
    rms: float = math.nan

    @property
    def n_weights(self) -> int:
        return int(np.prod(self.shape))


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


# ------------------------------------------------------------------------------------------------ llama-quantize
def llama_quantizes(name: str, n_dims: int) -> bool:
    """Whether stock llama-quantize would quantise this tensor (tensor_allows_quantization in llama-quant.cpp).

    Tensors it keeps as they are (1-D tensors, norms, MoE routers, positional embeddings, ...) are not planned,
    so that a --tensor-type-file reproduces the plan exactly. Architecture-specific exclusions are included by
    name, as llama.cpp lists them.
    """
    if n_dims < 2 or not name.endswith("weight"):
        return False
    if name in ("position_embd.weight", "token_types.weight"):
        return False
    return not any(s in name for s in _NOT_QUANTIZED)


_NOT_QUANTIZED = (
    "_norm.weight", "ffn_gate_inp.weight", "ffn_gate_tid2eid.weight", "altup", "laurel", "per_layer_model_proj",
    "ssm_conv1d", "shortconv.conv.weight", "indexer.k_proj.weight", "indexer.q_proj.weight",
    "time_mix_first.weight", "time_mix_w0.weight", "time_mix_w1.weight", "time_mix_w2.weight",
    "time_mix_v0.weight", "time_mix_v1.weight", "time_mix_v2.weight", "time_mix_a0.weight", "time_mix_a1.weight",
    "time_mix_a2.weight", "time_mix_g1.weight", "time_mix_g2.weight", "time_mix_decay_w1.weight",
    "time_mix_decay_w2.weight", "time_mix_lerp_fused.weight", "attn_rel_b.weight", ".position_embd",
    "sam.pos_embd", "sam.neck.", "sam.net_", ".rel_pos", ".patch_embd", ".patch_merger", "a.rvq.codebook",
    "mm.a.code_embd",
)


@dataclass(frozen=True)
class Override:
    """One `pattern=type` of llama-quantize's --tensor-type: a regex searched in the tensor name."""

    pattern: str
    type: str

    def matches(self, name: str) -> bool:
        return re.search(self.pattern, name) is not None


def parse_overrides(specs: Iterable[str]) -> list[Override]:
    """Parse `pattern=type` strings as llama-quantize does (pattern lower-cased, type case-insensitive).

    As in llama-quantize, the first override whose pattern is found in a tensor's name decides its type.
    """
    from . import formats

    out = []
    for spec in specs:
        pattern, sep, tname = str(spec).partition("=")
        if not sep or not pattern or not tname:
            raise QggufError(f"tensor type override {spec!r} is not of the form PATTERN=TYPE "
                             "(e.g. --tensor-type 'attn_v=Q6_K')")
        try:
            fmt = formats.get(tname)
        except QggufError:
            raise QggufError(f"tensor type override {spec!r}: unknown type {tname!r}; known types: "
                             f"{', '.join(formats.names())}") from None
        pattern = pattern.lower()
        try:
            re.compile(pattern)
        except re.error as e:
            raise QggufError(f"tensor type override {spec!r}: the pattern is not a valid regular expression "
                             f"({e}); escape special characters, e.g. 'blk\\.0\\.attn_v=Q6_K'") from None
        out.append(Override(pattern, fmt.name))
    return out


def read_tensor_type_file(path: Path) -> list[Override]:
    """A --tensor-type-file: `pattern=type` entries separated by white space, as llama-quantize reads it."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise QggufError(f"cannot read tensor type file {str(path)!r} ({e.strerror}); check the path") from None
    return parse_overrides(text.split())


def _pattern_for(name: str) -> str:
    """An anchored regex matching exactly `name`, that survives llama-quantize lower-casing the pattern."""
    return "^" + "".join("." if c.isupper() else re.escape(c) for c in name) + "$"


# ------------------------------------------------------------------------------------------------ knapsack core
@dataclass
class Solution:
    choice: np.ndarray      # option index per decision
    cost: float             # Σ cost of the chosen options
    value: float            # Σ value (ΔKL) of the chosen options
    lam: float              # Lagrange multiplier: ΔKL per byte at the hull-greedy stop (0 when nothing binds)


def _hull(cost: np.ndarray, value: np.ndarray) -> list[int]:
    """Indices of the lower convex hull of the points, from the cheapest, ΔKL strictly decreasing."""
    order = np.lexsort((value, cost))
    pareto: list[int] = []
    for i in order:  # cheapest first; keep only points that lower ΔKL
        if not pareto or value[i] < value[pareto[-1]]:
            if pareto and cost[i] == cost[pareto[-1]]:
                continue
            pareto.append(int(i))
    hull: list[int] = []
    for i in pareto:  # monotone chain: drop points above the segment joining their neighbours
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            # b lies on or above the segment a→i when (b−a)×(i−a) ≤ 0 (cross product)
            cross = (cost[b] - cost[a]) * (value[i] - value[a]) - (value[b] - value[a]) * (cost[i] - cost[a])
            if cross <= 0:
                hull.pop()
            else:
                break
        hull.append(i)
    return hull


def solve_mckp(costs: Sequence[np.ndarray], values: Sequence[np.ndarray], capacity: float, *,
               exchange_rounds: int | None = None, core_size: int = 40, max_states: int = 1 << 14) -> Solution:
    """Minimise Σ values[i][choice[i]] subject to Σ costs[i][choice[i]] ≤ capacity (one choice per decision).

    The caller checks feasibility (Σ min cost ≤ capacity). Deterministic: ties go to the lower index.
    """
    n = len(costs)
    m = max(len(c) for c in costs)
    C = np.full((n, m), np.inf)
    V = np.full((n, m), np.inf)
    for i, (c, v) in enumerate(zip(costs, values)):
        C[i, :len(c)] = c
        V[i, :len(v)] = v
    rows = np.arange(n)

    # 1. Lagrangian relaxation on the hulls: apply segments in order of efficiency while they fit.
    seg_dec, seg_to, seg_dc, seg_eff = [], [], [], []
    choice = np.empty(n, dtype=np.int64)
    for i in range(n):
        h = _hull(C[i, :len(costs[i])], V[i, :len(values[i])])
        choice[i] = h[0]
        prev = np.inf
        for a, b in zip(h[:-1], h[1:]):
            dc = C[i, b] - C[i, a]
            prev = min(prev, (V[i, a] - V[i, b]) / dc)  # never rising along a hull, even by rounding
            seg_dec.append(i)
            seg_to.append(b)
            seg_dc.append(dc)
            seg_eff.append(prev)
    left = capacity - C[rows, choice].sum()
    lam = 0.0
    if seg_dec:
        seg_dec_a, seg_eff_a = np.array(seg_dec), np.array(seg_eff)
        # by efficiency, then decision, then position on the hull (segments of a hull come in order)
        order = np.lexsort((np.arange(len(seg_dec)), seg_dec_a, -seg_eff_a))
        dc_sorted = np.array(seg_dc)[order]
        taken = np.cumsum(dc_sorted) <= left
        stop = int(np.argmin(taken)) if not taken.all() else len(order)
        for k in order[:stop]:
            choice[seg_dec[k]] = seg_to[k]
        if stop < len(order):
            lam = float(seg_eff_a[order[stop]])
        left = capacity - C[rows, choice].sum()

    # 2 and 3: greedy fill, then exchanges, until nothing improves.
    eps = _TOL
    rounds = 4 * n + 16 if exchange_rounds is None else exchange_rounds
    choice, left = _fill(C, V, choice, capacity, eps)
    for _ in range(rounds):  # each exchange lowers Σ ΔKL, so this cannot cycle
        moved = _exchange(C, V, choice, left, eps)
        if moved is None:
            break
        (i, j), (k, l) = moved
        choice[i], choice[k] = j, l
        choice, left = _fill(C, V, choice, capacity, eps)

    # 4. Core: re-solve exactly the decisions nearest the margin (all of them on small problems).
    if core_size > 0:
        core = _core(C, V, choice, lam, core_size)
        better = _core_dp(C, V, choice, core, capacity, max_states)
        if better is not None and V[rows, better].sum() < V[rows, choice].sum() * (1 - eps):
            choice, left = _fill(C, V, better, capacity, eps)
    return Solution(choice=choice, cost=float(C[rows, choice].sum()), value=float(V[rows, choice].sum()), lam=lam)


def _fill(C: np.ndarray, V: np.ndarray, choice: np.ndarray, capacity: float, eps: float
          ) -> tuple[np.ndarray, float]:
    """Apply the single change with the best ΔKL saved per byte that fits, until none does."""
    rows = np.arange(C.shape[0])
    while True:  # inf marks missing options; their arithmetic is masked out below
        c0, v0 = C[rows, choice], V[rows, choice]
        left = capacity - c0.sum()
        dc = C - c0[:, None]
        dv = V - v0[:, None]
        ok = (dc <= left) & (dv < -eps * v0.sum())
        if not ok.any():
            return choice, float(left)
        # free improvements (no extra bytes) first, then by ΔKL saved per byte
        with np.errstate(all="ignore"):
            gain = np.where(ok, -dv / np.maximum(dc, 1e-300), -np.inf)
        gain = np.where(ok & (dc <= 0), np.inf, gain)
        best = np.flatnonzero(gain == gain.max())
        if np.isinf(gain.max()):  # among free moves take the largest saving
            best = best[np.argmax(-dv.ravel()[best])]
        else:
            best = best[0]
        i, j = divmod(int(best), C.shape[1])
        choice[i] = j


def _exchange(C: np.ndarray, V: np.ndarray, choice: np.ndarray, left: float, eps: float,
              max_upgrades: int = 256):
    """The best pair (upgrade one decision, downgrade another) that fits and lowers Σ ΔKL, or None."""
    rows = np.arange(C.shape[0])
    c0, v0 = C[rows, choice], V[rows, choice]
    dc = C - c0[:, None]
    dv = V - v0[:, None]
    tol = eps * v0.sum()
    up = np.flatnonzero(((dc > left) & (dv < -tol) & np.isfinite(dc)).ravel())
    down = np.flatnonzero(((dc < 0) & np.isfinite(dv)).ravel())
    if up.size == 0 or down.size == 0:
        return None
    dcf, dvf = dc.ravel(), dv.ravel()
    if up.size > max_upgrades:  # the upgrades that save the most ΔKL
        up = up[np.argsort(dvf[up], kind="stable")[:max_upgrades]]
    m = C.shape[1]
    fits = dcf[up][:, None] + dcf[down][None, :] <= left
    other = (up // m)[:, None] != (down // m)[None, :]
    total = np.where(fits & other, dvf[up][:, None] + dvf[down][None, :], np.inf)
    k = int(np.argmin(total))
    if not total.flat[k] < -tol:
        return None
    u, d = up[k // down.size], down[k % down.size]
    return divmod(int(u), m), divmod(int(d), m)


def _core(C: np.ndarray, V: np.ndarray, choice: np.ndarray, lam: float, size: int) -> np.ndarray:
    """The decisions whose choice is least settled: smallest Lagrangian regret of switching to another option."""
    n = C.shape[0]
    if n <= size:
        return np.arange(n)
    rows = np.arange(n)
    with np.errstate(all="ignore"):
        score = V + lam * C
        regret = score - score[rows, choice][:, None]
        regret[rows, choice] = np.inf
        regret = np.where(np.isfinite(regret), np.abs(regret), np.inf).min(axis=1)
    return np.sort(np.argsort(regret, kind="stable")[:size])


def _core_dp(C: np.ndarray, V: np.ndarray, choice: np.ndarray, core: np.ndarray, capacity: float,
             max_states: int) -> np.ndarray | None:
    """Exact dynamic programme over Pareto states (cost, ΔKL) for the `core` decisions, the others fixed.

    States that cannot leave room for the cheapest options of the decisions still to come are dropped. Should
    the Pareto front outgrow `max_states`, it is thinned to the best state per cost bucket (then no longer
    exact, but every state is still a feasible plan).
    """
    rows = np.arange(C.shape[0])
    fixed = np.ones(C.shape[0], dtype=bool)
    fixed[core] = False
    room = capacity - C[rows[fixed], choice[fixed]].sum()
    cmin = np.where(np.isfinite(C[core]), C[core], np.inf).min(axis=1)
    rest = np.concatenate([np.cumsum(cmin[::-1])[::-1][1:], [0.0]])  # Σ cheapest of the decisions after each
    sc, sv = np.zeros(1), np.zeros(1)
    parents, options = [], []
    m = C.shape[1]
    for k, i in enumerate(core):
        cc = (sc[:, None] + C[i][None, :]).ravel()
        cv = (sv[:, None] + V[i][None, :]).ravel()
        keep = np.flatnonzero(np.isfinite(cc) & (cc <= room - rest[k]))
        if keep.size == 0:
            return None
        order = keep[np.lexsort((cv[keep], cc[keep]))]
        v_sorted = cv[order]
        best_before = np.concatenate([[np.inf], np.minimum.accumulate(v_sorted)[:-1]])
        order = order[v_sorted < best_before]  # Pareto: each kept state is strictly better than all cheaper ones
        if order.size > max_states:
            c = cc[order]
            bucket = np.floor((c - c[0]) / (c[-1] - c[0] + 1e-9) * max_states).astype(np.int64)
            last = np.flatnonzero(np.r_[bucket[1:] != bucket[:-1], True])  # the best (last) state in each bucket
            order = order[last]
        sc, sv = cc[order], cv[order]
        parents.append(order // m)
        options.append(order % m)
    best = int(np.argmin(sv))
    out = choice.copy()
    for k in range(len(core) - 1, -1, -1):
        out[core[k]] = options[k][best]
        best = int(parents[k][best])
    return out


# ------------------------------------------------------------------------------------------------ the plan
@dataclass
class PlannedTensor:
    name: str
    shape: tuple[int, ...]
    type: str
    bytes: int
    dkl: float
    fisher_sum: float
    rms: float
    continuous_bits: float
    options: dict[str, tuple[int, float]]
    forced: bool = False  # set by an override

    @property
    def n_weights(self) -> int:
        return int(np.prod(self.shape))

    @property
    def bpw(self) -> float:
        return 8.0 * self.bytes / self.n_weights

    @property
    def layer(self) -> int | None:
        m = re.match(r"blk\.(\d+)\.", self.name)
        return int(m.group(1)) if m else None

    @property
    def kind(self) -> str:
        """The tensor's role without its layer: blk.3.attn_q.weight → attn_q; token_embd.weight → token_embd."""
        base = re.sub(r"^blk\.\d+\.", "", self.name)
        return base[:-len(".weight")] if base.endswith(".weight") else base


@dataclass
class Plan:
    tensors: list[PlannedTensor]
    budget: Budget
    layout: FileLayout
    lam: float
    capacity: int
    ties: list[list[str]] = field(default_factory=list)

    # ------------------------------------------------------------ totals
    @property
    def types(self) -> dict[str, str]:
        """Tensor name → type name: what export writes."""
        return {t.name: t.type for t in self.tensors}

    @property
    def planned_bytes(self) -> int:
        return sum(t.bytes for t in self.tensors)

    @property
    def planned_weights(self) -> int:
        return sum(t.n_weights for t in self.tensors)

    @property
    def file_bytes(self) -> int:
        """The whole GGUF: header and metadata, every tensor with its alignment padding."""
        a = self.layout.alignment
        return self.layout.header_bytes + self.layout.fixed_padded + sum(padded(t.bytes, a) for t in self.tensors)

    @property
    def bpw(self) -> float:
        """llama.cpp's BPW: all tensor data bits over all tensor elements."""
        return 8.0 * (self.planned_bytes + self.layout.fixed_bytes) / (self.planned_weights + self.layout.fixed_weights)

    @property
    def weights_bpw(self) -> float:
        """Bits per weight of the planned tensors alone."""
        return 8.0 * self.planned_bytes / self.planned_weights

    @property
    def predicted_kl(self) -> float:
        return float(sum(t.dkl for t in self.tensors))

    # ------------------------------------------------------------ files
    def to_dict(self) -> dict:
        return {
            "version": PLAN_VERSION,
            "budget": {"kind": self.budget.kind, "value": self.budget.value},
            "layout": vars(self.layout).copy(),
            "lambda": self.lam,
            "capacity": self.capacity,
            "ties": self.ties,
            "totals": {"file_bytes": self.file_bytes, "bpw": self.bpw, "weights_bpw": self.weights_bpw,
                       "planned_bytes": self.planned_bytes, "planned_weights": self.planned_weights,
                       "predicted_kl": self.predicted_kl},
            "tensors": [{
                "name": t.name, "shape": list(t.shape), "type": t.type, "bytes": t.bytes, "bpw": t.bpw,
                "fisher_sum": _num(t.fisher_sum), "rms": _num(t.rms), "dkl": t.dkl,
                "continuous_bits": _num(t.continuous_bits), "forced": t.forced,
                "options": {k: [int(b), float(d)] for k, (b, d) in t.options.items()},
            } for t in self.tensors],
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Plan":
        if d.get("version") != PLAN_VERSION:
            raise QggufError(f"plan file version {d.get('version')!r} is not {PLAN_VERSION}; re-run the plan")
        tensors = [PlannedTensor(
            name=t["name"], shape=tuple(t["shape"]), type=t["type"], bytes=int(t["bytes"]), dkl=float(t["dkl"]),
            fisher_sum=_unnum(t["fisher_sum"]), rms=_unnum(t["rms"]), continuous_bits=_unnum(t["continuous_bits"]),
            options={k: (int(b), float(v)) for k, (b, v) in t["options"].items()}, forced=bool(t["forced"]))
            for t in d["tensors"]]
        return cls(tensors=tensors, budget=Budget(d["budget"]["kind"], float(d["budget"]["value"])),
                   layout=FileLayout(**d["layout"]), lam=float(d["lambda"]), capacity=int(d["capacity"]),
                   ties=[list(g) for g in d["ties"]])

    def write_json(self, out: Path) -> Path:
        with atomic_output(out) as tmp:
            tmp.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        return Path(out)

    @classmethod
    def read_json(cls, path: Path) -> "Plan":
        path = Path(path)
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise QggufError(f"{str(path)!r} is not a qgguf plan file ({e}); write one with the planner") from None

    def tensor_type_lines(self) -> list[str]:
        """`^name$=type` per tensor, for llama-quantize --tensor-type-file (regex search, first match wins)."""
        return [f"{_pattern_for(t.name)}={t.type}" for t in self.tensors]

    def write_tensor_type_file(self, out: Path) -> Path:
        """A file with which stock llama-quantize reproduces this plan:

            llama-quantize --tensor-type-file FILE [--imatrix IMATRIX] MODEL-F32.gguf OUT.gguf Q8_0

        Every planned tensor is named, so the base type only has to be a quantised one (it makes
        llama-quantize apply the overrides); tensors it never quantises are not planned.
        """
        from . import formats

        extended = sorted({t.type for t in self.tensors if not formats.get(t.type).stock})
        if extended:
            raise QggufError(f"the plan uses types stock llama-quantize does not have ({', '.join(extended)}); "
                             "plan with --palette stock to get a tensor type file")
        with atomic_output(out) as tmp:
            tmp.write_text("\n".join(self.tensor_type_lines()) + "\n")
        return Path(out)

    # ------------------------------------------------------------ report
    def summary(self) -> str:
        """Bits per tensor kind and per layer, the totals and the predicted KL, as plain-text tables."""
        def avg_bits(ts: list[PlannedTensor]) -> float:
            return 8.0 * sum(t.bytes for t in ts) / sum(t.n_weights for t in ts)

        def cont_bits(ts: list[PlannedTensor]) -> str:
            c = [(t.continuous_bits, t.n_weights) for t in ts if math.isfinite(t.continuous_bits)]
            return f"{sum(b * n for b, n in c) / sum(n for _, n in c):.2f}" if c else "-"

        kinds: dict[str, list[PlannedTensor]] = {}
        layers: dict[int, list[PlannedTensor]] = {}
        for t in self.tensors:
            kinds.setdefault(t.kind, []).append(t)
            if t.layer is not None:
                layers.setdefault(t.layer, []).append(t)
        lines = [f"{'tensor kind':<22} {'n':>4} {'bits':>6} {'contin.':>7} {'ΔKL':>10}  types"]
        for kind, ts in kinds.items():
            counts: dict[str, int] = {}
            for t in ts:
                counts[t.type] = counts.get(t.type, 0) + 1
            types = " ".join(f"{k}×{v}" if v > 1 else k for k, v in counts.items())
            lines.append(f"{kind:<22} {len(ts):>4} {avg_bits(ts):>6.2f} {cont_bits(ts):>7} "
                         f"{sum(t.dkl for t in ts):>10.4g}  {types}")
        if layers:
            lines += ["", f"{'layer':<22} {'n':>4} {'bits':>6} {'contin.':>7} {'ΔKL':>10}"]
            for layer in sorted(layers):
                ts = layers[layer]
                lines.append(f"{layer:<22} {len(ts):>4} {avg_bits(ts):>6.2f} {cont_bits(ts):>7} "
                             f"{sum(t.dkl for t in ts):>10.4g}")
        lines += ["",
                  f"budget            {self.budget}",
                  f"file size         {self.file_bytes:,} bytes ({self.file_bytes / 2**20:.2f} MiB)",
                  f"llama.cpp BPW     {self.bpw:.4f} (all tensors); planned weights {self.weights_bpw:.4f}",
                  f"predicted KL      {self.predicted_kl:.6g} nats/token",
                  f"lambda            {self.lam:.4g} ΔKL per byte"]
        return "\n".join(lines)

    def write_heatmap(self, out: Path) -> Path:
        """A PNG: bits per weight of each tensor kind (rows) in each layer (columns), types written in the cells."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        layered = [t for t in self.tensors if t.layer is not None]
        kinds = list(dict.fromkeys(t.kind for t in layered))
        n_layers = max((t.layer for t in layered), default=-1) + 1
        others = [t for t in self.tensors if t.layer is None]
        grid = np.full((len(kinds) + len(others), max(n_layers, 1)), np.nan)
        labels = np.full(grid.shape, "", dtype=object)
        for t in layered:
            r = kinds.index(t.kind)
            grid[r, t.layer], labels[r, t.layer] = t.bpw, t.type
        for k, t in enumerate(others):  # global tensors (token_embd, output) get a row each, in column 0
            grid[len(kinds) + k, 0], labels[len(kinds) + k, 0] = t.bpw, t.type
        rows = kinds + [t.kind for t in others]
        fig, ax = plt.subplots(figsize=(max(6.0, 0.45 * grid.shape[1] + 3), max(3.0, 0.4 * grid.shape[0] + 1.5)))
        im = ax.imshow(np.ma.masked_invalid(grid), aspect="auto", cmap="viridis")
        ax.set_yticks(range(len(rows)), rows)
        ax.set_xticks(range(grid.shape[1]))
        ax.set_xlabel("layer (global tensors in column 0)")
        ax.set_title(f"bits per weight — {self.file_bytes / 2**20:.1f} MiB, {self.bpw:.2f} BPW, "
                     f"predicted KL {self.predicted_kl:.3g}")
        if grid.size <= 600:
            bright = im.norm(np.nan_to_num(grid)) > 0.6  # dark text on the light end of the colour map
            for (r, c), lab in np.ndenumerate(labels):
                if lab:
                    ax.text(c, r, lab, ha="center", va="center", fontsize=6, color="k" if bright[r, c] else "w")
        fig.colorbar(im, ax=ax, label="bits per weight")
        fig.tight_layout()
        with atomic_output(out) as tmp:
            fig.savefig(tmp, format="png", dpi=110, metadata={"Software": None})
        plt.close(fig)
        return Path(out)


def _num(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def _unnum(x) -> float:
    return math.nan if x is None else float(x)


# ------------------------------------------------------------------------------------------------ plan()
def continuous_allocation(tensors: Sequence[TensorChoices], mean_bits: float) -> np.ndarray:
    """The paper's continuous widths: b_t = b̄ + log2 RMS_t + ½·log2 F̄_t − c, F̄_t = ΣF_t / n_t, with c
    chosen so the weight-count-weighted mean of b_t is b̄. NaN for tensors without RMS or Fisher (or zeros)."""
    n = np.array([t.n_weights for t in tensors], dtype=np.float64)
    rms = np.array([t.rms for t in tensors], dtype=np.float64)
    fsum = np.array([t.fisher_sum for t in tensors], dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        term = np.log2(rms) + 0.5 * np.log2(fsum / n)
    ok = np.isfinite(term)
    out = np.full(len(tensors), np.nan)
    if ok.any():
        out[ok] = mean_bits + term[ok] - np.sum(n[ok] * term[ok]) / np.sum(n[ok])
    return out


def type_bpw(name: str) -> float:
    from . import formats

    return formats.get(name).bpw


PALETTES = ("stock", "extended")


def palette_types(palette: str = "stock", *, min_type: str | None = None, max_type: str | None = None,
                  overrides: Sequence[Override] = ()) -> list[str]:
    """The types to measure: `stock` (types stock llama.cpp runs) or `extended` (every registered type),
    within --min-type/--max-type, plus every type an override names."""
    from . import formats

    if palette not in PALETTES:
        raise QggufError(f"unknown palette {palette!r}; choose one of: {', '.join(PALETTES)}")
    lo = type_bpw(min_type) if min_type else -math.inf
    hi = type_bpw(max_type) if max_type else math.inf
    types = [f.name for f in formats.all_formats() if (palette == "extended" or f.stock) and lo <= f.bpw <= hi]
    for o in overrides:
        if o.type not in types:
            types.append(o.type)
    return types


def plan(tensors: Sequence[TensorChoices], budget: Budget, layout: FileLayout = FileLayout(), *,
         overrides: Sequence[Override] = (), min_type: str | None = None, max_type: str | None = None,
         ties: Sequence[Sequence[str]] = ()) -> Plan:
    """Choose one type per tensor minimising Σ ΔKL under `budget`.

    overrides: llama-quantize --tensor-type semantics (first matching pattern fixes the type; it must be among
      the tensor's measured options). They win over min_type/max_type.
    min_type / max_type: only types with at least / at most that type's bits per weight.
    ties: groups of tensor names that must share one type (one decision; bytes and ΔKL summed).
    """
    if not tensors:
        raise QggufError("nothing to plan: no quantisable tensors were given")
    names = [t.name for t in tensors]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise QggufError(f"tensors named more than once: {', '.join(dup[:5])}")
    lo = type_bpw(min_type) if min_type else -math.inf
    hi = type_bpw(max_type) if max_type else math.inf
    if lo > hi:
        raise QggufError(f"--min-type {min_type} has more bits per weight than --max-type {max_type}; swap them")

    # allowed options and forced types per tensor
    used = [False] * len(overrides)
    allowed: list[dict[str, tuple[int, float]]] = []
    forced: list[str | None] = []
    for t in tensors:
        if not t.options:
            raise QggufError(f"{t.name}: no candidate types were measured for it; include types its rows "
                             f"({t.shape[-1]} long) can take")
        f = None
        for k, o in enumerate(overrides):
            if o.matches(t.name):
                used[k], f = True, o.type
                break
        if f is not None:
            if f not in t.options:
                raise QggufError(f"override {overrides[k].pattern}={f} matches {t.name}, but {f} was not measured "
                                 f"for it (its rows are {t.shape[-1]} long, or {f} is not in the palette); "
                                 "pick a type that fits or add it to the types measured")
            opts = {f: t.options[f]}
        else:
            opts = {k: v for k, v in t.options.items() if lo <= type_bpw(k) <= hi}
            if not opts:
                raise QggufError(f"{t.name}: none of its types {', '.join(t.options)} lies between "
                                 f"--min-type {min_type or '-'} and --max-type {max_type or '-'}; widen the range")
        allowed.append(opts)
        forced.append(f)
    unused = [o for o, u in zip(overrides, used) if not u]
    if unused:
        raise QggufError(f"override {unused[0].pattern}={unused[0].type} matches no tensor; tensor names look like "
                         f"{names[0]} (patterns are regular expressions searched in the name)")

    # decisions: tie groups, then every other tensor alone
    index = {n: i for i, n in enumerate(names)}
    groups: list[list[int]] = []
    in_group: set[int] = set()
    for g in ties:
        members = [index[n] for n in g if n in index]
        if len(members) < 2:
            continue
        if in_group & set(members):
            raise QggufError(f"tensor group {list(g)} overlaps another tied group; merge them")
        in_group |= set(members)
        groups.append(members)
    groups += [[i] for i in range(len(tensors)) if i not in in_group]
    groups.sort(key=lambda g: g[0])

    dec_types: list[list[str]] = []
    for g in groups:
        common = [k for k in allowed[g[0]] if all(k in allowed[i] for i in g[1:])]
        if not common:
            raise QggufError(f"tied tensors {', '.join(names[i] for i in g)} have no allowed type in common; "
                             "check the overrides and --min-type/--max-type for them")
        dec_types.append(common)

    planned_weights = sum(t.n_weights for t in tensors)
    capacity = budget.capacity(layout, planned_weights)
    costs, values = [], []
    for g, ts in zip(groups, dec_types):
        b = np.array([[tensors[i].options[k][0] for k in ts] for i in g], dtype=np.int64)
        costs.append(budget.cost(b, layout).sum(axis=0).astype(np.float64))
        values.append(np.array([[tensors[i].options[k][1] for k in ts] for i in g], dtype=np.float64).sum(axis=0))
    min_cost = sum(float(c.min()) for c in costs)
    max_cost = sum(float(c.max()) for c in costs)
    if min_cost > capacity:
        raise QggufError(
            f"{budget} cannot be met: the smallest achievable is {budget.describe(min_cost, layout, planned_weights)}"
            f" (every tensor in its smallest allowed type) and the largest "
            f"{budget.describe(max_cost, layout, planned_weights)}; raise the budget or allow smaller types")
    sol = solve_mckp(costs, values, capacity)

    chosen: dict[int, str] = {}
    for g, ts, j in zip(groups, dec_types, sol.choice):
        for i in g:
            chosen[i] = ts[int(j)]
    planned = [PlannedTensor(name=t.name, shape=tuple(int(s) for s in t.shape), type=chosen[i],
                             bytes=int(t.options[chosen[i]][0]), dkl=float(t.options[chosen[i]][1]),
                             fisher_sum=float(t.fisher_sum), rms=float(t.rms), continuous_bits=math.nan,
                             options={k: (int(b), float(v)) for k, (b, v) in t.options.items()},
                             forced=forced[i] is not None)
               for i, t in enumerate(tensors)]
    result = Plan(tensors=planned, budget=budget, layout=layout, lam=sol.lam, capacity=capacity,
                  ties=[[names[i] for i in g] for g in groups if len(g) > 1])
    for p, b in zip(planned, continuous_allocation(tensors, result.weights_bpw)):
        p.continuous_bits = float(b)
    return result
