"""Check the KL model behind the planner: ½·σ²·ΣF predicts the KL divergence caused by weight noise.

For each chosen tensor W: add Gaussian noise δ ~ N(0, σ²) to W alone, run the model on held-out text and measure
the mean per-token KL(p_original ‖ p_noisy); the prediction from the calibration statistics is ½·σ²·ΣF
(ΣF per token). σ² is set per tensor so that the predicted KL is --target nats/token (small enough for the
quadratic regime, large enough to measure). Each tensor is measured with --draws noise draws.

The command line is tools/kl_check.py; the test suite runs `run` on a tiny model.
"""

from __future__ import annotations

import fnmatch
import sys
import time
from pathlib import Path

import numpy as np
import torch

from qgguf.calibrate.runner import load_model
from qgguf.calibrate.stats import load_stats
from qgguf.calibrate.text import read_text, token_chunks

DEFAULT_TENSORS = ("token_embd.weight", "output.weight", "blk.*.attn_q.weight", "blk.*.attn_k.weight",
                   "blk.*.attn_v.weight", "blk.*.attn_output.weight", "blk.*.ffn_gate.weight",
                   "blk.*.ffn_up.weight", "blk.*.ffn_down.weight")


def kind_of(name: str) -> str:
    if name.startswith("token_embd") or name.startswith("output."):
        return "embedding/head"
    return "attention" if ".attn_" in name else "FFN"


def pick_tensors(names: list[str], n_blocks: int, blocks: list[int] | None) -> list[str]:
    """One of each kind in a few blocks (first, middle, last by default) plus the embedding / output head."""
    if blocks is None:
        blocks = sorted({0, n_blocks // 2, n_blocks - 1})
    chosen = []
    for pat in DEFAULT_TENSORS:
        if "*" not in pat:
            chosen += [pat] if pat in names else []
            continue
        for b in blocks:
            n = pat.replace("*", str(b))
            if n in names:
                chosen.append(n)
    return chosen


@torch.no_grad()
def mean_kl(model, batches: list[torch.Tensor], ref_logp: list[torch.Tensor]) -> float:
    """Mean over tokens of KL(p_ref ‖ p_model)."""
    total, n = 0.0, 0
    for ids, lp in zip(batches, ref_logp):
        lq = torch.log_softmax(model(input_ids=ids, use_cache=False).logits.double(), -1)  # fp64: small KLs
        total += (lp.exp() * (lp - lq)).sum().item()
        n += ids.numel()
    return total / n


def held_out(text: str, start: float) -> str:
    """The text from `start` (a fraction of its length) on, from the next line: a part calibration never read."""
    if start <= 0:
        return text
    cut = text.find("\n", int(len(text) * start))
    return text[cut + 1:] if cut >= 0 else ""


def run(model_dir: Path, stats_path: Path | list[Path], text_path: Path, tokens: int, seq_len: int, target: float,
        draws: int, seed: int, patterns: list[str] | None, blocks: list[int] | None, start: float = 0.0) -> dict:
    from transformers import AutoTokenizer

    paths = [stats_path] if isinstance(stats_path, (str, Path)) else list(stats_path)
    all_stats = [load_stats(p) for p in paths]
    stats = all_stats[0]
    model = load_model(model_dir, torch.device("cpu"), "float32")
    tok = AutoTokenizer.from_pretrained(model_dir)
    text = held_out(read_text(text_path), start)
    batches = [c[None] for c in token_chunks(tok, text, tokens, seq_len, str(text_path))]
    with torch.no_grad():
        ref = [torch.log_softmax(model(input_ids=b, use_cache=False).logits.double(), -1) for b in batches]
    params = dict(model.named_parameters())
    names = stats.names()
    if patterns:
        chosen = [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)]
    else:
        n_blocks = 1 + max(int(n.split(".")[1]) for n in names if n.startswith("blk."))
        chosen = pick_tensors(names, n_blocks, blocks)
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for name in chosen:
        t = stats[name]
        p = params[t.hf_name]
        sigma2 = 2.0 * target / t.fisher_sum
        predicted = 0.5 * sigma2 * t.fisher_sum
        orig = p.detach().clone()
        kls = []
        t0 = time.perf_counter()
        for _ in range(draws):
            with torch.no_grad():
                p.add_(torch.randn(p.shape, generator=gen) * sigma2 ** 0.5)
            kls.append(mean_kl(model, batches, ref))
            with torch.no_grad():
                p.copy_(orig)
        measured = float(np.mean(kls))
        rows.append({"tensor": name, "kind": kind_of(name), "fisher_sum": t.fisher_sum, "sigma2": sigma2,
                     "predicted": predicted, "measured": measured, "ratio": measured / predicted,
                     "ratios": [measured / (0.5 * sigma2 * s[name].fisher_sum) for s in all_stats],
                     "draws": [float(k) for k in kls], "seconds": time.perf_counter() - t0})
        print(f"{name:28s} ΣF={t.fisher_sum:10.4g} σ²={sigma2:9.3g} predicted={predicted:.4g} "
              f"measured={measured:.4g} ratio={measured / predicted:.3f}", file=sys.stderr, flush=True)
    return {"model": str(model_dir), "stats": [str(p) for p in paths], "stats_meta": [{k: s.meta.get(k) for k in (
        "tokens", "seq_len", "seed", "estimator", "text", "model_sha256")} for s in all_stats],
        "text": str(text_path), "tokens": tokens,
        "seq_len": seq_len, "target": target, "draws": draws, "seed": seed, "start": start, "rows": rows}
