"""What one bench measures: its inputs (model, texts), presets, targets and settings, and the command line
that reproduces it."""

from __future__ import annotations

import os
import platform
import re
import shlex
import subprocess
from dataclasses import dataclass
from pathlib import Path

from qgguf.calibrate.covariance import DEFAULT_WEIGHTING
from qgguf.calibrate.runner import DEFAULT_TOKENS
from qgguf.errors import QggufError
from qgguf.files import cache_dir, require_file
from qgguf.hashing import sha256_file
from qgguf.llamacpp.build import repo_root, tool_path
from qgguf.models import check_model_dir, model_sha256, resolve_model
from qgguf.plan.rules import PALETTES

PRESETS = ("Q2_K", "Q3_K_S", "Q3_K_M", "Q4_K_S", "Q4_K_M", "IQ4_XS", "Q5_K_S", "Q5_K_M", "Q6_K", "Q8_0")


# The bpw sweep of the qgguf curves beyond the size-matched rows: by default ("auto") one target half a bit below
# the smallest preset and one half a bit above the largest, so each curve spans every preset's KLD and the saving
# can be read off for all of them (the size-matched rows already fill the range between).
AUTO_TARGET_MARGIN = 0.5


DEFAULT_CHUNKS = 20   # × 512 tokens of the text; SmolLM2 Q4_K_M: mean KLD ± 1.7 % (docs/benchmarks.md)


DEFAULT_IMATRIX_CHUNKS = 100


DEFAULT_TEXT = "austen"   # held out: neither the imatrix nor qgguf's calibration sees it


DEFAULT_CALIB = "wiki"


KLD_ATTEMPTS = 5          # llama-perplexity's asynchronous log can lose its last lines at exit: run it again


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
    """The assets registry entry `name`, or None."""
    from qgguf.assets.fetch import ASSETS

    return ASSETS.get(name)


def model_source(arg: str) -> Source:
    """The model as a bench input: its folder (qgguf.models.resolve_model), a report name and its content hash."""
    path = resolve_model(arg)
    check_model_dir(path)
    name = arg if _asset(arg) is not None and not Path(arg).exists() else path.name
    try:  # a folder of the assets cache: name it as the asset
        rel = path.resolve().relative_to(cache_dir("assets").resolve())
        name = rel.parts[0] if _asset(rel.parts[0]) is not None else name
    except ValueError:
        pass
    asset = _asset(name)
    if asset is not None and "de-gridded" in asset.description:
        name += " (de-gridded)"
    return Source(path, name, model_sha256(path), arg)


def resolve_text(arg: str, what: str) -> Source:
    """A text file, or the name of a text asset."""
    path = Path(arg)
    name = path.name
    if not path.is_file():
        if path.exists() or _asset(arg) is None:
            raise QggufError(f"{what} {arg!r} is neither a text file nor a known text asset; give a UTF-8 text "
                             "file, or an asset name such as austen or wiki (fetch it with `qgguf fetch`)")
        from qgguf.assets.fetch import asset_path

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


@dataclass
class BenchConfig:
    model: Source
    text: Source
    calib: Source
    out: Path
    ctx: int = 512
    chunks: int = DEFAULT_CHUNKS
    imatrix_chunks: int = DEFAULT_IMATRIX_CHUNKS
    calib_tokens: int = DEFAULT_TOKENS
    presets: tuple[str, ...] = PRESETS
    targets: tuple[float, ...] | None = None  # None: auto (see AUTO_TARGET_MARGIN)
    sizes: tuple[str, ...] | None = None      # presets whose file size qgguf is matched at; None: all
    palettes: tuple[str, ...] = PALETTES
    roundings: tuple[str, ...] = ("plain",)  # qgguf convert --rounding, one series each
    covariance_weight: str = DEFAULT_WEIGHTING  # qgguf calibrate --covariance-weight (non-plain roundings)
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
        if self.roundings != ("plain",):
            parts += ["--rounding", *self.roundings]
            if self.covariance_weight != DEFAULT_WEIGHTING:
                parts += ["--covariance-weight", self.covariance_weight]
        if self.plain_rows:
            parts.append("--plain-rows")
        if not self.qgguf_rows:
            parts.append("--no-qgguf")
        if self.gpu:
            parts.append("--gpu")
        if self.stats:
            parts += ["--stats", str(self.stats)]
        # `--convert-arg=ARG`: argparse reads a separate `--max-rows` as an option of its own
        parts += [f"--convert-arg={a}" for a in self.convert_args]
        parts += ["-t", str(self.threads), "-o", str(self.out)]
        return shlex.join(parts)


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
        fb = [r for r in getattr(args, "roundings", None) or [] if r != "plain"]
        if fb:
            raise QggufError(f"--rounding {fb[0]} needs the input covariance, which --stats does not carry; drop "
                             "--stats (the bench calibrates both) or keep --rounding plain")
    weight = getattr(args, "covariance_weight", DEFAULT_WEIGHTING)
    if weight != DEFAULT_WEIGHTING and all(r == "plain" for r in getattr(args, "roundings", None) or ["plain"]):
        raise QggufError(f"--covariance-weight {weight} weighs the input covariance of a non-plain --rounding: add "
                         "--rounding feedback-on-plain (or feedback, auto), or drop it")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise QggufError(f"-o {str(out)!r} is a file; give a folder for the bench results")
    docs = args.docs if args.docs is not None else (repo_root() / "docs" / "benchmarks.md"
                                                    if args.update_docs else None)
    model = model_source(args.model)
    if out.resolve() == model.path.resolve() or model.path.resolve() in out.resolve().parents:
        raise QggufError(f"-o {str(out)!r} is inside the model folder; give a folder outside it")
    return BenchConfig(
        model=model, text=resolve_text(args.text, "--text"), calib=resolve_text(args.calib, "--calib"),
        out=out, ctx=args.ctx, chunks=args.chunks, imatrix_chunks=args.imatrix_chunks,
        calib_tokens=args.calib_tokens,
        presets=presets,
        targets=targets, sizes=sizes, palettes=tuple(dict.fromkeys(args.palettes)),
        roundings=tuple(dict.fromkeys(getattr(args, "roundings", None) or ["plain"])),
        covariance_weight=weight,
        plain_rows=args.plain_rows, qgguf_rows=args.qgguf_rows, gpu=args.gpu, threads=args.threads,
        stats=args.stats, convert_args=tuple(args.convert_args), redo=tuple(args.redo), keep_gguf=args.keep_gguf,
        timeout=args.timeout, docs=docs, cache=args.cache, attempts=max(1, args.attempts))
