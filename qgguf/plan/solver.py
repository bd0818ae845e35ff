"""The multiple-choice knapsack solver behind the plan (numpy only; knows nothing of models).

Choose one option per decision (a tensor, or a group of tied tensors) so that Σ cost ≤ capacity and Σ value
(predicted ΔKL) is least:

1. Lagrangian relaxation: the lower convex hull of each tensor's (bytes, ΔKL) points; the hull segments of all
   tensors, sorted by ΔKL saved per byte, are taken in that order from every tensor's cheapest option while they
   fit. The efficiency of the first segment that does not fit is the Lagrange multiplier λ (ΔKL per byte).
2. Greedy fill: the bytes left are spent on the single changes (any option, on the hull or not) with the best
   ΔKL saved per byte, until none fits.
3. Exchange pass: a downgrade of one tensor paired with an upgrade of another, when the pair fits and lowers
   Σ ΔKL; then fill again. Repeated until nothing improves.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

_TOL = 1e-12  # a change must lower Σ ΔKL by more than this fraction of it to count (rounding noise)


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
