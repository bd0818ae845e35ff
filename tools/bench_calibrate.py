"""Calibration benchmark: speed (tokens/s) and the spread of ΣF between two seeds.

    python tools/bench_calibrate.py smollm2-135m --tokens 16384 --seeds 0 1 --estimator sequence --dir out/cal
    python tools/bench_calibrate.py qwen2.5-coder-1.5b --tokens 1024 --seeds 0 --dir out/cal

MODEL is an HF folder or an asset name. Each run's statistics go to DIR/<model>-<estimator>-<tokens>-s<seed>
.safetensors with a .json beside it (timings, command, machine); a finished run is reused. Prints a markdown
section (speed table, seed spread) for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

import numpy as np
import torch

from qgguf.calibrate.runner import DEFAULT_SEQ_LEN, calibrate
from qgguf.calibrate.stats import load_stats
from qgguf.files import atomic_output


def resolve(x: str) -> Path:
    if Path(x).exists():
        return Path(x)
    from qgguf.assets.fetch import asset_path

    return asset_path(x)


def machine() -> str:
    return f"{platform.machine()} CPU, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


def one_run(model_dir: Path, label: str, text: Path | None, tokens: int, seq_len: int, seed: int, estimator: str,
            out_dir: Path) -> dict:
    base = f"{label}-{estimator}-{tokens}-s{seed}"
    stats_path, info_path = out_dir / f"{base}.safetensors", out_dir / f"{base}.json"
    if stats_path.is_file() and info_path.is_file():
        return json.loads(info_path.read_text())
    stats = calibrate(model_dir, stats_path, text=text, tokens=tokens, seq_len=seq_len, seed=seed,
                      estimator=estimator)
    load1 = os.getloadavg()[0]
    info = {"stats": str(stats_path), "tokens": stats.meta["tokens"], "seed": seed, "estimator": estimator,
            "seq_len": seq_len, **stats.timing, "tokens_per_s": stats.meta["tokens"] / stats.timing["loop_s"],
            "machine": machine(), "load_average_1min_at_end": load1}
    with atomic_output(info_path) as tmp:
        tmp.write_text(json.dumps(info, indent=1))
    return info


def seed_spread(paths: list[Path]) -> tuple[list[tuple[str, float]], dict]:
    """Per tensor: |ΣF_a − ΣF_b| / mean(ΣF_a, ΣF_b) between the first two seeds."""
    a, b = load_stats(paths[0]), load_stats(paths[1])
    rows = []
    for name in a.names():
        fa, fb = a[name].fisher_sum, b[name].fisher_sum
        rows.append((name, abs(fa - fb) / (0.5 * (fa + fb))))
    d = np.array([r for _, r in rows])
    worst = max(rows, key=lambda r: r[1])
    return rows, {"tensors": len(rows), "median": float(np.median(d)), "p90": float(np.quantile(d, 0.9)),
                  "max": float(d.max()), "worst": worst[0], "over_10pct": int((d > 0.10).sum())}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="HF folder or asset name (smollm2-135m, qwen2.5-coder-1.5b)")
    ap.add_argument("--text", default="wiki", help="calibration text file or asset name (default wiki)")
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--seq-len", type=int, default=DEFAULT_SEQ_LEN)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--estimator", default="sequence", choices=("token", "sequence"))
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--dir", type=Path, required=True, help="folder for the statistics and per-run JSON")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.dir.mkdir(parents=True, exist_ok=True)
    model_dir, text = resolve(args.model), resolve(args.text)
    label = Path(args.model).name if Path(args.model).exists() else args.model
    runs = [one_run(model_dir, label, text, args.tokens, args.seq_len, s, args.estimator, args.dir)
            for s in args.seeds]
    cmd = "python tools/bench_calibrate.py " + " ".join(argv if argv is not None else sys.argv[1:])
    print(f"`{cmd}`  \nmodel: {label} (de-gridded), text: {text.name}, machine: {runs[0]['machine']}\n")
    print("| seed | estimator | tokens | seq len | load s | calibrate s | tokens/s | 1-min load avg |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    for r in runs:
        print(f"| {r['seed']} | {r['estimator']} | {r['tokens']} | {r['seq_len']} | {r['load_s']:.1f} | "
              f"{r['loop_s']:.1f} | {r['tokens_per_s']:.1f} | {r['load_average_1min_at_end']:.1f} |")
    if len(runs) >= 2:
        _, summary = seed_spread([Path(r["stats"]) for r in runs[:2]])
        print(f"\nSeed spread of ΣF (seeds {runs[0]['seed']} vs {runs[1]['seed']}, |a−b|/mean over "
              f"{summary['tensors']} tensors): median {100 * summary['median']:.2f}%, 90th percentile "
              f"{100 * summary['p90']:.2f}%, max {100 * summary['max']:.2f}% ({summary['worst']}); "
              f"{summary['over_10pct']} tensors over 10%.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
