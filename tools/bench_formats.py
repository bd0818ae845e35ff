"""Encoder parity and speed of qgguf's formats against ggml's own quantiser (ggml_quantize_chunk via ctypes).

parity — for every quantised type, with and without importance: the importance-weighted squared error of our
encoder over ggml's on the same tensor with the same importance (both decoded by ggml's to_float), and how many
tensors come out byte-identical. Sources:
    student-t            random Student-t (ν = 5) tensors, synthetic activation-like importance
    smollm2-135m         every 2-D weight of the de-gridded asset (a block of --rows rows of each)
    qwen2.5-coder-1.5b   the same
  Importance for the assets: the mean squared input activation of each linear layer over --tokens tokens of the
  austen text asset (what llama.cpp's imatrix holds), from transformers forward hooks; tensors without a linear
  input (token embeddings) get a synthetic one. --importance synthetic uses synthetic vectors throughout.

speed — weights per second of our encoder and ggml's on the same tensors (Student-t 256 × 4096 and a real
FFN weight when an asset is there), per type, with and without importance, on the CPU with --threads torch threads
(ggml_quantize_chunk is single-threaded) and on CUDA when a device is there.

    python tools/bench_formats.py parity --source student-t smollm2-135m qwen2.5-coder-1.5b --write-doc
    python tools/bench_formats.py speed --write-doc
    python tools/bench_formats.py doc          # rebuild both sections from the saved results

Results are kept as JSON in the qgguf cache (bench/formats/), one file per source, so --write-doc rebuilds the
`## Encoder parity` / `## Encoder speed` sections of docs/benchmarks.md from every source run so far.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from qgguf import formats
from qgguf.docs import write_heading_section
from qgguf.files import atomic_output, cache_dir  # noqa: E402
from qgguf.llamacpp import ggml_ref  # noqa: E402

MACHINE = "2-core x86-64 CPU"
ASSETS = ("smollm2-135m", "qwen2.5-coder-1.5b")
SOURCES = ("student-t",) + ASSETS
PARITY_SECTION = "## Encoder parity"
SPEED_SECTION = "## Encoder speed"


# ------------------------------------------------------------------------------------------------ tensors
def synthetic_importance(cols: int, seed: int) -> np.ndarray:
    """Mean squared activation over 128 samples: log-normal channel scales, a few outlier channels, Student-t."""
    rng = np.random.default_rng(seed)
    scale = np.exp(rng.normal(0.0, 0.75, size=cols))
    scale[rng.choice(cols, size=max(1, cols // 64), replace=False)] *= 20.0
    acts = rng.standard_t(5, size=(128, cols)) * scale
    return (acts ** 2).mean(axis=0).astype(np.float32)


def student_t_tensors(rows: int):
    """Student-t (ν = 5) tensors of the row lengths LMs use, each with its own synthetic importance."""
    for i, cols in enumerate((576, 1536, 2048, 4096, 8960)):
        for j in range(2):
            seed = 1000 * i + j
            x = (np.random.default_rng(seed).standard_t(5, size=(rows, cols)) * 0.02).astype(np.float32)
            yield f"student-t-{cols}-{j}", x, synthetic_importance(cols, seed + 1)


def activation_importance(model_dir: Path, tokens: int) -> dict[str, np.ndarray]:
    """Per linear layer (HF name of its weight): mean of x² over the calibration tokens of each input channel."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qgguf.assets.fetch import asset_path

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    text = asset_path("austen").read_text(encoding="utf-8")
    ids = tok(text[: tokens * 16], return_tensors="pt").input_ids[:, :tokens]
    sums: dict[str, torch.Tensor] = {}
    count = {"n": 0}
    hooks = []
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear):
            def hook(m, inp, out, key=name + ".weight"):
                a = inp[0].detach().reshape(-1, inp[0].shape[-1]).to(torch.float64)
                sums[key] = sums.get(key, 0) + (a * a).sum(dim=0)
            hooks.append(mod.register_forward_hook(hook))
    with torch.no_grad():
        for start in range(0, ids.shape[1], 256):
            chunk = ids[:, start:start + 256]
            model(chunk)
            count["n"] += chunk.shape[1]
    for h in hooks:
        h.remove()
    out = {k: (v / count["n"]).to(torch.float32).numpy() for k, v in sums.items()}
    if getattr(model.config, "tie_word_embeddings", False) and "lm_head.weight" in out:
        out.setdefault("model.embed_tokens.weight", out["lm_head.weight"])
    del model
    return out


def asset_tensors(name: str, rows: int, importance: str, tokens: int):
    """A block of `rows` rows of every 2-D weight of the asset, with its importance."""
    from safetensors import safe_open

    from qgguf.assets.fetch import asset_path

    model_dir = asset_path(name)
    acts = activation_importance(model_dir, tokens) if importance == "act" else {}
    for path in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(path), "np") as st:
            for key in sorted(st.keys()):
                sl = st.get_slice(key)
                shape = sl.get_shape()
                if len(shape) != 2:
                    continue
                n = shape[0]
                start = zlib.crc32(key.encode()) % max(1, n - rows + 1)
                x = np.ascontiguousarray(sl[start:start + rows], dtype=np.float32)
                imp = acts.get(key)
                if imp is None:
                    imp = synthetic_importance(shape[1], zlib.crc32(key.encode()))
                yield key, x, imp


# ------------------------------------------------------------------------------------------------ parity
def weighted_error(f, raw: np.ndarray, x: np.ndarray, imp: np.ndarray | None) -> float:
    y = ggml_ref.dequantize(f.type_id, raw, x.shape).astype(np.float64)
    d2 = (y - x) ** 2
    return float((d2 * imp).sum() if imp is not None else d2.sum())


def run_parity(source: str, rows: int, importance: str, tokens: int, types: list[str]) -> dict:
    tensors = list(student_t_tensors(rows) if source == "student-t" else asset_tensors(source, rows, importance,
                                                                                         tokens))
    acc: dict[str, dict] = {}
    bar = tqdm(total=len(tensors) * len(types) * 2, desc=f"parity {source}", unit="enc")
    t_ours = t_ggml = 0.0
    for tname, x, imp in tensors:
        for name in types:
            f = formats.get(name)
            for mode, w in (("plain", None), ("importance", imp)):
                a = acc.setdefault(f"{name}/{mode}", {"type": name, "mode": mode, "tensors": 0, "skipped": 0,
                                                      "identical": 0, "sum_ours": 0.0, "sum_ggml": 0.0,
                                                      "log_ratio": 0.0, "max_ratio": 0.0, "max_at": "",
                                                      "min_ratio": math.inf, "min_at": ""})
                bar.update()
                if not f.accepts(x.shape[1]):
                    a["skipped"] += 1
                    continue
                t0 = time.perf_counter()
                ours = f.encode(x, w, tensor=tname)
                t1 = time.perf_counter()
                ref = ggml_ref.quantize(f.type_id, x, w)
                t2 = time.perf_counter()
                t_ours, t_ggml = t_ours + t1 - t0, t_ggml + t2 - t1
                e_ours, e_ggml = weighted_error(f, ours, x, w), weighted_error(f, ref, x, w)
                ratio = e_ours / e_ggml if e_ggml > 0 else (1.0 if e_ours == 0 else math.inf)
                a["tensors"] += 1
                a["identical"] += int(np.array_equal(ours, ref))
                a["sum_ours"] += e_ours
                a["sum_ggml"] += e_ggml
                a["log_ratio"] += math.log(ratio)
                if ratio > a["max_ratio"]:
                    a["max_ratio"], a["max_at"] = ratio, tname
                if ratio < a["min_ratio"]:
                    a["min_ratio"], a["min_at"] = ratio, tname
    bar.close()
    return {"source": source, "rows": rows, "importance": importance if source != "student-t" else "synthetic",
            "tokens": tokens, "n_tensors": len(tensors), "weights": int(sum(x.size for _, x, _ in tensors)),
            "seconds_ours": t_ours, "seconds_ggml": t_ggml, "torch_threads": torch.get_num_threads(),
            "command": shlex.join(["python", "tools/bench_formats.py", *sys.argv[1:]]), "results": acc}


def parity_section(runs: list[dict]) -> str:
    lines = [PARITY_SECTION, "",
             "Importance-weighted squared error of qgguf's encoder over ggml's own (ggml_quantize_chunk through "
             "ctypes), same tensor, same importance, both decoded by ggml's to_float. Ratio < 1: ours is better. "
             f"Measured on a {MACHINE}. `ident` = tensors whose bytes equal ggml's. Σ ratio = total error over "
             "total error; max = worst tensor. Tensors whose row length a type cannot take are left out (`skip`).",
             ""]
    lines += summary_table(runs)
    for run in runs:
        what = {"student-t": "random Student-t (ν = 5) tensors, 10 tensors of row lengths 576–8960",
                "smollm2-135m": "every 2-D weight of the de-gridded SmolLM2-135M asset",
                "qwen2.5-coder-1.5b": "every 2-D weight of the de-gridded Qwen2.5-Coder-1.5B asset"}[run["source"]]
        imp = ("synthetic activation-like importance (mean x² of Student-t activations with log-normal channel "
               "scales)" if run["importance"] == "synthetic" else
               f"importance = mean squared input activation of each linear layer over {run['tokens']} tokens of "
               "the austen text (transformers forward hooks); token embeddings get a synthetic one")
        lines += [f"### {run['source']}", "",
                  f"{what}, {run['rows']} rows of each ({run['n_tensors']} tensors, {run['weights']:,} weights); "
                  f"{imp}.", "", f"    {run['command']}", "",
                  "| type | plain Σ ratio | plain max | plain ident | importance Σ ratio | importance max "
                  "| importance ident | skip |",
                  "|---|---|---|---|---|---|---|---|"]
        res = run["results"]
        for name in [n for n in formats.names() if f"{n}/plain" in res]:
            p, q = res[f"{name}/plain"], res[f"{name}/importance"]

            def cells(a):
                if not a["tensors"]:
                    return ["n/a", "n/a", "n/a"]
                return [f"{a['sum_ours'] / a['sum_ggml']:.4f}", f"{a['max_ratio']:.4f}",
                        f"{a['identical']}/{a['tensors']}"]
            lines.append("| " + " | ".join([name, *cells(p), *cells(q), str(p["skipped"])]) + " |")
        lines.append("")
    return "\n".join(lines)


def summary_table(runs: list[dict]) -> list[str]:
    """Per type over every source and both modes: byte-identical tensors, best and worst tensor ratio."""
    lines = [f"Summary over {', '.join(r['source'] for r in runs)} (plain and importance):", "",
             "| type | byte-identical tensors | best tensor ratio | worst tensor ratio | within 1% on every tensor |",
             "|---|---|---|---|---|"]
    for name in formats.names():
        cells = [r["results"][f"{name}/{m}"] for r in runs for m in ("plain", "importance")
                 if f"{name}/{m}" in r["results"] and r["results"][f"{name}/{m}"]["tensors"]]
        if not cells:
            continue
        n = sum(a["tensors"] for a in cells)
        ident = sum(a["identical"] for a in cells)
        lo = min(cells, key=lambda a: a["min_ratio"])
        hi = max(cells, key=lambda a: a["max_ratio"])
        worst = f"{hi['max_ratio']:.4f}" + (f" ({hi['mode']}, {hi['max_at']})" if ident < n else "")
        lines.append(f"| {name} | {ident}/{n} | {lo['min_ratio']:.4f} | {worst} | "
                     f"{'yes' if hi['max_ratio'] <= 1.01 else 'no'} |")
    return lines + [""]


# ------------------------------------------------------------------------------------------------ speed
def speed_tensors() -> list[tuple[str, np.ndarray, np.ndarray]]:
    x = (np.random.default_rng(5).standard_t(5, size=(256, 4096)) * 0.02).astype(np.float32)
    out = [("Student-t 256×4096", x, synthetic_importance(4096, 6))]
    try:
        from safetensors import safe_open

        from qgguf.assets.fetch import asset_path

        path = next(asset_path("qwen2.5-coder-1.5b").glob("*.safetensors"))
        with safe_open(str(path), "np") as st:
            key = "model.layers.10.mlp.down_proj.weight"
            w = np.ascontiguousarray(st.get_slice(key)[:128], dtype=np.float32)
        out.append((f"Qwen2.5-Coder-1.5B {key} 128×{w.shape[1]}", w, synthetic_importance(w.shape[1], 7)))
    except Exception as e:  # the asset is optional for the speed run
        print(f"(no real tensor: {e})", file=sys.stderr)
    return out


def timed(fn, min_seconds: float = 1.0) -> float:
    fn()  # warm-up (allocations, kernel caches)
    n, t0 = 0, time.perf_counter()
    while True:
        fn()
        n += 1
        dt = time.perf_counter() - t0
        if dt >= min_seconds:
            return dt / n


def run_speed(types: list[str], device: str) -> dict:
    rows = []
    for label, x, imp in speed_tensors():
        xt = torch.from_numpy(x).to(device)
        it = torch.from_numpy(imp).to(device)
        for name in tqdm(types, desc=f"speed {label} {device}"):
            f = formats.get(name)
            if not f.accepts(x.shape[1]):
                continue
            for mode, w, wt in (("plain", None, None), ("importance", imp, it)):
                def ours():
                    out = f.encode_torch(xt, wt)
                    if out.is_cuda:
                        torch.cuda.synchronize()
                t_ours = timed(ours)
                t_ggml = timed(lambda: ggml_ref.quantize(f.type_id, x, w))
                rows.append({"tensor": label, "type": name, "mode": mode, "weights": x.size,
                             "ours_wps": x.size / t_ours, "ggml_wps": x.size / t_ggml})
    return {"device": device, "machine": MACHINE if device == "cpu" else torch.cuda.get_device_name(),
            "torch_threads": torch.get_num_threads(), "load": list(os.getloadavg()),
            "command": shlex.join(["python", "tools/bench_formats.py", *sys.argv[1:]]), "rows": rows}


def speed_section(runs: list[dict]) -> str:
    lines = [SPEED_SECTION, "",
             "Weights per second (millions) of qgguf's encoder and of ggml's (ggml_quantize_chunk through ctypes, "
             "single-threaded as llama-quantize calls it per thread), same tensors. ratio = ours / ggml.", ""]
    if not any(r["device"] == "cuda" for r in runs):
        lines += ["GPU: not measured yet (no CUDA device was available to the runs so far); the goal there is "
                  "≥ 1 G weights/s for Q4_K with importance on an H100.", ""]
    for run in runs:
        load = run.get("load")
        busy = (f" The machine is shared: load average {load[0]:.1f} (1 min) / {load[1]:.1f} (5 min) at the end "
                "of the run, so absolute numbers are noisy; ours and ggml's ran interleaved, so the ratios are "
                "fairer.") if load and run["device"] == "cpu" else ""
        lines += [f"### {run['device']}: {run['machine']}, {run['torch_threads']} torch thread(s)", "",
                  f"    {run['command']}", "", busy.strip(), ""] if busy else \
                 [f"### {run['device']}: {run['machine']}, {run['torch_threads']} torch thread(s)", "",
                  f"    {run['command']}", ""]
        for label in dict.fromkeys(r["tensor"] for r in run["rows"]):
            lines += [f"{label}:", "",
                      "| type | ours plain | ggml plain | ratio | ours importance | ggml importance | ratio |",
                      "|---|---|---|---|---|---|---|"]
            by = {(r["type"], r["mode"]): r for r in run["rows"] if r["tensor"] == label}
            for name in [n for n in formats.names() if (n, "plain") in by]:
                p, q = by[(name, "plain")], by[(name, "importance")]
                lines.append(f"| {name} | {p['ours_wps'] / 1e6:.2f} | {p['ggml_wps'] / 1e6:.2f} | "
                             f"{p['ours_wps'] / p['ggml_wps']:.2f} | {q['ours_wps'] / 1e6:.2f} | "
                             f"{q['ggml_wps'] / 1e6:.2f} | {q['ours_wps'] / q['ggml_wps']:.2f} |")
            lines.append("")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ files
def results_dir() -> Path:
    return cache_dir("bench", "formats")


def save_json(obj: dict, name: str) -> None:
    out = results_dir() / name
    with atomic_output(out) as tmp:
        tmp.write_text(json.dumps(obj, indent=1), encoding="utf-8")


def load_runs(prefix: str, order: tuple[str, ...]) -> list[dict]:
    runs = []
    for key in order:
        p = results_dir() / f"{prefix}-{key}.json"
        if p.is_file():
            runs.append(json.loads(p.read_text(encoding="utf-8")))
    return runs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    pp = sub.add_parser("parity")
    pp.add_argument("--source", nargs="+", choices=SOURCES, default=list(SOURCES))
    pp.add_argument("--rows", type=int, default=16, help="rows of each tensor (a contiguous block)")
    pp.add_argument("--importance", choices=("act", "synthetic"), default="act")
    pp.add_argument("--tokens", type=int, default=512, help="calibration tokens for --importance act")
    sub.add_parser("doc", help="rewrite both sections of docs/benchmarks.md from the saved results only")
    ps = sub.add_parser("speed")
    ps.add_argument("--device", nargs="+", default=["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    for q in (pp, ps):
        q.add_argument("--types", nargs="+", default=[n for n in formats.names() if formats.get(n).quantized])
        q.add_argument("--threads", type=int, default=1, help="torch CPU threads (ggml's quantiser uses one)")
        q.add_argument("--write-doc", action="store_true", help="rewrite this benchmark's section of "
                                                                "docs/benchmarks.md from all saved results")
    args = p.parse_args(argv)
    doc = REPO / "docs" / "benchmarks.md"
    if args.what == "doc":
        for text in (parity_section(load_runs("parity", SOURCES)), speed_section(load_runs("speed", ("cpu", "cuda")))):
            if "|" in text:  # some results saved
                write_heading_section(doc, text)
        return 0
    torch.set_num_threads(args.threads)
    if args.what == "parity":
        for source in args.source:
            run = run_parity(source, args.rows, args.importance, args.tokens, args.types)
            save_json(run, f"parity-{source}.json")
            print(parity_section([run]))
        if args.write_doc:
            write_heading_section(doc, parity_section(load_runs("parity", SOURCES)))
    else:
        for device in args.device:
            run = run_speed(args.types, device)
            save_json(run, f"speed-{device}.json")
            print(speed_section([run]))
        if args.write_doc:
            write_heading_section(doc, speed_section(load_runs("speed", ("cpu", "cuda"))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
