"""Split budgets: a type and a device (GPU or CPU) for every tensor, under a VRAM and a RAM budget.

llama.cpp decides where each tensor lives when it loads a model: the token embedding always stays on the CPU (its
input layer); `-ngl N` puts the output head and the last N−1 layers on the GPU; `-ot REGEX=CPU`
(`--override-tensor`) keeps the tensors whose names the regex finds (std::regex_search, first override wins) on
the CPU; `--n-cpu-moe N` is `-ot` for the expert tensors of the first N layers. A budget counts the data bytes of
the tensors placed on a device (ggml_nbytes, what the model buffers hold; the KV cache and compute buffers come
on top).

Placement order. Units of tensors go to the GPU in a fixed order and the GPU holds a prefix of it: for a MoE
model first everything but the expert tensors (attention, shared experts, routers, norms, output: read for every
token), then the expert tensors layer by layer from the last (read sparsely: the natural CPU residents, and the
CPU keeps the first layers' experts, which is `--n-cpu-moe`); for a dense model the output head, then whole
layers from the last (which is `-ngl`). For each prefix that can fit, both devices' types are planned (the
multiple-choice knapsack of each device under its budget) and the prefix with the least predicted KL wins, the
longer prefix on a tie (the GPU is the faster memory). With a whole-file budget as well, the GPU is planned
first under min(GPU budget, file budget − the CPU's smallest), the CPU under what is left.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Sequence

from qgguf.errors import QggufError
from qgguf.plan.budget import Budget, FileLayout
from qgguf.plan.planner import Plan, TensorChoices, plan
from qgguf.plan.rules import exact_pattern

GPU, CPU = "GPU", "CPU"
ALWAYS_CPU = ("token_embd.weight",)  # llama.cpp's input layer lives on the CPU whatever -ngl says


@dataclass
class Placement:
    """Where every tensor of the file lives, the two budgets, the bytes per device and the llama.cpp options."""

    device: dict[str, str]
    budget_gpu: int
    budget_cpu: int
    bytes: dict[str, int]
    args: list[str]

    def to_dict(self) -> dict:
        return {"budget": {GPU: self.budget_gpu, CPU: self.budget_cpu}, "bytes": dict(self.bytes),
                "llama_args": list(self.args), "device": dict(self.device)}


def _layer(name: str) -> int | None:
    m = re.match(r"blk\.(\d+)\.", name)
    return int(m.group(1)) if m else None


def is_expert(name: str) -> bool:
    """A stacked expert tensor (llama.cpp's LLM_FFN_EXPS_REGEX: ffn_{up,down,gate,gate_up}_{,ch}exps)."""
    return re.search(r"\.ffn_(up|down|gate|gate_up)_(ch|)exps", name) is not None


def gpu_units(names: Sequence[str], n_layer: int) -> list[list[str]]:
    """The tensors in the order they go to the GPU, as units (see the module docstring); the token embedding in
    none (it is always on the CPU)."""
    names = [n for n in names if n not in ALWAYS_CPU]
    if any(is_expert(n) for n in names):
        units = [[n for n in names if not is_expert(n)]]
        units += [[n for n in names if is_expert(n) and _layer(n) == il] for il in range(n_layer - 1, -1, -1)]
    else:
        units = [[n for n in names if _layer(n) is None]]
        units += [[n for n in names if _layer(n) == il] for il in range(n_layer - 1, -1, -1)]
    return [u for u in units if u]


def llama_args(device: dict[str, str], names: Sequence[str], n_layer: int) -> list[str]:
    """llama.cpp options that put each tensor on its device: `-ngl`, then `--n-cpu-moe N` or `-ot REGEX=CPU`."""
    cpu = {n for n in names if device[n] == CPU and n not in ALWAYS_CPU}
    if not cpu:
        return ["-ngl", str(n_layer + 1)]
    for ngl in range(n_layer + 1):  # dense: the last ngl−1 layers and the output on the GPU, the rest on the CPU
        gpu_layers = set(range(n_layer - ngl + 1, n_layer)) if ngl > 0 else set()
        want = {n for n in names if n not in ALWAYS_CPU
                and ((_layer(n) is None and ngl == 0) or (_layer(n) is not None and _layer(n) not in gpu_layers))}
        if want == cpu:
            return ["-ngl", str(ngl)]
    for k in range(1, n_layer + 1):
        if cpu == {n for n in names if is_expert(n) and _layer(n) is not None and _layer(n) < k}:
            return ["-ngl", str(n_layer + 1), "--n-cpu-moe", str(k)]
    pattern = "^(" + "|".join(exact_pattern(n)[1:-1] for n in sorted(cpu)) + ")$"
    return ["-ngl", str(n_layer + 1), "-ot", f"{pattern}=CPU"]


def apply_overrides(args: Sequence[str], names: Sequence[str], n_layer: int) -> dict[str, str]:
    """The device llama.cpp gives each tensor under these options (llama-model.cpp and common/arg.cpp of the
    pinned tree, regex_search semantics): for checking a written command line against the plan."""
    ngl, patterns = 0, []
    for opt, val in zip(args[::2], args[1::2]):
        if opt == "-ngl":
            ngl = int(val)
        elif opt == "--n-cpu-moe":
            patterns += [(rf"blk\.{i}\.ffn_(up|down|gate|gate_up)_(ch|)exps", CPU) for i in range(int(val))]
        elif opt == "-ot":
            for part in val.split(","):
                pat, _, buft = part.rpartition("=")
                patterns.append((pat, buft))
    start = max(n_layer + 1 - ngl, 0)  # i_gpu_start: layers il >= start on the GPU, the output is il = n_layer
    out = {}
    for n in names:
        il = _layer(n)
        dev = CPU if n in ALWAYS_CPU else (GPU if (n_layer if il is None else il) >= start else CPU)
        for pat, buft in patterns:
            if re.search(pat, n):
                dev = CPU if buft == CPU else GPU
                break
        out[n] = dev
    return out


def plan_split(tensors: Sequence[TensorChoices], fixed: dict[str, int], budget_gpu: int, budget_cpu: int,
               n_layer: int, total: Budget | None = None, layout: FileLayout = FileLayout(), **rules) -> tuple[Plan, Placement]:
    """Types and devices for every tensor under both budgets (bytes of tensor data per device).

    tensors: the planned tensors' choices; fixed: nbytes of every tensor that is not planned (norms, routers);
    total: an optional whole-file budget (--target-size / --target-bpw) on top; rules: plan()'s overrides,
    min_type, max_type."""
    by_name = {t.name: t for t in tensors}
    names = [t.name for t in tensors] + [n for n in fixed if n not in by_name]
    units = gpu_units(names, n_layer)
    lo = {t.name: min(b for b, _ in _allowed(t, rules).values()) for t in tensors}
    hi = {t.name: max(b for b, _ in _allowed(t, rules).values()) for t in tensors}
    size_lo = {n: lo.get(n, fixed.get(n, 0)) for n in names}
    size_hi = {n: hi.get(n, fixed.get(n, 0)) for n in names}

    def split(k: int) -> tuple[set[str], set[str]]:
        gpu = {n for u in units[:k] for n in u}
        return gpu, set(names) - gpu

    mins = []
    for k in range(len(units) + 1):
        g, c = split(k)
        mins.append((sum(size_lo[n] for n in g), sum(size_lo[n] for n in c)))
    feasible = [k for k, (g, c) in enumerate(mins) if g <= budget_gpu and c <= budget_cpu]
    if total is not None and total.kind == "size":
        fixed_pad = layout.header_bytes
        feasible = [k for k in feasible if sum(mins[k]) + fixed_pad <= total.value]
    if not feasible:
        raise QggufError(_infeasible(mins, budget_gpu, budget_cpu, size_lo, size_hi))

    best = None
    for k in sorted(feasible, reverse=True):
        gpu, cpu = split(k)
        try:
            parts = _plan_devices(tensors, fixed, gpu, cpu, budget_gpu, budget_cpu, total, layout, mins[k], rules)
        except QggufError:
            continue
        kl = sum(p.predicted_kl for p in parts if p is not None)
        if best is None or kl < best[0] * (1 - 1e-12):
            best = (kl, k, parts)
    if best is None:
        raise QggufError(_infeasible(mins, budget_gpu, budget_cpu, size_lo, size_hi))
    _, k, parts = best
    gpu, cpu = split(k)
    chosen = {t.name: t for p in parts if p is not None for t in p.tensors}
    order = [chosen[t.name] for t in tensors]
    device = {n: (GPU if n in gpu else CPU) for n in names}
    nbytes = {n: (chosen[n].bytes if n in chosen else fixed[n]) for n in names}
    used = {GPU: sum(nbytes[n] for n in gpu), CPU: sum(nbytes[n] for n in cpu)}
    placement = Placement(device, int(budget_gpu), int(budget_cpu), used, llama_args(device, names, n_layer))
    lam = max((p.lam for p in parts if p is not None), default=0.0)
    capacity = sum(p.capacity for p in parts if p is not None)
    combined = Plan(tensors=order, budget=total or Budget.target_size(budget_gpu + budget_cpu), layout=layout,
                    lam=lam, capacity=capacity, placement=placement)
    return combined, placement


def _allowed(t: TensorChoices, rules: dict) -> dict:
    from qgguf.plan.rules import type_bpw

    lo = type_bpw(rules["min_type"]) if rules.get("min_type") else -math.inf
    hi = type_bpw(rules["max_type"]) if rules.get("max_type") else math.inf
    for o in rules.get("overrides", ()):
        if o.matches(t.name) and o.type in t.options:
            return {o.type: t.options[o.type]}
    return {k: v for k, v in t.options.items() if lo <= type_bpw(k) <= hi} or dict(t.options)


def _plan_devices(tensors, fixed, gpu, cpu, budget_gpu, budget_cpu, total, layout, mins, rules):
    """Plan each device's tensors under its budget (GPU first when a whole-file budget also binds)."""
    cap = {GPU: budget_gpu, CPU: budget_cpu}
    if total is not None:
        room = _total_room(total, layout, tensors, fixed)
        cap[GPU] = min(cap[GPU], room - mins[1])
    parts = []
    used_gpu = None
    for dev, members in ((GPU, gpu), (CPU, cpu)):
        ts = [t for t in tensors if t.name in members]
        fixed_bytes = sum(b for n, b in fixed.items() if n in members)
        c = cap[dev] if dev == GPU or total is None else min(cap[dev], _total_room(total, layout, tensors, fixed)
                                                             - used_gpu)
        if not ts:
            if fixed_bytes > c:
                raise QggufError("does not fit")
            parts.append(None)
            used_gpu = fixed_bytes if dev == GPU else used_gpu
            continue
        dev_layout = FileLayout.from_tensors(0, [(b, 0) for n, b in fixed.items() if n in members], alignment=1)
        sub_rules = {k: v for k, v in rules.items() if k != "overrides"}
        ov = [o for o in rules.get("overrides", ()) if any(o.matches(t.name) for t in ts)]
        p = plan(ts, Budget.target_size(c), dev_layout, overrides=ov, **sub_rules)
        parts.append(p)
        if dev == GPU:
            used_gpu = p.planned_bytes + fixed_bytes
    return parts


def _total_room(total: Budget, layout: FileLayout, tensors, fixed) -> int:
    """Tensor data bytes a whole-file budget leaves (padding of each tensor counted at its worst)."""
    n = len(tensors) + len(fixed)
    if total.kind == "size":
        return int(total.value) - layout.header_bytes - n * (layout.alignment - 1)
    weights = sum(t.n_weights for t in tensors) + layout.fixed_weights
    return int(total.value * weights / 8)


def _infeasible(mins, budget_gpu, budget_cpu, size_lo, size_hi) -> str:
    need_gpu = min((g for g, c in mins if c <= budget_cpu), default=None)
    need_cpu = min((c for g, c in mins if g <= budget_gpu), default=None)
    least = sum(size_lo.values())
    cpu_floor = min(c for _, c in mins)
    most = sum(size_hi.values())
    parts = [f"--budget-gpu {budget_gpu:,} --budget-cpu {budget_cpu:,} bytes cannot be met: the tensors need at least "
             f"{least:,} bytes on the two together (every tensor in its smallest allowed type), at least "
             f"{cpu_floor:,} of them on the CPU (llama.cpp keeps the token embedding there)"]
    parts.append(f"with --budget-cpu {budget_cpu:,} the GPU needs at least {need_gpu:,}" if need_gpu is not None
                 else f"--budget-cpu {budget_cpu:,} is below that")
    parts.append(f"with --budget-gpu {budget_gpu:,} the CPU needs at least {need_cpu:,}" if need_cpu is not None
                 else f"--budget-gpu {budget_gpu:,} cannot hold the tensors that must come first")
    parts.append(f"more than {most:,} in all buys nothing (every tensor in its largest type)")
    return "; ".join(parts) + "; raise a budget or allow smaller types"
