"""The KLD floor that llama.cpp's quantised activations put under every weight plan, and the bench rows against it.

llama.cpp's CPU dot products do not multiply quantised weights by float activations: each activation row is first
quantised to 8 bits (Q8_0 blocks for the block-32 types, Q8_K super-blocks for the K-quants and the _XS types), so
a file's KLD against the F32 model has a part no choice of weights can remove. For a probe type P it is measured
by holding the weights fixed:

    Y   = llama-quantize (with the bench's imatrix) F32 → P          weights of P, activations quantised
    Y'  = llama-quantize --allow-requantize Y → F32                  the same weights as floats, float activations
    floor_P  = KLD(Y against Y')    (activations only)
    weights_P = KLD(Y' against F32) (weights only);  total_P = KLD(Y against F32)

Probes: Q8_0 (Q8_0 activations) and Q6_K (Q8_K activations; on a model whose rows do not take 256-blocks,
llama-quantize falls back on other types for those tensors, and the probe says which). Then, from the bench's
rows (`qgguf bench ... -o DIR` first, same options): each row's mean KLD over the floor, and a check that no other
floor remains: along every series, a file with more bytes must measure a lower KLD, beyond the two rows' ± , unless
the smaller one is already within 2× the floor.

    python tools/activation_floor.py smollm2-135m -o /tmp/bench/smol [the bench's options] [--update-docs]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qgguf.bench.cli import open_bench  # noqa: E402
from qgguf.bench.config import machine_description  # noqa: E402
from qgguf.bench.reference import Reference  # noqa: E402
from qgguf.bench.report import write_study  # noqa: E402
from qgguf.bench.rows import measure  # noqa: E402
from qgguf.errors import run_tool  # noqa: E402
from qgguf.files import atomic_output  # noqa: E402
from qgguf.hashing import checkout_commit  # noqa: E402
from qgguf.llamacpp.runner import PPL_PROGRESS, Tools  # noqa: E402

DOCS = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"

PROBES = {"Q8_0": "Q8_0 (block-32 types: Q4_0 … Q8_0, IQ4_NL, NL*_32)",
          "Q6_K": "Q8_K (K-quants, IQ4_XS, NL*_XS)"}
NEAR_FLOOR = 2.0  # a row within this factor of the floor may stop improving with bytes


def probe(p: str, cfg, ref: Reference, tools: Tools, folder: Path, logs: Path) -> dict:
    """floor, weights and total KLD of probe type `p` (see the module docstring)."""
    y, y32 = folder / f"{p}.gguf", folder / f"{p}-dequantised-f32.gguf"
    if not y.is_file():
        with atomic_output(y) as tmp:
            tools.run([tools.path("llama-quantize"), "--imatrix", ref.imatrix, ref.f32, tmp, p, str(tools.threads)],
                      logs / f"floor-{p}.quantize.log", f"floor: {p}")
    if not y32.is_file():
        with atomic_output(y32) as tmp:
            tools.run([tools.path("llama-quantize"), "--allow-requantize", y, tmp, "F32", str(tools.threads)],
                      logs / f"floor-{p}.f32.log", f"floor: {p} → F32")
    logits = folder / f"{p}-dequantised-f32.kld"
    if not logits.is_file():
        with atomic_output(logits) as tmp:
            tools.run([tools.path("llama-perplexity"), "-m", y32, "-f", cfg.text.path, "-c", cfg.ctx,
                       "--chunks", cfg.chunks, "--kl-divergence-base", tmp, *tools.common],
                      logs / f"floor-{p}.logits.log", f"floor: {p} F32 logits", total=cfg.chunks,
                      progress=PPL_PROGRESS)
    own = Reference(f32=y32, logits=logits, base=ref.base, imatrix=None, imatrix_key=None)
    floor = measure(y, own, cfg, tools, logs, f"floor-{p}-vs-dequantised")
    weights = measure(y32, ref, cfg, tools, logs, f"floor-{p}-dequantised-vs-f32")
    total = measure(y, ref, cfg, tools, logs, f"floor-{p}-vs-f32")
    return {"probe": p, "activations": PROBES[p], "tensor_types": total["tensor_types"], "bpw": total["bpw"],
            "floor": floor["kld"], "weights": weights["kld"], "total": total["kld"]}


def check_rows(results: dict, floor: float) -> tuple[list[dict], list[str]]:
    """Each row's KLD over the floor, and the pairs that break "more bytes, lower KLD" away from the floor."""
    rows = [r for r in results["rows"] if r.get("kld")]
    table = [{"id": r["id"], "series": r["series"], "label": r["label"], "bpw": r["bpw"],
              "kld": r["kld"]["kld_mean"], "err": r["kld"]["kld_mean_err"],
              "over_floor": r["kld"]["kld_mean"] / floor} for r in rows]
    breaks = []
    for series in sorted({t["series"] for t in table}):
        pts = sorted((t for t in table if t["series"] == series), key=lambda t: (t["bpw"], t["id"]))
        for a, b in zip(pts, pts[1:]):
            if b["bpw"] <= a["bpw"] or a["kld"] <= NEAR_FLOOR * floor:
                continue
            if b["kld"] > a["kld"] + a["err"] + b["err"]:
                breaks.append(f"{series}: {b['label']} ({b['bpw']:.3f} bpw) measures {b['kld']:.5f} ± {b['err']:.5f}, "
                              f"above {a['label']} ({a['bpw']:.3f} bpw) at {a['kld']:.5f} ± {a['err']:.5f}")
    return table, breaks


def markdown(res: dict) -> str:
    k = lambda d: f"{d['kld_mean']:.5f} ± {d['kld_mean_err']:.5f}"  # noqa: E731
    lines = [f"### {res['model']} on {res['text']} ({res['backend']})", "",
             f"- command: `{res['command']}`", f"- bench: `{res['bench_command']}`",
             f"- commit {res['commit']}, {res['date']}, {res['machine']}", "",
             "| probe | activations | bpw | floor: KLD(P, its F32 twin) | weights: KLD(F32 twin, F32) | "
             "total: KLD(P, F32) | tensor types |", "|---|---|---|---|---|---|---|"]
    for p in res["probes"]:
        types = ", ".join(f"{n} {t}" for t, n in p["tensor_types"].items())
        lines.append(f"| {p['probe']} | {p['activations']} | {p['bpw']:.3f} | {k(p['floor'])} | {k(p['weights'])} | "
                     f"{k(p['total'])} | {types} |")
    lines += ["", f"Floor used below: {res['floor']:.5f}, the lower probe floor (a plan's own floor depends on its types: "
              "block-32 types pay about the Q8_0 probe's, K-quants and _XS types the Q8_K probe's, F16 tensors "
              "less). Rows, mean KLD over that floor:", "",
              "| series | file | bpw | mean KLD | × floor |", "|---|---|---|---|---|"]
    for t in res["rows"]:
        lines.append(f"| {t['series']} | {t['label']} | {t['bpw']:.3f} | {t['kld']:.5f} ± {t['err']:.5f} | "
                     f"{t['over_floor']:.2f} |")
    lines.append("")
    if res["breaks"]:
        lines += ["**More bytes, higher KLD** (beyond the ±, away from the floor):", ""]
        lines += [f"- {b}" for b in res["breaks"]]
    else:
        lines.append(f"More bytes give a lower KLD beyond the ± along every series, wherever a row is more than "
                     f"{NEAR_FLOOR:g}× the floor: no other floor shows.")
    return "\n".join(lines) + "\n"


def main() -> int:
    argv = sys.argv[1:]
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    update = "--update-docs" in argv
    argv = [a for a in argv if a != "--update-docs"]
    cfg, results, tools, ref = open_bench(argv)
    logs = cfg.out / "logs"
    folder = cfg.out / "floor"
    folder.mkdir(exist_ok=True)
    probes = [probe(p, cfg, ref, tools, folder, logs) for p in PROBES]
    # the lower probe floor: a plan of block-32 types pays about it, one of K-quants more, F16 tensors less; the
    # lower value makes the "more bytes, lower KLD" check apply to more rows
    floor = min(p["floor"]["kld_mean"] for p in probes)
    rows, breaks = check_rows(results, floor)
    res = {"model": results["model"]["name"], "text": results["text"]["name"], "backend": cfg.backend,
           "command": "python tools/activation_floor.py " + " ".join(argv), "bench_command": results["command"],
           "commit": checkout_commit(), "date": time.strftime("%Y-%m-%d"), "machine": machine_description(cfg.gpu),
           "probes": probes, "floor": floor, "rows": rows, "breaks": breaks}
    write_study(results, "floor", "## Activation floor: the KLD llama.cpp's quantised activations add", res,
                markdown(res), folder / "floor.json", DOCS if update else None)
    return 0


if __name__ == "__main__":
    run_tool(main, "activation_floor")
