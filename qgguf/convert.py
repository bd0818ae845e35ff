"""`qgguf convert`: the main job. calibrate → measure → plan → export, each step cached.

    qgguf convert MODEL -o OUT.gguf (--target-bpw B | --target-size 1.2GiB) [--palette stock|extended]

MODEL is an HF folder or an asset name (`smollm2-135m`). Caches (under the qgguf cache folder), so an
interrupted run resumes: the converter's GGUF (per model hash; in the source's own float type, so BF16 for a bf16
model and F32 for an F32 one: `converter_gguf`), the calibration statistics (per model hash and calibration
settings), and every (tensor, type) measurement. Beside OUT.gguf it writes OUT.plan.json,
OUT.tensor-types.txt (stock palette: reproduces the plan with stock llama-quantize) and OUT.heatmap.png.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from qgguf import __version__, formats
from qgguf.calibrate.covariance import DEFAULT_WEIGHTING, WEIGHTINGS
from qgguf.formats import engines
from qgguf.devices import resolve_device
from qgguf.errors import QggufError, step
from qgguf.files import atomic_outputs, cache_dir, check_output_path, require_file, seal, sealed, writable_folder
from qgguf.llamacpp.converter import convert_hf
from qgguf.models import check_model_dir, resolve_model, source_float_type
from qgguf.plan.budget import HEADER_SLACK, Budget, FileLayout, parse_size
from qgguf.plan.outputs import summary, write_heatmap, write_plan_json, write_tensor_type_file
from qgguf.plan.planner import Plan, plan
from qgguf.plan.rules import PALETTES, llama_quantizes, palette_types, parse_overrides, read_tensor_type_file
from qgguf.torch_env import compile_cache_dir, compile_is_warm, mark_compile_warm

if TYPE_CHECKING:
    from qgguf.calibrate.covariance import CovarianceStore

# CPU seconds a cold compile of the K-quant encoders takes (docs/benchmarks.md, "First convert": ~80 s a type
# on a loaded 2-core CPU); the message divides it by the cores, as inductor compiles in parallel workers.
COLD_COMPILE_CPU_S = 400.0
# Compiling pays only for large work: eager K-quant encoding runs at ~3 M weights per CPU second, compiled at ~7,
# so a type's ~80 s compile is won back after ~400 M weights. Below this many measured weights per K-quant type
# (SmolLM2: 27 M) convert encodes eagerly, which gives the same bytes (docs/benchmarks.md, "First convert").
COMPILE_MIN_WEIGHTS = 300_000_000


class StageTimes:
    """Wall and CPU seconds of each stage, printed as each ends, and the total at the end."""

    def __init__(self) -> None:
        self.t0 = time.monotonic()
        self.c0 = _cpu_s()
        self.rows: list[tuple[str, float, float]] = []

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Time the stage; it is also the step an unexpected failure inside it is reported against."""
        t, c = time.monotonic(), _cpu_s()
        with step(name):
            yield
        wall, cpu = time.monotonic() - t, _cpu_s() - c
        self.rows.append((name, wall, cpu))
        print(f"qgguf: {name}: {wall:.1f} s (CPU {cpu:.1f} s)", file=sys.stderr)

    def total(self) -> str:
        return (f"total {time.monotonic() - self.t0:.1f} s (CPU {_cpu_s() - self.c0:.1f} s): "
                + ", ".join(f"{n} {w:.1f} s" for n, w, _ in self.rows))


def _cpu_s() -> float:
    """CPU seconds of this process and its finished children (the converter runs as one)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def _kquant_weights(shapes: list[tuple[int, int]], max_rows: int | None) -> int:
    """Weights measure encodes per K-quant type: (rows, row length) of each tensor, rows capped at max_rows."""
    return sum(min(rows, max_rows or rows) * row for rows, row in shapes if row % 256 == 0)


@contextmanager
def _compile_choice(types: list[str], device: str, kquant_weights: int, feedback: bool = False
                    ) -> Iterator[str | None]:
    """Decide whether the K-quant encoders compile for this run (unless QGGUF_COMPILE says); yield the compile
    cache key when they do, None when they run eagerly. `feedback`: error-feedback rounding runs the torch
    kernels whatever the engine."""
    kq = [t for t in types if t.endswith("_K")]
    user = os.environ.get("QGGUF_COMPILE", "").strip().lower()
    # ggml's quantiser encodes on the CPU (formats/engines.py): unless error feedback runs the torch kernels,
    # nothing to compile
    if not kq or user in ("0", "false", "no", "off") or (engines.choose(device).name == "ggml" and not feedback):
        yield None
        return
    key = device.split(":")[0] + ":" + formats.encoder_hash(kq[0])  # one module holds every K-quant encoder
    if user or device.startswith("cuda") or kquant_weights >= COMPILE_MIN_WEIGHTS:
        yield key
        return
    os.environ["QGGUF_COMPILE"] = "0"  # read by qgguf.formats.kquants at each call; eager gives the same bytes
    try:
        yield None
    finally:
        del os.environ["QGGUF_COMPILE"]


def _compiled_anything() -> bool:
    """Whether this process compiled K-quant kernels (a tiny model's small batches run eagerly)."""
    from qgguf.formats import kquants

    return kquants._compiled.cache_info().currsize > 0 and not kquants._compile_broken


def _exact_size(the_plan: Plan, written: int) -> Plan:
    """The plan with the header's real size: what it reports as the file size is the file's."""
    data = the_plan.file_bytes - the_plan.layout.header_bytes
    header = written - data
    if not 0 < header <= the_plan.layout.header_bytes:  # the header was planned with slack, never short
        raise QggufError(f"the written file has {written:,} bytes, the plan {the_plan.file_bytes:,}; this is a bug "
                         "in qgguf's size accounting")
    return dataclasses.replace(the_plan, layout=dataclasses.replace(the_plan.layout, header_bytes=header))


def feedback_on_plain(the_plan: Plan, store: CovarianceStore, ndim: dict[str, int]) -> Plan:
    """The plain plan with feedback rounding on every 2-D tensor that has an input covariance and whose type
    feedback rounding writes (F16/BF16/Q8_0 and embeddings stay plain): its types and predicted ΔKL are plain
    rounding's, an upper estimate (docs/design.md, "Error-feedback rounding")."""
    def how(t) -> str:
        return ("feedback" if ndim.get(t.name) == 2 and store.leader(t.name) is not None
                and formats.get(t.type).feedback else "plain")
    return dataclasses.replace(the_plan, tensors=[dataclasses.replace(t, rounding=how(t)) for t in the_plan.tensors])


def _expert_info(t) -> dict | None:
    """What the plan JSON records about a stacked expert tensor's calibration: tokens routed to each expert and
    the experts whose statistics are the prior."""
    if t.expert_tokens is None:
        return None
    return {"count": int(len(t.expert_tokens)), "tokens": [int(c) for c in t.expert_tokens],
            "prior": [int(e) for e in t.prior_experts]}


def converter_gguf(model_dir: Path, model_hash: str) -> Path:
    """The converter's GGUF of the model, made once per (model content, converter tree and code, type). Its type
    is the source's own (`source_float_type`: BF16 or F16 when every matrix is stored so, else F32), so the file
    holds every weight exactly and is no larger than the source; measure and export upcast one tensor at a time."""
    from qgguf.llamacpp.converter import converter_sha256

    outtype = source_float_type(model_dir)
    key = hashlib.sha256((f"{model_hash}|{converter_sha256()}" + ("" if outtype == "f32" else f"|{outtype}"))
                         .encode()).hexdigest()
    out = cache_dir("convert", key[:16]) / f"model-{outtype}.gguf"
    if not sealed(out, key):
        size = sum(p.stat().st_size for p in Path(model_dir).glob("*.safetensors"))
        print(f"qgguf: converting {model_dir} ({size / 1e9:.3g} GB of safetensors) to a {outtype.upper()} GGUF "
              "with llama.cpp's converter ...", file=sys.stderr)
        convert_hf(model_dir, out, outtype)
        seal(out, key)
    return out


def calibration_key(model_hash: str, text: Path, args) -> str:
    """What a calibration's statistics depend on: the model, the text's content, the settings, the device and
    the calibration code (with the versions of torch and transformers)."""
    from qgguf.calibrate import code_digest
    from qgguf.hashing import sha256_file

    parts = [model_hash, sha256_file(text), f"t{args.tokens}", f"l{args.seq_len}", f"s{args.seed}",
             f"d{resolve_device(args.device).type}", code_digest()]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()


def stats_for(model_dir: Path, model_hash: str, args) -> tuple[Path, Path | None]:
    """The statistics file and, for error-feedback rounding, the covariance folder: --stats (and --covariance),
    else a cached calibration keyed by everything it depends on (the covariance adds its own entry)."""
    from qgguf.calibrate.runner import calibrate
    from qgguf.calibrate.text import default_text_path
    from qgguf.plan.measure import SPLIT_ROUNDINGS

    rounding = getattr(args, "rounding", "plain")
    want_cov = rounding != "plain"
    # feedback and auto plan with feedback rounding's held-out error: their covariance keeps the split
    want_split = rounding in SPLIT_ROUNDINGS
    weight = getattr(args, "covariance_weight", DEFAULT_WEIGHTING)
    if weight != DEFAULT_WEIGHTING and (not want_cov or args.stats):
        raise QggufError(f"--covariance-weight {weight} weighs the input covariance qgguf calibrates for a non-plain "
                         "--rounding without --stats: give --rounding feedback|auto|feedback-on-plain, or drop it")
    if args.stats:
        cov = getattr(args, "covariance", None)
        if want_cov and not cov:
            raise QggufError(f"--rounding {args.rounding} needs the input covariance that goes with --stats: give "
                             "--covariance DIR (from `qgguf calibrate --covariance DIR`), or drop --stats")
        return Path(args.stats), (Path(cov) if want_cov else None)
    text = Path(args.text) if args.text else default_text_path()
    require_file(text, "calibration text", "give a UTF-8 text file with --text, or run `qgguf fetch wiki`")
    key = calibration_key(model_hash, text, args)
    if want_cov:  # the covariance run also keeps the per-row Fisher: its own statistics file
        key = hashlib.sha256(f"{key}|covariance{'|split' if want_split else ''}|{weight}".encode()).hexdigest()
    out = cache_dir("stats", model_hash[:16]) / f"{key[:24]}.safetensors"
    cov_dir = out.with_name(f"{key[:24]}.covariance") if want_cov else None
    if not sealed(out, key) or (cov_dir is not None and not (cov_dir / "index.json").is_file()):
        what = "diagonal Fisher, sampled labels" + (", input covariance" if want_cov else "")
        print(f"qgguf: calibrating on {args.tokens:,} tokens of {text.name} ({what}) ...", file=sys.stderr)
        calibrate(model_dir, out, text=text, tokens=args.tokens, seq_len=args.seq_len, device=args.device,
                  seed=args.seed, grad_checkpoint=args.grad_checkpoint, covariance=cov_dir,
                  covariance_split=want_split, covariance_weight=weight)
        seal(out, key)  # after the covariance folder's index: a sealed entry has both
    return out, cov_dir


# What convert writes beside OUT.gguf, by kind (the bench keeps them with its rows).
SIDE_FILES = {"plan": ".plan.json", "tensor_types": ".tensor-types.txt", "heatmap": ".heatmap.png"}


def run(args) -> int:
    import torch

    from qgguf.calibrate.stats import load_stats
    from qgguf.export.writer import export_gguf, open_gguf, tensor_f32
    from qgguf.models import model_sha256
    from qgguf.plan.measure import SPLIT_ROUNDINGS, TensorInput, measure_tensors

    device = str(resolve_device(args.device))  # before any stage announces itself
    engines.choose(device)  # a bad QGGUF_ENCODER fails here, not after calibrating
    if args.threads:
        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # for llama.cpp's converter, a child process
    model_dir = resolve_model(args.model)
    check_model_dir(model_dir)
    out = check_output_path(Path(args.out), [model_dir] + ([Path(args.stats)] if args.stats else []))
    if out.suffix != ".gguf":
        raise QggufError(f"output {str(out)!r} should end in .gguf (the plan and heat map are written beside it)")
    split = args.budget_gpu is not None or args.budget_cpu is not None
    if split and (args.budget_gpu is None or args.budget_cpu is None):
        raise QggufError("give both --budget-gpu SIZE and --budget-cpu SIZE (the VRAM and the RAM the tensors may "
                         "take), or neither")
    if args.target_bpw is None and args.target_size is None and not split:
        raise QggufError("give a budget: --target-bpw B (e.g. 4.5) or --target-size SIZE (e.g. 1.2GiB), or "
                         "--budget-gpu SIZE --budget-cpu SIZE")
    budget = (Budget.target_size(parse_size(args.target_size)) if args.target_size is not None
              else Budget.target_bpw(args.target_bpw) if args.target_bpw is not None else None)
    budget_gpu = parse_size(args.budget_gpu, "--budget-gpu") if split else None
    budget_cpu = parse_size(args.budget_cpu, "--budget-cpu") if split else None
    encode_cache = writable_folder(Path(args.encode_cache), "--encode-cache") if args.encode_cache else None
    overrides = parse_overrides(args.tensor_type or [])
    if args.tensor_type_file:
        overrides += read_tensor_type_file(Path(args.tensor_type_file))
    types = palette_types(args.palette, min_type=args.min_type, max_type=args.max_type, overrides=overrides)

    times = StageTimes()
    model_hash = model_sha256(model_dir)
    with times.stage("calibrate"):
        stats_path, cov_dir = stats_for(model_dir, model_hash, args)
    stats = load_stats(stats_path)
    store = None
    if cov_dir is not None:
        from qgguf.calibrate.covariance import CovarianceStore

        store = CovarianceStore(cov_dir)
        if store.index.get("model_sha256") not in (None, model_hash):
            raise QggufError(f"the covariance in {cov_dir} was computed for another model; run `qgguf calibrate "
                             f"{args.model} -o FILE --covariance DIR` and pass both")
        if args.rounding in SPLIT_ROUNDINGS and not store.has_split:
            print(f"qgguf: the covariance in {cov_dir} has no held-out split: feedback rounding's errors are scored "
                  "on the tokens it was fitted to and promise more than they give (calibrate with "
                  "--covariance-split to plan with held-out errors)", file=sys.stderr)
    if stats.meta.get("model_sha256") not in (None, model_hash):
        raise QggufError(f"statistics {stats_path} were computed for another model (model hash "
                         f"{str(stats.meta.get('model_sha256'))[:12]}…, this one is {model_hash[:12]}…); "
                         f"run `qgguf calibrate {args.model} -o FILE` or drop --stats")
    with times.stage("convert to F32 GGUF"):
        src = converter_gguf(model_dir, model_hash)
        reader = open_gguf(src)

    planned = [t for t in reader.tensors if llama_quantizes(t.name, len(t.shape))]
    missing = [t.name for t in planned if t.name not in stats]
    if missing:
        # the model hash matched (or was absent), so the statistics skipped these tensors: say so, not "another model"
        listed = f"{', '.join(missing[:3])}{' …' if len(missing) > 3 else ''}"
        cause = ("they were made for another model or by another qgguf version" if "model_sha256" not in stats.meta
                 else "they were made for this model by a calibration that skipped these tensors")
        raise QggufError(f"statistics {stats_path} have no entry for {listed}, which llama.cpp quantises; {cause}: "
                         f"run `qgguf calibrate {args.model} -o FILE` with this qgguf and pass it with --stats")
    planned_names = {t.name for t in planned}
    layout = FileLayout.from_tensors(
        int(reader.data_offset) + HEADER_SLACK,
        [(int(t.n_bytes), int(t.n_elements)) for t in reader.tensors if t.name not in planned_names])

    def inputs():
        for t in planned:
            imp = torch.from_numpy(stats[t.name].importance)
            # one tensor's H at a time; feedback-on-plain measures plainly (its plan uses plain rounding's errors)
            cov = store.get(t.name) if store is not None and args.rounding != "feedback-on-plain" else None
            split = store.get_split(t.name) if cov is not None else None
            fit_tokens = None if cov is None else store.tokens_a if split is not None else store.tokens
            yield TensorInput(name=t.name, weights=tensor_f32(t, device, reader), importance=imp,
                              channel_fisher=imp, covariance=cov, covariance_split=split, fit_tokens=fit_tokens,
                              row_fisher=stats[t.name].row_fisher if cov is not None else None)

    shapes = [(int(t.n_elements) // int(t.shape[0]), int(t.shape[0])) for t in planned]
    stacked = [t.name for t in planned if len(t.shape) == 3]
    if args.rounding != "plain" and stacked:  # calibrate --covariance keeps no per-expert covariance yet
        print(f"qgguf: {len(stacked)} stacked expert tensors ({stacked[0]}, …) are rounded plain (no per-expert "
              "input covariance)", file=sys.stderr)
    with _compile_choice(types, device, _kquant_weights(shapes, args.max_rows),
                         feedback=args.rounding != "plain") as compile_key:
        if compile_key is not None and not compile_is_warm(compile_key):
            minutes = max(1, round(COLD_COMPILE_CPU_S / (os.cpu_count() or 1) / 60))
            print(f"qgguf: first run: compiling the K-quant encoders (torch.compile), about {minutes} min on "
                  f"{os.cpu_count()} cores; later runs reuse the compiled kernels in {compile_cache_dir()}",
                  file=sys.stderr)
        with times.stage("measure"):
            measured = measure_tensors(inputs(), types, max_rows=args.max_rows, device=device,
                                       shapes=[tuple(int(s) for s in reversed(t.shape.tolist())) for t in planned])
        with times.stage("plan"):
            plan_rounding = "plain" if args.rounding == "feedback-on-plain" else args.rounding
            choices = [dataclasses.replace(measured[t.name].choices(stats[t.name].fisher_sum, plan_rounding),
                                           experts=_expert_info(stats[t.name])) for t in planned]
            if split:
                from qgguf.plan.placement import plan_split

                arch = reader.fields["general.architecture"].contents()
                n_layer = int(reader.fields[f"{arch}.block_count"].contents())
                fixed = {t.name: int(t.n_bytes) for t in reader.tensors if t.name not in planned_names}
                the_plan, _ = plan_split(choices, fixed, budget_gpu, budget_cpu, n_layer, total=budget,
                                         layout=layout, overrides=overrides, min_type=args.min_type,
                                         max_type=args.max_type)
            else:
                the_plan = plan(choices, budget, layout, overrides=overrides, min_type=args.min_type,
                                max_type=args.max_type)
            if args.rounding == "feedback-on-plain":
                the_plan = feedback_on_plain(the_plan, store, {t.name: len(t.shape) for t in planned})
        importance = {t.name: torch.from_numpy(stats[t.name].importance) for t in planned}
        meta = {"qgguf.version": __version__, "qgguf.budget": the_plan.budget_text, "qgguf.palette": args.palette,
                "qgguf.stats": json.dumps({k: stats.meta.get(k) for k in ("tokens", "seq_len", "seed")})}
        if args.rounding != "plain":  # plain files keep the keys (and bytes) they had
            meta["qgguf.rounding"] = args.rounding
        base = out.with_suffix("")
        side = {kind: base.with_name(base.name + suffix) for kind, suffix in SIDE_FILES.items()}
        stock = all(formats.get(t).stock for t in the_plan.types.values())
        outs = [out, side["plan"], side["heatmap"]] + ([side["tensor_types"]] if stock else [])
        # The GGUF and its side files appear together or not at all
        with times.stage("export"), atomic_outputs(outs, inputs=[model_dir, src]) as tmps:
            export_gguf(src, tmps[0], the_plan.types, importance, extra_metadata=meta, device=device,
                        reader=reader, encode_cache=encode_cache, roundings=the_plan.roundings,
                        covariance=store.get if store is not None else None,
                        covariance_tokens=store.tokens if store is not None else None)
            size = tmps[0].stat().st_size
            if budget is not None and budget.kind == "size" and size > budget.value:
                raise QggufError(f"the written file has {size:,} bytes, over --target-size {int(budget.value):,}; "
                                 "this is a bug in qgguf's size accounting (nothing was kept)")
            the_plan = _exact_size(the_plan, size)
            write_plan_json(the_plan, tmps[1])
            write_heatmap(the_plan, tmps[2])
            if stock:
                write_tensor_type_file(the_plan, tmps[3])
        if not stock:  # an earlier run's tensor-type file would describe another plan
            side["tensor_types"].unlink(missing_ok=True)
    if compile_key is not None and _compiled_anything():
        mark_compile_warm(compile_key)
    print(summary(the_plan))
    print(f"wrote {out} ({size:,} bytes)")
    print(f"qgguf: {times.total()}", file=sys.stderr)
    return 0


def add_parser(sub) -> None:
    from qgguf.calibrate.runner import DEFAULT_SEED, DEFAULT_SEQ_LEN, DEFAULT_TOKENS
    from qgguf.plan.measure import DEFAULT_MAX_ROWS, ROUNDINGS

    p = sub.add_parser("convert", help="the main job: an HF model to the Fisher-optimal GGUF for a budget")
    p.add_argument("model", help="HF model folder, or an asset name from `qgguf fetch` (e.g. smollm2-135m)")
    p.add_argument("-o", "--out", required=True, help="output .gguf")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--target-bpw", type=float, help="bits per weight as llama.cpp reports it (all tensors' data "
                                                     "bits over all weights)")
    g.add_argument("--target-size", help="whole-file size: 1.2GiB, 800MB or bytes")
    p.add_argument("--budget-gpu", metavar="SIZE", help="VRAM for tensor data (with --budget-cpu): each tensor gets a "
                   "type and a device, and the plan gives the llama.cpp options that place them")
    p.add_argument("--budget-cpu", metavar="SIZE", help="RAM for tensor data (with --budget-gpu)")
    p.add_argument("--palette", default="stock", choices=PALETTES,
                   help="stock: types unmodified llama.cpp runs (default); extended: adds qgguf's types")
    p.add_argument("--stats", help="statistics from `qgguf calibrate` (default: calibrate now, cached)")
    p.add_argument("--text", help="calibration text (default: the Wikipedia text of `qgguf fetch wiki`)")
    p.add_argument("--tokens", type=int, default=DEFAULT_TOKENS, help="calibration tokens")
    p.add_argument("--seq-len", type=int, default=DEFAULT_SEQ_LEN, help="calibration sequence length")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED, help="calibration seed")
    p.add_argument("--device", default="auto", help="auto (default: CUDA when torch sees a GPU, else the CPU), cpu "
                   "or cuda, for calibration, measurement and encoding")
    p.add_argument("--grad-checkpoint", action="store_true",
                   help="calibrate with gradient checkpointing (recompute each layer in the backward pass: for "
                        "models whose activations do not fit)")
    p.add_argument("-t", "--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    p.add_argument("--tensor-type", action="append", metavar="PATTERN=TYPE",
                   help="force a type on tensors matching a regex (llama-quantize syntax); repeatable")
    p.add_argument("--tensor-type-file", help="a file of PATTERN=TYPE lines, as llama-quantize takes")
    p.add_argument("--min-type", help="no tensor below this type's bits per weight")
    p.add_argument("--max-type", help="no tensor above this type's bits per weight")
    p.add_argument("--max-rows", type=int, default=DEFAULT_MAX_ROWS,
                   help=f"rows measured per tensor (default {DEFAULT_MAX_ROWS}; 0 = all)")
    p.add_argument("--rounding", default="plain", choices=ROUNDINGS,
                   help="how each tensor's integers are chosen: plain (each weight on its own, llama.cpp's way; "
                        "default), feedback (error feedback through the layer's input covariance, GPTQ-style: "
                        "the same GGUF blocks), auto (per tensor and type, whichever measures lower), "
                        "feedback-on-plain (plan with plain rounding's errors, then round every tensor that has an "
                        "input covariance with feedback: measured best so far); all but plain calibrate the input "
                        "covariance too")
    p.add_argument("--covariance", metavar="DIR",
                   help="the input covariance from `qgguf calibrate --covariance DIR`, with --stats")
    p.add_argument("--covariance-weight", default=DEFAULT_WEIGHTING, choices=WEIGHTINGS,
                   help="how the calibration weighs each token's x xᵀ in the input covariance (qgguf calibrate "
                        f"--covariance-weight; default {DEFAULT_WEIGHTING})")
    p.add_argument("--encode-cache", metavar="DIR",
                   help="keep encoded tensors in DIR and reuse them: for converting one model at several budgets "
                        "(costs about one file's size per new tensor/type pair)")
    p.set_defaults(func=run)
