"""`qgguf convert`: the main job. calibrate → measure → plan → export, each step cached.

    qgguf convert MODEL -o OUT.gguf (--target-bpw B | --target-size 1.2GiB) [--palette stock|extended]

MODEL is an HF folder or an asset name (`smollm2-135m`). Caches (under the qgguf cache folder), so an
interrupted run resumes: the converter's F32 GGUF (per model hash), the calibration statistics (per model hash and
calibration settings), and every (tensor, type) measurement. Beside OUT.gguf it writes OUT.plan.json,
OUT.tensor-types.txt (stock palette: reproduces the plan with stock llama-quantize) and OUT.heatmap.png.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from qgguf import __version__, formats
from qgguf.errors import QggufError
from qgguf.files import cache_dir, check_output_path, writable_folder
from qgguf.llamacpp.converter import convert_hf
from qgguf.models import check_model_dir, resolve_model
from qgguf.plan.budget import HEADER_SLACK, Budget, FileLayout, parse_size
from qgguf.plan.outputs import summary, write_heatmap, write_plan_json, write_tensor_type_file
from qgguf.plan.planner import plan
from qgguf.plan.rules import llama_quantizes, palette_types, parse_overrides, read_tensor_type_file


def f32_gguf(model_dir: Path, model_hash: str) -> Path:
    """The converter's F32 GGUF of the model, made once per model hash."""
    out = cache_dir("convert", model_hash[:16]) / "model-f32.gguf"
    if not out.is_file():
        print(f"qgguf: converting {model_dir} to F32 GGUF with llama.cpp's converter ...", file=sys.stderr)
        convert_hf(model_dir, out, "f32")
    return out


def stats_for(model_dir: Path, model_hash: str, args) -> Path:
    """The statistics file: --stats, else a cached calibration with the given settings."""
    from qgguf.calibrate.runner import calibrate

    if args.stats:
        return Path(args.stats)
    text = Path(args.text) if args.text else None
    text_tag = "default" if text is None else text.resolve().as_posix().replace("/", "_")[-60:]
    out = cache_dir("stats", model_hash[:16]) / f"{text_tag}-t{args.tokens}-l{args.seq_len}-s{args.seed}.safetensors"
    if not out.is_file():
        print("qgguf: calibrating (diagonal Fisher, sampled labels) ...", file=sys.stderr)
        calibrate(model_dir, out, text=text, tokens=args.tokens, seq_len=args.seq_len, device=args.device,
                  seed=args.seed)
    return out


def run(args) -> int:
    import torch

    from qgguf.calibrate.stats import load_stats
    from qgguf.export.writer import export_gguf, open_gguf, tensor_f32
    from qgguf.models import model_sha256
    from qgguf.plan.measure import TensorInput, measure_tensors

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
    types = palette_types(args.palette, min_type=args.min_type, max_type=args.max_type,
                                  overrides=overrides)

    model_hash = model_sha256(model_dir)
    stats_path = stats_for(model_dir, model_hash, args)
    stats = load_stats(stats_path)
    if stats.meta.get("model_sha256") not in (None, model_hash):
        raise QggufError(f"statistics {stats_path} were computed for another model (model hash "
                         f"{str(stats.meta.get('model_sha256'))[:12]}…, this one is {model_hash[:12]}…); "
                         f"run `qgguf calibrate {args.model} -o FILE` or drop --stats")
    src = f32_gguf(model_dir, model_hash)
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
            yield TensorInput(name=t.name, weights=tensor_f32(t), importance=imp, channel_fisher=imp)

    measured = measure_tensors(inputs(), types, max_rows=args.max_rows, device=args.device, total=len(planned))
    choices = [measured[t.name].choices(stats[t.name].fisher_sum) for t in planned]
    the_plan = plan(choices, budget, layout, overrides=overrides, min_type=args.min_type,
                            max_type=args.max_type)

    importance = {t.name: torch.from_numpy(stats[t.name].importance) for t in planned}
    meta = {"qgguf.version": __version__, "qgguf.budget": str(budget), "qgguf.palette": args.palette,
            "qgguf.stats": json.dumps({k: stats.meta.get(k) for k in ("tokens", "seq_len", "seed")})}
    export_gguf(src, out, the_plan.types, importance, extra_metadata=meta, device=args.device, reader=reader,
                encode_cache=encode_cache)

    size = out.stat().st_size
    if budget.kind == "size" and size > budget.value:
        out.unlink()
        raise QggufError(f"the written file has {size:,} bytes, over --target-size {int(budget.value):,}; "
                         "this is a bug in qgguf's size accounting (nothing was kept)")
    base = out.with_suffix("")
    write_plan_json(the_plan, base.with_name(base.name + ".plan.json"))
    if all(formats.get(t).stock for t in the_plan.types.values()):
        write_tensor_type_file(the_plan, base.with_name(base.name + ".tensor-types.txt"))
    write_heatmap(the_plan, base.with_name(base.name + ".heatmap.png"))
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
    p.add_argument("--palette", default="stock", choices=("stock", "extended"),
                   help="stock: types unmodified llama.cpp runs (default); extended: adds qgguf's types")
    p.add_argument("--stats", help="statistics from `qgguf calibrate` (default: calibrate now, cached)")
    p.add_argument("--text", help="calibration text (default: the Wikipedia text of `qgguf fetch wiki`)")
    p.add_argument("--tokens", type=int, default=DEFAULT_TOKENS, help="calibration tokens")
    p.add_argument("--seq-len", type=int, default=DEFAULT_SEQ_LEN, help="calibration sequence length")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED, help="calibration seed")
    p.add_argument("--device", default="cpu", help="cpu or cuda, for calibration, measurement and encoding")
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
