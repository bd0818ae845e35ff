"""How far a row-subsampled measurement is from the full tensor's: the evidence for measure.DEFAULT_MAX_ROWS.

For each chosen weight tensor of a model and each type, the full measurement (every row) is compared with the
subsampled one for several row counts and seeds; the table gives the largest relative deviation of the plain
and the channel-weighted mean squared error. Weights are read from the HF folder's safetensors (HF layout
out × in is GGUF's rows × row length; the Q/K row permutation of llama-family models only reorders rows).
The channel weighting uses a seeded heavy-tailed stand-in for the per-channel Fisher (gamma, shape 0.5), as
heavy-tailed as real importance vectors, so the weighted path is exercised without a calibration run.

    python tools/measure_subsample.py --model qwen2.5-coder-1.5b --layers 0 14 27 --types Q4_0 IQ4_NL Q8_0
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from qgguf.files import atomic_output
from qgguf.plan.measure import DEFAULT_MAX_ROWS, TensorInput, measure_tensor


def model_dir(name: str) -> Path:
    p = Path(name)
    if p.is_dir():
        return p
    from qgguf.assets.fetch import asset_path

    return asset_path(name)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m", help="asset name or HF folder")
    ap.add_argument("--layers", type=int, nargs="+", default=[0])
    ap.add_argument("--embeddings", action="store_true", help="also the token embedding")
    ap.add_argument("--types", nargs="+", default=["Q4_0", "Q8_0"])
    ap.add_argument("--rows", type=int, nargs="+", default=[256, 512, DEFAULT_MAX_ROWS])
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--json", type=Path, help="also write the raw deviations here")
    args = ap.parse_args(argv)

    folder = model_dir(args.model)
    pat = re.compile(r"model\.layers\.(\d+)\..*\.weight$")
    with safe_open(folder / "model.safetensors", "pt") as f:
        names = [n for n in f.keys()
                 if (m := pat.match(n)) and int(m.group(1)) in args.layers and len(f.get_slice(n).get_shape()) == 2]
        if args.embeddings:
            names.insert(0, "model.embed_tokens.weight")
        worst: dict[int, float] = {k: 0.0 for k in args.rows}
        raw = []
        print(f"{'tensor':<42} {'rows':>7} {'type':<7} " + " ".join(f"{'k=' + str(k):>10}" for k in args.rows))
        t0 = time.time()
        for name in names:
            w = f.get_tensor(name).to(torch.float32)
            imp = torch.from_numpy(np.random.default_rng(0).gamma(0.5, size=w.shape[1]).astype(np.float32))
            for t in args.types:
                full = measure_tensor(TensorInput(name, w, channel_fisher=imp), [t], max_rows=None, cache=False)
                if t not in full.results:
                    continue
                fr = full.results[t]
                cells = []
                for k in args.rows:
                    dev = 0.0
                    for seed in range(args.seeds):
                        sub = measure_tensor(TensorInput(name, w, channel_fisher=imp), [t], max_rows=k, seed=seed,
                                             cache=False).results[t]
                        d = max(abs(sub.mse / fr.mse - 1), abs(sub.channel_mse / fr.channel_mse - 1))
                        dev = max(dev, d)
                        raw.append({"tensor": name, "type": t, "rows": k, "seed": seed, "dev": d})
                    if w.shape[0] > k:
                        worst[k] = max(worst[k], dev)
                    cells.append(f"{100 * dev:>9.2f}%" if w.shape[0] > k else f"{'all rows':>10}")
                print(f"{name:<42} {w.shape[0]:>7} {t:<7} " + " ".join(cells), flush=True)
    print(f"\nlargest deviation over tensors with more rows than k, {args.seeds} seeds each: "
          + ", ".join(f"k={k}: {100 * v:.2f}%" for k, v in worst.items()))
    print(f"({time.time() - t0:.0f} s on {platform.machine()}, {args.model})")
    if args.json:
        with atomic_output(args.json) as tmp:
            tmp.write_text(json.dumps(raw, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
