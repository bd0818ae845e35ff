"""Damping of error-feedback rounding: which λ keeps the rounding's gain on tokens it was not fitted to?

Feedback rounding (qgguf/formats/feedback.py) fits its integers to an input covariance H estimated from N
calibration tokens, damped by λ·I. This study measures, for the Linear inputs of a few transformer layers of a
Llama-family model (attn_q, attn_output, ffn_gate, ffn_down: one per distinct input), the output error
Σ_r δ_r H_test δ_rᵀ of feedback rounding against that of plain rounding, where H_test comes from calibration tokens
the rounding never saw (the text's sequences after the fit's). Per tensor, fit size N and λ in a grid (λ/mean diag H),
and for qgguf's rule `damping(n, N)`; the importance is diag(H_fit) (E[x²], llama.cpp's imatrix) and rows are
a fixed random sample.

    python tools/feedback_damping.py qwen2.5-coder-1.5b [--layers 3 14] [--fit-tokens 4096 16384]
        [--test-tokens 8192] [--rows 256] [--types Q4_K Q5_K Q3_K] [-o DIR] [--update-docs]

The covariances are kept in DIR (default ~/.cache/qgguf/studies/feedback-damping), in a folder keyed by the model,
the text's content, the layers, token counts and the capture code: a second run with other λ or types skips the
forward passes.
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from qgguf import formats  # noqa: E402
from qgguf.bench.config import machine_description  # noqa: E402
from qgguf.docs import write_section  # noqa: E402
from qgguf.calibrate.text import default_text_path, read_text, token_chunks  # noqa: E402
from qgguf.errors import QggufError, run_tool  # noqa: E402
from qgguf.files import atomic_output  # noqa: E402
from qgguf.formats import engines  # noqa: E402
from qgguf.formats.feedback import DAMP, DAMP_PER_INPUT, Feedback, damping, h_error  # noqa: E402
from qgguf.hashing import checkout_commit  # noqa: E402
from qgguf.models import resolve_model  # noqa: E402

DOCS = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"
LAMBDAS = [0.01, 0.1, 0.3, 1.0, 3.0, 10.0]
SEQ_LEN = 512
# one Linear per distinct input of a Llama-family layer: GGUF kind → HF module path inside the layer
KINDS = {"attn_q": "self_attn.q_proj", "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj",
         "ffn_down": "mlp.down_proj"}


class _Stop(Exception):
    pass


def capture(model_dir: Path, text: Path, layers: list[int], fits: list[int], test: int, out: Path) -> None:
    """H of every KINDS input of `layers` after the first N tokens for each N in `fits`, and over the `test`
    tokens after the largest fit: out/<layer>.<kind>.<N | test>.pt (float32 H, tokens)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    want = [out / f"{L}.{k}.{tag}.pt" for L in layers for k in KINDS for tag in [*map(str, fits), "test"]]
    if all(p.is_file() for p in want):
        return
    tok = AutoTokenizer.from_pretrained(model_dir)
    chunks = token_chunks(tok, read_text(text), max(fits) + test, SEQ_LEN, where=str(text))
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    mods = {}
    for L in layers:
        layer = model.model.layers[L]
        for kind, path in KINDS.items():
            mods[(L, kind)] = layer.get_submodule(path)
    acc = {k: torch.zeros(m.in_features, m.in_features, dtype=torch.float64) for k, m in mods.items()}
    last = (max(layers), "ffn_down")

    def hook(key):
        def f(_mod, inp):
            x = inp[0].detach().reshape(-1, inp[0].shape[-1]).to(torch.float64)
            acc[key].addmm_(x.T, x)
            if key == last:
                raise _Stop  # the rest of the forward is not needed
        return f

    for k, m in mods.items():
        m.register_forward_pre_hook(hook(k))

    def save(tag: str, n: int) -> None:
        for (L, kind), a in acc.items():
            with atomic_output(out / f"{L}.{kind}.{tag}.pt") as tmp:
                torch.save({"H": (a / n).to(torch.float32), "tokens": n}, tmp)

    seen = 0
    print(f"feedback_damping: {len(chunks)} forwards of {SEQ_LEN} tokens, each stopped after layer {max(layers)} of "
          f"{len(model.model.layers)} (a 1.5B model: about 9 s each on 2 CPU cores)", file=sys.stderr)
    with torch.no_grad():
        for c in tqdm(chunks, desc="covariance", unit="seq"):
            try:
                model(c[None])
            except _Stop:
                pass
            seen += c.numel()
            if seen in fits:
                save(str(seen), seen)
            if seen == max(fits):
                for a in acc.values():
                    a.zero_()
    save("test", seen - max(fits))


def weight(model_dir: Path, layer: int, kind: str) -> torch.Tensor:
    from safetensors import safe_open

    key = f"model.layers.{layer}.{KINDS[kind]}.weight"
    for f in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(f), "pt") as sf:
            if key in sf.keys():
                return sf.get_tensor(key).float()
    raise QggufError(f"{model_dir} has no {key}; this study reads Llama-family checkpoints")


def study(model_dir: Path, cov: Path, layers: list[int], fits: list[int], rows: int, types: list[str]) -> list[dict]:
    engine = engines.choose("cpu")
    fmts = [formats.get(t) for t in types]
    res = []
    jobs = [(L, k) for L in layers for k in KINDS]
    for L, kind in tqdm(jobs, desc="tensors", unit="tensor"):
        W = weight(model_dir, L, kind)
        sel = torch.randperm(W.shape[0], generator=torch.Generator().manual_seed(0))[:rows].sort().values
        W = W[sel].contiguous()
        Ht = torch.load(cov / f"{L}.{kind}.test.pt")["H"].to(torch.float64)
        for N in fits:
            Hf = torch.load(cov / f"{L}.{kind}.{N}.pt")["H"]
            imp = Hf.diagonal().clone()
            err = {f.name: float(h_error(W, f.decode(f.encode(W, imp, tensor=kind), tuple(W.shape)), Ht).sum())
                   for f in fmts}
            n = int(Hf.shape[0])
            variants = {f"{lam:g}": lam for lam in LAMBDAS} | {"rule": damping(n, N)}
            for name, lam in variants.items():
                q = Feedback(Hf, f"blk.{L}.{kind}", damp=lam, log=False).encode_many(fmts, W, imp, engine)
                for f in fmts:
                    e = float(h_error(W, f.decode(q[f.name], tuple(W.shape)), Ht).sum())
                    res.append({"layer": L, "kind": kind, "n": n, "tokens": N, "variant": name, "lambda": lam,
                                "type": f.name, "ratio": e / err[f.name]})
    return res


def summarise(res: list[dict]) -> dict:
    """Geometric mean of feedback/plain over (tensor, type) per (inputs, tokens) and variant; the best λ of the
    grid per tensor and type ("best")."""
    groups: dict[tuple, dict[str, list[float]]] = {}
    best: dict[tuple, float] = {}
    for r in res:
        g = groups.setdefault((r["n"], r["tokens"]), {})
        g.setdefault(r["variant"], []).append(math.log(r["ratio"]))
        if r["variant"] != "rule":
            k = (r["n"], r["tokens"], r["layer"], r["kind"], r["type"])
            best[k] = min(best.get(k, math.inf), math.log(r["ratio"]))
    out = {}
    for (n, N), g in sorted(groups.items()):
        row = {v: math.exp(float(np.mean(x))) for v, x in g.items()}
        row["best"] = math.exp(float(np.mean([b for k, b in best.items() if k[:2] == (n, N)])))
        out[f"{n}/{N}"] = row
    allv = {v: math.exp(float(np.mean([math.log(r["ratio"]) for r in res if r["variant"] == v])))
            for v in {r["variant"] for r in res}}
    allv["best"] = math.exp(float(np.mean(list(best.values()))))
    out["all"] = allv
    return out


def markdown(meta: dict, summ: dict) -> str:
    cols = [f"{lam:g}" for lam in LAMBDAS] + ["rule", "best"]
    lines = [f"### {meta['model']}: feedback rounding's held-out error against plain rounding, by damping", "",
             f"- command: `{meta['command']}`",
             f"- commit {meta['commit']}, {meta['date']}, {meta['machine']}; layers {meta['layers']}, "
             f"{meta['rows']} sampled rows per tensor, types {', '.join(meta['types'])}; H_test from "
             f"{meta['test_tokens']:,} tokens after the fit's", "",
             "Geometric mean over tensors and types of Σ_r δ_r H_test δ_rᵀ, feedback / plain (below 1: feedback "
             "gains on unseen tokens). Columns: λ / mean diag H; `rule` is qgguf's "
             f"λ = {DAMP:g} + {DAMP_PER_INPUT:g}·n/N; `best` the grid's best λ per tensor and type.", "",
             "| inputs n / tokens N | n/N | " + " | ".join(f"λ={c}" if c[0].isdigit() else c for c in cols) + " |",
             "|---|---|" + "---|" * len(cols)]
    for key, row in summ.items():
        nn_ = "" if key == "all" else f"{int(key.split('/')[0]) / int(key.split('/')[1]):.2f}"
        lines.append(f"| {key} | {nn_} | " + " | ".join(f"{row[c]:.3f}" if c in row else "" for c in cols) + " |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--text", type=Path, default=None, help="calibration text (default: wiki)")
    ap.add_argument("--layers", type=int, nargs="+", default=[3, 14])
    ap.add_argument("--fit-tokens", type=int, nargs="+", default=[4096, 16384])
    ap.add_argument("--test-tokens", type=int, default=8192)
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--types", nargs="+", default=["Q4_K", "Q5_K", "Q3_K"])
    ap.add_argument("-o", type=Path, default=None)
    ap.add_argument("--update-docs", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    model_dir = resolve_model(args.model)
    for t in args.types:
        if not formats.get(t).feedback:
            raise QggufError(f"{t} has no levels for feedback rounding; choose K-quant, IQ4 or NL types")
    if any(n % SEQ_LEN for n in args.fit_tokens):
        raise QggufError(f"--fit-tokens must be multiples of {SEQ_LEN} (whole sequences)")
    text = args.text or default_text_path()
    key = hashlib.sha256(f"{sorted(args.layers)}|{sorted(args.fit_tokens)}|{args.test_tokens}|{SEQ_LEN}|"
                         f"{inspect.getsource(capture)}".encode() + Path(text).read_bytes()).hexdigest()[:16]
    out = (args.o or Path.home() / ".cache" / "qgguf" / "studies" / "feedback-damping") / f"{model_dir.name}-{key}"
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    capture(model_dir, text, args.layers, sorted(args.fit_tokens), args.test_tokens, out)
    res = study(model_dir, out, args.layers, sorted(args.fit_tokens), args.rows, args.types)
    summ = summarise(res)
    meta = {"model": args.model, "command": "python tools/feedback_damping.py " + " ".join(sys.argv[1:]),
            "commit": checkout_commit(), "date": time.strftime("%Y-%m-%d"), "machine": machine_description(False),
            "layers": args.layers, "rows": args.rows, "types": args.types, "test_tokens": args.test_tokens,
            "seconds": round(time.time() - t0)}
    with atomic_output(out / "damping.json") as tmp:
        tmp.write_text(json.dumps({"meta": meta, "summary": summ, "rows": res}, indent=1) + "\n")
    md = markdown(meta, summ)
    print(md)
    if args.update_docs:
        write_section(DOCS, "feedback-damping", args.model, md,
                      heading="## Error-feedback rounding: damping for the calibration tokens")
    return 0


if __name__ == "__main__":
    run_tool(main, "feedback_damping")
