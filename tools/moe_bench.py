#!/usr/bin/env python3
"""A bench table for a mixture-of-experts model (docs/benchmarks.md, "qgguf bench: tiny-mixtral-random").

No package registry ships small real MoE weights (docs/design.md, "Mixture of experts"), so the model is a tiny
random Mixtral made here (qgguf.assets.tiny.make_tiny: 4 experts, 2 per token, seeded, so the same files every
time), and `qgguf bench` compares qgguf's plans at the file sizes of llama-quantize presets (with an imatrix from
llama-imatrix, which collects per-expert statistics) on KLD against the F32 model over held-out text. With random
weights the numbers are a smoke test of the MoE path end to end, not evidence of quality: the section says so.

    python tools/moe_bench.py [--work DIR] [--presets Q3_K_M Q4_K_M Q6_K] [-t 2] [--update-docs]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qgguf.assets.tiny import make_tiny  # noqa: E402
from qgguf.bench.config import config_from_args  # noqa: E402
from qgguf.bench.report import print_summary, update_docs  # noqa: E402
from qgguf.bench.run import run_bench  # noqa: E402
from qgguf.cli import build_parser  # noqa: E402
from qgguf.llamacpp.build import repo_root  # noqa: E402

MODEL = dict(arch="mixtral", hidden=256, ffn=512, layers=4, seed=0)  # 4 experts of FFN 512, 2 per token

NOTE = ("The model is a tiny random Mixtral ({layers} layers, hidden {hidden}, 4 experts of FFN {ffn}, 2 routed per "
        "token; `make_tiny` seed {seed}, made by `python tools/moe_bench.py`), because no package registry ships "
        "small real MoE weights. Random weights make these KLD figures a smoke test of the MoE path (per-expert "
        "calibration, stacked expert tensors measured and encoded expert by expert, llama-imatrix's per-expert "
        "imatrix for the presets), not a measure of quality: a random model's output distribution and its "
        "sensitivity to each tensor are unlike a trained model's.").format(**MODEL)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/qgguf-moe-bench"), help="model and bench folder")
    ap.add_argument("--presets", nargs="+", default=["Q3_K_M", "Q4_K_M", "Q6_K"])
    ap.add_argument("--chunks", type=int, default=20, help="chunks of 512 tokens of the held-out text")
    ap.add_argument("-t", "--threads", type=int, default=1)
    ap.add_argument("--update-docs", action="store_true", help="write the section into docs/benchmarks.md")
    args = ap.parse_args(argv)

    model = args.work / "tiny-mixtral-random"
    if not (model / "config.json").is_file():
        kw = {k: v for k, v in MODEL.items() if k != "arch"}
        make_tiny(MODEL["arch"], model, **kw)
    bench_argv = ["bench", str(model), "--presets", *args.presets, "--sizes", *args.presets, "--targets",
                  "--palettes", "stock", "--chunks", str(args.chunks), "-t", str(args.threads),
                  "-o", str(args.work / "bench")]
    bench = build_parser().parse_args(bench_argv)
    cfg = config_from_args(bench)
    results = run_bench(cfg)
    results["out"] = str(cfg.out)
    print_summary(results)
    if args.update_docs and not results["failed"]:
        docs = update_docs(results, cfg.out / "pareto.png", repo_root() / "docs" / "benchmarks.md", note=NOTE)
        print(f"wrote {docs}")
    return 1 if results["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
