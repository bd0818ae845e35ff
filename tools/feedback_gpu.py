#!/usr/bin/env python3
"""Error-feedback rounding on a GPU, checked and timed (docs/benchmarks.md, "Error-feedback rounding on a GPU").

Steps, each skipped when the time left (--deadline) cannot hold it:
  1. the suite's CUDA tests (encoders, measure and feedback rounding on the GPU against the CPU);
  2. one layer of Qwen2.5-Coder-1.5B's shapes (seeded synthetic weights; an input covariance with correlated,
     unevenly scaled channels): measure over the stock palette without and with the covariance (the second adds
     feedback rounding of every type and both K-FAC errors), and export's encode of one type, plain and feedback;
  3. `qgguf convert` of a random model of Qwen2.5-Coder-1.5B's configuration (transformers' own initialisation, the
     real tokenizer), plain then feedback-on-plain, at the Acceptance settings (4,096 calibration tokens of wiki,
     --max-rows 256), each stage timed; both files read back with gguf-py.
Prints a short table last and writes every figure as JSON to --out. The weights of step 3 are random, so its KLD
means nothing; its times are those of the real model's shapes (the CPU figures in docs/benchmarks.md are for the
real Qwen2.5-Coder-1.5B on 2 cores).

    python tools/feedback_gpu.py --device cuda --tokenizer QWEN_DIR --text wiki.txt --work /tmp/fbgpu --out r.json
    python tools/feedback_gpu.py --device cpu --layers 2 --steps layer convert ...   # the script itself, on a CPU

On a machine without qgguf installed: PYTHONPATH=.:LLAMA_TREE/gguf-py and LLAMA_CPP_DIR=LLAMA_TREE (a llama.cpp
tree with convert_hf_to_gguf.py, conversion/ and gguf-py/; the converter runs from it).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

# Qwen2.5-Coder-1.5B's configuration (its config.json)
QWEN = dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_attention_heads=12,
            num_key_value_heads=2, num_hidden_layers=28, max_position_embeddings=32768, rope_theta=1e6,
            rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=151643, eos_token_id=151645,
            pad_token_id=151643)
TOKENS, MAX_ROWS, BPW = 4096, 256, 4.9
STEPS = ("tests", "layer", "convert")


def layer_shapes() -> dict[str, tuple[int, int]]:
    """(rows, row length) in GGUF layout of one Qwen2.5-Coder-1.5B layer's tensors."""
    h, i = QWEN["hidden_size"], QWEN["intermediate_size"]
    kv = QWEN["num_key_value_heads"] * h // QWEN["num_attention_heads"]
    return {"attn_q": (h, h), "attn_k": (kv, h), "attn_v": (kv, h), "attn_output": (h, h),
            "ffn_gate": (i, h), "ffn_up": (i, h), "ffn_down": (h, i)}


def synthetic_covariance(n: int, seed: int) -> torch.Tensor:
    """H = diag(s)·R·diag(s): neighbouring channels correlated (R_ij = 0.8^|i−j|), scales log-normal with a few
    outlier channels, as real inputs have; float64."""
    g = torch.Generator().manual_seed(seed)
    i = torch.arange(n, dtype=torch.float64)
    s = torch.exp(torch.randn(n, generator=g, dtype=torch.float64) * 0.5)
    s[torch.randperm(n, generator=g)[: max(1, n // 200)]] *= 20
    return s[:, None] * 0.8 ** (i[:, None] - i[None, :]).abs() * s[None, :]


class Clock:
    def __init__(self, device: torch.device) -> None:
        self.device = device

    def __enter__(self) -> "Clock":
        self._sync()
        self.t = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self._sync()
        self.s = time.perf_counter() - self.t

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def step_tests(args, report: dict) -> None:
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "cuda", "tests/test_feedback.py",
           "tests/test_measure.py", "tests/test_formats.py", "tests/test_calibrate.py", "tests/test_engines.py"]
    print("$ " + " ".join(cmd), flush=True)
    t = time.time()
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=args.left(60))
    print(res.stdout[-4000:] + res.stderr[-2000:], flush=True)
    counts = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|skipped|errors?)", res.stdout)}
    report["tests"] = {"exit": res.returncode, **counts, "wall_s": round(time.time() - t, 1)}


def step_layer(args, report: dict) -> None:
    from qgguf.formats import feedback as fbm
    from qgguf.formats import get as get_format
    from qgguf.formats.feedback import Feedback
    from qgguf.plan.measure import TensorInput, measure_tensor
    from qgguf.plan.rules import palette_types

    dev = torch.device(args.device)
    types = palette_types("stock")
    q4k = get_format("Q4_K")
    rows_out = []

    def inputs(name: str, shape: tuple[int, int], seed: int):
        g = torch.Generator().manual_seed(seed)
        W = (torch.randn(shape, generator=g) * 0.02).to(dev)
        H = synthetic_covariance(shape[1], seed).to(dev)
        imp = H.diagonal().float()
        d = (torch.rand(shape[0], generator=g) + 0.5).to(dev)
        return W, H, imp, d

    def measure(name, W, H, imp, d, cov: bool):
        t = TensorInput(name, W, importance=imp, channel_fisher=imp, covariance=H if cov else None,
                        row_fisher=d if cov else None, fit_tokens=TOKENS if cov else None)
        return measure_tensor(t, types, max_rows=MAX_ROWS, cache=False, device=dev)

    W, H, imp, d = inputs("warm", (64, 512), 0)  # kernels loaded and CUDA initialised outside the clock
    measure("warm", W, H, imp, d, False), measure("warm", W, H, imp, d, True)
    for k, (name, shape) in enumerate(layer_shapes().items()):
        if args.left(0) < 30:
            print(f"layer: out of time before {name}", flush=True)
            break
        W, H, imp, d = inputs(name, shape, k + 1)
        fbm._factors.clear()  # each timing factorises, as a convert does for a new input
        with Clock(dev) as c_plain:
            measure(name, W, H, imp, d, False)
        fbm._factors.clear()
        with Clock(dev) as c_fb:
            res = measure(name, W, H, imp, d, True)
        with Clock(dev) as e_plain:
            q4k.encode_torch(W, imp)
        fbm._factors.clear()
        with Clock(dev) as e_fb:
            Feedback(H, name, device=dev, tokens=TOKENS).encode(q4k, W, imp)
        r = res.results["Q4_K"]
        row = {"tensor": name, "shape": list(shape), "measure_plain_s": c_plain.s, "measure_feedback_s": c_fb.s,
               "encode_q4k_plain_s": e_plain.s, "encode_q4k_feedback_s": e_fb.s,
               "q4k_kfac_plain_over_feedback": r.kfac_plain / r.kfac_feedback}
        print(json.dumps(row), flush=True)
        rows_out.append(row)
        del W, H
    report["layer"] = {"device": str(dev), "types": types, "max_rows": MAX_ROWS, "rows": rows_out}


def make_model(args, folder: Path) -> None:
    from transformers import AutoModelForCausalLM, Qwen2Config

    cfg = Qwen2Config(**{**QWEN, "num_hidden_layers": args.layers})
    torch.manual_seed(0)
    init = torch.device(args.device)
    with init:  # initialising 1.5 B weights is quicker on the GPU
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.save_pretrained(folder, safe_serialization=True)
    for f in Path(args.tokenizer).iterdir():
        if f.name.startswith("tokenizer") or f.name == "chat_template.jinja":
            shutil.copy(f, folder / f.name)
    del model


STAGE = re.compile(r"qgguf: (calibrate|convert to F32 GGUF|measure|plan|export): ([\d.]+) s \(CPU ([\d.]+) s\)")


def step_convert(args, report: dict) -> None:
    work = Path(args.work)
    model = work / "qwen2.5-1.5b-random"
    out: dict = {"layers": args.layers, "tokens": TOKENS, "max_rows": MAX_ROWS, "target_bpw": BPW}
    report["convert"] = out
    if not (model / "model.safetensors").is_file() and not any(model.glob("*.safetensors")):
        t = time.time()
        make_model(args, model)
        out["make_model_s"] = round(time.time() - t, 1)
        print(f"model: {out['make_model_s']} s", flush=True)
    env = dict(os.environ, QGGUF_CACHE=str(work / "cache"), QGGUF_COMPILE=args.compile, PYTHONUNBUFFERED="1")
    for rounding in ("plain", "feedback-on-plain"):
        left = args.left(0)
        if left < 60:
            out[rounding] = {"skipped": f"{left:.0f} s left"}
            continue
        gguf = work / f"{rounding}.gguf"
        cmd = [sys.executable, "-m", "qgguf", "convert", str(model), "-o", str(gguf), "--target-bpw", str(BPW),
               "--device", args.device, "--tokens", str(TOKENS), "--max-rows", str(MAX_ROWS), "--text", args.text,
               "--rounding", rounding]
        print("$ " + " ".join(cmd), flush=True)
        t = time.time()
        try:
            res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=left - 20)
            rc, err = res.returncode, res.stderr
        except subprocess.TimeoutExpired as e:
            rc, err = "timeout", (e.stderr or b"").decode(errors="replace") if isinstance(e.stderr, bytes) \
                else (e.stderr or "")
        wall = time.time() - t
        (work / f"{rounding}.log").write_text(err)
        if args.out_dir:
            shutil.copy(work / f"{rounding}.log", Path(args.out_dir) / f"convert-{rounding}.log")
        print(err[-3000:], flush=True)
        r = {"exit": rc, "wall_s": round(wall, 1),
             "stages": {m[0]: {"wall_s": float(m[1]), "cpu_s": float(m[2])} for m in STAGE.findall(err)},
             "children_max_rss_mib": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)}
        if rc == 0:
            r.update(read_back(gguf))
        out[rounding] = r
        print(json.dumps({rounding: r}), flush=True)
    cov = list((work / "cache" / "stats").glob("*/*.covariance"))
    if cov:
        out["covariance_gib"] = round(sum(f.stat().st_size for f in cov[0].rglob("*") if f.is_file()) / 2**30, 2)
    p, f = work / "plain.gguf", work / "feedback-on-plain.gguf"
    if p.is_file() and f.is_file():
        out["same_types"], out["identical_tensors"] = compare(p, f)


def read_back(path: Path) -> dict:
    """gguf-py reads the file; every quantised tensor of layer 0 dequantises to finite values near the source."""
    import numpy as np
    from gguf import GGUFReader
    from gguf.quants import dequantize

    r = GGUFReader(str(path))
    types: dict[str, int] = {}
    worst = 0.0
    for t in r.tensors:
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
        if t.name.startswith("blk.0."):
            x = dequantize(t.data, t.tensor_type)
            if not np.isfinite(x).all():
                raise SystemExit(f"{path}: {t.name} dequantises to non-finite values")
            worst = max(worst, float(np.abs(x).max()))
    return {"bytes": path.stat().st_size, "tensor_types": types, "blk0_max_abs": worst}


def compare(a: Path, b: Path) -> tuple[bool, int]:
    from gguf import GGUFReader

    ra, rb = GGUFReader(str(a)), GGUFReader(str(b))
    ta, tb = {t.name: t for t in ra.tensors}, {t.name: t for t in rb.tensors}
    same_types = all(ta[n].tensor_type == tb[n].tensor_type for n in ta)
    identical = sum(bytes(ta[n].data) == bytes(tb[n].data) for n in ta)
    return same_types, identical


def table(report: dict) -> str:
    lines = [f"device {report['device']}; torch {report['torch']}"]
    t = report.get("tests")
    if t:
        lines.append(f"CUDA tests: exit {t['exit']}, {t.get('passed', 0)} passed, {t.get('failed', 0)} failed, "
                     f"{t.get('skipped', 0)} skipped ({t['wall_s']} s)")
    lay = report.get("layer")
    if lay and lay["rows"]:
        lines.append("| tensor | measure plain s | with covariance s | × | Q4_K encode plain s | feedback s | "
                     "K-FAC gain |")
        for r in lay["rows"]:
            lines.append(f"| {r['tensor']} {r['shape'][0]}×{r['shape'][1]} | {r['measure_plain_s']:.2f} | "
                         f"{r['measure_feedback_s']:.2f} | {r['measure_feedback_s'] / r['measure_plain_s']:.2f} | "
                         f"{r['encode_q4k_plain_s']:.3f} | {r['encode_q4k_feedback_s']:.2f} | "
                         f"{r['q4k_kfac_plain_over_feedback']:.2f} |")
        mp = sum(r["measure_plain_s"] for r in lay["rows"])
        mf = sum(r["measure_feedback_s"] for r in lay["rows"])
        ep = sum(r["encode_q4k_plain_s"] for r in lay["rows"])
        ef = sum(r["encode_q4k_feedback_s"] for r in lay["rows"])
        lines.append(f"| layer | {mp:.2f} | {mf:.2f} | {mf / mp:.2f} | {ep:.3f} | {ef:.2f} | |")
    c = report.get("convert")
    if c:
        lines.append(f"convert ({c['layers']} layers; make model {c.get('make_model_s', '-')} s; covariance "
                     f"{c.get('covariance_gib', '-')} GiB; same types {c.get('same_types', '-')}, identical "
                     f"tensors {c.get('identical_tensors', '-')})")
        for rounding in ("plain", "feedback-on-plain"):
            r = c.get(rounding)
            if not r:
                continue
            if "skipped" in r:
                lines.append(f"| {rounding} | skipped: {r['skipped']} |")
                continue
            st = " ".join(f"{k} {v['wall_s']:.1f}" for k, v in r["stages"].items())
            lines.append(f"| {rounding} | exit {r['exit']} | {r['wall_s']} s | {st} | {r.get('bytes', '-')} B |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--steps", nargs="+", choices=STEPS, default=list(STEPS))
    ap.add_argument("--layers", type=int, default=QWEN["num_hidden_layers"])
    ap.add_argument("--tokenizer", help="folder with Qwen2.5-Coder's tokenizer files (convert step)")
    ap.add_argument("--text", help="calibration text (convert step)")
    ap.add_argument("--work", default="/tmp/feedback-gpu", help="folder for the model, caches and outputs")
    ap.add_argument("--compile", default="0", help="QGGUF_COMPILE for every step (0: eager)")
    ap.add_argument("--deadline", type=float, default=3600, help="seconds the whole script may take")
    ap.add_argument("--out", type=Path, help="the report as JSON")
    ap.add_argument("--out-dir", help="a folder for the converts' logs")
    args = ap.parse_args()
    if "convert" in args.steps:
        for opt, value in (("--tokenizer", args.tokenizer), ("--text", args.text)):
            if not value or not Path(value).exists():
                ap.error(f"the convert step needs {opt} (an existing path; got {value!r}), or leave the step out "
                         "with --steps tests layer")
    os.environ["QGGUF_COMPILE"] = args.compile  # the layer step's encoders too: no compile inside its clock
    t0 = time.time()
    args.left = lambda margin: args.deadline - (time.time() - t0) - margin
    Path(args.work).mkdir(parents=True, exist_ok=True)
    report = {"device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
              "torch": torch.__version__, "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    for name, fn in (("tests", step_tests), ("layer", step_layer), ("convert", step_convert)):
        if name not in args.steps:
            continue
        try:
            fn(args, report)
        except Exception as e:  # a failed step leaves the others' figures
            report[f"{name}_error"] = f"{type(e).__name__}: {e}"
            print(f"{name}: {type(e).__name__}: {e}", flush=True)
        if args.out:
            args.out.write_text(json.dumps(report, indent=1))
    report["wall_s"] = round(time.time() - t0, 1)
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))
    print(table(report))


if __name__ == "__main__":
    main()
