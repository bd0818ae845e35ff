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

Each finished row is one JSON file in DIR/rows/, written atomically with the spec that produced it; a rerun
reuses every row whose spec is unchanged, so an interrupted bench resumes where it stopped.
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import hashlib
import json
import math
import os
import platform
import re
import resource
import select
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from tqdm import tqdm

from . import __version__
from .errors import QggufError
from .files import atomic_output, cache_dir, require_file, sha256_file
from .llama import LLAMA_CPP_COMMIT, repo_root, tool_env, tool_path
from .benchreport import compute_savings, plot_results, print_summary, report_markdown, update_docs
from .pareto import rate_gap
from .toolout import (ToolOutputIncomplete, kld_chunk_rows, parse_kl_divergence, parse_llama_bench_json,
                      parse_model_info, parse_quantize)

PRESETS = ("Q2_K", "Q3_K_S", "Q3_K_M", "Q4_K_S", "Q4_K_M", "IQ4_XS", "Q5_K_S", "Q5_K_M", "Q6_K", "Q8_0")
# The bpw sweep of the qgguf curves beyond the size-matched rows: by default ("auto") one target half a bit below
# the smallest preset and one half a bit above the largest, so each curve spans every preset's KLD and the saving
# can be read off for all of them (the size-matched rows already fill the range between).
AUTO_TARGET_MARGIN = 0.5
PALETTES = ("stock", "extended")
DEFAULT_CHUNKS = 20   # × 512 tokens of the text; SmolLM2 Q4_K_M: mean KLD ± 1.7 % (docs/benchmarks.md)
DEFAULT_IMATRIX_CHUNKS = 100
DEFAULT_CALIB_TOKENS = 16384  # tokens of the calibration text for qgguf's Fisher statistics
DEFAULT_TEXT = "austen"   # held out: neither the imatrix nor qgguf's calibration sees it
DEFAULT_CALIB = "wiki"
ROW_VERSION = 1           # bump when a row's measurement changes meaning
# What qgguf convert writes beside OUT.gguf, and the row field naming the copy kept in DIR/plans/.
CONVERT_SIDE_FILES = {".plan.json": "plan", ".tensor-types.txt": "tensor_type_file", ".heatmap.png": "heatmap"}
ENCODE_CACHE = "encoded"  # DIR/encoded: `qgguf convert --encode-cache` for the qgguf rows, removed when all finish
KLD_ATTEMPTS = 5          # llama-perplexity's asynchronous log can lose its last lines at exit: run it again

# --------------------------------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class Source:
    """A resolved input: where it is, how to name it in a report, and its content hash."""

    path: Path
    name: str
    digest: str
    arg: str = ""  # as the user gave it (a path or an asset name), for the reproducing command line

    @property
    def key(self) -> str:
        return self.digest[:16]


def _asset(name: str):
    """The assets registry entry `name`, or None (no such asset, or no assets module)."""
    try:
        from . import assets
    except ImportError:
        return None
    return getattr(assets, "ASSETS", {}).get(name)


def folder_digest(folder: Path) -> str:
    """sha256 over every file of a folder (relative name and content hash, in name order)."""
    h = hashlib.sha256()
    files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))
    for p in tqdm(files, desc="hash model", unit="file", disable=None, leave=False, file=sys.stderr):
        h.update(str(p.relative_to(folder)).encode() + b"\0" + sha256_file(p).encode() + b"\n")
    return h.hexdigest()


def resolve_model(arg: str) -> Source:
    """An HF model folder, or the name of a model asset (`qgguf fetch`)."""
    from .hfconvert import check_model_dir

    path = Path(arg)
    name = path.name
    if not path.exists():
        asset = _asset(arg)
        if asset is None:
            raise QggufError(f"model {arg!r} is neither a folder nor a known model asset; give a Hugging Face "
                             "model folder, or an asset name such as smollm2-135m (see `qgguf fetch --list`)")
        from .assets import asset_path

        path, name = asset_path(arg), arg
    else:
        try:  # a folder of the assets cache: name it as the asset
            rel = path.resolve().relative_to(cache_dir("assets").resolve())
            name = rel.parts[0] if _asset(rel.parts[0]) is not None else name
        except ValueError:
            pass
    check_model_dir(path)
    asset = _asset(name)
    if asset is not None and "de-gridded" in getattr(asset, "description", ""):
        name += " (de-gridded)"
    return Source(path, name, folder_digest(path), arg)


def resolve_text(arg: str, what: str) -> Source:
    """A text file, or the name of a text asset."""
    path = Path(arg)
    name = path.name
    if not path.is_file():
        if path.exists() or _asset(arg) is None:
            raise QggufError(f"{what} {arg!r} is neither a text file nor a known text asset; give a UTF-8 text "
                             "file, or an asset name such as austen or wiki (fetch it with `qgguf fetch`)")
        from .assets import asset_path

        path, name = asset_path(arg), arg
    if path.stat().st_size == 0:
        raise QggufError(f"{what} {str(path)!r} is empty; give a text with enough tokens for the chunks asked")
    return Source(path, name, sha256_file(path), arg)


def machine_description(gpu: bool) -> str:
    """"2-core x86-64 CPU", with the GPU's name first when one is used."""
    arch = platform.machine().replace("x86_64", "x86-64").replace("aarch64", "arm64")
    cpu = f"{os.cpu_count()}-core {arch} CPU"
    if not gpu:
        return cpu
    try:
        res = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30)
        name = res.stdout.strip().splitlines()[0] if res.returncode == 0 and res.stdout.strip() else "a GPU"
    except (OSError, subprocess.TimeoutExpired):
        name = "a GPU"
    return f"{name} + {cpu}"


# --------------------------------------------------------------------------------------------------- config


@dataclass
class BenchConfig:
    model: Source
    text: Source
    calib: Source
    out: Path
    ctx: int = 512
    chunks: int = DEFAULT_CHUNKS
    imatrix_chunks: int = DEFAULT_IMATRIX_CHUNKS
    calib_tokens: int = DEFAULT_CALIB_TOKENS
    presets: tuple[str, ...] = PRESETS
    targets: tuple[float, ...] | None = None  # None: auto (see AUTO_TARGET_MARGIN)
    sizes: tuple[str, ...] | None = None      # presets whose file size qgguf is matched at; None: all
    palettes: tuple[str, ...] = PALETTES
    plain_rows: bool = False
    qgguf_rows: bool = True
    gpu: bool = False
    threads: int = 0
    stats: Path | None = None
    convert_args: tuple[str, ...] = ()
    redo: tuple[str, ...] = ()
    keep_gguf: bool = False
    attempts: int = KLD_ATTEMPTS
    timeout: float | None = None  # per tool run, seconds
    docs: Path | None = None      # --update-docs target
    cache: Path | None = None     # reference files (F32 GGUF, logits, imatrix); default: the qgguf cache

    def __post_init__(self) -> None:
        self.threads = self.threads or os.cpu_count() or 1

    @property
    def backend(self) -> str:
        return "cuda" if self.gpu else "cpu"

    def command(self) -> str:
        """The full command line that reproduces this bench, every default spelled out."""
        parts = ["qgguf", "bench", self.model.arg, "--text", self.text.arg, "--calib", self.calib.arg,
                 "--ctx", str(self.ctx),
                 "--chunks", str(self.chunks), "--imatrix-chunks", str(self.imatrix_chunks),
                 "--calib-tokens", str(self.calib_tokens),
                 "--presets", *self.presets,
                 "--targets", *(["auto"] if self.targets is None else [f"{t:g}" for t in self.targets]),
                 *(["--sizes", *self.sizes] if self.sizes is not None else []),
                 "--palettes", *self.palettes]
        if self.plain_rows:
            parts.append("--plain-rows")
        if not self.qgguf_rows:
            parts.append("--no-qgguf")
        if self.gpu:
            parts.append("--gpu")
        if self.stats:
            parts += ["--stats", str(self.stats)]
        for a in self.convert_args:
            parts += ["--convert-arg", a]
        parts += ["-t", str(self.threads), "-o", str(self.out)]
        return shlex.join(parts)


# --------------------------------------------------------------------------------------------------- tools


TOOL_TIME = {"wall": 0.0, "cpu": 0.0}  # totals over every tool run of this process (for the timing report)
LAST_RUN: dict[str, float] = {}  # the last tool run: wall and CPU seconds, peak resident memory (MiB)


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run_tool(cmd: list[str], log: Path, desc: str, *, total: int | None = None,
             progress: Callable[[str], int] | None = None, timeout: float | None = None) -> str:
    """Run a built tool; return its stderr then stdout as text. The whole output goes to `log`.

    Progress comes from its stdout (`progress(text so far)` → units done). A failure raises QggufError with the
    last lines; Ctrl-C or a timeout stops the tool first.
    """
    t0 = time.monotonic()
    cpu0 = _children_cpu()
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen([str(c) for c in cmd], stdout=subprocess.PIPE, stderr=err, env=tool_env())
        out = bytearray()
        try:
            with tqdm(total=total, desc=desc, unit="chunk", disable=None, leave=False, file=sys.stderr) as bar:
                assert proc.stdout is not None
                fd = proc.stdout.fileno()
                while True:
                    ready, _, _ = select.select([fd], [], [], 1.0)
                    if ready:
                        data = os.read(fd, 1 << 16)
                        if not data:
                            break
                        out += data
                        if progress is not None:
                            bar.n = min(progress(out.decode("utf-8", "replace")), total or 1 << 30)
                            bar.refresh()
                    if timeout is not None and time.monotonic() - t0 > timeout:
                        raise QggufError(f"{desc} ran longer than {timeout:.0f} s and was stopped; raise --timeout "
                                         "or lower --chunks")
            # wait4 rather than wait: the tool's own rusage gives its peak resident memory (KiB on Linux)
            _, status, usage = os.wait4(proc.pid, 0)
            rc = proc.returncode = os.waitstatus_to_exitcode(status)
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        err.seek(0)
        text = err.read().decode("utf-8", "replace") + "\n" + out.decode("utf-8", "replace")
    TOOL_TIME["wall"] += time.monotonic() - t0
    TOOL_TIME["cpu"] += _children_cpu() - cpu0
    LAST_RUN.update(wall_s=round(time.monotonic() - t0, 1), cpu_s=round(usage.ru_utime + usage.ru_stime, 1),
                    peak_rss_mib=round(usage.ru_maxrss / 1024.0, 1))
    with atomic_output(log) as tmp:
        tmp.write_text("$ " + shlex.join(str(c) for c in cmd) + "\n" + text)
    if rc != 0:
        tail = "\n".join(text.strip().splitlines()[-12:])
        raise QggufError(f"{desc} failed (exit {rc}); the last lines of {log}:\n{tail}")
    return text


def _last_index(pattern: re.Pattern) -> Callable[[str], int]:
    def count(text: str) -> int:
        found = pattern.findall(text)
        return int(found[-1]) if found else 0
    return count


_PPL_PROGRESS = _last_index(re.compile(r"\[(\d+)\]-?\d"))


def _kld_progress(text: str) -> int:
    rows = kld_chunk_rows(text)
    return rows[-1][0] if rows else 0


@dataclass
class Tools:
    """The built tools of one backend, and the flags every run of them shares."""

    cuda: bool
    threads: int

    def __post_init__(self) -> None:
        # One build for the whole bench (a clear error now rather than at the first row), even if cpp_ext/
        # changes while it runs.
        self._paths = {name: tool_path(name, cuda=self.cuda)
                       for name in ("llama-perplexity", "llama-imatrix", "llama-quantize", "llama-bench")}

    def path(self, name: str) -> Path:
        return self._paths[name]

    @property
    def common(self) -> list[str]:
        return ["-t", str(self.threads)] + (["-ngl", "999"] if self.cuda else [])


# --------------------------------------------------------------------------------------------------- reference


@dataclass
class Reference:
    f32: Path
    logits: Path
    base: dict  # PPL of the F32 model over the text, chunks, tokens, seconds
    imatrix: Path | None
    imatrix_key: str | None


STEP_TIME: dict[str, dict[str, float]] = {}  # one-off steps made by this run: wall and CPU seconds


@contextlib.contextmanager
def timed(step: str) -> Iterator[None]:
    """Record the wall and child-process CPU seconds of a one-off step (reported in results.json)."""
    t0, c0 = time.time(), _children_cpu()
    yield
    STEP_TIME[step] = {"wall_s": round(time.time() - t0, 1), "cpu_s": round(_children_cpu() - c0, 1)}


def reference(cfg: BenchConfig, tools: Tools, logs: Path) -> Reference:
    """The F32 GGUF, its logits over the text and the imatrix: made once, cached by what determines them."""
    from .hfconvert import convert_hf

    folder = (cfg.cache or cache_dir("bench")) / cfg.model.key
    folder.mkdir(parents=True, exist_ok=True)
    f32 = folder / f"f32-{LLAMA_CPP_COMMIT}.gguf"
    if not f32.is_file():
        print(f"qgguf: converting {cfg.model.name} to F32 with llama.cpp's converter -> {f32}", file=sys.stderr)
        with timed("convert_f32"):
            convert_hf(cfg.model.path, f32, "f32")

    stem = f"logits-{cfg.text.key}-c{cfg.ctx}-n{cfg.chunks}-{cfg.backend}"
    logits, meta = folder / f"{stem}.kld", folder / f"{stem}.json"
    if not (logits.is_file() and meta.is_file()):
        t0, c0 = time.time(), TOOL_TIME["cpu"]
        with timed("f32_logits"), atomic_output(logits) as tmp:
            text = run_tool([tools.path("llama-perplexity"), "-m", f32, "-f", cfg.text.path, "-c", cfg.ctx,
                             "--chunks", cfg.chunks, "--kl-divergence-base", tmp, *tools.common],
                            logs / "f32.logits.log", "F32 logits", total=cfg.chunks, progress=_PPL_PROGRESS,
                            timeout=cfg.timeout)
        m = re.search(r"calculating perplexity over (\d+) chunks, n_ctx=(\d+)", text)
        ppl = re.search(r"Final estimate: PPL = ([\d.]+) \+/- ([\d.]+)", text)  # may be lost at exit: optional
        base = {"chunks": int(m.group(1)) if m else None, "ctx": cfg.ctx,
                "ppl": float(ppl.group(1)) if ppl else None, "ppl_err": float(ppl.group(2)) if ppl else None,
                "seconds": round(time.time() - t0, 1), "cpu_seconds": round(TOOL_TIME["cpu"] - c0, 1),
                "text": cfg.text.name, "text_sha256": cfg.text.digest}
        if base["chunks"] is not None and base["chunks"] < cfg.chunks:
            print(f"qgguf: the text has only {base['chunks']} chunks of {cfg.ctx} tokens (asked {cfg.chunks})",
                  file=sys.stderr)
        with atomic_output(meta) as tmp:
            tmp.write_text(json.dumps(base, indent=1) + "\n")
    base = json.loads(meta.read_text())

    imatrix = key = None
    if cfg.presets:
        key = f"{cfg.calib.key}-c{cfg.ctx}-n{cfg.imatrix_chunks}-{cfg.backend}"
        imatrix = folder / f"imatrix-{key}.gguf"
        if not imatrix.is_file():
            with timed("imatrix"), atomic_output(imatrix) as tmp:
                run_tool([tools.path("llama-imatrix"), "-m", f32, "-f", cfg.calib.path, "-c", cfg.ctx,
                          "--chunks", cfg.imatrix_chunks, "-o", tmp, "--output-format", "gguf", *tools.common],
                         logs / "imatrix.log", "imatrix", total=cfg.imatrix_chunks, progress=_PPL_PROGRESS,
                         timeout=cfg.timeout)
    return Reference(f32, logits, base, imatrix, key)


# --------------------------------------------------------------------------------------------------- files


def gguf_sizes(path: Path) -> dict:
    """Bytes and bits per weight of a GGUF: llama.cpp's BPW (tensor bits / tensor elements) and the whole file's."""
    import gguf

    reader = gguf.GGUFReader(path)
    tensor_bytes = sum(int(t.n_bytes) for t in reader.tensors)
    elements = sum(int(t.n_elements) for t in reader.tensors)
    counts: dict[str, int] = {}
    for t in reader.tensors:
        name = t.tensor_type.name
        counts[name] = counts.get(name, 0) + 1
    file_bytes = path.stat().st_size
    return {"file_bytes": file_bytes, "tensor_bytes": tensor_bytes, "elements": elements,
            "bpw": 8.0 * tensor_bytes / elements, "bpw_file": 8.0 * file_bytes / elements,
            "tensor_types": dict(sorted(counts.items()))}


def measure(gguf_path: Path, ref: Reference, cfg: BenchConfig, tools: Tools, logs: Path, row_id: str) -> dict:
    """KLD statistics against the reference logits (and speeds with --gpu) of one GGUF."""
    result = gguf_sizes(gguf_path)
    text = ""
    log = logs / f"{row_id}.kld.log"
    for attempt in range(1, cfg.attempts + 1):
        text = run_tool([tools.path("llama-perplexity"), "-m", gguf_path, "--kl-divergence-base", ref.logits,
                         "--kl-divergence", "-c", cfg.ctx, "-lv", "4", *tools.common],
                        log, f"{row_id}: KLD", total=ref.base.get("chunks") or cfg.chunks,
                        progress=_kld_progress, timeout=cfg.timeout)
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
        bench_out = run_tool([tools.path("llama-bench"), "-m", gguf_path, "-p", "512", "-n", "128", "-r", "3",
                              "-o", "json", *tools.common], logs / f"{row_id}.speed.log", f"{row_id}: speed",
                             timeout=cfg.timeout)
        result["speed"] = {s.test: {"tokens_per_s": s.tokens_per_s, "std": s.tokens_per_s_std,
                                    "backends": s.backends} for s in parse_llama_bench_json(bench_out)}
    return result


# --------------------------------------------------------------------------------------------------- rows


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
    t0, c0 = time.time(), TOOL_TIME["cpu"]
    try:
        facts = row.make(gguf_path)
        t1, c1 = time.time(), TOOL_TIME["cpu"]
        result = measure(gguf_path, ref, cfg, tools, logs, row.id)
        t2, c2 = time.time(), TOOL_TIME["cpu"]
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
                    text = run_tool(args + [ref.f32, tmp, preset, cfg.threads], cfg.out / "logs" /
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


def calibration_stats(cfg: BenchConfig, help_text: str | None) -> Path | None:
    """qgguf's calibration statistics for every qgguf row: --stats if given, else `qgguf calibrate` run once
    on the calibration text (cached like the reference). None when convert takes no --stats (it calibrates)."""
    if cfg.stats is not None or not help_text or "--stats" not in help_text:
        return cfg.stats
    folder = (cfg.cache or cache_dir("bench")) / cfg.model.key
    stats = folder / f"stats-{cfg.calib.key}-t{cfg.calib_tokens}-{cfg.backend}.safetensors"
    if not stats.is_file():
        cmd = [sys.executable, "-m", "qgguf", "calibrate", str(cfg.model.path), "-o", str(stats), "--text",
               str(cfg.calib.path), "--tokens", str(cfg.calib_tokens), "--threads", str(cfg.threads),
               "--device", "cuda" if cfg.gpu else "cpu"]
        with timed("calibrate"):
            run_tool(cmd, cfg.out / "logs" / "calibrate.log", "qgguf calibrate", timeout=cfg.timeout)
        if not stats.is_file():
            raise QggufError(f"qgguf calibrate finished but wrote no {stats}; see {cfg.out / 'logs' / 'calibrate.log'}")
    return stats


def extended_palette_exists() -> bool:
    from . import formats

    return any(not getattr(f, "stock", True) for f in formats.all_formats())


def auto_targets(stock_done: dict[str, dict]) -> tuple[float, ...]:
    """Half a bit below the smallest and above the largest finished preset (llama.cpp bpw), to 0.25."""
    bpws = [r["bpw"] for r in stock_done.values()]
    if not bpws:
        return ()
    lo, hi = min(bpws) - AUTO_TARGET_MARGIN, max(bpws) + AUTO_TARGET_MARGIN
    return tuple(t for t in (math.floor(lo * 4) / 4, math.ceil(hi * 4) / 4) if 0 < t <= 32)


def qgguf_rows(cfg: BenchConfig, stock_done: dict[str, dict], common: dict, help_text: str | None,
               why_not: str, stats: Path | None = None) -> list[Row]:
    """`qgguf convert` at each preset's file size and at each bpw target, per palette."""
    rows = []
    targets = cfg.targets if cfg.targets is not None else auto_targets(stock_done)
    stats_digest = sha256_file(stats) if stats else None
    for palette in cfg.palettes:
        series = f"qgguf ({palette} palette)"
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
            rid = f"qgguf-{palette}-{part}"
            spec = {**common, "kind": "qgguf", "palette": palette, "budget": flag.removeprefix("--"),
                    "value": value, "stats": stats_digest,
                    "convert_args": list(cfg.convert_args), "qgguf": __version__}
            row_skip = skip or ("" if not math.isnan(value) else
                                f"the stock {part.removeprefix('size-')} row did not finish, so its size is unknown")

            def make(out: Path, flag=flag, value=value, palette=palette, rid=rid) -> dict:
                target = str(int(value)) if flag == "--target-size" else f"{value:g}"
                cmd = [sys.executable, "-m", "qgguf", "convert", str(cfg.model.path), "-o", str(out), flag, target,
                       "--palette", palette]
                if stats:
                    cmd += ["--stats", str(stats)]
                if help_text and "--threads" in help_text:
                    cmd += ["--threads", str(cfg.threads)]
                if help_text and "--device" in help_text:
                    cmd += ["--device", "cuda" if cfg.gpu else "cpu"]
                if help_text and "--encode-cache" in help_text:  # rows share most (tensor, type) encodings
                    cmd += ["--encode-cache", str(cfg.out / ENCODE_CACHE)]
                cmd += list(cfg.convert_args)
                run_tool(cmd, cfg.out / "logs" / f"{rid}.convert.log", f"{rid}: qgguf convert",
                         timeout=cfg.timeout)
                facts: dict = {"target": {"flag": flag, "value": value}, "convert_run": dict(LAST_RUN)}
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


# --------------------------------------------------------------------------------------------------- report


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
        "machine": machine_description(cfg.gpu), "date": time.strftime("%Y-%m-%d"),
        "model": {"name": cfg.model.name, "path": str(cfg.model.path), "sha256": cfg.model.digest},
        "text": {"name": cfg.text.name, "sha256": cfg.text.digest},
        "calibration": {"name": cfg.calib.name, "sha256": cfg.calib.digest, "imatrix_chunks": cfg.imatrix_chunks},
        "backend": cfg.backend, "ctx": cfg.ctx, "chunks": base.get("chunks") or cfg.chunks, "scored_tokens": tokens,
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


# --------------------------------------------------------------------------------------------------- driver


def run_bench(cfg: BenchConfig) -> dict:
    """Run (or resume) the whole bench; returns the results dict also written to cfg.out/results.json."""
    t_start = time.time()
    cfg.out.mkdir(parents=True, exist_ok=True)
    for sub in ("rows", "logs"):
        (cfg.out / sub).mkdir(exist_ok=True)
    tools = Tools(cuda=cfg.gpu, threads=cfg.threads)
    ref = reference(cfg, tools, cfg.out / "logs")
    common = {"model": cfg.model.digest, "text": cfg.text.digest, "ctx": cfg.ctx, "chunks": cfg.chunks,
              "backend": cfg.backend, "llama_cpp": LLAMA_CPP_COMMIT}
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
        stats = None
        if help_text is not None:
            try:
                stats = calibration_stats(cfg, help_text)
            except QggufError as e:
                help_text, why_not = None, f"qgguf calibrate failed: {str(e).splitlines()[0]}"
                failed.append({"id": "calibrate", "error": str(e)})
        run_all(qgguf_rows(cfg, by_preset, common, help_text, why_not, stats), "qgguf")
        if not failed:  # kept while rows are left to resume; the finished files are all that is needed now
            shutil.rmtree(cfg.out / ENCODE_CACHE, ignore_errors=True)
    timing = {"this_run_wall_s": round(time.time() - t_start, 1),
              "this_run_tool_cpu_s": round(TOOL_TIME["cpu"], 1),
              "rows_wall_s": round(sum(sum(r["seconds"].values()) for r in records), 1),
              "rows_cpu_s": round(sum(sum(r.get("cpu_seconds", {}).values()) for r in records), 1),
              "steps_this_run": dict(STEP_TIME)}
    results = write_report(cfg, ref, records, skipped, failed, gguf_sizes(ref.f32), timing)
    if cfg.docs is not None:
        update_docs(results, cfg.out / "pareto.png", cfg.docs)
    return results


# --------------------------------------------------------------------------------------------------- CLI


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="measure qgguf against stock llama-quantize presets (KLD, PPL, bpw, speed)")
    p.add_argument("model", help="Hugging Face model folder, or a model asset name (e.g. smollm2-135m)")
    p.add_argument("-o", "--out", type=Path, required=True, help="output folder (rows, logs, results, plot)")
    p.add_argument("--text", default=DEFAULT_TEXT, help=f"evaluation text file or asset (default {DEFAULT_TEXT})")
    p.add_argument("--calib", default=DEFAULT_CALIB,
                   help=f"calibration text for the imatrix, file or asset (default {DEFAULT_CALIB})")
    p.add_argument("--ctx", type=int, default=512, help="tokens per chunk (default 512)")
    p.add_argument("--chunks", type=int, default=DEFAULT_CHUNKS,
                   help=f"chunks of the text to score (default {DEFAULT_CHUNKS})")
    p.add_argument("--imatrix-chunks", type=int, default=DEFAULT_IMATRIX_CHUNKS,
                   help=f"chunks of the calibration text for the imatrix (default {DEFAULT_IMATRIX_CHUNKS})")
    p.add_argument("--calib-tokens", type=int, default=DEFAULT_CALIB_TOKENS,
                   help=f"tokens of the calibration text for qgguf calibrate (default {DEFAULT_CALIB_TOKENS})")
    p.add_argument("--presets", nargs="+", default=list(PRESETS), metavar="TYPE",
                   help="llama-quantize presets (default: " + " ".join(PRESETS) + ")")
    p.add_argument("--targets", nargs="*", default=["auto"], metavar="BPW",
                   help=f"bpw targets of the qgguf sweep, besides the preset sizes (default auto: "
                   f"{AUTO_TARGET_MARGIN:g} bpw below the smallest preset and above the largest; none: no sweep)")
    p.add_argument("--sizes", nargs="*", default=None, metavar="TYPE",
                   help="presets whose exact file size qgguf is matched at (default: every preset)")
    p.add_argument("--palettes", nargs="+", default=list(PALETTES), choices=PALETTES,
                   help="qgguf palettes (default: both; extended is skipped while it does not exist)")
    p.add_argument("--plain-rows", action="store_true", help="also quantise each preset without the imatrix")
    p.add_argument("--no-qgguf", dest="qgguf_rows", action="store_false", help="stock rows only")
    p.add_argument("--gpu", action="store_true", help="run on the CUDA build (-ngl 999) and measure pp512/tg128")
    p.add_argument("-t", "--threads", type=int, default=0, help="CPU threads (default: all cores)")
    p.add_argument("--stats", type=Path, default=None,
                   help="calibration statistics for qgguf convert (default: `qgguf calibrate` on --calib, cached)")
    p.add_argument("--convert-arg", dest="convert_args", action="append", default=[], metavar="ARG",
                   help="extra argument for qgguf convert (repeat for several)")
    p.add_argument("--redo", action="append", default=[], metavar="GLOB",
                   help="re-measure rows whose id matches (e.g. 'qgguf-*'); others are reused")
    p.add_argument("--keep-gguf", action="store_true", help="keep the quantised files in OUT/gguf/")
    p.add_argument("--timeout", type=float, default=None, help="seconds one tool run may take")
    p.add_argument("--attempts", type=int, default=KLD_ATTEMPTS,
                   help=f"runs of llama-perplexity per file when its output is cut short (default {KLD_ATTEMPTS})")
    p.add_argument("--update-docs", action="store_true", help="write the table and plot into docs/benchmarks.md")
    p.add_argument("--docs", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--cache", type=Path, default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=_cmd)


def quantize_types(cuda: bool) -> set[str]:
    """The type names the built llama-quantize accepts (from its --help list)."""
    res = subprocess.run([str(tool_path("llama-quantize", cuda=cuda)), "--help"], capture_output=True, text=True)
    return set(re.findall(r"^\s+\d+\s+or\s+(\w+)\s+:", res.stdout + res.stderr, re.M))


def config_from_args(args) -> BenchConfig:
    for name, v, lo in (("--ctx", args.ctx, 16), ("--chunks", args.chunks, 1),
                        ("--imatrix-chunks", args.imatrix_chunks, 1)):
        if v < lo:
            raise QggufError(f"{name} {v} is too small; give at least {lo}")
    if args.ctx % 2:
        raise QggufError(f"--ctx {args.ctx} is odd; give an even context length such as 512")
    presets = tuple(dict.fromkeys(p.upper() for p in args.presets))
    sizes = None if args.sizes is None else tuple(dict.fromkeys(p.upper() for p in args.sizes))
    if sizes and set(sizes) - set(presets):
        raise QggufError(f"--sizes {' '.join(sorted(set(sizes) - set(presets)))}: not among --presets; a size is "
                         "matched only for a preset the bench measures")
    allowed = quantize_types(args.gpu)
    unknown = [p for p in presets if p not in allowed]
    if unknown:
        raise QggufError(f"--presets {' '.join(unknown)}: not a llama-quantize type; choose from "
                         f"{' '.join(sorted(allowed))}")
    targets: tuple[float, ...] | None = None
    if args.targets != ["auto"]:
        try:
            values = [float(t) for t in args.targets]
        except ValueError:
            raise QggufError(f"--targets {' '.join(args.targets)}: give bpw numbers such as 4.5, or auto") from None
        bad = [t for t in values if not 0 < t <= 32]
        if bad:
            raise QggufError(f"--targets {' '.join(map(str, bad))}: bpw targets must be between 0 and 32")
        targets = tuple(sorted(set(values)))
    if args.stats is not None:
        require_file(args.stats, "--stats file", "give the statistics file written by `qgguf calibrate`")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise QggufError(f"-o {str(out)!r} is a file; give a folder for the bench results")
    docs = args.docs if args.docs is not None else (repo_root() / "docs" / "benchmarks.md"
                                                    if args.update_docs else None)
    model = resolve_model(args.model)
    if out.resolve() == model.path.resolve() or model.path.resolve() in out.resolve().parents:
        raise QggufError(f"-o {str(out)!r} is inside the model folder; give a folder outside it")
    return BenchConfig(
        model=model, text=resolve_text(args.text, "--text"), calib=resolve_text(args.calib, "--calib"),
        out=out, ctx=args.ctx, chunks=args.chunks, imatrix_chunks=args.imatrix_chunks,
        calib_tokens=args.calib_tokens,
        presets=presets,
        targets=targets, sizes=sizes, palettes=tuple(dict.fromkeys(args.palettes)),
        plain_rows=args.plain_rows, qgguf_rows=args.qgguf_rows, gpu=args.gpu, threads=args.threads,
        stats=args.stats, convert_args=tuple(args.convert_args), redo=tuple(args.redo), keep_gguf=args.keep_gguf,
        timeout=args.timeout, docs=docs, cache=args.cache, attempts=max(1, args.attempts))


def _cmd(args) -> int:
    cfg = config_from_args(args)
    results = run_bench(cfg)
    results["out"] = str(cfg.out)
    print_summary(results)
    return 1 if results["failed"] else 0
