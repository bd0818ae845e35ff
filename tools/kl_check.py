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
import fnmatch
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from qgguf.calibrate import load_model, read_text, token_chunks
from qgguf.stats import load_stats

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
        from qgguf.assets import asset_path

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
