"""`qgguf calibrate`: statistics for the planner (and a llama.cpp imatrix) from the command line."""

from __future__ import annotations

from pathlib import Path

import torch

from qgguf.calibrate.covariance import DEFAULT_WEIGHTING, WEIGHTINGS
from qgguf.calibrate.fisher import DEFAULT_ESTIMATOR, ESTIMATORS, PROBES
from qgguf.calibrate.runner import DEFAULT_SEED, DEFAULT_SEQ_LEN, DEFAULT_TOKENS, DTYPES, calibrate
from qgguf.errors import QggufError


def add_parser(sub) -> None:
    p = sub.add_parser("calibrate", help="estimate per-tensor Fisher information and per-channel importance "
                                         "(statistics for the planner, and a llama.cpp imatrix)")
    p.add_argument("model_dir", metavar="model", help="Hugging Face causal-LM folder, or an asset name from `qgguf "
                   "fetch` (e.g. smollm2-135m)")
    p.add_argument("-o", "--out", type=Path, required=True, help="output statistics file (.safetensors)")
    p.add_argument("--text", type=Path, default=None, help="calibration text, UTF-8 (default: the wiki asset)")
    p.add_argument("--tokens", type=int, default=DEFAULT_TOKENS, help=f"tokens to read (default {DEFAULT_TOKENS})")
    p.add_argument("--seq-len", type=int, default=DEFAULT_SEQ_LEN,
                   help=f"sequence length (default {DEFAULT_SEQ_LEN})")
    p.add_argument("--device", default="auto", help="auto (default: CUDA when torch sees a GPU, else the CPU), cpu, "
                   "cuda (spread over the GPUs, then the CPU, when the model is larger than one) or cuda:N")
    p.add_argument("--grad-checkpoint", action="store_true",
                   help="recompute each layer's activations in the backward pass (for models whose activations "
                        "do not fit)")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED, help="seed of the sampled labels (default 0)")
    p.add_argument("--dtype", default="auto", choices=tuple(DTYPES),
                   help="compute dtype of the model (default: as stored); statistics accumulate in fp32")
    p.add_argument("--batch-size", type=int, default=1, help="sequences per forward pass (default 1)")
    p.add_argument("--per-element", action="append", default=[], metavar="GLOB",
                   help="also keep the per-element Fisher of GGUF tensors matching GLOB (repeatable; e.g. "
                        "'blk.*.attn_v.weight'); costs 4 bytes per weight")
    p.add_argument("--imatrix", type=Path, default=None, metavar="OUT.gguf",
                   help="also write a llama.cpp imatrix GGUF (for llama-quantize --imatrix)")
    p.add_argument("--imatrix-from", default="act", choices=("act", "fisher"),
                   help="what the imatrix holds: act = E[x²] like llama-imatrix (default), fisher = the "
                        "per-channel Fisher importance")
    p.add_argument("--estimator", default=DEFAULT_ESTIMATOR, choices=ESTIMATORS,
                   help="sequence: each sequence's whole gradient is one sample, keeping the terms between "
                        "positions (default); token: each token's gradient contribution is one sample")
    p.add_argument("--probe", default="label", choices=PROBES,
                   help="label: one label per position drawn from the model (default); gaussian: a Gaussian "
                        "probe with the same covariance (same expectation, lighter tails)")
    p.add_argument("--covariance", type=Path, default=None, metavar="DIR",
                   help="also write the input covariance of every Linear weight to DIR (one safetensors file per "
                        "layer) and keep each Linear weight's per-row Fisher, for error-feedback rounding "
                        "(`qgguf convert --rounding feedback|auto|feedback-on-plain`); costs one forward pass per "
                        "group of layers")
    p.add_argument("--covariance-weight", default=DEFAULT_WEIGHTING, choices=WEIGHTINGS,
                   help="with --covariance: uniform is GPTQ's E[x xᵀ], one H per input (default); gradient weighs "
                        "each token's x xᵀ by its output gradient's ‖g‖² from the Fisher pass, one H per tensor")
    p.add_argument("--covariance-split", action="store_true",
                   help="with --covariance: also keep the covariance of every other sequence, so measure scores "
                        "feedback rounding on tokens it was not fitted to (what --rounding feedback|auto plan with); "
                        "doubles the folder and the passes")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.set_defaults(func=_cmd)


def _cmd(args) -> int:
    from qgguf.models import resolve_model

    if args.covariance_weight != DEFAULT_WEIGHTING and args.covariance is None:
        raise QggufError("--covariance-weight weighs the input covariance: give --covariance DIR too")
    if args.covariance_split and args.covariance is None:
        raise QggufError("--covariance-split splits the input covariance: give --covariance DIR too")
    if args.threads:
        torch.set_num_threads(args.threads)
    stats = calibrate(resolve_model(args.model_dir), args.out, text=args.text, tokens=args.tokens, seq_len=args.seq_len,
                      device=args.device, seed=args.seed, per_element=args.per_element, dtype=args.dtype,
                      batch_size=args.batch_size, imatrix_out=args.imatrix, imatrix_from=args.imatrix_from,
                      estimator=args.estimator, probe=args.probe, grad_checkpoint=args.grad_checkpoint,
                      covariance=args.covariance, covariance_split=args.covariance_split,
                      covariance_weight=args.covariance_weight)
    total = sum(t.fisher_sum for t in stats.tensors.values())
    print(f"{args.out}: {len(stats.tensors)} tensors, {stats.meta['tokens']} tokens, ΣF over all = {total:.4g}")
    if args.imatrix:
        print(args.imatrix)
    return 0
