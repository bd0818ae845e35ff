"""Parsers for what the built llama.cpp tools print: numbers in, dataclasses out.

Each parser takes the tool's whole output (stdout and stderr joined; the order does not matter) and searches for
the lines it needs anywhere in it, so log prefixes, colours and interleaving do not break it. A block that is
missing or cut short raises ToolOutputIncomplete naming what was not found: the tools log through an
asynchronous logger whose last lines can be lost when the process exits, and the caller decides to run again.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field

from qgguf.errors import QggufError

_NUM = r"([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?|[-+]?nan|[-+]?inf)"
_PM = r"\s*±\s*"
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


class ToolOutputIncomplete(QggufError):
    """The tool's output lacks lines a parser needs (cut short, or a different tool version)."""

    def __init__(self, tool: str, missing: list[str]):
        self.missing = missing
        super().__init__(f"{tool} output lacks {', '.join(missing)}; its output was cut short or this llama.cpp "
                         "prints a different format (see the log kept beside the results)")


def _clean(text: str) -> str:
    return _ANSI.sub("", text)


def _float(s: str) -> float:
    return float(s)


def _find(pattern: str, text: str) -> re.Match | None:
    """The last match: when a tool prints a running estimate, the final value comes last."""
    last = None
    for m in re.finditer(pattern, text, re.M):
        last = m
    return last


# ------------------------------------------------------------------------------------------- llama-perplexity
@dataclass
class Perplexity:
    """`Final estimate: PPL = X +/- Y` of a plain perplexity (or imatrix) run."""

    ppl: float
    ppl_err: float
    chunks: int | None = None


def parse_perplexity(text: str, tool: str = "llama-perplexity") -> Perplexity:
    text = _clean(text)
    m = _find(rf"Final estimate: PPL = {_NUM} \+/- {_NUM}", text)
    if m is None:
        raise ToolOutputIncomplete(tool, ["'Final estimate: PPL'"])
    chunks = _find(r"(?:calculating perplexity|computing) over (\d+) chunks", text)
    return Perplexity(_float(m.group(1)), _float(m.group(2)), int(chunks.group(1)) if chunks else None)


@dataclass
class KLDivergence:
    """The statistics block of `llama-perplexity --kl-divergence` (percentages as printed, in %)."""

    ppl: float
    ppl_err: float
    ppl_base: float
    ppl_base_err: float
    ln_ppl_ratio: float
    ln_ppl_ratio_err: float
    ppl_ratio: float
    ppl_ratio_err: float
    kld_mean: float
    kld_mean_err: float
    kld_max: float
    kld_p999: float
    kld_p99: float
    kld_p95: float
    kld_p90: float
    kld_median: float
    same_top_p: float
    same_top_p_err: float
    rms_dp: float | None = None
    rms_dp_err: float | None = None
    cor_ln_ppl: float | None = None
    chunks: int | None = None
    tokens_per_chunk: int | None = None

    def to_dict(self) -> dict:
        return asdict(self)


# (field, regex with value groups): one entry per printed line of the block.
_KLD_LINES: tuple[tuple[str, tuple[str, ...], str], ...] = (
    ("Mean PPL(Q)", ("ppl", "ppl_err"), rf"^Mean PPL\(Q\)\s*:\s*{_NUM}{_PM}{_NUM}"),
    ("Mean PPL(base)", ("ppl_base", "ppl_base_err"), rf"^Mean PPL\(base\)\s*:\s*{_NUM}{_PM}{_NUM}"),
    ("Mean ln(PPL(Q)/PPL(base))", ("ln_ppl_ratio", "ln_ppl_ratio_err"),
     rf"^Mean ln\(PPL\(Q\)/PPL\(base\)\)\s*:\s*{_NUM}{_PM}{_NUM}"),
    ("Mean PPL(Q)/PPL(base)", ("ppl_ratio", "ppl_ratio_err"), rf"^Mean PPL\(Q\)/PPL\(base\)\s*:\s*{_NUM}{_PM}{_NUM}"),
    ("Mean KLD", ("kld_mean", "kld_mean_err"), rf"^Mean\s+KLD:\s*{_NUM}{_PM}{_NUM}"),
    ("Maximum KLD", ("kld_max",), rf"^Maximum KLD:\s*{_NUM}"),
    ("99.9% KLD", ("kld_p999",), rf"^99\.9%\s+KLD:\s*{_NUM}"),
    ("99.0% KLD", ("kld_p99",), rf"^99\.0%\s+KLD:\s*{_NUM}"),
    ("95.0% KLD", ("kld_p95",), rf"^95\.0%\s+KLD:\s*{_NUM}"),
    ("90.0% KLD", ("kld_p90",), rf"^90\.0%\s+KLD:\s*{_NUM}"),
    ("Median KLD", ("kld_median",), rf"^Median\s+KLD:\s*{_NUM}"),
    ("Same top p", ("same_top_p", "same_top_p_err"), rf"^Same top p:\s*{_NUM}{_PM}{_NUM}\s*%"),
    ("RMS Δp", ("rms_dp", "rms_dp_err"), rf"^RMS Δp\s*:\s*{_NUM}{_PM}{_NUM}\s*%"),
    ("Cor(ln(PPL(Q)), ln(PPL(base)))", ("cor_ln_ppl",), rf"^Cor\(ln\(PPL\(Q\)\), ln\(PPL\(base\)\)\):\s*{_NUM}%"),
)
_KLD_OPTIONAL = {"rms_dp", "rms_dp_err", "cor_ln_ppl"}

# A row of the per-chunk table: chunk, PPL ± , ln ratio ± , KLD ± , Δp RMS ± %, same top p ± %.
# Its values are running means, so the last row carries the final mean KLD and same-top-p too.
_KLD_CHUNK_ROW = re.compile(
    rf"^\s*(\d+)\s+{_NUM}{_PM}{_NUM}\s+{_NUM}{_PM}{_NUM}\s+{_NUM}{_PM}{_NUM}\s+{_NUM}{_PM}{_NUM}\s*%"
    rf"\s+{_NUM}{_PM}{_NUM}\s*%\s*$", re.M)


def kld_chunk_rows(text: str) -> list[tuple[int, float, float]]:
    """(chunk, running mean KLD, its ±) of each row of the per-chunk table printed so far."""
    return [(int(m.group(1)), _float(m.group(6)), _float(m.group(7))) for m in _KLD_CHUNK_ROW.finditer(_clean(text))]


def parse_kl_divergence(text: str, tool: str = "llama-perplexity --kl-divergence") -> KLDivergence:
    """The final statistics of a --kl-divergence run; ToolOutputIncomplete if any required line is missing."""
    text = _clean(text)
    values: dict[str, float] = {}
    missing: list[str] = []
    for label, names, pattern in _KLD_LINES:
        m = _find(pattern, text)
        if m is None:
            if not set(names) <= _KLD_OPTIONAL:
                missing.append(f"'{label}'")
            continue
        for i, name in enumerate(names):
            values[name] = _float(m.group(i + 1))
    if missing:
        raise ToolOutputIncomplete(tool, missing)
    m = _find(r"kl_divergence: computing over (\d+) chunks, n_ctx=(\d+)", text)
    if m:
        values["chunks"] = int(m.group(1))
        n_ctx = int(m.group(2))
        values["tokens_per_chunk"] = n_ctx - 1 - n_ctx // 2  # scored: the second half of each chunk, less one
    rows = kld_chunk_rows(text)
    if m and (not rows or rows[-1][0] != values["chunks"]):
        # The table comes before the block; a block without its last row would be a mixed-up log.
        raise ToolOutputIncomplete(tool, [f"the per-chunk row {values['chunks']}"])
    return KLDivergence(**values)


# ------------------------------------------------------------------------------------------- model loading
@dataclass
class ModelInfo:
    """What the model loader prints at verbosity ≥ 4 (`-lv 4`): llama.cpp's own size and BPW of the file."""

    file_type: str | None
    size_mib: float
    bpw: float
    tensor_types: dict[str, int] = field(default_factory=dict)


def parse_model_info(text: str, tool: str = "llama.cpp model loader") -> ModelInfo:
    text = _clean(text)
    m = _find(rf"print_info: file size\s*=\s*{_NUM} (MiB|GiB) \({_NUM} BPW\)", text)
    if m is None:
        raise ToolOutputIncomplete(tool, ["'print_info: file size' (run the tool with -lv 4)"])
    size = _float(m.group(1)) * (1024.0 if m.group(2) == "GiB" else 1.0)
    ft = _find(r"print_info: file type\s*=\s*(.+?)\s*$", text)
    types = {t.upper(): int(n) for t, n in re.findall(r"llama_model_loader: - type\s+(\w+):\s+(\d+) tensors", text)}
    return ModelInfo(ft.group(1) if ft else None, size, _float(m.group(3)), types)


# ------------------------------------------------------------------------------------------- llama-quantize
@dataclass
class QuantizeReport:
    """llama-quantize's closing lines: sizes in MiB and BPW over all tensors, before and after."""

    model_mib: float
    model_bpw: float
    quant_mib: float
    quant_bpw: float
    tensor_types: dict[str, int] = field(default_factory=dict)  # how many tensors it wrote in each type


def parse_quantize(text: str, tool: str = "llama-quantize") -> QuantizeReport:
    text = _clean(text)
    model = _find(rf"model size\s*=\s*{_NUM} MiB \({_NUM} BPW\)", text)
    quant = _find(rf"quant size\s*=\s*{_NUM} MiB \({_NUM} BPW\)", text)
    missing = [n for n, m in (("'model size'", model), ("'quant size'", quant)) if m is None]
    if missing:
        raise ToolOutputIncomplete(tool, missing)
    counts: dict[str, int] = {}
    # One segment per tensor, from its "[ i/ n] name" line to the next; warnings may split it over lines.
    # A quantised tensor says "converting to TYPE"; one kept as it is only has "type = TYPE,".
    starts = [m.start() for m in re.finditer(r"^\[\s*\d+/\s*\d+\]", text, re.M)]
    for a, b in zip(starts, starts[1:] + [model.start()]):
        seg = text[a:b]
        m = re.search(r"converting to (\w+)", seg) or re.search(r"type =\s*(\w+),", seg)
        if m:
            t = m.group(1).upper()
            counts[t] = counts.get(t, 0) + 1
    return QuantizeReport(_float(model.group(1)), _float(model.group(2)), _float(quant.group(1)),
                          _float(quant.group(2)), counts)


# ------------------------------------------------------------------------------------------- llama-bench
@dataclass
class Speed:
    """One llama-bench test: tokens per second (mean ± standard deviation over its repetitions)."""

    test: str  # "pp512", "tg128"
    tokens_per_s: float
    tokens_per_s_std: float
    backends: str
    n_gpu_layers: int
    repetitions: int


def parse_llama_bench_json(text: str, tool: str = "llama-bench -o json") -> list[Speed]:
    """The tests of a `llama-bench -o json` run (its stdout: a JSON array of test records)."""
    start, end = text.find("["), text.rfind("]")
    if start < 0 or end < start:
        raise ToolOutputIncomplete(tool, ["the JSON array of results"])
    try:
        records = json.loads(text[start:end + 1])
    except json.JSONDecodeError as e:
        raise ToolOutputIncomplete(tool, [f"valid JSON ({e})"]) from None
    out = []
    for r in records:
        n_p, n_g = int(r.get("n_prompt", 0)), int(r.get("n_gen", 0))
        name = f"pp{n_p}" if n_g == 0 else f"tg{n_g}" if n_p == 0 else f"pp{n_p}+tg{n_g}"
        out.append(Speed(name, float(r["avg_ts"]), float(r.get("stddev_ts", math.nan)), str(r.get("backends", "")),
                         int(r.get("n_gpu_layers", 0)), len(r.get("samples_ts", []))))
    if not out:
        raise ToolOutputIncomplete(tool, ["any test record"])
    return out
