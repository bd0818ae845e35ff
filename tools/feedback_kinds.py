"""Plain against error-feedback rounding at one plan, per tensor kind: predicted error and measured KLD.

The plan (the types) is held fixed: that of a bench row made with `--rounding feedback` (default: the stock
palette at Q4_K_M's size). Files written from it:

    plain        every tensor rounded plainly (llama.cpp's way), the same types
    feedback     every tensor with an input covariance rounded with error feedback (the row's own file)
    <kind> only  feedback for the tensors of that kind (attn_q, ffn_down, …), plain for the others

Per kind the table gives the K-FAC predicted ΔKL (½·ΣF·err, measure's kfac_plain / kfac_feedback at the planned
type, summed over the kind's tensors) of both roundings and the measured mean KLD of "<kind> only", next to the
whole files'. Tensors without an input covariance (token_embd, output) and types without levels (Q8_0, F16) are
plain in every file.

    qgguf bench smollm2-135m -o DIR --rounding plain feedback [the bench's options]
    python tools/feedback_kinds.py [--row qgguf-stock-feedback-size-Q4_K_M] -- smollm2-135m -o DIR \\
        --rounding plain feedback [the bench's options] [--update-docs]
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from qgguf.bench.cli import open_bench  # noqa: E402
from qgguf.bench.config import machine_description  # noqa: E402
from qgguf.bench.report import write_study  # noqa: E402
from qgguf.bench.rows import calibration_stats, convert_help, measure  # noqa: E402
from qgguf.calibrate.covariance import CovarianceStore  # noqa: E402
from qgguf.calibrate.stats import load_stats  # noqa: E402
from qgguf.errors import QggufError  # noqa: E402
from qgguf.export.writer import export_gguf, open_gguf, tensor_f32  # noqa: E402
from qgguf.files import atomic_output  # noqa: E402
from qgguf.hashing import checkout_commit  # noqa: E402
from qgguf.plan.measure import DEFAULT_MAX_ROWS, TensorInput, measure_tensor  # noqa: E402
from qgguf.plan.outputs import read_plan_json  # noqa: E402

DOCS = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"


def kind_of(name: str) -> str:
    """blk.3.ffn_down.weight → ffn_down; output.weight → output."""
    m = re.match(r"blk\.\d+\.(.+)\.weight$", name)
    return m.group(1) if m else name.removesuffix(".weight")


def convert_option(args: tuple[str, ...], flag: str, default):
    """The value of `flag` among the bench's --convert-arg options (as `--flag=V` or `--flag V`)."""
    for i, a in enumerate(args):
        if a.startswith(flag + "="):
            return type(default)(a.split("=", 1)[1])
        if a == flag and i + 1 < len(args):
            return type(default)(args[i + 1])
    return default


def main() -> int:
    argv = sys.argv[1:]
    if "--" not in argv:
        print(__doc__)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    cut = argv.index("--")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--row", default="qgguf-stock-feedback-size-Q4_K_M", help="the bench row whose plan is kept")
    own = ap.parse_args(argv[:cut])
    bench_argv = [a for a in argv[cut + 1:] if a != "--update-docs"]
    update = "--update-docs" in argv[cut + 1:]
    cfg, results, tools, ref = open_bench(bench_argv)
    row = next((r for r in results["rows"] if r["id"] == own.row), None)
    if row is None or not row.get("plan"):
        raise QggufError(f"the bench in {cfg.out} has no finished row {own.row} with a plan; run the bench with "
                         "--rounding feedback first")
    plan = read_plan_json(cfg.out / row["plan"])
    if cfg.gpu:
        raise QggufError("this study encodes on the CPU; run it on a bench made without --gpu")
    stats_path, cov_dir = calibration_stats(cfg, tools, convert_help()[0], covariance=True)
    stats, store = load_stats(stats_path), CovarianceStore(cov_dir)
    max_rows = convert_option(cfg.convert_args, "--max-rows", DEFAULT_MAX_ROWS)
    reader = open_gguf(ref.f32)
    by_name = {t.name: t for t in reader.tensors}
    types = {t.name: t.type for t in plan.tensors}
    importance = {n: torch.from_numpy(stats[n].importance) for n in types}
    fb_names = {n for n in types if n in store and store.get(n) is not None}

    # predicted ΔKL per tensor, both roundings, at the planned type (measure's cache: the bench measured them)
    print(f"feedback_kinds: predicted errors of {len(types)} tensors at their planned types ...", file=sys.stderr)
    pred: dict[str, tuple[float, float]] = {}
    for n, ty in types.items():
        if n not in fb_names:
            continue
        t = by_name[n]
        m = measure_tensor(TensorInput(n, tensor_f32(t, "cpu", reader), importance=importance[n],
                                       channel_fisher=importance[n], covariance=store.get(n),
                                       row_fisher=stats[n].row_fisher), [ty], max_rows=max_rows, device="cpu")
        r = m.results[ty]
        half_f = 0.5 * stats[n].fisher_sum
        pred[n] = (half_f * r.kfac_plain, half_f * (r.kfac_feedback if r.kfac_feedback is not None
                                                    else r.kfac_plain))

    kinds = sorted({kind_of(n) for n in fb_names})
    variants = {"plain": set(), "feedback": fb_names, **{f"{k} only": {n for n in fb_names if kind_of(n) == k}
                                                          for k in kinds}}
    folder = cfg.out / "feedback_kinds"
    folder.mkdir(exist_ok=True)
    logs = cfg.out / "logs"
    measured = {}
    for label, fb in variants.items():
        slug = label.replace(" ", "-")
        gguf = folder / f"{slug}.gguf"
        if not gguf.is_file():
            print(f"feedback_kinds: writing {gguf.name} ({len(fb)} tensors with feedback) ...", file=sys.stderr)
            with atomic_output(gguf) as tmp:
                export_gguf(ref.f32, tmp, types, importance, reader=reader, encode_cache=folder / "encode-cache",
                            roundings={n: "feedback" if n in fb else "plain" for n in types},
                            covariance=store.get, progress=False)
        m = measure(gguf, ref, cfg, tools, logs, f"feedback-kinds-{slug}")
        measured[label] = {"kld": m["kld"]["kld_mean"], "err": m["kld"]["kld_mean_err"], "bpw": m["bpw"],
                           "file_bytes": m["file_bytes"]}
    sizes = {v["file_bytes"] for v in measured.values()}
    if len(sizes) != 1:
        raise QggufError(f"the files of one plan differ in size ({sorted(sizes)}): a bug in the export")
    per_kind = {}
    for k in kinds:
        names = [n for n in fb_names if kind_of(n) == k]
        per_kind[k] = {"tensors": len(names), "plain": sum(pred[n][0] for n in names),
                       "feedback": sum(pred[n][1] for n in names), "measured": measured[f"{k} only"]}
    res = {"model": results["model"]["name"], "text": results["text"]["name"], "row": own.row,
           "command": "python tools/feedback_kinds.py " + " ".join(argv), "commit": checkout_commit(),
           "date": time.strftime("%Y-%m-%d"), "machine": machine_description(False), "bpw": measured["plain"]["bpw"],
           "file_bytes": sizes.pop(), "whole": {"plain": measured["plain"], "feedback": measured["feedback"]},
           "predicted": {"plain": sum(p for p, _ in pred.values()), "feedback": sum(f for _, f in pred.values())},
           "kinds": per_kind}
    write_study(results, "feedback-kinds", "## Error-feedback rounding: plain against feedback at one plan",
                res, markdown(res), folder / "feedback_kinds.json", DOCS if update else None)
    return 0


def markdown(res: dict) -> str:
    w = res["whole"]
    lines = [f"### {res['model']} on {res['text']}: the plan of {res['row']} ({res['bpw']:.3f} bpw, "
             f"{res['file_bytes']:,} bytes)", "",
             f"- command: `{res['command']}`", f"- commit {res['commit']}, {res['date']}, {res['machine']}", "",
             "| tensors with feedback | tensors | predicted ΔKL, plain | predicted ΔKL, feedback | plain / feedback "
             "| measured mean KLD | vs all plain |", "|---|---|---|---|---|---|---|"]

    def row(label, n, p, f, m):
        gain = (w["plain"]["kld"] - m["kld"]) / w["plain"]["kld"] * 100
        return (f"| {label} | {n} | {p:.5f} | {f:.5f} | {p / f:.2f} | {m['kld']:.5f} ± {m['err']:.5f} | "
                f"{-gain:+.1f} % |")

    lines.append(f"| none (all plain) | 0 | {res['predicted']['plain']:.5f} | – | – | {w['plain']['kld']:.5f} ± "
                 f"{w['plain']['err']:.5f} | – |")
    for k, v in sorted(res["kinds"].items(), key=lambda kv: -(kv[1]["plain"] - kv[1]["feedback"])):
        lines.append(row(k, v["tensors"], v["plain"], v["feedback"], v["measured"]))
    n_all = sum(v["tensors"] for v in res["kinds"].values())
    lines.append(row("**all**", n_all, res["predicted"]["plain"], res["predicted"]["feedback"], w["feedback"]))
    lines += ["", "Predicted ΔKL: per kind, the K-FAC prediction ½·ΣF·err of the kind's tensors at their planned "
              "types (all rows of the \"none\" line: the whole plan, plain). Measured: the file with feedback on "
              "that kind only, the others plain; \"vs all plain\" is its change of mean KLD against the all-plain "
              "file (same tokens, same types, same bytes)."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    try:
        sys.exit(main())
    except QggufError as e:
        print(f"feedback_kinds: {e}", file=sys.stderr)
        sys.exit(1)
