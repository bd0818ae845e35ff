"""Cost and gain of error-feedback rounding on one real tensor: measure's CPU time without and with the input
covariance (which adds feedback rounding of every type and the K-FAC errors of both roundings), and per type the
K-FAC error of plain and of feedback rounding.

    qgguf calibrate MODEL -o STATS --tokens 4096 --covariance COV --threads 1
    OMP_NUM_THREADS=1 QGGUF_COMPILE=0 python tools/feedback_cost.py --stats STATS --covariance COV \
        --model MODEL --tensor blk.0.ffn_down.weight --palette stock

MODEL is the HF folder (its safetensors hold the weights; the tensor is read in GGUF layout, which for
ffn_down/ffn_gate/ffn_up/attn_output is the HF layout). Each setting runs --repeats times, alternating, on one
torch thread; CPU seconds are reported (the shared machine's wall times vary with its load).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--stats", type=Path, required=True)
    ap.add_argument("--covariance", type=Path, required=True)
    ap.add_argument("--model", type=Path, required=True, help="HF folder with model.safetensors")
    ap.add_argument("--tensor", default="blk.0.ffn_down.weight")
    ap.add_argument("--palette", default="stock")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()

    from safetensors import safe_open

    from qgguf.calibrate.covariance import CovarianceStore
    from qgguf.calibrate.stats import load_stats
    from qgguf.plan.measure import TensorInput, measure_tensor
    from qgguf.plan.rules import palette_types

    torch.set_num_threads(1)
    stats, store = load_stats(args.stats), CovarianceStore(args.covariance)
    st = stats[args.tensor]
    with safe_open(str(next(args.model.glob("*.safetensors"))), "pt") as f:
        W = f.get_tensor(st.hf_name).float()
    imp = torch.from_numpy(st.importance)
    types = palette_types(args.palette)
    H = store.get(args.tensor)
    plain_s, fb_s = [], []
    for _ in range(args.repeats):
        c = time.process_time()
        measure_tensor(TensorInput(args.tensor, W, importance=imp, channel_fisher=imp), types, cache=False)
        plain_s.append(time.process_time() - c)
        c = time.process_time()
        res = measure_tensor(TensorInput(args.tensor, W, importance=imp, channel_fisher=imp, covariance=H,
                                         row_fisher=st.row_fisher), types, cache=False)
        fb_s.append(time.process_time() - c)
    p, q = min(plain_s), min(fb_s)
    print(f"{args.tensor} {tuple(W.shape)}, palette {args.palette}, {len(res.results)} types: measure "
          f"{p:.2f} CPU s plain, {q:.2f} CPU s with feedback ({q / p:.2f}×); best of {args.repeats}; "
          f"load average {os.getloadavg()[0]:.1f}")
    print("| type | K-FAC error, plain | feedback | plain / feedback |")
    print("|---|---|---|---|")
    for k, r in res.results.items():
        if r.kfac_plain and r.kfac_feedback and r.kfac_plain != r.kfac_feedback:
            print(f"| {k} | {r.kfac_plain:.4g} | {r.kfac_feedback:.4g} | {r.kfac_plain / r.kfac_feedback:.2f} |")


if __name__ == "__main__":
    main()
