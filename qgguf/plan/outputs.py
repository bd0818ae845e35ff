"""What a plan leaves beside the GGUF: the plan JSON, the tensor-type file for stock llama-quantize, a text
summary and a heat map of bits per tensor."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from qgguf.errors import QggufError
from qgguf.files import atomic_output
from qgguf.plan.planner import Plan, PlannedTensor
from qgguf.plan.rules import exact_pattern


def write_plan_json(plan: Plan, out: Path) -> Path:
    with atomic_output(out) as tmp:
        tmp.write_text(json.dumps(plan.to_dict(), indent=1) + "\n")
    return Path(out)


def read_plan_json(path: Path) -> Plan:
    path = Path(path)
    try:
        return Plan.from_dict(json.loads(path.read_text()))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise QggufError(f"{str(path)!r} is not a qgguf plan file ({e}); write one with the planner") from None


def tensor_type_lines(plan: Plan) -> list[str]:
    """`^name$=type` per tensor, for llama-quantize --tensor-type-file (regex search, first match wins)."""
    return [f"{exact_pattern(t.name)}={t.type}" for t in plan.tensors]


def write_tensor_type_file(plan: Plan, out: Path) -> Path:
    """A file with which stock llama-quantize reproduces this plan:

        llama-quantize --tensor-type-file FILE [--imatrix IMATRIX] MODEL-F32.gguf OUT.gguf Q8_0

    Every planned tensor is named, so the base type only has to be a quantised one (it makes
    llama-quantize apply the overrides); tensors it never quantises are not planned.
    """
    from qgguf import formats

    extended = sorted({t.type for t in plan.tensors if not formats.get(t.type).stock})
    if extended:
        raise QggufError(f"the plan uses types stock llama-quantize does not have ({', '.join(extended)}); "
                         "plan with --palette stock to get a tensor type file")
    with atomic_output(out) as tmp:
        tmp.write_text("\n".join(tensor_type_lines(plan)) + "\n")
    return Path(out)


def summary(plan: Plan) -> str:
    """Bits per tensor kind and per layer, the totals and the predicted KL, as plain-text tables."""
    def avg_bits(ts: list[PlannedTensor]) -> float:
        return 8.0 * sum(t.bytes for t in ts) / sum(t.n_weights for t in ts)

    def cont_bits(ts: list[PlannedTensor]) -> str:
        c = [(t.continuous_bits, t.n_weights) for t in ts if math.isfinite(t.continuous_bits)]
        return f"{sum(b * n for b, n in c) / sum(n for _, n in c):.2f}" if c else "-"

    kinds: dict[str, list[PlannedTensor]] = {}
    layers: dict[int, list[PlannedTensor]] = {}
    for t in plan.tensors:
        kinds.setdefault(t.kind, []).append(t)
        if t.layer is not None:
            layers.setdefault(t.layer, []).append(t)
    kl = plan.predicted_kl
    lines = [f"{'tensor kind':<22} {'n':>4} {'bits':>6} {'contin.':>7} {'ΔKL':>10} {'bytes%':>6} {'ΔKL%':>6}  types"]
    for kind, ts in kinds.items():
        counts: dict[str, int] = {}
        for t in ts:
            counts[t.type] = counts.get(t.type, 0) + 1
        types = " ".join(f"{k}×{v}" if v > 1 else k for k, v in counts.items())
        dkl = sum(t.dkl for t in ts)
        lines.append(f"{kind:<22} {len(ts):>4} {avg_bits(ts):>6.2f} {cont_bits(ts):>7} {dkl:>10.4g} "
                     f"{100 * sum(t.bytes for t in ts) / plan.planned_bytes:>6.1f} "
                     f"{100 * dkl / kl if kl > 0 else 0.0:>6.1f}  {types}")
    if layers:
        lines += ["", f"{'layer':<22} {'n':>4} {'bits':>6} {'contin.':>7} {'ΔKL':>10}"]
        for layer in sorted(layers):
            ts = layers[layer]
            lines.append(f"{layer:<22} {len(ts):>4} {avg_bits(ts):>6.2f} {cont_bits(ts):>7} "
                         f"{sum(t.dkl for t in ts):>10.4g}")
    prior = [f"{t.name} {t.experts['prior']}" for t in plan.tensors if t.experts and t.experts.get("prior")]
    if prior:
        lines += ["", "experts routed too few calibration tokens (their statistics are a prior): " + "; ".join(prior)]
    lines += ["",
              f"budget            {plan.budget}",
              f"file size         {plan.file_bytes:,} bytes ({plan.file_bytes / 2**20:.2f} MiB)",
              f"llama.cpp BPW     {plan.bpw:.4f} (all tensors); planned weights {plan.weights_bpw:.4f}",
              f"predicted KL      {plan.predicted_kl:.6g} nats/token",
              f"lambda            {plan.lam:.4g} ΔKL per byte"]
    if plan.placement is not None:
        pl = plan.placement
        for dev, cap in (("GPU", pl.budget_gpu), ("CPU", pl.budget_cpu)):
            n = sum(1 for d in pl.device.values() if d == dev)
            lines.append(f"{dev} tensors       {pl.bytes[dev]:,} bytes ({pl.bytes[dev] / 2**20:.2f} MiB) of "
                         f"{cap:,} budgeted, {n} tensors")
        lines.append(f"llama.cpp options {' '.join(_quote(a) for a in pl.args)}")
    return "\n".join(lines)


def _quote(a: str) -> str:
    import shlex

    return shlex.quote(a)


def write_heatmap(plan: Plan, out: Path) -> Path:
    """A PNG: bits per weight of each tensor kind (rows) in each layer (columns), types written in the cells."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layered = [t for t in plan.tensors if t.layer is not None]
    kinds = list(dict.fromkeys(t.kind for t in layered))
    n_layers = max((t.layer for t in layered), default=-1) + 1
    others = [t for t in plan.tensors if t.layer is None]
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
    ax.set_title(f"bits per weight — {plan.file_bytes / 2**20:.1f} MiB, {plan.bpw:.2f} BPW, "
                 f"predicted KL {plan.predicted_kl:.3g}")
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
