"""The plan: one GGUF type per tensor, minimising the predicted KL divergence under a size budget.

Input: for every planned tensor its candidate types, each with exact bytes and predicted ΔKL (from measure).
`plan()` applies the rules (overrides, --min-type/--max-type, ties), turns the budget into a capacity and
hands the choices to the solver; the result is a `Plan`, which export reads (`Plan.types`) and
qgguf.plan.outputs writes (JSON, tensor-type file, summary, heat map). Also the paper's continuous bit
allocation, reported beside the chosen types."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np

from qgguf.errors import QggufError
from qgguf.plan.budget import Budget, FileLayout, padded
from qgguf.plan.rules import Override, type_bpw
from qgguf.plan.solver import solve_mckp

PLAN_VERSION = 1


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
    rounding: Mapping[str, str] = field(default_factory=dict)  # type → "plain" | "feedback" (absent: plain)
    experts: Mapping | None = None  # stacked experts: {"count", "tokens" per expert, "prior" experts}

    @property
    def n_weights(self) -> int:
        return int(np.prod(self.shape))


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
    rounding: str = "plain"  # how export chooses the integers: "plain" or "feedback" (formats/feedback.py)
    experts: dict | None = None  # stacked experts (TensorChoices.experts)

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
    budget: Budget | None  # the whole-file budget; None when only split budgets were given (see placement)
    layout: FileLayout
    lam: float
    capacity: int
    ties: list[list[str]] = field(default_factory=list)
    placement: object | None = None  # split budgets: qgguf.plan.placement.Placement

    # ------------------------------------------------------------ totals
    @property
    def types(self) -> dict[str, str]:
        """Tensor name → type name: what export writes."""
        return {t.name: t.type for t in self.tensors}

    @property
    def roundings(self) -> dict[str, str]:
        """Tensor name → "plain" or "feedback": the rounding export must use (the one measured for the type)."""
        return {t.name: t.rounding for t in self.tensors}

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

    @property
    def budget_text(self) -> str:
        """The budgets as the user gave them: the whole file's, the two devices', or both."""
        parts = [str(self.budget)] if self.budget is not None else []
        if self.placement is not None:
            parts.append(f"--budget-gpu {self.placement.budget_gpu:,} --budget-cpu {self.placement.budget_cpu:,} bytes")
        return "; ".join(parts)

    # ------------------------------------------------------------ files
    def to_dict(self) -> dict:
        return {
            "version": PLAN_VERSION,
            "budget": {"kind": self.budget.kind, "value": self.budget.value} if self.budget is not None else None,
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
                "continuous_bits": _num(t.continuous_bits), "forced": t.forced, "rounding": t.rounding,
                "share": self.shares(t),
                "options": {k: [int(b), float(d)] for k, (b, d) in t.options.items()},
                **({"experts": t.experts} if t.experts is not None else {}),
                **({"device": self.placement.device[t.name]} if self.placement is not None else {}),
            } for t in self.tensors],
            **({"placement": self.placement.to_dict()} if self.placement is not None else {}),
        }

    def shares(self, t: PlannedTensor) -> dict[str, float]:
        """The tensor's share of the planned bytes and of the predicted KL."""
        kl = self.predicted_kl
        return {"bytes": t.bytes / self.planned_bytes, "dkl": t.dkl / kl if kl > 0 else 0.0}

    @classmethod
    def from_dict(cls, d: dict) -> "Plan":
        if d.get("version") != PLAN_VERSION:
            raise QggufError(f"plan file version {d.get('version')!r} is not {PLAN_VERSION}; re-run the plan")
        tensors = [PlannedTensor(
            name=t["name"], shape=tuple(t["shape"]), type=t["type"], bytes=int(t["bytes"]), dkl=float(t["dkl"]),
            fisher_sum=_unnum(t["fisher_sum"]), rms=_unnum(t["rms"]), continuous_bits=_unnum(t["continuous_bits"]),
            options={k: (int(b), float(v)) for k, (b, v) in t["options"].items()}, forced=bool(t["forced"]),
            rounding=str(t.get("rounding", "plain")), experts=t.get("experts"))
            for t in d["tensors"]]
        placement = None
        if "placement" in d:
            from qgguf.plan.placement import Placement

            pl = d["placement"]
            placement = Placement(device=dict(pl["device"]), budget_gpu=int(pl["budget"]["GPU"]),
                                  budget_cpu=int(pl["budget"]["CPU"]), bytes=dict(pl["bytes"]),
                                  args=list(pl["llama_args"]))
        budget = Budget(d["budget"]["kind"], float(d["budget"]["value"])) if d["budget"] is not None else None
        return cls(tensors=tensors, budget=budget,
                   layout=FileLayout(**d["layout"]), lam=float(d["lambda"]), capacity=int(d["capacity"]),
                   ties=[list(g) for g in d["ties"]], placement=placement)


def _num(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def _unnum(x) -> float:
    return math.nan if x is None else float(x)


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
                             forced=forced[i] is not None, rounding=t.rounding.get(chosen[i], "plain"),
                             experts=dict(t.experts) if t.experts is not None else None)
               for i, t in enumerate(tensors)]
    result = Plan(tensors=planned, budget=budget, layout=layout, lam=sol.lam, capacity=capacity,
                  ties=[[names[i] for i in g] for g in groups if len(g) > 1])
    for p, b in zip(planned, continuous_allocation(tensors, result.weights_bpw)):
        p.continuous_bits = float(b)
    return result
