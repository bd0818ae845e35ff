"""Calibration stability: do two calibration seeds give the same plan quality, and the same ΣF where it matters?

The criterion a user feels is the plan, not every tensor's ΣF. For each seed (the sampled labels change; the text
does not) this calibrates at the bench's token count, converts at the file size of the bench's Q4_K_M preset and
measures the file's mean KLD against the bench's F32 logits; the plans agree when the two KLDs differ by less than
their combined ±. It also compares ΣF per tensor between the first two seeds over the tensors that together carry
≥ 95 % of the total Fisher (the ones the plan's bytes follow), against a 10 % tolerance.

    python tools/calibration_stability.py --seeds 0 1 [--palette stock] -- smollm2-135m -o /tmp/bench/smol [the
        bench's options] [--update-docs]

Run `qgguf bench` with the same options first (its reference logits, its Q4_K_M row).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qgguf.bench.cli import open_bench  # noqa: E402
from qgguf.bench.config import machine_description  # noqa: E402
from qgguf.bench.report import write_study  # noqa: E402
from qgguf.bench.rows import measure  # noqa: E402
from qgguf.calibrate.stats import load_stats  # noqa: E402
from qgguf.errors import QggufError, run_tool  # noqa: E402
from qgguf.hashing import checkout_commit  # noqa: E402

DOCS = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"

SHARE = 0.95      # tensors carrying this share of the total Fisher
TOLERANCE = 0.10  # relative ΣF difference allowed between seeds


def fisher_spread(a_path: Path, b_path: Path) -> dict:
    """|ΣF_a − ΣF_b| / mean per tensor, over the tensors carrying SHARE of the total Fisher (by the mean)."""
    a, b = load_stats(a_path), load_stats(b_path)
    names = [n for n in a.tensors if n in b.tensors]
    fs = {n: (a.tensors[n].fisher_sum, b.tensors[n].fisher_sum) for n in names}
    order = sorted(names, key=lambda n: -(fs[n][0] + fs[n][1]))
    total = sum(x + y for x, y in fs.values())
    core, acc = [], 0.0
    for n in order:
        if acc >= SHARE * total:
            break
        core.append(n)
        acc += sum(fs[n])
    rel = {n: abs(fs[n][0] - fs[n][1]) / (0.5 * (fs[n][0] + fs[n][1])) for n in names if sum(fs[n]) > 0}
    core_rel = sorted(((rel[n], n) for n in core), reverse=True)
    over = [(r, n) for r, n in core_rel if r > TOLERANCE]
    rest_over = sorted(((r, n) for n, r in rel.items() if n not in set(core) and r > TOLERANCE), reverse=True)
    return {"tensors": len(names), "core": len(core), "core_share": acc / total if total else None,
            "core_median": sorted(r for r, _ in core_rel)[len(core_rel) // 2] if core_rel else None,
            "core_max": core_rel[0] if core_rel else None, "core_over": over, "rest_over": rest_over[:8],
            "rest_over_count": len(rest_over)}


def main() -> int:
    argv = sys.argv[1:]
    if "--" not in argv:
        print(__doc__)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    cut = argv.index("--")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--palette", default="stock")
    ap.add_argument("--preset", default="Q4_K_M", help="the preset whose file size the plans are made at")
    own = ap.parse_args(argv[:cut])
    bench_argv = argv[cut + 1:]
    update = "--update-docs" in bench_argv
    bench_argv = [a for a in bench_argv if a != "--update-docs"]
    cfg, results, tools, ref = open_bench(bench_argv)
    preset = [r for r in results["rows"] if r["series"] == "llama-quantize + imatrix" and r["label"] == own.preset]
    if not preset:
        raise QggufError(f"the bench in {cfg.out} has no {own.preset} row with an imatrix; add it to --presets")
    size = int(preset[0]["file_bytes"])
    logs = cfg.out / "logs"
    folder = cfg.out / "stability"
    folder.mkdir(exist_ok=True)
    device = "cuda" if cfg.gpu else "cpu"
    runs = []
    for seed in own.seeds:
        stats = folder / f"stats-t{cfg.calib_tokens}-s{seed}.safetensors"
        if not stats.is_file():
            tools.run([sys.executable, "-m", "qgguf", "calibrate", str(cfg.model.path), "-o", str(stats), "--text",
                       str(cfg.calib.path), "--tokens", str(cfg.calib_tokens), "--seed", str(seed), "--threads",
                       str(cfg.threads), "--device", device], logs / f"stability-s{seed}.calibrate.log",
                      f"calibrate, seed {seed}")
        gguf = folder / f"{own.palette}-{own.preset}-size-s{seed}.gguf"
        if not gguf.is_file():
            tools.run([sys.executable, "-m", "qgguf", "convert", str(cfg.model.path), "-o", str(gguf),
                       "--target-size", str(size), "--stats", str(stats), "--palette", own.palette, "-t",
                       str(cfg.threads), "--device", device, *cfg.convert_args], logs / f"stability-s{seed}.convert.log",
                      f"convert at {own.preset} size, seed {seed}")
        m = measure(gguf, ref, cfg, tools, logs, f"stability-s{seed}")
        runs.append({"seed": seed, "stats": str(stats), "file_bytes": m["file_bytes"], "bpw": m["bpw"],
                     "kld": m["kld"]["kld_mean"], "err": m["kld"]["kld_mean_err"], "ppl": m["kld"]["ppl"],
                     "ppl_err": m["kld"]["ppl_err"]})
    a, b = runs[0], runs[1]
    diff, allowed = abs(a["kld"] - b["kld"]), a["err"] + b["err"]
    spread = fisher_spread(Path(a["stats"]), Path(b["stats"]))
    res = {"model": results["model"]["name"], "text": results["text"]["name"], "backend": cfg.backend,
           "command": "python tools/calibration_stability.py " + " ".join(argv), "commit": checkout_commit(),
           "date": time.strftime("%Y-%m-%d"), "machine": machine_description(cfg.gpu), "preset": own.preset,
           "size": size, "palette": own.palette, "tokens": cfg.calib_tokens, "runs": runs, "kld_diff": diff,
           "kld_allowed": allowed, "plans_agree": diff < allowed, "fisher": spread}
    write_study(results, "stability", "## Calibration stability: two seeds, one plan", res, markdown(res),
                folder / "stability.json", DOCS if update else None)
    return 0


def markdown(res: dict) -> str:
    f = res["fisher"]
    lines = [f"### {res['model']}: two calibration seeds, plans at {res['preset']}'s size ({res['palette']} palette)", "",
             f"- command: `{res['command']}`", f"- commit {res['commit']}, {res['date']}, {res['machine']}; "
             f"{res['tokens']:,} calibration tokens; file size {res['size']:,} bytes", "",
             "| seed | bpw | mean KLD | PPL |", "|---|---|---|---|"]
    for r in res["runs"]:
        lines.append(f"| {r['seed']} | {r['bpw']:.4f} | {r['kld']:.5f} ± {r['err']:.5f} | {r['ppl']:.3f} ± "
                     f"{r['ppl_err']:.3f} |")
    verdict = "agree" if res["plans_agree"] else "**differ**"
    lines += ["", f"The plans {verdict}: the mean KLDs differ by {res['kld_diff']:.5f}, their combined ± is "
              f"{res['kld_allowed']:.5f}.", "",
              f"ΣF between the two seeds: the {f['core']} of {f['tensors']} tensors that carry "
              f"{100 * f['core_share']:.1f} % of the total Fisher differ by a median {100 * f['core_median']:.2f} %, "
              f"at most {100 * f['core_max'][0]:.1f} % ({f['core_max'][1]}); "
              + (f"{len(f['core_over'])} of them over {100 * TOLERANCE:g} %: "
                 + ", ".join(f"{n} {100 * r:.1f} %" for r, n in f["core_over"][:8]) + "."
                 if f["core_over"] else f"every one within {100 * TOLERANCE:g} %.")]
    if f["rest_over_count"]:
        lines.append(f"Outside that set {f['rest_over_count']} tensors differ by more than {100 * TOLERANCE:g} % "
                     "(largest: " + ", ".join(f"{n} {100 * r:.0f} %" for r, n in f["rest_over"][:5]) + ").")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    run_tool(main, "calibration_stability")
