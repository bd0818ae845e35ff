"""`qgguf bench`: qgguf's files against stock llama-quantize presets, measured the same way, resumable.

For one model and one evaluation text:

1. reference (cached in the qgguf cache, keyed by model hash + text hash + ctx + chunks): the F32 GGUF from
   llama.cpp's converter, its log-probabilities over the text (`llama-perplexity --kl-divergence-base`) and an
   imatrix from the calibration text (`llama-imatrix`);
2. rows: each stock preset quantised by llama-quantize with that imatrix (and, with --plain-rows, without), then
   `qgguf convert` at each preset's exact file size and at a sweep of bpw targets, per palette;
3. every file is measured by `llama-perplexity --kl-divergence` against the reference (mean and 99th-percentile
   KLD, PPL and its ratio to F32, same top token) and, with --gpu, by llama-bench (pp512, tg128);
4. results.json, results.md and pareto.png in the output folder; --update-docs writes a section of
   docs/benchmarks.md.
"""

from __future__ import annotations

import shutil
import sys
import time

from tqdm import tqdm

from qgguf.bench.config import BenchConfig
from qgguf.bench.reference import gguf_sizes, reference
from qgguf.bench.report import update_docs, write_report
from qgguf.bench.rows import ENCODE_CACHE, Row, calibration_stats, convert_help, qgguf_rows, run_row, stock_rows
from qgguf.errors import QggufError
from qgguf.llamacpp.build import LLAMA_CPP_COMMIT
from qgguf.llamacpp.runner import Tools
from qgguf.plan.measure import SPLIT_ROUNDINGS


def run_bench(cfg: BenchConfig) -> dict:
    """Run (or resume) the whole bench; returns the results dict also written to cfg.out/results.json."""
    t_start = time.time()
    cfg.out.mkdir(parents=True, exist_ok=True)
    for sub in ("rows", "logs"):
        (cfg.out / sub).mkdir(exist_ok=True)
    tools = Tools(cuda=cfg.gpu, threads=cfg.threads)
    ref = reference(cfg, tools, cfg.out / "logs")
    common = {"model": cfg.model.digest, "text": cfg.text.digest, "ctx": cfg.ctx, "chunks": cfg.chunks,
              "backend": cfg.backend, "llama_cpp": LLAMA_CPP_COMMIT, "tools": tools.key}
    records: list[dict] = []
    skipped: list[dict] = []
    failed: list[dict] = []

    def run_all(rows: list[Row], what: str) -> None:
        todo = [r for r in rows if not r.skip]
        for r in rows:
            if r.skip:
                skipped.append({"id": r.id, "reason": r.skip})
        reasons = sorted({r.skip for r in rows if r.skip})
        for why in reasons:
            n = sum(r.skip == why for r in rows)
            print(f"qgguf: skipping {n} {what} row(s): {why}", file=sys.stderr)
        reused = 0
        for r in tqdm(todo, desc=f"{what} rows", unit="row", disable=None, file=sys.stderr):
            try:
                rec, was = run_row(r, cfg, ref, tools)
            except QggufError as e:
                failed.append({"id": r.id, "error": str(e)})
                print(f"qgguf: {r.id} failed: {e}", file=sys.stderr)
                continue
            reused += was
            records.append(rec)
        if reused:
            print(f"qgguf: reused {reused} finished {what} row(s) from {cfg.out / 'rows'}", file=sys.stderr)

    run_all(stock_rows(cfg, ref, tools, common), "stock")
    if cfg.qgguf_rows:
        help_text, why_not = convert_help()
        by_preset = {r["label"]: r for r in records if r["series"] == "llama-quantize + imatrix"}
        by_preset.update({r["label"]: r for r in records if r["series"] == "llama-quantize"
                          and r["label"] not in by_preset})
        stats: dict = {}
        if help_text is not None:
            try:
                # one covariance calibration serves every rounding that needs one; split when any plans with it
                split = any(r in SPLIT_ROUNDINGS for r in cfg.roundings)
                for rounding in cfg.roundings:
                    stats[rounding] = calibration_stats(cfg, tools, help_text, covariance=rounding != "plain",
                                                        split=split)
            except QggufError as e:
                help_text, why_not = None, f"qgguf calibrate failed: {str(e).splitlines()[0]}"
                failed.append({"id": "calibrate", "error": str(e)})
        run_all(qgguf_rows(cfg, tools, by_preset, common, help_text, why_not, stats), "qgguf")
        if not failed:  # kept while rows are left to resume; the finished files are all that is needed now
            shutil.rmtree(cfg.out / ENCODE_CACHE, ignore_errors=True)
    timing = {"this_run_wall_s": round(time.time() - t_start, 1),
              "this_run_tool_cpu_s": round(tools.times.cpu_s, 1),
              "rows_wall_s": round(sum(sum(r["seconds"].values()) for r in records), 1),
              "rows_cpu_s": round(sum(sum(r.get("cpu_seconds", {}).values()) for r in records), 1),
              "steps_this_run": dict(tools.times.steps)}
    results = write_report(cfg, ref, records, skipped, failed, gguf_sizes(ref.f32), timing)
    if cfg.docs is not None:
        update_docs(results, cfg.out / "pareto.png", cfg.docs)
    return results
