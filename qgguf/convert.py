"""`qgguf convert`: the main job. calibrate → measure → plan → export, each step cached.

    qgguf convert MODEL -o OUT.gguf (--target-bpw B | --target-size 1.2GiB) [--palette stock|extended]

MODEL is an HF folder or an asset name (`smollm2-135m`). Caches (under the qgguf cache folder), so an
interrupted run resumes: the converter's GGUF (per model hash; in the source's own float type, so BF16 for a bf16
model and F32 for an F32 one: `converter_gguf`), the calibration statistics (per model hash and calibration
settings), and every (tensor, type) measurement. Beside OUT.gguf it writes OUT.plan.json,
OUT.tensor-types.txt (stock palette: reproduces the plan with stock llama-quantize) and OUT.heatmap.png.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

from qgguf import __version__, formats
from qgguf.devices import resolve_device
from qgguf.errors import QggufError, step
from qgguf.files import atomic_outputs, cache_dir, check_output_path, require_file, seal, sealed, writable_folder
from qgguf.llamacpp.converter import convert_hf
from qgguf.models import check_model_dir, resolve_model, source_float_type
from qgguf.plan.budget import HEADER_SLACK, Budget, FileLayout, parse_size
from qgguf.plan.outputs import summary, write_heatmap, write_plan_json, write_tensor_type_file
from qgguf.plan.planner import plan
from qgguf.plan.rules import PALETTES, llama_quantizes, palette_types, parse_overrides, read_tensor_type_file


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
    from qgguf.hashing import code_sha256, sha256_file

    parts = [model_hash, sha256_file(text), f"t{args.tokens}", f"l{args.seq_len}", f"s{args.seed}",
             f"d{resolve_device(args.device).type}", code_sha256("calibrate", "models.py", "devices.py")]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()


def stats_for(model_dir: Path, model_hash: str, args) -> Path:
    """The statistics file: --stats, else a cached calibration keyed by everything it depends on."""
    from qgguf.calibrate.runner import calibrate
    from qgguf.calibrate.text import default_text_path

    if args.stats:
        return Path(args.stats)
    text = Path(args.text) if args.text else default_text_path()
    require_file(text, "calibration text", "give a UTF-8 text file with --text, or run `qgguf fetch wiki`")
    key = calibration_key(model_hash, text, args)
    out = cache_dir("stats", model_hash[:16]) / f"{key[:24]}.safetensors"
    if not sealed(out, key):
        print(f"qgguf: calibrating on {args.tokens:,} tokens of {text.name} (diagonal Fisher, sampled labels) ...",
              file=sys.stderr)
        calibrate(model_dir, out, text=text, tokens=args.tokens, seq_len=args.seq_len, device=args.device,
                  seed=args.seed, grad_checkpoint=args.grad_checkpoint)
        seal(out, key)
    return out


# What convert writes beside OUT.gguf, by kind (the bench keeps them with its rows).
SIDE_FILES = {"plan": ".plan.json", "tensor_types": ".tensor-types.txt", "heatmap": ".heatmap.png"}


def run(args) -> int:
    import torch

    from qgguf.calibrate.stats import load_stats
    from qgguf.export.writer import export_gguf, open_gguf, tensor_f32
    from qgguf.models import model_sha256
    from qgguf.plan.measure import TensorInput, measure_tensors

    device = str(resolve_device(args.device))  # before any work: a bad --device fails at once
    if args.threads:
        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # for llama.cpp's converter, a child process
    model_dir = resolve_model(args.model)
    check_model_dir(model_dir)
    out = check_output_path(Path(args.out), [model_dir] + ([Path(args.stats)] if args.stats else []))
    if out.suffix != ".gguf":
        raise QggufError(f"output {str(out)!r} should end in .gguf (the plan and heat map are written beside it)")
    if args.target_bpw is None and args.target_size is None:
        raise QggufError("give a budget: --target-bpw B (e.g. 4.5) or --target-size SIZE (e.g. 1.2GiB)")
    budget = (Budget.target_size(parse_size(args.target_size)) if args.target_size is not None
              else Budget.target_bpw(args.target_bpw))
    encode_cache = writable_folder(Path(args.encode_cache), "--encode-cache") if args.encode_cache else None
    overrides = parse_overrides(args.tensor_type or [])
    if args.tensor_type_file:
        overrides += read_tensor_type_file(Path(args.tensor_type_file))
    types = palette_types(args.palette, min_type=args.min_type, max_type=args.max_type, overrides=overrides)

    model_hash = model_sha256(model_dir)
    with step("calibrate"):
        stats_path = stats_for(model_dir, model_hash, args)
    stats = load_stats(stats_path)
    if stats.meta.get("model_sha256") not in (None, model_hash):
        raise QggufError(f"statistics {stats_path} were computed for another model (model hash "
                         f"{str(stats.meta.get('model_sha256'))[:12]}…, this one is {model_hash[:12]}…); "
                         f"run `qgguf calibrate {args.model} -o FILE` or drop --stats")
    with step("convert to GGUF"):
        src = converter_gguf(model_dir, model_hash)
    reader = open_gguf(src)

    planned = [t for t in reader.tensors if llama_quantizes(t.name, len(t.shape))]
    missing = [t.name for t in planned if t.name not in stats]
    if missing:
        raise QggufError(f"statistics {stats_path} have no entry for {', '.join(missing[:3])}"
                         f"{' …' if len(missing) > 3 else ''}; they belong to another model: recalibrate")
    planned_names = {t.name for t in planned}
    layout = FileLayout.from_tensors(
        int(reader.data_offset) + HEADER_SLACK,
        [(int(t.n_bytes), int(t.n_elements)) for t in reader.tensors if t.name not in planned_names])

    def inputs():
        for t in planned:
            imp = torch.from_numpy(stats[t.name].importance)
            yield TensorInput(name=t.name, weights=tensor_f32(t, device, reader), importance=imp,
                              channel_fisher=imp)

    with step("measure"):
        measured = measure_tensors(inputs(), types, max_rows=args.max_rows, device=device,
                                   shapes=[tuple(int(s) for s in reversed(t.shape.tolist())) for t in planned])
    with step("plan"):
        choices = [measured[t.name].choices(stats[t.name].fisher_sum) for t in planned]
        the_plan = plan(choices, budget, layout, overrides=overrides, min_type=args.min_type,
                        max_type=args.max_type)

    importance = {t.name: torch.from_numpy(stats[t.name].importance) for t in planned}
    meta = {"qgguf.version": __version__, "qgguf.budget": str(budget), "qgguf.palette": args.palette,
            "qgguf.stats": json.dumps({k: stats.meta.get(k) for k in ("tokens", "seq_len", "seed")})}
    base = out.with_suffix("")
    side = {kind: base.with_name(base.name + suffix) for kind, suffix in SIDE_FILES.items()}
    stock = all(formats.get(t).stock for t in the_plan.types.values())
    outs = [out, side["plan"], side["heatmap"]] + ([side["tensor_types"]] if stock else [])
    # The GGUF and its side files appear together or not at all
    with step("export"), atomic_outputs(outs, inputs=[model_dir, src]) as tmps:
        export_gguf(src, tmps[0], the_plan.types, importance, extra_metadata=meta, device=device,
                    reader=reader, encode_cache=encode_cache)
        size = tmps[0].stat().st_size
        if budget.kind == "size" and size > budget.value:
            raise QggufError(f"the written file has {size:,} bytes, over --target-size {int(budget.value):,}; "
                             "this is a bug in qgguf's size accounting (nothing was kept)")
        write_plan_json(the_plan, tmps[1])
        write_heatmap(the_plan, tmps[2])
        if stock:
            write_tensor_type_file(the_plan, tmps[3])
    if not stock:  # an earlier run's tensor-type file would describe another plan
        side["tensor_types"].unlink(missing_ok=True)
    print(summary(the_plan))
    print(f"wrote {out} ({size:,} bytes)")
    return 0


def add_parser(sub) -> None:
    from qgguf.calibrate.runner import DEFAULT_SEED, DEFAULT_SEQ_LEN, DEFAULT_TOKENS
    from qgguf.plan.measure import DEFAULT_MAX_ROWS

    p = sub.add_parser("convert", help="the main job: an HF model to the Fisher-optimal GGUF for a budget")
    p.add_argument("model", help="HF model folder, or an asset name from `qgguf fetch` (e.g. smollm2-135m)")
    p.add_argument("-o", "--out", required=True, help="output .gguf")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--target-bpw", type=float, help="bits per weight as llama.cpp reports it (all tensors' data "
                                                     "bits over all weights)")
    g.add_argument("--target-size", help="whole-file size: 1.2GiB, 800MB or bytes")
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
    p.add_argument("--encode-cache", metavar="DIR",
                   help="keep encoded tensors in DIR and reuse them: for converting one model at several budgets "
                        "(costs about one file's size per new tensor/type pair)")
    p.set_defaults(func=run)
