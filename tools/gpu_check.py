#!/usr/bin/env python3
"""The NL types on CUDA, checked and timed on a GPU machine (docs/benchmarks.md, "NL types on CUDA").

Steps, each on the CUDA backend (or, with --cpu-only, the same steps on the CPU build, to check the script itself):
  1. test-backend-ops -b CUDA0 -o MUL_MAT / MUL_MAT_ID / GET_ROWS -p 'nl[0-9]_': every NL case against the CPU
     backend (passed, failed, not supported: an NL case the CUDA backend refuses would run on the CPU in a model);
  2. llama-perplexity KLD of an extended-palette file, -ngl 99 against the same file on the CPU (-ngl 0);
  3. llama-bench pp512 / tg128 of that file (-ngl 99);
  4. test-backend-ops perf -o MUL_MAT for the NL types and stock references (IQ4_XS, Q4_K, Q4_0) at n = 1, 8, 512;
and prints a short table last (and writes it as JSON to --out).

The model: --model (an extended-palette GGUF, e.g. from `qgguf convert --palette extended`), else a tiny random
Llama with every NL type and two stock types, made here (qgguf's exporter; no download).
The build: --bin-dir (prebuilt tools, e.g. carried to the GPU machine), else `qgguf llama build --cuda` (with
--cuda-arch), or the CPU build with --cpu-only. The CUDA build takes well over half an hour on a small machine
(mmvq.cu alone about 11 minutes per architecture on 2 cores): build it before the GPU time starts, for the one
architecture of that GPU (--cuda-arch 90 on an H100/H200), and carry it with --bin-dir.

    python tools/gpu_check.py --cuda-arch 90 [--model m.gguf] [--out gpu_check.json]
    python tools/gpu_check.py --cpu-only
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qgguf.llamacpp import build as lb  # noqa: E402
from qgguf.llamacpp.toolout import parse_kl_divergence, parse_llama_bench_json  # noqa: E402

NL_PATTERN = "nl[0-9]_"
PERF_PATTERN = r"type_a=(nl[0-9]_(xs|32)|iq4_xs|q4_K|q4_0),.*n=(1|8|512),"
PERF_PATTERN_CPU = r"type_a=(nl3_xs|iq4_xs),.*n=1,"  # the CPU half: two cases, to keep it short
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def run(cmd: list[str], env: dict, timeout: int = 3600) -> subprocess.CompletedProcess:
    print("$ " + " ".join(cmd), flush=True)
    t0 = time.time()
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    print(f"  exit {res.returncode} in {time.time() - t0:.1f} s", flush=True)
    res.stdout, res.stderr = ANSI.sub("", res.stdout), ANSI.sub("", res.stderr)  # test-backend-ops colours
    return res


def bin_dir(args) -> Path:
    if args.bin_dir:
        return Path(args.bin_dir).resolve()
    spec = lb.BuildSpec.from_env(cuda=not args.cpu_only, cuda_arch=args.cuda_arch)
    return lb.build(spec, install_gguf_py=False) / "bin"


def tiny_model(work: Path) -> Path:
    """A 2-layer random Llama with every NL type and Q4_0 / Q8_0, as the exporter writes it."""
    import gguf

    from qgguf import formats
    from qgguf.assets.tiny import make_tiny_llama
    from qgguf.export.writer import export_gguf
    from qgguf.formats import nl
    from qgguf.llamacpp.converter import convert_hf

    f32 = convert_hf(make_tiny_llama(work / "tiny-llama"), work / "tiny-f32.gguf", "f32")
    nl_types = [f.name for f in formats.all_formats() if isinstance(f, nl.NLFormat)]
    names = sorted(t.name for t in gguf.GGUFReader(f32).tensors if len(t.shape) == 2)
    cycle = nl_types + ["Q4_0", "Q8_0"]
    return export_gguf(f32, work / "tiny-mixed.gguf", {n: cycle[i % len(cycle)] for i, n in enumerate(names)},
                       progress=False)


def tiny_text(work: Path) -> Path:
    from qgguf.assets.tiny import tiny_text as make

    p = work / "text.txt"
    p.write_text(make(20000, seed=5))
    return p


def backend_ops(bins: Path, backend: str, op: str, env: dict) -> dict:
    res = run([str(bins / "test-backend-ops"), "test", "-b", backend, "-o", op, "-p", NL_PATTERN], env)
    out = res.stdout + res.stderr
    m = re.search(r"(\d+)/(\d+) tests passed", out)
    passed, total = (int(m.group(1)), int(m.group(2))) if m else (0, 0)
    unsupported = len(re.findall(rf"{op}\(type_a=nl[^\n]*not supported", out)) + \
        len(re.findall(rf"{op}\(type=nl[^\n]*not supported", out))
    failed = len(re.findall(r"\bFAIL\b", out))
    return {"op": op, "passed": passed, "total": total, "failed": failed, "not_supported": unsupported,
            "ok": res.returncode == 0 and total > 0 and passed == total and failed == 0}


def kld(bins: Path, model: Path, text: Path, ngl: int, threads: int, work: Path, env: dict) -> dict:
    base = work / "cpu.kld"
    common = ["-m", str(model), "-f", str(text), "-c", "128", "--chunks", "8", "-b", "128"]
    res = run([str(bins / "llama-perplexity"), *common, "-ngl", "0", "-t", str(threads),
               "--kl-divergence-base", str(base)], env)
    if res.returncode != 0:
        return {"ok": False, "error": res.stderr[-2000:]}
    # the device run (CPU-only: the CPU again with one thread, a different summation split)
    t2 = threads if ngl else 1
    res = run([str(bins / "llama-perplexity"), *common, "-ngl", str(ngl), "-t", str(t2),
               "--kl-divergence-base", str(base), "--kl-divergence"], env)
    if res.returncode != 0:
        return {"ok": False, "error": res.stderr[-2000:]}
    k = parse_kl_divergence(res.stdout + res.stderr)
    return {"ok": k.kld_mean < 1e-3 and k.same_top_p > 99.0, "kld_mean": k.kld_mean, "kld_max": k.kld_max,
            "same_top_p": k.same_top_p, "ppl": k.ppl, "ppl_base": k.ppl_base}


def bench(bins: Path, model: Path, ngl: int, threads: int, env: dict) -> dict:
    res = run([str(bins / "llama-bench"), "-m", str(model), "-p", "512", "-n", "128", "-ngl", str(ngl),
               "-t", str(threads), "-r", "3", "-o", "json"], env)
    if res.returncode != 0:
        return {"ok": False, "error": res.stderr[-2000:]}
    speeds = parse_llama_bench_json(res.stdout)
    return {"ok": True, **{s.test: round(s.tokens_per_s, 1) for s in speeds},
            "backends": speeds[0].backends if speeds else ""}


def perf(bins: Path, backend: str, pattern: str, env: dict) -> dict:
    res = run([str(bins / "test-backend-ops"), "perf", "-b", backend, "-o", "MUL_MAT", "-p", pattern], env)
    rows = []
    for m in re.finditer(r"MUL_MAT\(type_a=(\w+),type_b=\w+,m=(\d+),n=(\d+),k=(\d+)[^)]*\):\s+(\d+) runs -\s+"
                         r"([\d.]+) us/run -\s+[\d.]+ \w+/run -\s+([\d.]+) (\w)FLOPS", res.stdout + res.stderr):
        scale = {"G": 1e-3, "T": 1.0, "M": 1e-6, "k": 1e-9}.get(m.group(8), float("nan"))
        rows.append({"type": m.group(1), "m": int(m.group(2)), "n": int(m.group(3)), "k": int(m.group(4)),
                     "us_per_run": float(m.group(6)), "tflops": float(m.group(7)) * scale})
    return {"ok": res.returncode == 0 and bool(rows), "rows": rows}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu-only", action="store_true", help="run every step on the CPU build (checks the script)")
    ap.add_argument("--bin-dir", help="prebuilt tools (llama-perplexity, llama-bench, test-backend-ops)")
    ap.add_argument("--cuda-arch", default=None, help="for the CUDA build (default: qgguf's, 80;86;89;90)")
    ap.add_argument("--model", help="an extended-palette GGUF (default: a tiny file with every NL type)")
    ap.add_argument("--text", help="text for llama-perplexity (default: generated)")
    ap.add_argument("--threads", type=int, default=min(8, os.cpu_count() or 2))
    ap.add_argument("--perf-pattern", default=None, help="test-backend-ops perf -p regex")
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args()

    bins = bin_dir(args)
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in [str(bins), env.get("LD_LIBRARY_PATH", "")] if p)
    backend, ngl = ("CPU", 0) if args.cpu_only else ("CUDA0", 99)
    work = Path(tempfile.mkdtemp(prefix="gpu_check."))
    model = Path(args.model) if args.model else tiny_model(work)
    text = Path(args.text) if args.text else tiny_text(work)

    results: dict = {"backend": backend, "bin_dir": str(bins), "model": str(model)}
    results["ops"] = [backend_ops(bins, backend, op, env) for op in ("MUL_MAT", "MUL_MAT_ID", "GET_ROWS")]
    results["kld"] = kld(bins, model, text, ngl, args.threads, work, env)
    results["bench"] = bench(bins, model, ngl, args.threads, env)
    pattern = args.perf_pattern or (PERF_PATTERN_CPU if args.cpu_only else PERF_PATTERN)
    results["perf"] = perf(bins, backend, pattern, env)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))

    ok = all(r["ok"] for r in results["ops"]) and results["kld"]["ok"] and results["bench"]["ok"] \
        and results["perf"]["ok"]
    print(f"\n## NL types on {backend} ({bins})\n")
    print("| check | result |")
    print("|---|---|")
    for r in results["ops"]:
        print(f"| test-backend-ops {r['op']} nl* | {r['passed']}/{r['total']} passed, {r['failed']} failed, "
              f"{r['not_supported']} not supported |")
    k = results["kld"]
    if "kld_mean" in k:
        print(f"| KLD -ngl {ngl} vs CPU | mean {k['kld_mean']:.3g}, max {k['kld_max']:.3g}, same top "
              f"{k['same_top_p']:.2f} %, PPL {k['ppl']:.4g} vs {k['ppl_base']:.4g} |")
    else:
        print(f"| KLD -ngl {ngl} vs CPU | failed |")
    b = results["bench"]
    print(f"| llama-bench -ngl {ngl} | " + (f"pp512 {b.get('pp512')} t/s, tg128 {b.get('tg128')} t/s |"
                                            if b["ok"] else "failed |"))
    for r in results["perf"]["rows"]:
        print(f"| MUL_MAT {r['type']} m={r['m']} n={r['n']} k={r['k']} | {r['us_per_run']:.1f} us/run, "
              f"{r['tflops']:.3g} TFLOPS |")
    print(f"\n{'ALL OK' if ok else 'SOME CHECKS FAILED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
