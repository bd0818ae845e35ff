#!/usr/bin/env python3
"""Split budgets on a GPU: the bytes per device llama.cpp reports when it loads a file with the options the plan
wrote, against the plan's placement and budgets (docs/design.md, "Mixture of experts", split budgets).

Two steps, so that the GPU time is only the loading:
  prepare (CPU, here): tiny random models (a Mixtral, an ERNIE 4.5 MoE with a dense first layer and a shared
      expert, a dense Llama), each converted by `qgguf convert --budget-gpu G --budget-cpu C` at two budget pairs;
      writes the GGUFs, their plan JSONs and a list of the cases into --work.
  check (GPU machine, or --cpu-only to check the script on a CPU build): for each case, llama-completion loads the
      file with the plan's `llama_args` and `--load-mode none` (without mmap every tensor is copied into its
      device's buffer; with mmap the CPU buffer would be the mapped span of the file, other tensors included),
      and its "<buffer> model buffer size = X MiB" lines are summed per device (CUDA* buffers: GPU; CPU,
      CPU_REPACK, CUDA_Host: CPU). Each device must hold the plan's bytes, within the print's rounding (0.005 MiB
      per buffer) plus the buffers' alignment padding (at most 256 bytes per tensor), and so stay within its
      budget. With --cpu-only every buffer is a CPU buffer, so the CPU must hold both devices' plan bytes.

    python tools/split_gpu_check.py prepare --work /tmp/split-check
    python tools/split_gpu_check.py check --work /tmp/split-check --bin-dir BUILD/bin [--out split_check.json]
    python tools/split_gpu_check.py check --work /tmp/split-check --cpu-only

The CUDA build (`qgguf llama build --cuda --cuda-arch 90`) takes long on a small machine: build it before the GPU
time starts and give its bin folder with --bin-dir (tools/gpu_check.py says more).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

BUFFER_LINE = re.compile(r"model buffer size\s*=\s*([0-9.]+) MiB")
BUFFER_NAME = re.compile(r"(\S+) model buffer size")
ALIGN_SLACK = 256  # bytes of padding a backend buffer may add per tensor (ggml's CPU and CUDA alignments are less)
PRINT_SLACK = 0.005 * 2**20  # the MiB are printed with two decimals

# tiny model -> (make_tiny arguments, (GPU, CPU) budget pairs as fractions of the F32 tensor bytes)
MODELS = {
    "mixtral": ({"hidden": 512, "ffn": 512, "layers": 4}, [(0.05, 0.08), (0.09, 0.05)]),
    # ERNIE's dense FFN must be its shared expert's width × kv heads for llama.cpp: the default 256 / 512 keeps that
    "ernie4_5_moe": ({"layers": 4}, [(0.05, 0.08), (0.09, 0.05)]),
    "llama": ({"hidden": 512, "ffn": 1024, "layers": 4}, [(0.05, 0.08), (0.09, 0.05)]),
}


def prepare(work: Path, threads: int) -> Path:
    import gguf

    from qgguf.assets.tiny import make_tiny, tiny_text
    from qgguf.llamacpp.converter import convert_hf

    work.mkdir(parents=True, exist_ok=True)
    text = work / "cal.txt"
    text.write_text(tiny_text(6000, seed=1))
    cases = []
    for arch, (kw, pairs) in MODELS.items():
        model = work / arch
        if not (model / "config.json").is_file():
            make_tiny(arch, model, **kw)
        f32 = convert_hf(model, work / f"{arch}-f32.gguf")
        total = sum(int(t.n_bytes) for t in gguf.GGUFReader(f32).tensors)
        for i, (fg, fc) in enumerate(pairs):
            gpu, cpu = int(total * fg), int(total * fc)
            out = work / f"{arch}-{i}.gguf"
            cmd = [sys.executable, "-m", "qgguf", "convert", str(model), "-o", str(out), "--budget-gpu", str(gpu),
                   "--budget-cpu", str(cpu), "--tokens", "1024", "--seq-len", "128", "--text", str(text),
                   "-t", str(threads)]
            print("$ " + " ".join(cmd), flush=True)
            res = subprocess.run(cmd, capture_output=True, text=True)
            if res.returncode != 0:
                raise SystemExit(f"{arch} {i}: convert failed:\n{res.stderr[-3000:]}")
            cases.append({"arch": arch, "gguf": out.name, "plan": out.with_suffix(".plan.json").name,
                          "budget": {"GPU": gpu, "CPU": cpu}})
    (work / "cases.json").write_text(json.dumps(cases, indent=1) + "\n")
    print(f"wrote {len(cases)} cases to {work / 'cases.json'}")
    return work / "cases.json"


def buffers(log: str) -> dict[str, float]:
    """Bytes per buffer name from llama.cpp's "<name> model buffer size = X MiB" lines (summed per name)."""
    out: dict[str, float] = {}
    for line in log.splitlines():
        m, n = BUFFER_LINE.search(line), BUFFER_NAME.search(line)
        if m and n:
            out[n.group(1)] = out.get(n.group(1), 0.0) + float(m.group(1)) * 2**20
    return out


def check_case(case: dict, work: Path, bin_dir: Path, cpu_only: bool, threads: int) -> dict:
    plan = json.loads((work / case["plan"]).read_text())
    pl = plan["placement"]
    n_tensors = {d: sum(1 for v in pl["device"].values() if v == d) for d in ("GPU", "CPU")}
    cmd = [str(bin_dir / "llama-completion"), "-m", str(work / case["gguf"]), *pl["llama_args"], "--load-mode",
           "none", "-lv", "4", "-p", "The world", "-n", "4", "--temp", "0", "-no-cnv", "-t", str(threads)]
    res = subprocess.run(cmd, capture_output=True, text=True, errors="replace", timeout=600)
    bufs = buffers(res.stdout + res.stderr)
    reported = {"GPU": sum(v for k, v in bufs.items() if k.startswith("CUDA") and k != "CUDA_Host"),
                "CPU": sum(v for k, v in bufs.items() if not (k.startswith("CUDA") and k != "CUDA_Host"))}
    want = dict(pl["bytes"])
    tensors = dict(n_tensors)
    if cpu_only:  # a CPU build puts every tensor in a CPU buffer, whatever -ngl says
        want = {"GPU": 0, "CPU": want["GPU"] + want["CPU"]}
        tensors = {"GPU": 0, "CPU": n_tensors["GPU"] + n_tensors["CPU"]}
    problems = []
    if res.returncode != 0:
        problems.append(f"llama-completion exit {res.returncode}: {res.stderr.strip().splitlines()[-1:]}")
    if not bufs:
        problems.append("no 'model buffer size' lines")
    for dev in ("GPU", "CPU"):
        n_buf = sum(1 for k in bufs if (k.startswith("CUDA") and k != "CUDA_Host") == (dev == "GPU"))
        lo = want[dev] - PRINT_SLACK * n_buf
        hi = want[dev] + PRINT_SLACK * n_buf + ALIGN_SLACK * tensors[dev]
        if not lo <= reported[dev] <= hi:
            problems.append(f"{dev}: llama.cpp reports {reported[dev]:,.0f} bytes, the plan {want[dev]:,} "
                            f"(allowed {lo:,.0f}–{hi:,.0f})")
        if not cpu_only and reported[dev] > case["budget"][dev] + PRINT_SLACK * n_buf:
            problems.append(f"{dev}: {reported[dev]:,.0f} bytes over the budget {case['budget'][dev]:,}")
    return {"case": case["gguf"], "args": pl["llama_args"], "plan_bytes": pl["bytes"], "budget": case["budget"],
            "buffers": {k: round(v) for k, v in bufs.items()}, "reported": {k: round(v) for k, v in reported.items()},
            "ok": not problems, "problems": problems}


def check(work: Path, bin_dir: Path | None, cpu_only: bool, threads: int, out: Path | None) -> int:
    from qgguf.llamacpp import build as lb

    if bin_dir is None:
        bin_dir = lb.build(lb.BuildSpec.from_env(cuda=not cpu_only), install_gguf_py=False) / "bin"
    cases = json.loads((work / "cases.json").read_text())
    rows = [check_case(c, work, Path(bin_dir), cpu_only, threads) for c in cases]
    print(f"{'case':<22} {'llama.cpp options':<44} {'GPU plan':>12} {'GPU llama':>12} {'CPU plan':>12} "
          f"{'CPU llama':>12}  ok")
    for r in rows:
        print(f"{r['case']:<22} {' '.join(r['args'])[:44]:<44} {r['plan_bytes']['GPU']:>12,} "
              f"{r['reported']['GPU']:>12,} {r['plan_bytes']['CPU']:>12,} {r['reported']['CPU']:>12,}  "
              f"{'yes' if r['ok'] else 'NO: ' + '; '.join(r['problems'])}")
    if out is not None:
        out.write_text(json.dumps({"cpu_only": cpu_only, "rows": rows}, indent=1) + "\n")
    return 0 if all(r["ok"] for r in rows) else 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("step", choices=("prepare", "check"))
    ap.add_argument("--work", type=Path, required=True, help="folder of the models, plans and cases.json")
    ap.add_argument("--bin-dir", type=Path, default=None, help="built llama.cpp tools (the CUDA build's bin)")
    ap.add_argument("--cpu-only", action="store_true", help="check with the CPU build (the script itself)")
    ap.add_argument("-t", "--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None, help="write the rows as JSON")
    args = ap.parse_args(argv)
    if args.step == "prepare":
        prepare(args.work, args.threads)
        return 0
    return check(args.work, args.bin_dir, args.cpu_only, args.threads, args.out)


if __name__ == "__main__":
    sys.exit(main())
