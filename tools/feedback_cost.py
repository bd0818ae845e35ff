"""Cost and gain of error-feedback rounding on one real tensor: measure's CPU time without and with the input
covariance (which adds feedback rounding of every type and the K-FAC errors of both roundings), and per type the
K-FAC error of plain and of feedback rounding. With --layer L: export's cost instead, one layer's tensors encoded
in Q4_K_M's types (Q6_K for attn_v and ffn_down, else Q4_K; Q5_0 on rows not a multiple of 256) plainly and with
feedback (the factorisation timed on its own), wall seconds on the torch threads given (-t), through the encoder
export uses on a CPU.

    qgguf calibrate MODEL -o STATS --tokens 4096 --covariance COV --threads 1
    OMP_NUM_THREADS=1 QGGUF_COMPILE=0 python tools/feedback_cost.py --stats STATS --covariance COV \
        --model MODEL --tensor blk.0.ffn_down.weight --palette stock
    QGGUF_COMPILE=0 python tools/feedback_cost.py --stats STATS --covariance COV --model MODEL --layer 0 -t 2

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
    ap.add_argument("--layer", type=int, help="time export's encodes of this layer instead")
    ap.add_argument("-t", "--threads", type=int, default=1)
    args = ap.parse_args()
    if args.layer is not None:
        return export_layer(args)

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


EXPORT_TYPES = {"attn_q": "Q4_K", "attn_k": "Q4_K", "attn_v": "Q6_K", "attn_output": "Q4_K", "ffn_gate": "Q4_K",
                "ffn_up": "Q4_K", "ffn_down": "Q6_K"}  # what Q4_K_M gives a layer (its first ones)


def export_layer(args) -> None:
    from safetensors import safe_open

    from qgguf import formats
    from qgguf.calibrate.covariance import CovarianceStore
    from qgguf.calibrate.stats import load_stats
    from qgguf.formats import engines
    from qgguf.formats import feedback as fbm

    torch.set_num_threads(args.threads)
    stats, store = load_stats(args.stats), CovarianceStore(args.covariance)
    engine = engines.choose("cpu")
    missing = [k for k in EXPORT_TYPES if f"blk.{args.layer}.{k}.weight" not in stats]
    if missing:
        raise SystemExit(f"feedback_cost.py: {args.stats} has no blk.{args.layer}.{missing[0]}.weight; give a layer "
                         "of that model (--layer) or its statistics (--stats)")
    print(f"layer {args.layer}: export's encodes, {args.threads} torch thread(s), engine {engine.name}, "
          f"{store.tokens} calibration tokens")
    print("| tensor | shape | type | plain s | factor s | feedback encode s | feedback / plain |")
    print("|---|---|---|---|---|---|---|")
    tot = [0.0, 0.0, 0.0]
    with safe_open(str(next(args.model.glob("*.safetensors"))), "pt") as f:
        for kind, tname in EXPORT_TYPES.items():
            name = f"blk.{args.layer}.{kind}.weight"
            st, H = stats[name], store.get(name)
            W, imp = f.get_tensor(st.hf_name).float(), torch.from_numpy(st.importance)
            if W.shape[1] % 256:
                tname = "Q5_0"  # llama.cpp's fallback for Q4_K on rows that are not a multiple of 256 (SmolLM2)
            fmt = formats.get(tname)
            fbm._factors.clear()  # export factorises the first tensor of each input; all are timed cold here
            t = time.perf_counter()
            fmt.encode(W, imp, tensor=name, device="cpu", engine=engine)
            p = time.perf_counter() - t
            fb = fbm.Feedback(H, name, tokens=store.tokens)
            t = time.perf_counter()
            fb.U
            u = time.perf_counter() - t
            t = time.perf_counter()
            fb.encode(fmt, W, imp, engine)
            e = time.perf_counter() - t
            tot = [tot[0] + p, tot[1] + u, tot[2] + e]
            print(f"| {kind} | {W.shape[0]} × {W.shape[1]} | {tname} | {p:.2f} | {u:.2f} | {e:.2f} | "
                  f"{(u + e) / p:.1f}× |")
    print(f"| layer | | | {tot[0]:.2f} | {tot[1]:.2f} | {tot[2]:.2f} | {(tot[1] + tot[2]) / tot[0]:.1f}× |")
    print(f"load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
