#!/usr/bin/env python3
"""The NL types on the CPU: tokens/s against the stock type nearest in bpw, and a mixed file's measured KLD.

    python tools/nl_bench.py speed [--reps 2]      # llama-bench pp512 / tg128, 2 threads, one type per model
    python tools/nl_bench.py kld [--target-bpw 4.5] # qgguf convert --palette extended vs stock on SmolLM2
    python tools/nl_bench.py kernels                # test-backend-ops perf MUL_MAT, m=4096 k=14336

speed: every 2-D weight of the model in one type (llama-quantize --pure from the F32 GGUF, token embedding and
output included): Qwen2.5-Coder-1.5B (rows all multiples of 256) for the _XS types, SmolLM2-135M (576-wide rows:
block-32 types only) for the _32 types. The machine may be shared, so each repetition runs the NL file and its stock
partner back to back (alternating which goes first) and the table gives the mean of the per-repetition ratios.

kld: `qgguf convert` with the extended and the stock palette at the same budget, each file's KL divergence to the
F32 model over the bench's cached logits (Austen, 20 chunks of 512; `qgguf bench` makes them) against the planner's
predicted KL.

`--write-docs` replaces this tool's sections of docs/benchmarks.md with the tables; results go to --out as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qgguf.bench.config import model_source
from qgguf.docs import write_heading_section
from qgguf.files import atomic_output, cache_dir  # noqa: E402
from qgguf.llamacpp.build import LLAMA_CPP_COMMIT, tool_env, tool_path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MACHINE = "2-core x86-64 CPU"

# NL type -> the stock type nearest in bpw that takes the model's rows (block 32 only on SmolLM2)
SPEED_PAIRS = {
    "qwen2.5-coder-1.5b": (("NL2_XS", "Q2_K"), ("NL3_XS", "Q3_K"), ("NL5_XS", "Q5_K"), ("NL6_XS", "Q6_K")),
    "smollm2-135m": (("NL2_32", "Q4_0"), ("NL3_32", "IQ4_NL"), ("NL5_32", "Q5_0"), ("NL6_32", "Q5_1")),
}
KERNEL_PAIRS = (("NL2_XS", "Q2_K"), ("NL2_32", "Q2_K"), ("NL3_XS", "Q3_K"), ("NL3_32", "Q3_K"), ("NL5_XS", "Q5_K"),
                ("NL5_32", "Q5_0"), ("NL6_XS", "Q6_K"), ("NL6_32", "Q6_K"), ("IQ4_XS", "Q4_K"))


def sh(cmd: list, timeout: int = 3600) -> str:
    res = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, env=tool_env())
    if res.returncode != 0:
        raise SystemExit(f"{' '.join(map(str, cmd))} failed:\n{(res.stdout + res.stderr)[-3000:]}")
    return res.stdout + res.stderr


def f32_gguf(asset: str) -> Path:
    """The bench cache's F32 GGUF of an asset (made with llama.cpp's converter if missing)."""
    from qgguf.llamacpp.converter import convert_hf

    src = model_source(asset)
    f32 = cache_dir("bench") / src.key / f"f32-{LLAMA_CPP_COMMIT}.gguf"
    if not f32.is_file():
        f32.parent.mkdir(parents=True, exist_ok=True)
        print(f"converting {asset} to F32 -> {f32}", file=sys.stderr, flush=True)
        convert_hf(src.path, f32, "f32")
    return f32


def quantized(f32: Path, typ: str, work: Path) -> Path:
    """The whole model in one type (llama-quantize --pure, embedding and output too), made once."""
    out = work / f"{f32.parent.name}-{typ}.gguf"
    if not out.is_file():
        with atomic_output(out, inputs=[f32]) as tmp:
            sh([tool_path("llama-quantize"), "--pure", "--token-embedding-type", typ.lower(),
                "--output-tensor-type", typ.lower(), f32, tmp, typ, "2"])
    return out


def llama_bench(model: Path, threads: int, warmup: bool = True) -> dict[str, float]:
    """tokens/s of one llama-bench repetition: {'pp512': ..., 'tg128': ...}."""
    cmd = [tool_path("llama-bench"), "-m", model, "-p", "512", "-n", "128", "-t", threads, "-r", "1", "-o", "json"]
    out = sh(cmd + ([] if warmup else ["--no-warmup"]))
    rows = json.loads(out[out.index("["):out.rindex("]") + 1])
    got = {}
    for r in rows:
        key = f"pp{r['n_prompt']}" if r["n_prompt"] else f"tg{r['n_gen']}"
        got[key] = float(r["avg_ts"])
    return got


def type_bpw(model: Path) -> float:
    """bits per weight of a GGUF's tensor data."""
    import gguf

    r = gguf.GGUFReader(model)
    return 8 * sum(int(t.n_bytes) for t in r.tensors) / sum(int(t.n_elements) for t in r.tensors)


def cmd_speed(args) -> dict:
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    results = {"command": " ".join(["python tools/nl_bench.py", *sys.argv[1:]]), "machine": MACHINE,
               "date": time.strftime("%Y-%m-%d"), "reps": args.reps, "threads": args.threads,
               "no_warmup": args.no_warmup, "rows": []}
    for asset in args.models:
        f32 = f32_gguf(asset)
        for nl_type, stock in SPEED_PAIRS[asset]:
            files = {t: quantized(f32, t, work) for t in (nl_type, stock)}
            runs: dict[str, list[dict]] = {nl_type: [], stock: []}
            for rep in range(args.reps):
                order = (nl_type, stock) if rep % 2 == 0 else (stock, nl_type)
                for t in order:
                    results.setdefault("load_1min", []).append(round(os.getloadavg()[0], 2))
                    runs[t].append(llama_bench(files[t], args.threads, not args.no_warmup))
                    print(asset, t, rep, runs[t][-1], file=sys.stderr, flush=True)
            row = {"model": asset, "nl": nl_type, "stock": stock,
                   "nl_bpw": type_bpw(files[nl_type]), "stock_bpw": type_bpw(files[stock])}
            for test in ("pp512", "tg128"):
                a = [r[test] for r in runs[nl_type]]
                b = [r[test] for r in runs[stock]]
                row[test] = {"nl": sum(a) / len(a), "stock": sum(b) / len(b),
                             "ratio": sum(x / y for x, y in zip(a, b)) / len(a)}
            results["rows"].append(row)
    return results


def load_text(res: dict) -> str:
    loads = res.get("load_1min")
    if not loads:
        return "machine load not recorded"
    return f"1-minute load average before each llama-bench run {min(loads):.1f}–{max(loads):.1f}"


def speed_markdown(res: dict) -> str:
    lines = [
        "## Non-linear types: CPU speed",
        "",
        f"Command: `{res['command']}` ({res['date']}), {res['machine']} ({load_text(res)}), llama-bench of the "
        f"fork at {LLAMA_CPP_COMMIT}, {res['threads']} threads, {res['reps']} repetition(s) per file"
        f"{', no warm-up run' if res.get('no_warmup') else ''}, each NL file and "
        "its stock partner run back to back (alternating first). Every weight of the model in the one type "
        "(`llama-quantize --pure`, token embedding and output included). Models: Qwen2.5-Coder-1.5B-Instruct and "
        "SmolLM2-135M-Instruct, de-gridded. Ratio = mean over repetitions of NL t/s ÷ stock t/s.",
        "",
        "| model | NL type | bpw | pp512 t/s | tg128 t/s | stock type | bpw | pp512 t/s | tg128 t/s | pp512 ratio | "
        "tg128 ratio |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res["rows"]:
        lines.append(f"| {r['model']} | {r['nl']} | {r['nl_bpw']:.3f} | {r['pp512']['nl']:.1f} | "
                     f"{r['tg128']['nl']:.2f} | {r['stock']} | {r['stock_bpw']:.3f} | {r['pp512']['stock']:.1f} | "
                     f"{r['tg128']['stock']:.2f} | {r['pp512']['ratio']:.2f} | {r['tg128']['ratio']:.2f} |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------- KLD
def cmd_kld(args) -> dict:
    if args.tiny:
        return kld_tiny(args)
    from qgguf.llamacpp.toolout import parse_kl_divergence

    asset = "smollm2-135m"
    src = model_source(asset)
    folder = cache_dir("bench") / src.key
    logits = sorted(folder.glob("logits-*-c512-n20-cpu.kld"))
    if not logits:
        raise SystemExit(f"no cached F32 logits in {folder}; run `qgguf bench {asset}` once first")
    meta = json.loads(logits[0].with_suffix(".json").read_text())
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    results = {"command": " ".join(["python tools/nl_bench.py", *sys.argv[1:]]), "machine": MACHINE,
               "date": time.strftime("%Y-%m-%d"), "text": meta.get("text"), "chunks": meta.get("chunks"),
               "ctx": meta.get("ctx"), "rows": []}
    for target in args.target_bpw:
        for palette in ("extended", "stock"):
            out = work / f"{asset}-{palette}-{target}.gguf"
            log = sh([sys.executable, "-m", "qgguf", "convert", asset, "-o", out, "--target-bpw", target,
                      "--palette", palette], timeout=7200)
            plan = json.loads(out.with_name(out.stem + ".plan.json").read_text())
            types: dict[str, int] = {}
            for t in plan["tensors"]:
                types[t["type"]] = types.get(t["type"], 0) + 1
            text = sh([tool_path("llama-perplexity"), "-m", out, "-f", src_text(meta), "-c", meta["ctx"],
                       "--chunks", meta["chunks"], "--kl-divergence-base", logits[0], "--kl-divergence",
                       "-t", "2"], timeout=7200)
            kld = parse_kl_divergence(text)
            results["rows"].append({"target_bpw": target, "palette": palette, "bpw": type_bpw(out),
                                    "predicted_kl": predicted_kl(plan, log), "kld_mean": kld.kld_mean,
                                    "kld_mean_err": kld.kld_mean_err, "same_top_p": kld.same_top_p,
                                    "types": types})
            print(results["rows"][-1], file=sys.stderr, flush=True)
    return results


def kld_tiny(args) -> dict:
    """The same comparison on the tests' tiny random Llama (seed 0; calibration text seed 1, 1024 tokens; evaluation
    text seed 3, 3 chunks of 128): a few minutes, for a quick check of the predicted-KL band."""
    import tempfile

    from qgguf.assets.tiny import make_tiny_llama, tiny_text
    from qgguf.llamacpp.toolout import parse_kl_divergence

    d = Path(tempfile.mkdtemp(prefix="nl-kld-tiny-", dir=args.work if Path(args.work).is_dir() else None))
    model = make_tiny_llama(d / "model")
    (d / "calib.txt").write_text(tiny_text(seed=1))
    (d / "eval.txt").write_text(tiny_text(6000, seed=3))
    stats = d / "stats.safetensors"
    sh([sys.executable, "-m", "qgguf", "calibrate", model, "-o", stats, "--text", d / "calib.txt", "--tokens", "1024",
        "--seq-len", "128"])
    sh([sys.executable, "-m", "qgguf", "convert-hf", model, "-o", d / "f32.gguf"])
    ppl = [tool_path("llama-perplexity"), "-f", d / "eval.txt", "-c", "128", "--chunks", "3", "-t", "2", "-b", "128"]
    sh(ppl + ["-m", d / "f32.gguf", "--kl-divergence-base", d / "f32.kld"])
    results = {"command": " ".join(["python tools/nl_bench.py", *sys.argv[1:]]), "machine": MACHINE,
               "date": time.strftime("%Y-%m-%d"), "model": "tiny random Llama (qgguf/assets/tiny.py)",
               "text": "tiny_text(seed=3)", "chunks": 3, "ctx": 128, "rows": []}
    for target in args.target_bpw:
        for palette in ("extended", "stock"):
            out = d / f"{palette}-{target}.gguf"
            log = sh([sys.executable, "-m", "qgguf", "convert", model, "-o", out, "--target-bpw", target,
                      "--palette", palette, "--stats", stats])
            plan = json.loads(out.with_name(out.stem + ".plan.json").read_text())
            types: dict[str, int] = {}
            for t in plan["tensors"]:
                types[t["type"]] = types.get(t["type"], 0) + 1
            kld = parse_kl_divergence(sh(ppl + ["-m", out, "--kl-divergence-base", d / "f32.kld", "--kl-divergence"]))
            results["rows"].append({"target_bpw": target, "palette": palette, "bpw": type_bpw(out),
                                    "predicted_kl": predicted_kl(plan, log), "kld_mean": kld.kld_mean,
                                    "kld_mean_err": kld.kld_mean_err, "same_top_p": kld.same_top_p,
                                    "types": types})
    return results


def src_text(meta: dict) -> Path:
    from qgguf.assets.fetch import asset_path
    from qgguf.hashing import sha256_file

    p = asset_path(meta["text"])
    p = next(p.rglob("*.txt")) if p.is_dir() else p
    if sha256_file(p) != meta["text_sha256"]:
        raise SystemExit(f"{p} is not the text the cached logits were made from")
    return p


def predicted_kl(plan: dict, log: str) -> float:
    for k in ("predicted_kl",):
        for where in (plan, plan.get("summary", {}), plan.get("totals", {})):
            if isinstance(where, dict) and k in where:
                return float(where[k])
    m = re.search(r"predicted KL\s+([0-9.eE+-]+)", log)
    if m is None:
        raise SystemExit("qgguf convert printed no predicted KL")
    return float(m.group(1))


def kld_markdown(res: dict) -> str:
    model = res.get("model", "SmolLM2-135M-Instruct (de-gridded)")
    lines = [
        "## Non-linear types: measured KLD of mixed files" + (" (tiny model)" if "tiny" in model else ""),
        "",
        f"Command: `{res['command']}` ({res['date']}), {res['machine']}. Model: {model}. "
        f"`qgguf convert`{' (default calibration)' if 'tiny' not in model else ''} with each palette at the same "
        "bpw target; KLD to the F32 model from "
        f"`llama-perplexity --kl-divergence` over {res['text']}, {res['chunks']} chunks of {res['ctx']} tokens "
        + ("(the bench's cached F32 logits). " if "tiny" not in model
           else "(calibration: `qgguf calibrate` on 1024 tokens of tiny_text(seed=1)). ")
        + "Predicted KL: the planner's ½·Σ Fisher·error for the file.",
        "",
        "| target bpw | palette | file bpw | predicted KL | measured KLD | measured / predicted | same top token % | "
        "types (tensors) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in res["rows"]:
        ty = ", ".join(f"{k} {v}" for k, v in sorted(r["types"].items(), key=lambda kv: -kv[1]))
        lines.append(f"| {r['target_bpw']} | {r['palette']} | {r['bpw']:.3f} | {r['predicted_kl']:.4f} | "
                     f"{r['kld_mean']:.4f} ± {r['kld_mean_err']:.4f} | {r['kld_mean'] / r['predicted_kl']:.2f} | "
                     f"{r['same_top_p']:.2f} | {ty} |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------- kernels
LINE = re.compile(r"MUL_MAT\(type_a=(\w+),type_b=f32,m=4096,n=(\d+),k=14336,.*?\):\s+(\d+) runs -\s+([\d.]+) us/run")


def cmd_kernels(args) -> dict:
    types = sorted({t for p in KERNEL_PAIRS for t in p})
    rows = []
    for bs in args.batch:
        # ggml's type names: lower case but for the K of the K-quants (q2_K); -p is a case-sensitive regex
        pat = f"type_a=({'|'.join(t.lower().replace('_k', '_K') for t in types)}),type_b=f32,m=4096,n={bs},k=14336,"
        out = sh([tool_path("test-backend-ops"), "perf", "-b", "CPU", "-o", "MUL_MAT", "-p", pat])
        us = {m.group(1).upper(): float(m.group(4)) for m in LINE.finditer(out) if int(m.group(2)) == bs}
        for a, b in KERNEL_PAIRS:
            if a in us and b in us:
                rows.append({"n": bs, "nl": a, "stock": b, "nl_us": us[a], "stock_us": us[b]})
    threads = max(1, (os.cpu_count() or 2) // 2)  # test-backend-ops uses half the hardware threads
    print(f"test-backend-ops perf -b CPU -o MUL_MAT, m=4096 k=14336, {threads} thread(s)")
    print("| n | NL type | µs/op | stock type | µs/op | NL / stock time |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['n']} | {r['nl']} | {r['nl_us']:.0f} | {r['stock']} | {r['stock_us']:.0f} | "
              f"{r['nl_us'] / r['stock_us']:.2f} |")
    return {"rows": rows}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    sp = sub.add_parser("speed")
    sp.add_argument("--models", nargs="+", default=list(SPEED_PAIRS), choices=list(SPEED_PAIRS))
    sp.add_argument("--reps", type=int, default=2)
    sp.add_argument("--threads", type=int, default=2)
    sp.add_argument("--no-warmup", action="store_true",
                    help="skip llama-bench's warm-up run (it repeats the whole 512-token prompt)")
    kp = sub.add_parser("kld")
    kp.add_argument("--target-bpw", nargs="+", type=float, default=[4.5])
    kp.add_argument("--tiny", action="store_true", help="the tests' tiny random Llama instead of SmolLM2")
    kn = sub.add_parser("kernels")
    kn.add_argument("--batch", type=int, nargs="*", default=[1, 8])
    for p in (sp, kp, kn):
        p.add_argument("--work", default="/tmp/qgguf-nl-bench", help="folder for the quantised files")
        p.add_argument("--out", help="write the results as JSON here")
        p.add_argument("--write-docs", action="store_true", help="update this tool's section of docs/benchmarks.md")
    args = ap.parse_args(argv)
    res = {"speed": cmd_speed, "kld": cmd_kld, "kernels": cmd_kernels}[args.cmd](args)
    md = {"speed": speed_markdown, "kld": kld_markdown}.get(args.cmd)
    if md is not None:
        print(md(res))
        if args.write_docs:
            write_heading_section(ROOT / "docs" / "benchmarks.md", md(res))
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
