"""Which input covariance should error-feedback rounding fit: GPTQ's E[x xᵀ] or the gradient-weighted one?

`qgguf calibrate --covariance` runs twice on the same calibration tokens: `--covariance-weight uniform` (H = E[x xᵀ],
one per distinct input: the default) and `gradient` (H = E[‖g‖² x xᵀ] / E[‖g‖²] per tensor, g the tensor's output
gradient in the Fisher pass). Every Linear weight of the model is then rounded into one type — plainly, and with
error feedback against each H (qgguf/formats/feedback.py, the importance the plan uses: the statistics' channel
Fisher) — the rounded weights are put back into the HF model, and the mean KL divergence of its next-token
distribution from the original model's is measured in torch on held-out text (no GGUF: the same decode as
gguf-py's). A tensor whose row length the type's block does not divide gets the next type of its spec (Q4_K/Q4_0:
Q4_K where it fits, else Q4_0).

    python tools/covariance_weighting.py smollm2-135m [--text wiki] [--tokens 16384] [--test-text austen]
        [--test-tokens 8192] [--types Q4_K/Q4_0 Q3_K/IQ4_NL] [--damping 1] [-o DIR] [--update-docs]

`--damping K` also rounds with K × qgguf's damping (several K: one row each). Calibrations are cached in DIR
(default ~/.cache/qgguf/studies/covariance-weighting) under a key of the model, the text, the tokens and the
calibration code.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from qgguf import formats  # noqa: E402
from qgguf.bench.config import machine_description, model_source, resolve_text  # noqa: E402
from qgguf.calibrate import code_digest  # noqa: E402
from qgguf.calibrate.covariance import WEIGHTINGS, CovarianceStore  # noqa: E402
from qgguf.calibrate.stats import load_stats  # noqa: E402
from qgguf.calibrate.text import read_text, token_chunks  # noqa: E402
from qgguf.docs import write_section  # noqa: E402
from qgguf.errors import QggufError, run_tool  # noqa: E402
from qgguf.files import atomic_output  # noqa: E402
from qgguf.formats import engines  # noqa: E402
from qgguf.formats.feedback import Feedback, damping  # noqa: E402
from qgguf.hashing import checkout_commit  # noqa: E402

DOCS = ROOT / "docs" / "benchmarks.md"
SEQ_LEN = 512
HEADING = "## Error-feedback rounding: the covariance's token weighting and the tied embedding"


def calibrations(model_dir: Path, text: Path, tokens: int, out: Path) -> dict[str, tuple[Path, Path]]:
    """(statistics, covariance folder) per weighting, made once per key."""
    from qgguf.calibrate.runner import calibrate

    res = {}
    for w in WEIGHTINGS:
        stats, cov = out / f"stats-{w}.safetensors", out / f"cov-{w}"
        if not stats.is_file() or not (cov / "index.json").is_file():
            print(f"covariance_weighting: calibrating ({w} covariance) on {tokens:,} tokens of {text.name}",
                  file=sys.stderr)
            calibrate(model_dir, stats, text=text, tokens=tokens, seq_len=SEQ_LEN, covariance=cov,
                      covariance_weight=w)
        res[w] = (stats, cov)
    return res


def pick(spec: str, n: int):
    for name in spec.split("/"):
        f = formats.get(name)
        if n % f.block_size == 0:
            return f
    raise QggufError(f"--types {spec}: no type of it divides a row of {n}; end the spec with a block-32 type")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--text", default="wiki", help="calibration text (file or asset; default wiki)")
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--test-text", default="austen", help="held-out text (default austen)")
    ap.add_argument("--test-tokens", type=int, default=8192)
    ap.add_argument("--types", nargs="+", default=["Q4_K/Q4_0", "Q3_K/IQ4_NL"])
    ap.add_argument("--damping", type=float, nargs="+", default=[1.0], help="multiples of qgguf's damping")
    ap.add_argument("-o", type=Path, default=None)
    ap.add_argument("--update-docs", action="store_true")
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = model_source(args.model)
    text, test = resolve_text(args.text, "--text"), resolve_text(args.test_text, "--test-text")
    for spec in args.types:
        for t in spec.split("/"):
            if not formats.get(t).feedback:
                raise QggufError(f"--types {spec}: {t} has no levels for feedback rounding; choose K-quant, "
                                 "legacy, IQ4 or NL types")
    key = hashlib.sha256(f"{src.digest}|{text.digest}|{args.tokens}|{SEQ_LEN}|{code_digest()}".encode()
                         ).hexdigest()[:16]
    out = (args.o or Path.home() / ".cache" / "qgguf" / "studies" / "covariance-weighting") / f"{src.path.name}-{key}"
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    cal = calibrations(src.path, text.path, args.tokens, out)
    stats = load_stats(cal["gradient"][0])  # the Fisher pass is the same in both runs (same seed and code)
    stores = {w: CovarianceStore(c) for w, (_, c) in cal.items()}
    n_tok = stores["gradient"].tokens

    tok = AutoTokenizer.from_pretrained(src.path)
    model = AutoModelForCausalLM.from_pretrained(src.path, dtype=torch.float32).eval()
    params = dict(model.named_parameters())
    names = [n for n, t in stats.tensors.items() if n in stores["gradient"] and t.hf_name in params]
    orig = {n: params[stats[n].hf_name].detach().clone() for n in names}
    chunks = token_chunks(tok, read_text(test.path), args.test_tokens, SEQ_LEN, where=str(test.path))
    with torch.no_grad():
        ref = [torch.log_softmax(model(c[None]).logits[0].float(), -1)
               for c in tqdm(chunks, desc="reference", file=sys.stderr)]

    def kl() -> float:
        tot, cnt = 0.0, 0
        with torch.no_grad():
            for c, r in zip(chunks, ref):
                q = torch.log_softmax(model(c[None]).logits[0].float(), -1)
                tot += float((r.exp() * (r - q)).sum())
                cnt += r.shape[0]
        return tot / cnt

    eng = engines.choose("cpu")
    variants = [("plain", None, 1.0)] + [(f"feedback, {w} H" + ("" if k == 1 else f", {k:g}× damping"), w, k)
                                         for k in args.damping for w in ("uniform", "gradient")]
    rows = []
    for spec in args.types:
        for label, w, k in variants:
            for n in tqdm(names, desc=f"{spec}: {label}", file=sys.stderr, leave=False):
                W = orig[n]
                fmt = pick(spec, W.shape[1])
                imp = torch.as_tensor(stats[n].importance)
                if w is None:
                    q = fmt.encode_torch(W, imp, tensor=n)
                else:
                    H = torch.from_numpy(stores[w].get(n))
                    q = Feedback(H, n, damp=damping(W.shape[1], n_tok) * k, log=False).encode_many(
                        [fmt], W, imp, eng)[fmt.name]
                params[stats[n].hf_name].data.copy_(fmt.decode(q, tuple(W.shape)))
            rows.append({"types": spec, "variant": label, "kl": kl()})
            print(f"{spec}: {label}: mean KL {rows[-1]['kl']:.5f}", file=sys.stderr)
            for n in names:
                params[stats[n].hf_name].data.copy_(orig[n])
    meta = {"model": src.name, "command": "python tools/covariance_weighting.py " + " ".join(sys.argv[1:]),
            "commit": checkout_commit(), "date": time.strftime("%Y-%m-%d"), "machine": machine_description(False),
            "tensors": len(names), "tokens": n_tok, "text": text.name, "test": test.name,
            "test_tokens": sum(int(c.numel()) for c in chunks), "seconds": round(time.time() - t0)}
    with atomic_output(out / "result.json") as tmp:
        tmp.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    md = markdown(meta, rows)
    print(md)
    if args.update_docs:
        write_section(DOCS, "covariance-weighting", src.path.name, md, heading=HEADING)
    return 0


def markdown(meta: dict, rows: list[dict]) -> str:
    plain = {r["types"]: r["kl"] for r in rows if r["variant"] == "plain"}
    lines = [f"### {meta['model']}: every Linear weight (and a tied embedding) in one type, mean KL on {meta['test']}",
             "",
             f"- command: `{meta['command']}`",
             f"- commit {meta['commit']}, {meta['date']}, {meta['machine']}; {meta['tensors']} tensors; "
             f"covariances from {meta['tokens']:,} tokens of {meta['text']}; KL over {meta['test_tokens']:,} "
             f"tokens of {meta['test']} in torch; {meta['seconds'] / 60:.0f} min", "",
             "| types | rounding | mean KL | vs plain |", "|---|---|---|---|"]
    for r in rows:
        d = "" if r["variant"] == "plain" else f"{100 * (r['kl'] / plain[r['types']] - 1):+.1f} %"
        lines.append(f"| {r['types']} | {r['variant']} | {r['kl']:.5f} | {d} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    run_tool(main, "covariance_weighting")
