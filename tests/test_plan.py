"""The planner: the knapsack solver against an exact dynamic programme, budgets, options, outputs, and a
--tensor-type-file that stock llama-quantize turns into exactly the planned file."""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import numpy as np
import pytest

from qgguf import formats
from qgguf.errors import QggufError
from qgguf.plan.budget import Budget, FileLayout
from qgguf.plan.outputs import (
    read_plan_json,
    summary,
    tensor_type_lines,
    write_heatmap,
    write_plan_json,
    write_tensor_type_file,
)
from qgguf.plan.planner import Plan, TensorChoices, continuous_allocation, plan
from qgguf.plan.rules import llama_quantizes, palette_types, parse_overrides, read_tensor_type_file
from qgguf.plan.solver import solve_mckp

BPW = np.array([2.625, 3.4375, 4.5, 5.5, 6.5625, 8.5, 16.0, 32.0])


def exact(costs: list[np.ndarray], values: list[np.ndarray], capacity: int) -> float:
    """Least Σ value with Σ cost ≤ capacity: dynamic programme over integer costs."""
    best = np.zeros(capacity + 1)
    for c, v in zip(costs, values):
        nxt = np.full(capacity + 1, np.inf)
        for cc, vv in zip(c.astype(int), v):
            if cc <= capacity:
                nxt[cc:] = np.minimum(nxt[cc:], best[:capacity + 1 - cc] + vv)
        best = nxt
    return float(best[capacity])


def quant_like(rng, n: int, m: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Instances shaped like real ones: bytes ∝ bits per weight, ΔKL ∝ ΣF·RMS²·2^(−2b) with noise."""
    costs, values = [], []
    for _ in range(n):
        b = np.sort(rng.choice(BPW, m, replace=False))
        nw = int(rng.integers(2, 20)) * 16
        costs.append(np.ceil(nw * b / 8))
        v = math.exp(rng.normal(0, 1.5)) * nw * math.exp(rng.normal(0, 0.5)) ** 2 * 2.0 ** (-2 * b)
        values.append(np.where(b >= 32, 0.0, v * np.exp(rng.normal(0, 0.3, m))))
    return costs, values


def arbitrary(rng, n: int, m: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """No structure at all: non-convex, dominated options, equal costs."""
    return ([rng.integers(1, 60, m).astype(float) for _ in range(n)],
            [rng.random(m) * rng.random() * 10 for _ in range(n)])


@pytest.mark.parametrize("make", [quant_like, arbitrary])
def test_solver_within_half_a_percent_of_exact(make):
    worst = 0.0
    for seed in range(150):
        rng = np.random.default_rng(seed)
        costs, values = make(rng, int(rng.integers(6, 13)), int(rng.integers(4, 9)))
        lo, hi = sum(c.min() for c in costs), sum(c.max() for c in costs)
        cap = int(lo + rng.random() * (hi - lo))
        sol = solve_mckp(costs, values, cap)
        chosen_c = sum(c[j] for c, j in zip(costs, sol.choice))
        chosen_v = sum(v[j] for v, j in zip(values, sol.choice))
        assert chosen_c <= cap and math.isclose(chosen_c, sol.cost) and math.isclose(chosen_v, sol.value)
        opt = exact(costs, values, cap)
        assert sol.value >= opt * (1 - 1e-12) - 1e-300
        worst = max(worst, (sol.value - opt) / opt if opt > 0 else 0.0)
    assert worst <= 0.005


def test_solver_beyond_the_exact_core_stays_within_half_a_percent():
    # 60 decisions: more than the exactly re-solved core (40), so the Lagrangian, fill and exchanges carry it
    for seed in range(6):
        rng = np.random.default_rng(100 + seed)
        costs, values = quant_like(rng, 60, 6)
        lo, hi = sum(c.min() for c in costs), sum(c.max() for c in costs)
        cap = int(lo + (0.1 + 0.15 * seed) * (hi - lo))
        sol = solve_mckp(costs, values, cap)
        assert sol.cost <= cap
        opt = exact(costs, values, cap)
        assert sol.value <= opt * 1.005


def test_lagrange_multiplier_gives_a_lower_bound():
    # Weak duality: L(λ) = Σ_i min_j (ΔKL_ij + λ·bytes_ij) − λ·capacity ≤ the optimum ≤ our plan.
    for seed in range(20):
        rng = np.random.default_rng(200 + seed)
        costs, values = quant_like(rng, 12, 8)
        lo, hi = sum(c.min() for c in costs), sum(c.max() for c in costs)
        cap = int(lo + 0.3 * (hi - lo))
        sol = solve_mckp(costs, values, cap)
        bound = sum(float(np.min(v + sol.lam * c)) for c, v in zip(costs, values)) - sol.lam * cap
        assert sol.lam > 0
        opt = exact(costs, values, cap)
        assert bound <= opt * (1 + 1e-9) and opt <= sol.value * (1 + 1e-9)
    everything = solve_mckp(costs, values, hi)
    assert everything.lam == 0.0 and everything.value == 0.0


# ------------------------------------------------------------------------------------------------ plan()
def choices(n_layers: int = 3, seed: int = 0) -> list[TensorChoices]:
    """A small Llama-shaped model with real type sizes from the registry and modelled ΔKL."""
    rng = np.random.default_rng(seed)
    shapes = {"attn_q": (256, 256), "attn_k": (128, 256), "attn_v": (128, 256), "attn_output": (256, 256),
              "ffn_gate": (512, 256), "ffn_up": (512, 256), "ffn_down": (256, 512)}
    names = [("token_embd.weight", (320, 256))]
    names += [(f"blk.{i}.{k}.weight", s) for i in range(n_layers) for k, s in shapes.items()]
    names += [("output.weight", (320, 256))]
    out = []
    for name, shape in names:
        fsum, rms = math.exp(rng.normal(0, 1)), 0.05 * math.exp(rng.normal(0, 0.3))
        opts = {}
        for f in formats.all_formats():
            if f.accepts(shape[-1]):
                err = 0.0 if f.name == "F32" else rms ** 2 * 2.0 ** (-2 * f.bpw) * math.exp(rng.normal(0, 0.2))
                opts[f.name] = (f.nbytes(shape), 0.5 * fsum * err)
        out.append(TensorChoices(name, shape, opts, fisher_sum=fsum, rms=rms))
    return out


def test_budget_infeasible_names_smallest_and_largest():
    ts = choices()
    smallest = sum(min(b for b, _ in t.options.values()) for t in ts)
    largest = sum(max(b for b, _ in t.options.values()) for t in ts)
    with pytest.raises(QggufError) as e:
        plan(ts, Budget.target_size(smallest - 1))
    msg = str(e.value)
    assert f"{smallest:,} bytes" in msg and f"{largest:,} bytes" in msg and "smallest" in msg
    with pytest.raises(QggufError, match="smallest achievable is .* bpw"):
        plan(ts, Budget.target_bpw(1.0))
    assert plan(ts, Budget.target_size(smallest)).planned_bytes == smallest
    with pytest.raises(QggufError, match="target-size"):
        Budget.target_size(0)


def test_target_size_counts_the_whole_file_and_target_bpw_as_llama_reports_it():
    ts = choices()
    layout = FileLayout.from_tensors(header_bytes=70_016, fixed=[(1024, 256)] * 7, alignment=32)
    assert layout.fixed_padded == 7 * 1024 and layout.fixed_weights == 7 * 256
    for target in (900_000, 1_400_000, 2_500_000):
        p = plan(ts, Budget.target_size(target), layout)
        assert p.file_bytes <= target
        assert p.file_bytes == 70_016 + 7 * 1024 + sum(-(-t.bytes // 32) * 32 for t in p.tensors)
    for bpw in (4.6, 5.2, 9.0):
        p = plan(ts, Budget.target_bpw(bpw), layout)
        assert p.bpw <= bpw
        assert p.bpw == 8 * (p.planned_bytes + 7 * 1024) / (p.planned_weights + 7 * 256)
        assert p.bpw > bpw - 0.5  # the budget is used, not just met


def test_more_budget_never_predicts_more_kl():
    ts = choices()
    kls = [plan(ts, Budget.target_bpw(b)).predicted_kl for b in (4.4, 4.8, 5.5, 6.5, 8.5, 12, 20)]
    assert all(a >= b for a, b in zip(kls, kls[1:]))
    assert plan(ts, Budget.target_bpw(32)).predicted_kl == 0.0  # everything fits in F32


def test_overrides_min_max_and_ties_are_respected():
    ts = choices()
    ov = parse_overrides([r"ATTN_V=q8_0", r"^output\.weight$=F16"])  # pattern lower-cased, type any case
    tied = [["blk.0.ffn_gate.weight", "blk.0.ffn_up.weight"], ["blk.1.attn_q.weight", "blk.1.attn_k.weight"]]
    p = plan(ts, Budget.target_bpw(6.0), overrides=ov, min_type="Q4_1", max_type="Q5_1", ties=tied)
    types = p.types
    for name, t in types.items():
        if ".attn_v." in name:
            assert t == "Q8_0"
        elif name == "output.weight":
            assert t == "F16"
        else:
            assert formats.get("Q4_1").bpw <= formats.get(t).bpw <= formats.get("Q5_1").bpw, (name, t)
    for a, b in tied:
        assert types[a] == types[b]
    assert [t.forced for t in p.tensors].count(True) == 4
    assert p.ties == tied


def test_ties_match_the_exact_optimum_of_the_grouped_problem():
    ts = choices(n_layers=1, seed=3)
    tied = [["blk.0.attn_q.weight", "blk.0.attn_k.weight", "blk.0.attn_v.weight"]]
    unit = 64  # bytes in DP units: every size here is a multiple of 64
    p = plan(ts, Budget.target_bpw(5.0), ties=tied)
    groups = [[t for t in ts if t.name in tied[0]]] + [[t] for t in ts if t.name not in tied[0]]
    costs, values = [], []
    for g in groups:
        common = [k for k in g[0].options if all(k in t.options for t in g)]
        costs.append(np.array([sum(t.options[k][0] for t in g) // unit for k in common], dtype=float))
        values.append(np.array([sum(t.options[k][1] for t in g) for k in common]))
    assert all(b % unit == 0 for t in ts for b, _ in t.options.values())
    assert p.predicted_kl <= exact(costs, values, p.capacity // unit) * 1.005


def test_bad_options_are_clear_errors():
    ts = choices()
    with pytest.raises(QggufError, match="unknown type 'Q9_9'"):
        parse_overrides(["attn_v=Q9_9"])
    with pytest.raises(QggufError, match="PATTERN=TYPE"):
        parse_overrides(["attn_v"])
    with pytest.raises(QggufError, match="regular expression"):
        parse_overrides(["attn_(v=Q8_0"])
    with pytest.raises(QggufError, match="matches no tensor"):
        plan(ts, Budget.target_bpw(6), overrides=parse_overrides(["attn_vv=Q8_0"]))
    with pytest.raises(QggufError, match="unknown GGUF type"):
        plan(ts, Budget.target_bpw(6), min_type="Q3_X")
    with pytest.raises(QggufError, match="swap them"):
        plan(ts, Budget.target_bpw(6), min_type="Q8_0", max_type="Q4_0")
    narrow = [TensorChoices("blk.0.x.weight", (4, 48), {"F16": (384, 1e-9), "F32": (768, 0.0)})]
    with pytest.raises(QggufError, match="was not measured"):  # 48-long rows take no 32-blocks
        plan(narrow, Budget.target_bpw(16), overrides=parse_overrides(["x=Q8_0"]))
    with pytest.raises(QggufError, match="unknown palette"):
        palette_types("everything")


def test_palette_and_llama_quantize_rules():
    stock = palette_types("stock")
    assert all(formats.get(t).stock for t in stock) and "Q8_0" in stock
    assert set(stock) <= set(palette_types("extended"))
    narrow = palette_types(min_type="Q4_0", max_type="Q8_0", overrides=parse_overrides(["attn_v=F16"]))
    assert "F32" not in narrow and "F16" in narrow and "Q8_0" in narrow
    assert llama_quantizes("blk.0.attn_q.weight", 2) and llama_quantizes("token_embd.weight", 2)
    assert not llama_quantizes("blk.0.attn_norm.weight", 1) and not llama_quantizes("output_norm.weight", 2)
    assert not llama_quantizes("blk.0.ffn_gate_inp.weight", 2) and not llama_quantizes("rope_freqs.weight", 1)


def test_plan_is_deterministic_and_round_trips_through_json(tmp_path):
    ts = choices()
    a = plan(ts, Budget.target_bpw(5.0), FileLayout(header_bytes=4096))
    b = plan(list(ts), Budget.target_bpw(5.0), FileLayout(header_bytes=4096))
    write_plan_json(a, tmp_path / "a.json")
    write_plan_json(b, tmp_path / "b.json")
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()
    back = read_plan_json(tmp_path / "a.json")
    assert back.to_dict() == a.to_dict()
    d = json.loads((tmp_path / "a.json").read_text())
    t0 = d["tensors"][0]
    for key in ("type", "bytes", "fisher_sum", "rms", "dkl", "continuous_bits", "options"):
        assert key in t0
    assert d["totals"]["predicted_kl"] == pytest.approx(sum(t["dkl"] for t in d["tensors"]))
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(QggufError, match="plan"):
        read_plan_json(tmp_path / "bad.json")


def test_continuous_allocation_is_the_papers_formula():
    ts = choices()
    b = continuous_allocation(ts, 5.0)
    n = np.array([t.n_weights for t in ts])
    assert np.sum(n * b) / n.sum() == pytest.approx(5.0)
    # b_t − b_s = log2(RMS_t/RMS_s) + ½·log2(F̄_t/F̄_s)
    t, s = ts[1], ts[5]
    want = math.log2(t.rms / s.rms) + 0.5 * math.log2((t.fisher_sum / t.n_weights) / (s.fisher_sum / s.n_weights))
    assert b[1] - b[5] == pytest.approx(want)
    p = plan(ts, Budget.target_bpw(5.0))
    assert sum(x.continuous_bits * x.n_weights for x in p.tensors) / p.planned_weights == pytest.approx(p.weights_bpw)
    nan = continuous_allocation([TensorChoices("a", (2, 32), {"F32": (256, 0.0)})], 4.0)
    assert math.isnan(nan[0])


def test_summary_and_heatmap(tmp_path):
    import matplotlib.image

    p = plan(choices(), Budget.target_bpw(5.0))
    text = summary(p)
    for word in ("attn_q", "ffn_down", "token_embd", "output", "predicted KL", "file size", "BPW"):
        assert word in text
    assert len([ln for ln in text.splitlines() if ln[:1].isdigit()]) == 3  # one line per layer
    png = write_heatmap(p, tmp_path / "bits.png")
    img = matplotlib.image.imread(png)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
    assert not list(tmp_path.glob(".*partial"))


# ------------------------------------------------------------------------------------------------ llama-quantize
@pytest.fixture(scope="module")
def tiny_f32(tiny_llama, llama_build, tmp_path_factory) -> Path:
    from qgguf.llamacpp.converter import convert_hf

    return convert_hf(tiny_llama, tmp_path_factory.mktemp("plan") / "tiny-f32.gguf", "f32")


def test_tensor_type_file_reproduces_the_plan_in_stock_llama_quantize(tiny_f32, tmp_path):
    import gguf

    from qgguf.llamacpp.build import tool_path
    from qgguf.plan.measure import TensorInput, measure_tensors

    reader = gguf.GGUFReader(tiny_f32)
    planned = [t for t in reader.tensors if llama_quantizes(t.name, len(t.shape))]
    fixed = [t for t in reader.tensors if not llama_quantizes(t.name, len(t.shape))]
    assert len(planned) == 2 + 2 * 7 and len(fixed) == 1 + 2 * 2
    # part of the stock palette (the K-quant encoders are slow on 2 cores), one of each block family
    types = [t for t in palette_types("stock") if t in ("F16", "Q8_0", "Q6_K", "Q5_0", "Q4_0", "IQ4_NL", "Q3_K")]
    assert len(types) == 7
    # real measurements of the real encoders on a few rows, modelled ΣF: what convert will hand the planner
    items = (TensorInput(t.name, np.asarray(t.data).reshape(int(t.shape[1]), int(t.shape[0]))) for t in planned)
    meas = measure_tensors(items, types, max_rows=8, cache=False, progress=False)
    fsum = {t.name: 1.0 + 3.0 * (".attn_v." in t.name or t.name == "output.weight") for t in planned}
    ts = [meas[t.name].choices(fsum[t.name]) for t in planned]
    p = plan(ts, Budget.target_bpw(6.0), FileLayout.from_tensors(0, [(int(t.n_bytes), int(t.n_elements))
                                                                       for t in fixed]))
    assert len(set(p.types.values())) >= 2  # a real mix, not one type everywhere
    ttf = write_tensor_type_file(p, tmp_path / "types.txt")
    assert [(o.pattern, o.type) for o in read_tensor_type_file(ttf)] == \
        [(ln.split("=")[0].lower(), ln.split("=")[1]) for ln in tensor_type_lines(p)]

    out = tmp_path / "tiny-planned.gguf"
    res = subprocess.run([str(tool_path("llama-quantize")), "--tensor-type-file", str(ttf), str(tiny_f32),
                          str(out), "Q8_0", "2"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    q = gguf.GGUFReader(out)
    got = {t.name: formats.by_id(int(t.tensor_type)).name for t in q.tensors}
    assert {n: got[n] for n in p.types} == p.types
    assert all(got[t.name] == "F32" for t in fixed)
    # bytes: every tensor as planned, and the file is the header plus padded tensors, as plan counts it
    assert sum(int(t.n_bytes) for t in q.tensors if t.name in p.types) == p.planned_bytes
    at = Plan(p.tensors, p.budget, FileLayout.from_tensors(q.data_offset, [(int(t.n_bytes), int(t.n_elements))
                                                                           for t in fixed]), p.lam, p.capacity)
    assert at.file_bytes == out.stat().st_size
    assert at.bpw <= 6.0


def test_split_budgets_alone_are_reported_as_given(tmp_path):
    """With only --budget-gpu/--budget-cpu the plan has no whole-file budget: the summary's budget line, the plan
    JSON and its reading back give the two budgets as given, not a --target-size of their sum; with a file budget
    as well, both."""
    from qgguf.plan.placement import plan_split

    ts = choices()
    fixed = {f"blk.{i}.attn_norm.weight": 1024 for i in range(3)}
    total_min = sum(min(b for b, _ in t.options.values()) for t in ts) + sum(fixed.values())
    gpu, cpu = total_min, 2 * total_min
    p, pl = plan_split(ts, fixed, gpu, cpu, n_layer=3)
    assert p.budget is None and pl.bytes["GPU"] <= gpu and pl.bytes["CPU"] <= cpu
    given = f"--budget-gpu {gpu:,} --budget-cpu {cpu:,} bytes"
    assert p.budget_text == given
    assert f"budget            {given}\n" in summary(p) and "--target-size" not in summary(p)
    write_plan_json(p, tmp_path / "split.json")
    d = json.loads((tmp_path / "split.json").read_text())
    assert d["budget"] is None and d["placement"]["budget"] == {"GPU": gpu, "CPU": cpu}
    back = read_plan_json(tmp_path / "split.json")
    assert back.to_dict() == p.to_dict() and back.budget_text == given
    size = 4 * total_min
    both, _ = plan_split(ts, fixed, gpu, cpu, n_layer=3, total=Budget.target_size(size))
    assert both.budget_text == f"--target-size {size:,} bytes; {given}"
