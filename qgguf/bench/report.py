"""The report of a bench: the Markdown table, the bits saved per preset, the plot, the docs section.

Everything here reads the results dict that `qgguf bench` writes as results.json, so a report can be made again
from that file alone."""

from __future__ import annotations

import json
import math
import re
import shutil
import time
from pathlib import Path

from qgguf import __version__
from qgguf.bench.config import BenchConfig, machine_description
from qgguf.bench.pareto import Saving, Series, plot_pareto, rate_gap, savings
from qgguf.bench.reference import Reference
from qgguf.docs import write_section
from qgguf.errors import QggufError
from qgguf.files import atomic_output
from qgguf.hashing import checkout_commit, package_sha256
from qgguf.llamacpp.build import LLAMA_CPP_COMMIT
from qgguf.llamacpp.runner import Tools


def _fmt(v: float | None, spec: str) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def table_rows(records: list[dict], gpu: bool) -> list[list[str]]:
    head = ["file", "series", "MiB", "bpw (llama.cpp)", "bpw (file)", "mean KLD", "KLD p99", "PPL",
            "PPL / F32", "same top %"]
    if gpu:
        head += ["pp512 t/s", "tg128 t/s"]
    head.append("rate gap (bits)")
    out = [head]
    for r in records:
        if r["kind"] == "reference":
            out.append([r["label"], r["series"], _fmt(r["file_bytes"] / 2**20, ".2f"), _fmt(r["bpw"], ".3f"),
                        _fmt(r["bpw_file"], ".3f"), "0", "0", _fmt(r.get("ppl"), ".3f"), "1", "100"]
                       + (["–", "–"] if gpu else []) + ["–"])
            continue
        k = r.get("kld") or {}
        row = [r["label"], r["series"], _fmt(r["file_bytes"] / 2**20, ".2f"), _fmt(r["bpw"], ".3f"),
               _fmt(r["bpw_file"], ".3f"),
               f"{k['kld_mean']:.5f} ± {k['kld_mean_err']:.5f}" if k else "0",
               _fmt(k.get("kld_p99"), ".4f") if k else "0",
               f"{k['ppl']:.3f} ± {k['ppl_err']:.3f}" if k else _fmt(r.get("ppl"), ".3f"),
               f"{k['ppl_ratio']:.4f} ± {k['ppl_ratio_err']:.4f}" if k else "1",
               f"{k['same_top_p']:.2f} ± {k['same_top_p_err']:.2f}" if k else "100"]
        if gpu:
            sp = r.get("speed") or {}
            row += [_fmt((sp.get("pp512") or {}).get("tokens_per_s"), ".0f"),
                    _fmt((sp.get("tg128") or {}).get("tokens_per_s"), ".1f")]
        row.append(_fmt((r.get("rate_gap") or {}).get("mean_gap_bits"), ".3f"))
        out.append(row)
    return out


def markdown_table(rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "|".join("---" for _ in rows[0]) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows[1:]]
    return "\n".join(lines)


def savings_table(sv: list[Saving]) -> str:
    lines = ["| preset | preset bpw | preset mean KLD | curve | curve bpw at equal KLD | saving (bpw) | saving |",
             "|---|---|---|---|---|---|---|"]
    for s in sv:
        lines.append(f"| {s.preset} | {s.preset_bpw:.3f} | {s.preset_kld:.5f} | {s.curve} | "
                     f"{_fmt(s.curve_bpw, '.3f')} | {_fmt(s.saving_bpw, '+.3f')} | "
                     f"{_fmt(s.saving_pct, '+.1f') + ' %' if s.saving_pct is not None else s.reason} |")
    return "\n".join(lines)


def compute_savings(records: list[dict]) -> list[Saving]:
    presets = [(r["label"], r["bpw"], r["kld"]["kld_mean"]) for r in records
               if r["kind"] == "stock" and r["series"] == "llama-quantize + imatrix"]
    presets += [(r["label"] + " (no imatrix)", r["bpw"], r["kld"]["kld_mean"]) for r in records
                if r["kind"] == "stock" and r["series"] == "llama-quantize"]
    out: list[Saving] = []
    for curve in sorted({r["series"] for r in records if r["kind"] == "qgguf"}):
        pts = [(r["bpw"], r["kld"]["kld_mean"]) for r in records if r["series"] == curve]
        out += savings(presets, curve, pts)
    return out


def plot_results(results: dict, out: Path) -> Path:
    groups: dict[str, list[dict]] = {}
    for r in results["rows"]:
        groups.setdefault(r["series"], []).append(r)
    series = []
    for name in sorted(groups, key=lambda s: (s != "llama-quantize + imatrix", s != "llama-quantize", s)):
        rs = groups[name]
        pts = [(r["bpw"], r["kld"]["kld_mean"], r["kld"]["kld_mean_err"]) for r in rs]
        if name == "llama-quantize + imatrix":
            series.append(Series(name, pts, labels=[r["label"] for r in rs], colour="#1f4e79", marker="s"))
        elif name == "llama-quantize":  # the presets are labelled once, beside their imatrix twins
            series.append(Series(name, pts, labels=None if "llama-quantize + imatrix" in groups
                                 else [r["label"] for r in rs], colour="#8a8a8a", marker="o"))
        else:
            series.append(Series(name, pts, line=True,
                                 colour="#d62728" if "stock" in name else "#2ca02c" if "extended" in name else None))
    title = f"{results['model']['name']}: mean KLD to F32 on {results['text']['name']}"
    sub = (f"{results['chunks']} chunks × {results['ctx']} tokens ({results['scored_tokens']} scored), "
           f"{results['machine']}, llama.cpp {results['llama_cpp']}")
    return plot_pareto(series, out, title, sub)


def report_markdown(results: dict, plot_name: str, heading: str = "#") -> str:
    f32 = results["f32"]
    lines = [f"{heading} qgguf bench: {results['model']['name']} on {results['text']['name']}", "",
             f"- command: `{results['command']}`",
             f"- machine: {results['machine']}; llama.cpp {results['llama_cpp']}; qgguf {results['qgguf']}",
             f"- model: {results['model']['name']} (sha256 of its files {results['model']['sha256'][:16]}…); "
             f"F32 {f32['file_bytes'] / 2**20:.1f} MiB, {f32['elements']:,} weights, PPL {_fmt(f32['ppl'], '.3f')}",
             f"- text: {results['text']['name']}, {results['chunks']} chunks × {results['ctx']} tokens "
             f"({results['scored_tokens']:,} scored tokens); imatrix from {results['calibration']['name']} "
             f"({results['calibration']['imatrix_chunks']} chunks)",
             f"- date: {results['date']}; qgguf commit {results.get('commit') or 'unknown'} (code "
             f"{str(results.get('code'))[:12]}, llama.cpp tools build {results.get('tools')})",
             *_timing_lines(results),
             "- bpw (llama.cpp) = all tensor bits / all tensor elements, as llama.cpp prints it; bpw (file) = the "
             "whole file's bits / all tensor elements",
             "", markdown_table(table_rows([f32] + results["rows"], results["backend"] == "cuda")), ""]
    if results["savings"]:
        lines += ["Bits saved at equal mean KLD (along each qgguf curve, log-linear between its points):", "",
                  savings_table([Saving(s["preset"], s["curve"], s["preset_bpw"], s["preset_kld"], s["curve_bpw"],
                                        s["reason"]) for s in results["savings"]]), ""]
    if results["skipped"]:
        by_reason: dict[str, list[str]] = {}
        for s in results["skipped"]:
            by_reason.setdefault(s["reason"], []).append(s["id"])
        lines += ["Not measured:", ""] + [f"- {len(ids)} row(s) ({ids[0]}{', …' if len(ids) > 1 else ''}): {why}"
                                         for why, ids in by_reason.items()] + [""]
    if results["failed"]:
        lines += ["Failed:", ""] + [f"- {s['id']}: {s['error'].splitlines()[0]}" for s in results["failed"]] + [""]
    lines += [f"![mean KLD against bpw]({plot_name})", ""]
    return "\n".join(lines)


def _timing_lines(results: dict) -> list[str]:
    t = results.get("timing") or {}
    rows = [r for r in results["rows"] if r.get("seconds")]
    if not rows:
        return []
    line = (f"- time: measuring the {len(rows)} rows took {t.get('rows_wall_s', 0) / 60:.1f} min "
            f"({t.get('rows_cpu_s', 0) / 60:.1f} CPU-min in the tools)")
    loads = [r["load_avg"][1] for r in rows if r.get("load_avg")]
    if loads:
        line += (f"; machine load (5-min load average at the end of each row) {min(loads):.1f}–{max(loads):.1f}"
                 f" over {len(loads)} of the {len(rows)} rows")
    steps = t.get("steps_this_run") or {}
    if steps:
        line += "; one-off steps of this run: " + ", ".join(
            f"{k} {v['wall_s'] / 60:.1f} min ({v['cpu_s'] / 60:.1f} CPU-min)" for k, v in steps.items())
    return [line]


def stale_rows(results: dict) -> list[str]:
    """Rows made by other code than this checkout's: qgguf's, or the built llama.cpp tools'."""
    code, tools = package_sha256(), results.get("tools")
    return [r["id"] for r in results["rows"]
            if r["spec"].get("tools") != tools or (r["kind"] == "qgguf" and r["spec"].get("code") != code)]


def section_slug(results: dict) -> str:
    """The name of a bench's sections in docs/benchmarks.md: model, text and backend, and the roundings when they
    are not plain alone (a rounding study is a section of its own, beside the model's default bench)."""
    roundings = results.get("roundings") or ["plain"]
    tail = "" if roundings == ["plain"] else "-rounding-" + "-".join(roundings)
    return re.sub(r"[^a-z0-9.]+", "-", f"{results['model']['name']}-{results['text']['name']}-{results['backend']}"
                  f"{tail}".lower()).strip("-")


def write_study(results: dict, kind: str, heading: str, data: dict, md: str, out: Path, docs: Path | None) -> None:
    """A study made on a bench's folder (tools/activation_floor.py, tools/calibration_stability.py): its JSON in
    `out`, its markdown printed, and with `docs` its section there under `heading`."""
    with atomic_output(out) as tmp:
        tmp.write_text(json.dumps(data, indent=1) + "\n")
    print(md)
    if docs is not None:
        write_section(docs, kind, section_slug(results), md, heading=heading)


def update_docs(results: dict, plot: Path, docs: Path, note: str = "") -> Path:
    """Put this bench's section (between its own markers) and its plot into `docs`; other sections stay as they are.
    `note`: a paragraph placed under the section's heading (what the numbers can and cannot say).

    Refuses rows that other code made: a published number must be reproducible from the checkout."""
    stale = stale_rows(results)
    if stale:
        raise QggufError(f"{len(stale)} row(s) ({', '.join(stale[:3])}{' …' if len(stale) > 3 else ''}) were made by "
                         "other code than this checkout's; run the bench again (it re-measures them) before "
                         "--update-docs")
    slug = section_slug(results)
    img_rel = Path("bench") / f"{slug}.png"
    img = docs.parent / img_rel
    img.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(img) as tmp:
        shutil.copyfile(plot, tmp)
    md = report_markdown(results, img_rel.as_posix(), heading="##")
    if note:
        head, _, rest = md.partition("\n\n")
        md = f"{head}\n\n{note.strip()}\n\n{rest}"
    return write_section(docs, "bench", slug, md)


def print_summary(results: dict) -> None:
    print(markdown_table(table_rows(results["rows"], results["backend"] == "cuda")))
    for s in results["savings"]:
        if s["saving_bpw"] is None:
            print(f"{s['preset']:>22} vs {s['curve']}: no saving computed ({s['reason']})")
        else:
            print(f"{s['preset']:>22} vs {s['curve']}: {s['saving_bpw']:+.3f} bpw ({s['saving_pct']:+.1f} %) "
                  f"at mean KLD {s['preset_kld']:.5f}")
    for r in results["rows"]:
        g = r.get("rate_gap")
        if g:
            gap = g.get("mean_gap_bits")
            print(f"{r['id']}: rate gap to the Gaussian bound "
                  + (f"{gap:.3f} bits/weight over {g['tensors']} tensors" if gap is not None else f"– ({g['reason']})"))
    print(f"results: {results.get('out', '')}")


def write_report(cfg: BenchConfig, ref: Reference, records: list[dict], skipped: list[dict],
                 failed: list[dict], f32_sizes: dict, timing: dict | None = None) -> dict:
    """results.json, results.md and pareto.png in the output folder; returns the results dict."""
    base = ref.base
    ppl_base = base.get("ppl")
    if ppl_base is None:  # the base run's last line was lost: every KLD run prints PPL(base) too
        found = [r["kld"]["ppl_base"] for r in records if r.get("kld")]
        ppl_base = found[0] if found else None
    f32_row = {"id": "f32", "kind": "reference", "label": "F32", "series": "reference", **f32_sizes,
               "kld": None, "ppl": ppl_base}
    for r in records:  # from the kept plan, so a reused row follows the current definition of the gap
        plan = cfg.out / r["plan"] if r.get("plan") else None
        if plan is not None and plan.is_file():
            r["rate_gap"] = rate_gap(json.loads(plan.read_text()))
    order = {"llama-quantize + imatrix": 0, "llama-quantize": 1}
    records = sorted(records, key=lambda r: (order.get(r["series"], 2), r["series"], r["bpw"], r["id"]))
    sv = compute_savings(records)
    tokens = (base.get("chunks") or cfg.chunks) * (cfg.ctx - 1 - cfg.ctx // 2)
    results = {
        "command": cfg.command(), "qgguf": __version__, "llama_cpp": LLAMA_CPP_COMMIT,
        "code": package_sha256(), "commit": checkout_commit(), "tools": Tools(cuda=cfg.gpu, threads=1).key,
        "machine": machine_description(cfg.gpu), "date": time.strftime("%Y-%m-%d"),
        "model": {"name": cfg.model.name, "path": str(cfg.model.path), "sha256": cfg.model.digest},
        "text": {"name": cfg.text.name, "sha256": cfg.text.digest},
        "calibration": {"name": cfg.calib.name, "sha256": cfg.calib.digest, "imatrix_chunks": cfg.imatrix_chunks},
        "backend": cfg.backend, "roundings": list(cfg.roundings), "ctx": cfg.ctx,
        "chunks": base.get("chunks") or cfg.chunks, "scored_tokens": tokens,
        "f32": f32_row, "rows": records, "skipped": skipped, "failed": failed,
        "savings": [s.to_dict() for s in sv], "timing": timing or {},
    }
    out = cfg.out
    with atomic_output(out / "results.json") as tmp:
        tmp.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    md = report_markdown(results, plot_name="pareto.png")
    with atomic_output(out / "results.md") as tmp:
        tmp.write_text(md)
    plot_results(results, out / "pareto.png")
    return results
