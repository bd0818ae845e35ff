"""Predicted against measured KL of whole-model qgguf plans, from a finished `qgguf bench` folder.

    python tools/predicted_vs_measured.py BENCH_DIR [--bpw-range 2.5 6.5] [--series REGEX] [--update-docs]

For every qgguf row of BENCH_DIR/results.json whose plan JSON was kept (BENCH_DIR/plans/), the plan's predicted KL
(totals.predicted_kl = ½·Σ_t ΣF_t·err_t, nats per token) beside the measured mean KLD of the written file against
the F32 model (llama-perplexity --kl-divergence, nats per token). Prints a Markdown table with the ratio
measured / predicted per plan and the Spearman rank correlation (over all plans and over those inside --bpw-range),
writes it to BENCH_DIR/predicted_vs_measured.md with a log-log scatter plot, and with --update-docs puts both
into docs/benchmarks.md between this tool's own markers. --series keeps the series whose name matches REGEX
(e.g. "feedback rounding"); its section is then a separate one. The ratios are summarised per series too.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shlex
import shutil
import sys
from pathlib import Path

from scipy import stats as sps

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from qgguf.docs import write_section  # noqa: E402
from qgguf.files import atomic_output  # noqa: E402


def collect(bench: Path, series: str | None = None) -> tuple[dict, list[dict]]:
    if not (bench / "results.json").is_file():
        raise SystemExit(f"{bench}: no results.json; give the output folder of a finished `qgguf bench` run")
    results = json.loads((bench / "results.json").read_text())
    plans = []
    for r in results["rows"]:
        if r["kind"] != "qgguf" or not r.get("plan") or not r.get("kld"):
            continue
        if series and not re.search(series, r["series"]):
            continue
        if not (bench / r["plan"]).is_file():
            raise SystemExit(f"{bench / r['plan']}: the plan of row {r['id']} is missing; rerun `qgguf bench` with "
                             f"the same -o folder (or `--redo '{r['id']}'`) to remake it")
        plan = json.loads((bench / r["plan"]).read_text())
        plans.append({"id": r["id"], "label": r["label"], "series": r["series"], "bpw": r["bpw"],
                      "predicted": float(plan["totals"]["predicted_kl"]), "measured": r["kld"]["kld_mean"],
                      "measured_err": r["kld"]["kld_mean_err"]})
    return results, sorted(plans, key=lambda p: p["bpw"])


def spearman(plans: list[dict]) -> tuple[float | None, float | None]:
    if len(plans) < 3:
        return None, None
    res = sps.spearmanr([p["predicted"] for p in plans], [p["measured"] for p in plans])
    return float(res.statistic), float(res.pvalue)


def report(results: dict, plans: list[dict], lo: float, hi: float, command: str, plot_rel: str) -> str:
    inside = [p for p in plans if lo <= p["bpw"] <= hi]
    rho_all, p_all = spearman(plans)
    rho_in, p_in = spearman(inside)
    ratios = [p["measured"] / p["predicted"] for p in plans]
    log_r = [math.log(r) for r in ratios]
    gm = math.exp(sum(log_r) / len(log_r)) if log_r else float("nan")
    lines = [
        f"- command: `{command}`, on the results of `{results['command']}`",
        f"- model: {results['model']['name']}; text: {results['text']['name']}, {results['chunks']} chunks × "
        f"{results['ctx']} tokens; machine: {results['machine']}; date: {results['date']}",
        "- predicted = the plan's ½·Σ_t ΣF_t·err_t (nats/token; err the Fisher-weighted error of the chosen type, "
        "docs/design.md \"Predicted ΔKL\"); measured = mean KLD of the written file against F32 "
        "(llama-perplexity --kl-divergence)",
        "",
        "| series | plan | bpw (llama.cpp) | predicted KL | measured mean KLD | measured / predicted |",
        "|---|---|---|---|---|---|",
    ]
    for p, r in zip(plans, ratios):
        mark = "" if lo <= p["bpw"] <= hi else " (outside the range)"
        lines.append(f"| {p['series']} | {p['label']}{mark} | {p['bpw']:.3f} | {p['predicted']:.5f} | "
                     f"{p['measured']:.5f} ± {p['measured_err']:.5f} | {r:.3f} |")
    lines += [""]
    def fmt(rho: float | None, pv: float | None, n: int) -> str:
        if rho is None or pv is None:
            return f"– ({n} plans)"
        return f"{rho:.3f} ({'p < 1e-4' if pv < 1e-4 else f'p = {pv:.2g}'}, {n} plans)"

    lines += [f"- Spearman rank correlation, all plans: {fmt(rho_all, p_all, len(plans))}; plans within "
              f"{lo:g}–{hi:g} bpw: {fmt(rho_in, p_in, len(inside))}",
              f"- measured / predicted: geometric mean {gm:.3f}, range {min(ratios):.3f}–{max(ratios):.3f}"
              if ratios else "- no plans"]
    for name in sorted({p["series"] for p in plans}):
        rs = [r for p, r in zip(plans, ratios) if p["series"] == name]
        sub = [p for p in plans if p["series"] == name]
        rho, pv = spearman(sub)
        lines.append(f"  - {name}: measured / predicted {min(rs):.3f}–{max(rs):.3f} (geometric mean "
                     f"{math.exp(sum(map(math.log, rs)) / len(rs)):.3f}); Spearman {fmt(rho, pv, len(sub))}")
    lines += ["", f"![predicted against measured KL]({plot_rel})", ""]
    return "\n".join(lines)


def plot(plans: list[dict], out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4.5), dpi=100)
    x = [p["predicted"] for p in plans]
    y = [p["measured"] for p in plans]
    ax.errorbar(x, y, yerr=[p["measured_err"] for p in plans], fmt="o", color="#d62728", markersize=4, capsize=2)
    for p in plans:
        ax.annotate(f"{p['bpw']:.2f}", (p["predicted"], p["measured"]), textcoords="offset points", xytext=(4, 3),
                    fontsize=7)
    lo, hi = min(x + y) / 1.5, max(x + y) * 1.5
    ax.plot([lo, hi], [lo, hi], color="#888888", linewidth=1, linestyle="--", label="measured = predicted")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("predicted KL ½·ΣF·err (nats/token)")
    ax.set_ylabel("measured mean KLD (nats/token)")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_output(out) as tmp:
        fig.savefig(tmp, format="png", metadata={"Software": None})
    plt.close(fig)


def update_docs(docs: Path, slug: str, body: str, title: str) -> None:
    write_section(docs, "pvm", slug, body, heading="## Predicted against measured KL of whole-model plans", title=title)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bench", type=Path, help="a finished `qgguf bench` output folder")
    ap.add_argument("--bpw-range", nargs=2, type=float, default=(2.5, 6.5), metavar=("LO", "HI"))
    ap.add_argument("--series", default=None, metavar="REGEX", help="only the series whose name matches")
    ap.add_argument("--update-docs", action="store_true")
    args = ap.parse_args()
    results, plans = collect(args.bench, args.series)
    if not plans:
        print(f"{args.bench}: no qgguf rows with a kept plan and a measured KLD", file=sys.stderr)
        return 1
    command = shlex.join(["python", "tools/predicted_vs_measured.py", str(args.bench), "--bpw-range",
                          *(f"{v:g}" for v in args.bpw_range)] + (["--series", args.series] if args.series else [])
                         + (["--update-docs"] if args.update_docs else []))
    slug = re.sub(r"[^a-z0-9.]+", "-", f"{results['model']['name']}-{results['text']['name']}-"
                  f"{results['backend']}".lower() + (f"-{args.series}" if args.series else "")).strip("-")
    title = f"{results['model']['name']} on {results['text']['name']}" + (
        f", series matching “{args.series}”" if args.series else "")
    tail = "-" + re.sub(r"[^a-z0-9.]+", "-", args.series.lower()).strip("-") if args.series else ""
    png = args.bench / f"predicted_vs_measured{tail}.png"
    plot(plans, png, f"{title}: predicted vs measured KL")
    lo, hi = args.bpw_range
    body = report(results, plans, lo, hi, command, png.name)
    with atomic_output(args.bench / f"predicted_vs_measured{tail}.md") as tmp:
        tmp.write_text(f"# Predicted against measured KL: {title}\n\n{body}")
    print(body)
    if args.update_docs:
        docs = ROOT / "docs" / "benchmarks.md"
        img_rel = Path("bench") / f"pvm-{slug}.png"
        (docs.parent / img_rel).parent.mkdir(parents=True, exist_ok=True)
        with atomic_output(docs.parent / img_rel) as tmp:
            shutil.copyfile(png, tmp)
        update_docs(docs, slug, report(results, plans, lo, hi, command, img_rel.as_posix()), title)
    return 0


if __name__ == "__main__":
    sys.exit(main())
