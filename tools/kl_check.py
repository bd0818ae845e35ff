"""Check the KL model behind the planner: ½·σ²·ΣF predicts the KL divergence caused by weight noise.

For each chosen tensor W: add Gaussian noise δ ~ N(0, σ²) to W alone, run the model on held-out text and measure
the mean per-token KL(p_original ‖ p_noisy); the prediction from the calibration statistics is ½·σ²·ΣF
(ΣF per token). σ² is set per tensor so that the predicted KL is --target nats/token (small enough for the
quadratic regime, large enough to measure). Each tensor is measured with --draws noise draws.

    python tools/kl_check.py MODEL_DIR --stats stats.safetensors [more.safetensors ...] [--text austen] [--md]

With several statistics files (e.g. the two estimators), σ² comes from the first and each file's prediction
is compared with the same measured KL.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch

from qgguf.calibrate.klcheck import run


def markdown(res: dict) -> str:
    labels = [m.get("estimator") or f"stats {i}" for i, m in enumerate(res["stats_meta"])]
    lines = ["| tensor | kind | ΣF (per token) | σ² | predicted KL | measured KL | "
             + " | ".join(f"measured / predicted ({lab})" for lab in labels) + " |",
             "|---|---|---:|---:|---:|---:|" + "---:|" * len(labels)]
    for r in res["rows"]:
        lines.append(f"| {r['tensor']} | {r['kind']} | {r['fisher_sum']:.4g} | {r['sigma2']:.3g} | "
                     f"{r['predicted']:.4g} | {r['measured']:.4g} | "
                     + " | ".join(f"{x:.3f}" for x in r["ratios"]) + " |")
    lines.append("")
    for i, lab in enumerate(labels):
        ratios = [r["ratios"][i] for r in res["rows"]]
        within = sum(abs(x - 1) <= 0.25 for x in ratios)
        lines.append(f"- {lab}: {within} of {len(ratios)} tensors within 25% (ratios {min(ratios):.3f}–"
                     f"{max(ratios):.3f})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir", help="HF folder, or an asset name (smollm2-135m)")
    ap.add_argument("--stats", type=Path, nargs="+", required=True,
                    help="statistics from `qgguf calibrate` (σ² is set from the first)")
    ap.add_argument("--text", default="austen", help="held-out text file, or an asset name (default austen)")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--target", type=float, default=0.01, help="predicted KL per token to aim σ² at")
    ap.add_argument("--draws", type=int, default=2)
    ap.add_argument("--start", type=float, default=0.0,
                    help="read the text from this fraction of its length on (e.g. 0.5 for the calibration text's "
                         "unread second half)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tensors", nargs="*", default=None, help="GGUF-name globs (default: a spread of kinds)")
    ap.add_argument("--blocks", type=int, nargs="*", default=None, help="blocks to sample (default first/mid/last)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", type=Path, default=None, help="write the results as JSON")
    ap.add_argument("--md", action="store_true", help="print a markdown table")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    def resolve(x: str) -> Path:
        if Path(x).exists():
            return Path(x)
        from qgguf.assets.fetch import asset_path

        return asset_path(x)

    res = run(resolve(args.model_dir), args.stats, resolve(args.text), args.tokens, args.seq_len, args.target,
              args.draws, args.seed, args.tensors, args.blocks, args.start)
    res["command"] = "python tools/kl_check.py " + " ".join(argv if argv is not None else sys.argv[1:])
    res["machine"] = f"{platform.machine()}, {torch.get_num_threads()} torch threads"
    if args.json:
        from qgguf.files import atomic_output

        with atomic_output(args.json) as tmp:
            tmp.write_text(json.dumps(res, indent=1))
    if args.md:
        print(markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
