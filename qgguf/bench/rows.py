"""Bench rows: one file each (a llama-quantize preset or a qgguf convert), made, measured and kept as JSON.

Each finished row is one JSON file in DIR/rows/, written atomically with the spec that produced it; a rerun
reuses every row whose spec is unchanged, so an interrupted bench resumes where it stopped."""

from __future__ import annotations

import fnmatch
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from qgguf import __version__
from qgguf.bench.config import AUTO_TARGET_MARGIN, BenchConfig
from qgguf.bench.pareto import rate_gap
from qgguf.bench.reference import Reference, gguf_sizes
from qgguf.errors import QggufError
from qgguf.files import atomic_output, cache_dir
from qgguf.hashing import package_sha256, sha256_file
from qgguf.llamacpp.runner import Tools, kld_progress
from qgguf.llamacpp.toolout import (
    ToolOutputIncomplete,
    parse_kl_divergence,
    parse_llama_bench_json,
    parse_model_info,
    parse_quantize,
)

ROW_VERSION = 1           # bump when a row's measurement changes meaning


# What qgguf convert writes beside OUT.gguf, and the row field naming the copy kept in DIR/plans/.
CONVERT_SIDE_FILES = {".plan.json": "plan", ".tensor-types.txt": "tensor_type_file", ".heatmap.png": "heatmap"}


ENCODE_CACHE = "encoded"  # DIR/encoded: `qgguf convert --encode-cache` for the qgguf rows, removed when all finish


def measure(gguf_path: Path, ref: Reference, cfg: BenchConfig, tools: Tools, logs: Path, row_id: str) -> dict:
    """KLD statistics against the reference logits (and speeds with --gpu) of one GGUF."""
    result = gguf_sizes(gguf_path)
    text = ""
    log = logs / f"{row_id}.kld.log"
    for attempt in range(1, cfg.attempts + 1):
        text = tools.run([tools.path("llama-perplexity"), "-m", gguf_path, "--kl-divergence-base", ref.logits,
                         "--kl-divergence", "-c", cfg.ctx, "-lv", "4", *tools.common],
                        log, f"{row_id}: KLD", total=ref.base.get("chunks") or cfg.chunks,
                        progress=kld_progress, timeout=cfg.timeout)
        try:
            kld = parse_kl_divergence(text)
            break
        except ToolOutputIncomplete as e:
            if not re.search(r"kl_divergence: computing over \d+ chunks", text):
                raise QggufError(f"llama-perplexity --kl-divergence did not run on {gguf_path.name} (see {log}); "
                                 f"is {ref.logits} from this model?") from None
            if attempt == cfg.attempts:
                raise QggufError(f"llama-perplexity lost its final statistics at exit {attempt} times in a row "
                                 f"({e}); raise --attempts, or use a build whose tools flush their log at exit"
                                 ) from None
            print(f"qgguf: {row_id}: llama-perplexity's output was cut short at exit ({len(e.missing)} statistics "
                  f"missing); running it again ({attempt + 1}/{cfg.attempts})", file=sys.stderr)
    result["kld_runs"] = attempt
    result["kld"] = kld.to_dict()
    try:
        info = parse_model_info(text)
        result["llama_bpw"], result["llama_file_type"] = info.bpw, info.file_type
    except ToolOutputIncomplete:
        result["llama_bpw"] = result["llama_file_type"] = None
    if cfg.gpu:
        bench_out = tools.run([tools.path("llama-bench"), "-m", gguf_path, "-p", "512", "-n", "128", "-r", "3",
                              "-o", "json", *tools.common], logs / f"{row_id}.speed.log", f"{row_id}: speed",
                             timeout=cfg.timeout)
        result["speed"] = {s.test: {"tokens_per_s": s.tokens_per_s, "std": s.tokens_per_s_std,
                                    "backends": s.backends} for s in parse_llama_bench_json(bench_out)}
    return result


@dataclass
class Row:
    """One file to make and measure. `spec` is everything its result depends on; `make` writes the GGUF."""

    id: str
    kind: str        # "stock" or "qgguf"
    label: str       # for tables and the plot
    series: str      # the plot series / curve it belongs to
    spec: dict
    make: Callable[[Path], dict] | None = None  # writes the GGUF at the path given; returns facts to keep
    skip: str = ""   # why this row cannot run now (printed and recorded, never silent)


def row_path(out: Path, row_id: str) -> Path:
    return out / "rows" / f"{row_id}.json"


def load_row(out: Path, row: Row) -> dict | None:
    """The finished result of `row` if one exists for exactly its spec."""
    path = row_path(out, row.id)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if data.get("spec") == row.spec and data.get("version") == ROW_VERSION else None


def save_row(out: Path, record: dict) -> Path:
    path = row_path(out, record["id"])
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path) as tmp:
        tmp.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    return path


def run_row(row: Row, cfg: BenchConfig, ref: Reference, tools: Tools) -> tuple[dict, bool]:
    """The row's record: reused when finished with the same spec (and not --redo), else made and measured.

    Returns (record, reused).
    """
    redo = any(fnmatch.fnmatch(row.id, pat) for pat in cfg.redo)
    if not redo:
        done = load_row(cfg.out, row)
        if done is not None:
            return done, True
    assert row.make is not None
    gdir, logs = cfg.out / "gguf", cfg.out / "logs"
    gdir.mkdir(exist_ok=True)
    gguf_path = gdir / f"{row.id}.gguf"
    t0, c0 = time.time(), tools.times.cpu_s
    try:
        facts = row.make(gguf_path)
        t1, c1 = time.time(), tools.times.cpu_s
        result = measure(gguf_path, ref, cfg, tools, logs, row.id)
        t2, c2 = time.time(), tools.times.cpu_s
    finally:
        if not cfg.keep_gguf:
            for p in [gguf_path] + [gguf_path.with_suffix(x) for x in CONVERT_SIDE_FILES]:
                p.unlink(missing_ok=True)
    record = {"id": row.id, "version": ROW_VERSION, "kind": row.kind, "label": row.label, "series": row.series,
              "spec": row.spec, **facts, **result,
              "seconds": {"make": round(t1 - t0, 1), "measure": round(t2 - t1, 1)},
              "cpu_seconds": {"make": round(c1 - c0, 1), "measure": round(c2 - c1, 1)},
              "load_avg": [round(x, 2) for x in os.getloadavg()]}  # the machine's load while it ran (shared?)
    save_row(cfg.out, record)
    return record, False


def stock_rows(cfg: BenchConfig, ref: Reference, tools: Tools, common: dict) -> list[Row]:
    """llama-quantize presets: with the imatrix, and without it under --plain-rows."""
    rows = []
    variants = [("imatrix", ref.imatrix)] + ([("plain", None)] if cfg.plain_rows else [])
    for variant, imatrix in variants:
        for preset in cfg.presets:
            spec = {**common, "kind": "stock", "preset": preset,
                    "imatrix": ref.imatrix_key if imatrix else None}

            def make(out: Path, preset=preset, imatrix=imatrix, rid=f"stock-{variant}-{preset}") -> dict:
                args = [tools.path("llama-quantize")] + (["--imatrix", imatrix] if imatrix else [])
                with atomic_output(out) as tmp:
                    text = tools.run(args + [ref.f32, tmp, preset, cfg.threads], cfg.out / "logs" /
                                    f"{rid}.quantize.log", f"{rid}: llama-quantize", timeout=cfg.timeout)
                q = parse_quantize(text)
                return {"quantize": {"quant_mib": q.quant_mib, "quant_bpw": q.quant_bpw,
                                     "tensor_types": q.tensor_types}}

            series = "llama-quantize + imatrix" if imatrix else "llama-quantize"
            rows.append(Row(f"stock-{variant}-{preset}", "stock", preset, series, spec, make))
    return rows


def convert_help() -> tuple[str | None, str]:
    """(`qgguf convert --help` text, "") when the sub-command exists, else (None, why not)."""
    res = subprocess.run([sys.executable, "-m", "qgguf", "convert", "--help"], capture_output=True, text=True)
    if res.returncode != 0:
        return None, "qgguf convert not available"
    return res.stdout, ""


def calibration_stats(cfg: BenchConfig, tools: Tools, help_text: str | None, covariance: bool = False,
                      split: bool = False) -> tuple[Path | None, Path | None]:
    """qgguf's calibration statistics for the qgguf rows: --stats if given, else `qgguf calibrate` run once on the
    calibration text (cached like the reference); with `covariance` (feedback/auto rounding) a calibration that
    also writes the input covariance folder, its own pair; `split` keeps the held-out split in it (feedback/auto
    plan with it). (None, None) when convert takes no --stats (it calibrates)."""
    if cfg.stats is not None or not help_text or "--stats" not in help_text:
        return cfg.stats, None
    from qgguf.calibrate import code_digest
    from qgguf.calibrate.covariance import DEFAULT_WEIGHTING

    folder = (cfg.cache or cache_dir("bench")) / cfg.model.key
    # the calibration code is in the name: statistics made by other code are never reused
    stem = (f"stats-{cfg.calib.key}-t{cfg.calib_tokens}-{cfg.backend}-{code_digest()[:12]}"
            + ("-cov" if covariance else "")
            + (f"-{cfg.covariance_weight}" if covariance and cfg.covariance_weight != DEFAULT_WEIGHTING else "")
            + ("-split" if covariance and split else ""))
    stats = folder / f"{stem}.safetensors"
    cov = folder / f"{stem}.covariance" if covariance else None
    if not stats.is_file() or (cov is not None and not (cov / "index.json").is_file()):
        cmd = [sys.executable, "-m", "qgguf", "calibrate", str(cfg.model.path), "-o", str(stats), "--text",
               str(cfg.calib.path), "--tokens", str(cfg.calib_tokens), "--threads", str(cfg.threads),
               "--device", "cuda" if cfg.gpu else "cpu"]
        if cov is not None:
            if cov.exists():  # an unfinished folder (no index): calibrate writes a new one
                shutil.rmtree(cov)
            cmd += (["--covariance", str(cov), "--covariance-weight", cfg.covariance_weight]
                    + (["--covariance-split"] if split else []))
        log = "calibrate-cov.log" if covariance else "calibrate.log"
        with tools.times.step("calibrate"):
            tools.run(cmd, cfg.out / "logs" / log, "qgguf calibrate" + (" --covariance" if covariance else ""),
                      timeout=cfg.timeout)
        if not stats.is_file():
            raise QggufError(f"qgguf calibrate finished but wrote no {stats}; see {cfg.out / 'logs' / log}")
    return stats, cov


def extended_palette_exists() -> bool:
    from qgguf import formats

    return any(not getattr(f, "stock", True) for f in formats.all_formats())


def auto_targets(stock_done: dict[str, dict]) -> tuple[float, ...]:
    """Half a bit below the smallest and above the largest finished preset (llama.cpp bpw), to 0.25."""
    bpws = [r["bpw"] for r in stock_done.values()]
    if not bpws:
        return ()
    lo, hi = min(bpws) - AUTO_TARGET_MARGIN, max(bpws) + AUTO_TARGET_MARGIN
    return tuple(t for t in (math.floor(lo * 4) / 4, math.ceil(hi * 4) / 4) if 0 < t <= 32)


def qgguf_rows(cfg: BenchConfig, tools: Tools, stock_done: dict[str, dict], common: dict, help_text: str | None,
               why_not: str, stats: dict[str, tuple[Path | None, Path | None]] | None = None) -> list[Row]:
    """`qgguf convert` at each preset's file size and at each bpw target, per palette and rounding. `stats`:
    per rounding, the statistics file and covariance folder (calibration_stats)."""
    rows = []
    targets = cfg.targets if cfg.targets is not None else auto_targets(stock_done)
    for palette, rounding in [(p, r) for p in cfg.palettes for r in cfg.roundings]:
        stats_file, cov = (stats or {}).get(rounding, (None, None))
        # plain rounding keeps the ids, series and spec it had before --rounding existed
        series = f"qgguf ({palette} palette" + ("" if rounding == "plain" else f", {rounding} rounding") + ")"
        tag = "" if rounding == "plain" else f"{rounding}-"
        extra_spec = {} if rounding == "plain" else {
            "rounding": rounding, "covariance": sha256_file(cov / "index.json") if cov else None}
        skip = why_not
        if not skip and palette == "extended" and not extended_palette_exists():
            skip = "the extended palette does not exist yet (no non-stock types are registered)"
        budgets: list[tuple[str, str, str, float]] = []  # (id part, label, flag, value)
        for preset in cfg.presets if cfg.sizes is None else [p for p in cfg.presets if p in cfg.sizes]:
            st = stock_done.get(preset)
            budgets.append((f"size-{preset}", f"@{preset} size", "--target-size",
                            float(st["file_bytes"]) if st else math.nan))
        for t in targets:
            budgets.append((f"bpw-{t:.2f}", f"{t:g} bpw", "--target-bpw", float(t)))
        for part, label, flag, value in budgets:
            rid = f"qgguf-{palette}-{tag}{part}"
            spec = {**common, "kind": "qgguf", "palette": palette, "budget": flag.removeprefix("--"),
                    "value": value, "stats": sha256_file(stats_file) if stats_file else None, **extra_spec,
                    "convert_args": list(cfg.convert_args), "qgguf": __version__,
                    "code": package_sha256()}
            row_skip = skip or ("" if not math.isnan(value) else
                                f"the stock {part.removeprefix('size-')} row did not finish, so its size is unknown")

            def make(out: Path, flag=flag, value=value, palette=palette, rid=rid, rounding=rounding,
                     stats=stats_file, cov=cov) -> dict:
                target = str(int(value)) if flag == "--target-size" else f"{value:g}"
                cmd = [sys.executable, "-m", "qgguf", "convert", str(cfg.model.path), "-o", str(out), flag, target,
                       "--palette", palette]
                if stats:
                    cmd += ["--stats", str(stats)]
                if rounding != "plain":
                    cmd += ["--rounding", rounding] + (["--covariance", str(cov)] if cov else [])
                if help_text and "--threads" in help_text:
                    cmd += ["--threads", str(cfg.threads)]
                if help_text and "--device" in help_text:
                    cmd += ["--device", "cuda" if cfg.gpu else "cpu"]
                if help_text and "--encode-cache" in help_text:  # rows share most (tensor, type) encodings
                    cmd += ["--encode-cache", str(cfg.out / ENCODE_CACHE)]
                cmd += list(cfg.convert_args)
                tools.run(cmd, cfg.out / "logs" / f"{rid}.convert.log", f"{rid}: qgguf convert",
                         timeout=cfg.timeout)
                facts: dict = {"target": {"flag": flag, "value": value}, "convert_run": dict(tools.times.last_run)}
                plan = out.with_suffix(".plan.json")
                for extra, field_name in CONVERT_SIDE_FILES.items():
                    side = out.with_suffix(extra)
                    if side.is_file():
                        kept = cfg.out / "plans" / f"{rid}{extra}"
                        kept.parent.mkdir(exist_ok=True)
                        with atomic_output(kept) as tmp:
                            shutil.copyfile(side, tmp)
                        facts[field_name] = str(kept.relative_to(cfg.out))
                if plan.is_file():
                    facts["rate_gap"] = rate_gap(json.loads(plan.read_text()))
                else:
                    facts["plan"] = None
                    facts["rate_gap"] = {"mean_gap_bits": None, "reason": f"qgguf convert wrote no {plan.name}"}
                if flag == "--target-size" and out.stat().st_size > value:
                    facts["over_budget_bytes"] = int(out.stat().st_size - value)
                return facts

            rows.append(Row(rid, "qgguf", label, series, spec, make, row_skip))
    return rows
