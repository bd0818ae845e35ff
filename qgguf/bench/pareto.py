"""Rate–distortion curves of a bench: the Pareto front, bpw at equal KLD, the saving per preset, the gap of a
plan to the Gaussian distortion–rate bound, the plot.

A qgguf curve is the set of (bpw, mean KLD) points of one palette. Between measured points, log KLD is taken as
linear in bpw (distortion falls about exponentially with rate: D ∝ 2^(−2R) for a Gaussian source), so the
interpolation is exact for that law and never leaves the measured range: a preset whose KLD lies outside the
curve gets no saving rather than an extrapolated one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence


def pareto_front(points: Iterable[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points not beaten by a point with fewer (or equal) bits: bpw ascending, KLD strictly descending."""
    front: list[tuple[float, float]] = []
    for b, k in sorted((float(b), float(k)) for b, k in points if k > 0 and math.isfinite(k) and math.isfinite(b)):
        if front and b == front[-1][0]:
            continue  # the same bpw twice: the first (lower KLD, as sorted) wins
        if not front or k < front[-1][1]:
            front.append((b, k))
    return front


def bpw_at_kld(front: Sequence[tuple[float, float]], kld: float) -> float | None:
    """The bpw at which the front reaches `kld` (log-linear between points); None outside its range."""
    if not front or not kld > 0:
        return None
    if len(front) == 1:
        return front[0][0] if kld == front[0][1] else None
    lk = math.log(kld)
    for (b1, k1), (b2, k2) in zip(front, front[1:]):
        l1, l2 = math.log(k1), math.log(k2)
        if l2 <= lk <= l1:
            return b1 + (l1 - lk) * (b2 - b1) / (l1 - l2)
    return None


def kld_at_bpw(front: Sequence[tuple[float, float]], bpw: float) -> float | None:
    """The front's KLD at `bpw` (log-linear between points); None outside its range."""
    for (b1, k1), (b2, k2) in zip(front, front[1:]):
        if b1 <= bpw <= b2:
            t = (bpw - b1) / (b2 - b1)
            return math.exp(math.log(k1) + t * (math.log(k2) - math.log(k1)))
    if len(front) == 1 and bpw == front[0][0]:
        return front[0][1]
    return None


@dataclass
class Saving:
    """Bits a qgguf curve saves against one preset at the preset's own mean KLD."""

    preset: str
    curve: str
    preset_bpw: float
    preset_kld: float
    curve_bpw: float | None  # the curve's bpw at preset_kld (None: outside the measured range)
    reason: str = ""

    @property
    def saving_bpw(self) -> float | None:
        return None if self.curve_bpw is None else self.preset_bpw - self.curve_bpw

    @property
    def saving_pct(self) -> float | None:
        s = self.saving_bpw
        return None if s is None else 100.0 * s / self.preset_bpw

    def to_dict(self) -> dict:
        return {"preset": self.preset, "curve": self.curve, "preset_bpw": self.preset_bpw,
                "preset_kld": self.preset_kld, "curve_bpw": self.curve_bpw, "saving_bpw": self.saving_bpw,
                "saving_pct": self.saving_pct, "reason": self.reason}


def savings(presets: Iterable[tuple[str, float, float]], curve_name: str,
            curve: Iterable[tuple[float, float]]) -> list[Saving]:
    """For each (preset, bpw, KLD): the bpw the curve needs for the same KLD, and the difference."""
    front = pareto_front(curve)
    out = []
    for name, b, k in presets:
        at = bpw_at_kld(front, k)
        reason = ""
        if at is None:
            if not front:
                reason = "no measured points on the curve"
            else:
                lo, hi = front[-1][1], front[0][1]
                reason = (f"KLD {k:.4g} is outside the curve's range [{lo:.4g}, {hi:.4g}]; "
                          "add --targets that reach it")
        out.append(Saving(name, curve_name, b, k, at, reason))
    return out


# ------------------------------------------------------------------------------------------------ rate gap
def rate_gap(plan: dict) -> dict:
    """Mean gap to the Gaussian distortion–rate bound: Σ n_t·(bpw_t − max(0, ½·log2(σ_t²/MSE_t))) / Σ n_t.

    Needs each tensor's measured MSE ("mse") and variance ("variance"; the RMS² stands in when only "rms" is
    there, which equals the variance for zero-mean weights). A plan that gives the chosen type's predicted ΔKL
    ("dkl") and the tensor's ΣF ("fisher_sum") instead gives the Fisher-weighted MSE, 2·ΔKL/ΣF: the error the
    plan optimises, below the plain MSE where the encoder spends its accuracy on the important weights.
    Tensors without either are left out and counted.
    """
    num = den = 0.0
    used = missing = 0
    variance_from, mse_from = set(), set()
    for t in plan.get("tensors", []):
        n = float(math.prod(t.get("shape") or [0]))
        mse, mse_src = t.get("mse"), "mse"
        if mse is None and t.get("dkl") is not None and t.get("fisher_sum"):
            mse, mse_src = 2.0 * float(t["dkl"]) / float(t["fisher_sum"]), "2·ΔKL/ΣF"
        var = t.get("variance")
        if var is None and t.get("rms") is not None:
            var, src = float(t["rms"]) ** 2, "rms²"
        else:
            src = "variance"
        bpw = t.get("bpw")
        if bpw is None and t.get("bytes") is not None and n:
            bpw = 8.0 * float(t["bytes"]) / n
        if not n or mse is None or var is None or bpw is None or not (mse > 0 and var > 0):
            missing += 1
            continue
        bound = max(0.0, 0.5 * math.log2(float(var) / float(mse)))
        num += n * (float(bpw) - bound)
        den += n
        used += 1
        variance_from.add(src)
        mse_from.add(mse_src)
    if not used:
        tensors = plan.get("tensors", [])
        lacking = [k for k in ("mse", "variance") if not any(t.get(k) is not None for t in tensors)]
        if "variance" in lacking and any(t.get("rms") is not None for t in tensors):
            lacking.remove("variance")
        return {"mean_gap_bits": None, "tensors": 0, "missing": missing,
                "reason": "the plan JSON has no per-tensor " + " or ".join(f"'{k}'" for k in lacking or ["bpw"])}
    return {"mean_gap_bits": num / den, "tensors": used, "missing": missing,
            "variance_from": "+".join(sorted(variance_from)), "mse_from": "+".join(sorted(mse_from))}


# ------------------------------------------------------------------------------------------------ the plot
@dataclass
class Series:
    """One set of points on the plot: a preset family (markers, labelled) or a qgguf curve (a line)."""

    name: str
    points: list[tuple[float, float, float]]  # bpw, mean KLD, its ±
    labels: list[str] | None = None  # one per point, written beside it (presets)
    line: bool = False
    colour: str | None = None
    marker: str = "o"


_CURVE_COLOURS = ["#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"]


def plot_pareto(series: Sequence[Series], out: Path, title: str, subtitle: str = "") -> Path:
    """Mean KLD (log) against bpw: preset markers with their names, qgguf curves as lines. PNG at `out`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from qgguf.files import atomic_output

    fig, ax = plt.subplots(figsize=(9, 6), dpi=120)
    n_curve = 0
    for s in series:
        pts = sorted(s.points) if s.line else list(s.points)
        if not pts:
            continue
        xs, ys, es = zip(*pts)
        if s.line:
            colour = s.colour or _CURVE_COLOURS[n_curve % len(_CURVE_COLOURS)]
            n_curve += 1
            ax.errorbar(xs, ys, yerr=es, color=colour, marker=s.marker, markersize=4, linestyle="-",
                        linewidth=1.6, capsize=2, label=s.name, zorder=3)
        else:
            colour = s.colour or "#1f4e79"
            ax.errorbar(xs, ys, yerr=es, color=colour, marker=s.marker, markersize=8, linestyle="none",
                        markerfacecolor="none", markeredgewidth=1.6, capsize=2, label=s.name, zorder=2)
            for x, y, lab in zip(xs, ys, s.labels or []):
                ax.annotate(lab, (x, y), textcoords="offset points", xytext=(7, 5), fontsize=8, color=colour)
    ax.margins(x=0.08)
    ax.set_yscale("log")
    ax.set_xlabel("bits per weight (llama.cpp: all tensor bits / all tensor elements)")
    ax.set_ylabel("mean KL divergence to F32 (nats per token)")
    ax.set_title(title + (f"\n{subtitle}" if subtitle else ""), fontsize=10)
    ax.grid(True, which="major", alpha=0.35)
    ax.grid(True, which="minor", alpha=0.12)
    ax.legend(fontsize=9)
    fig.tight_layout()
    with atomic_output(Path(out)) as tmp:
        fig.savefig(tmp, format="png", metadata={"Software": None})  # no version stamp: same inputs, same bytes
    plt.close(fig)
    return Path(out)
