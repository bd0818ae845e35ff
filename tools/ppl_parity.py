"""F32 perplexity parity: llama.cpp's llama-perplexity and transformers on the same tokens, same protocol.

For each model asset (de-gridded HF folder): convert it to an F32 GGUF with `qgguf convert-hf`, run

    llama-perplexity -m F32.gguf -f austen.txt -c 512 --chunks N -t 2

and score the very same tokens with transformers (fp32). llama-perplexity's protocol (tools/perplexity/
perplexity.cpp in the pinned tree): the whole text is tokenised once (BOS first if the vocab adds BOS), cut
into N windows of 512 tokens; if the vocab adds BOS, each window's first token is replaced by BOS; the logits
at positions 256..510 score the tokens at 257..511 (255 per window); PPL = exp(mean NLL). The tokens are
llama.cpp's own: they are read from the logits stream it writes with --kl-divergence-base (a FIFO, so the gigabytes of log-probs it also
carries are read and dropped, never stored). The HF tokenizer's ids for the same text are compared too.

    python tools/ppl_parity.py                          # both models, default chunks, prints the table
    python tools/ppl_parity.py --model smollm2-135m --chunks 40 --write-doc
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import re
import shlex
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from qgguf.assets.fetch import asset_path, read_manifest  # noqa: E402
from qgguf.docs import split_heading_section, write_heading_section
from qgguf.errors import QggufError  # noqa: E402
from qgguf.files import cache_dir  # noqa: E402
from qgguf.llamacpp.build import tool_path  # noqa: E402
from qgguf.llamacpp.converter import convert_hf  # noqa: E402

SECTION = "## F32 perplexity: llama.cpp vs transformers"
DEFAULT_CHUNKS = {"smollm2-135m": 40, "qwen2.5-coder-1.5b": 20}
MACHINE = "2-core x86-64 CPU"
TOLERANCE = 0.01


def read_logits_header(fifo: Path, box: dict) -> None:
    """Reader thread: the n_ctx, n_vocab, n_chunk and tokens that lead llama-perplexity's logits file; the rest
    (log-probs) is read and dropped so the writer never blocks."""
    try:
        with open(fifo, "rb") as f:
            def need(n: int) -> bytes:
                b = f.read(n)
                if len(b) != n:
                    raise EOFError("the logits stream ended early")
                return b
            if need(8) != b"_logits_":
                raise ValueError("not a llama-perplexity logits stream")
            n_ctx, n_vocab, n_chunk = struct.unpack("<iii", need(12))
            box["n_ctx"], box["n_vocab"], box["n_chunk"] = n_ctx, n_vocab, n_chunk
            box["tokens"] = np.frombuffer(need(4 * n_ctx * n_chunk), dtype="<i4").copy()
            while f.read(1 << 24):
                pass
    except Exception as e:  # reported by the main thread
        box["error"] = e


def llama_perplexity(gguf: Path, text: Path, ctx: int, chunks: int, threads: int) -> dict:
    exe = tool_path("llama-perplexity", cuda=False)
    cmd = [str(exe), "-m", str(gguf), "-f", str(text), "-c", str(ctx), "--chunks", str(chunks), "-t", str(threads)]
    with tempfile.TemporaryDirectory() as tmp:
        fifo = Path(tmp) / "logits.fifo"
        os.mkfifo(fifo)
        box: dict = {}
        reader = threading.Thread(target=read_logits_header, args=(fifo, box), daemon=True)
        reader.start()
        t0 = time.time()
        res = subprocess.run(cmd + ["--kl-divergence-base", str(fifo)], capture_output=True, text=True)
        seconds = time.time() - t0
        if res.returncode != 0 and reader.is_alive():
            open(fifo, "wb").close()  # let a reader still waiting to open see EOF
        reader.join(timeout=60)
    log = res.stdout + res.stderr
    m = re.search(r"Final estimate: PPL = ([0-9.]+) \+/- ([0-9.]+)", log)
    if res.returncode != 0 or m is None or "error" in box:
        raise QggufError(f"llama-perplexity failed on {gguf} (exit {res.returncode}, "
                         f"{box.get('error', 'no final estimate')}):\n" + "\n".join(log.splitlines()[-20:]))
    return {"ppl": float(m.group(1)), "err": float(m.group(2)), "tokens": box["tokens"], "n_ctx": box["n_ctx"],
            "n_chunk": box["n_chunk"], "seconds": seconds, "command": cmd}


def gguf_bos(gguf: Path) -> tuple[bool, int]:
    """Whether llama.cpp adds BOS for this GGUF, and the BOS id (llama_vocab_get_add_bos reads this key)."""
    from gguf import GGUFReader

    fields = GGUFReader(gguf).fields
    add = fields.get("tokenizer.ggml.add_bos_token")
    bos = fields.get("tokenizer.ggml.bos_token_id")
    model = fields["tokenizer.ggml.model"].contents()
    add_bos = bool(add.contents()) if add is not None else model in ("llama", "t5")  # SPM adds BOS by default
    return add_bos, int(bos.contents()) if bos is not None else -1


def transformers_perplexity(model_dir: Path, tokens: np.ndarray, ctx: int, n_chunk: int, add_bos: bool,
                            bos: int, threads: int) -> dict:
    """The same protocol as llama-perplexity's perplexity(): windows, BOS swap, second-half scoring."""
    import torch
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    first = ctx // 2
    nll, count = 0.0, 0
    t0 = time.time()
    with torch.inference_mode():
        for i in tqdm(range(n_chunk), desc=f"transformers {model_dir.name}", unit="chunk", file=sys.stderr):
            window = torch.from_numpy(tokens[i * ctx:(i + 1) * ctx].astype(np.int64))
            inputs = window.clone()
            if add_bos:
                inputs[0] = bos
            logits = model(inputs[None]).logits[0, first:ctx - 1].double()
            logp = torch.log_softmax(logits, dim=-1)
            targets = window[first + 1:ctx]
            nll -= logp.gather(1, targets[:, None]).sum().item()
            count += ctx - first - 1
    return {"ppl": math.exp(nll / count), "count": count, "seconds": time.time() - t0}


def hf_token_agreement(model_dir: Path, text: Path, llama_tokens: np.ndarray, add_bos: bool, bos: int) -> str:
    """How the HF tokenizer's ids for the text compare with llama.cpp's over the scored prefix."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = tok(text.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]
    if add_bos:
        ids = [bos] + ids
    n = len(llama_tokens)
    ours = np.asarray(ids[:n], dtype=np.int64)
    if len(ours) == n and np.array_equal(ours, llama_tokens):
        return f"identical ({n} tokens)"
    diff = np.nonzero(ours[:min(n, len(ours))] != llama_tokens[:len(ours)])[0]
    first = int(diff[0]) if len(diff) else min(n, len(ours))
    return f"differ: {len(diff)} of {n} ids, first at {first}"


def f32_gguf(name: str, model_dir: Path) -> Path:
    """The model's F32 GGUF from `qgguf convert-hf`, cached by the model's tensor hash."""
    manifest = read_manifest(model_dir) or {}
    key = manifest.get("tensor_sha256", "unknown")[:12]
    out = cache_dir("ppl-parity") / f"{name}-{key}-f32.gguf"
    if not out.is_file():
        print(f"converting {model_dir} -> {out}", file=sys.stderr)
        convert_hf(model_dir, out, "f32")
    return out


def run_model(name: str, chunks: int, ctx: int, threads: int) -> dict:
    model_dir = asset_path(name)
    text = asset_path("austen")
    gguf = f32_gguf(name, model_dir)
    print(f"[{name}] llama-perplexity, {chunks} chunks of {ctx} ...", file=sys.stderr)
    lc = llama_perplexity(gguf, text, ctx, chunks, threads)
    add_bos, bos = gguf_bos(gguf)
    print(f"[{name}] llama.cpp PPL {lc['ppl']:.4f} ({lc['seconds']:.0f} s); transformers ...", file=sys.stderr)
    hf = transformers_perplexity(model_dir, lc["tokens"], lc["n_ctx"], lc["n_chunk"], add_bos, bos, threads)
    agree = hf_token_agreement(model_dir, text, lc["tokens"], add_bos, bos)
    rel = hf["ppl"] / lc["ppl"] - 1
    row = {"model": name, "chunks": lc["n_chunk"], "ctx": lc["n_ctx"], "scored": hf["count"],
           "add_bos": add_bos, "llama_ppl": lc["ppl"], "llama_err": lc["err"], "hf_ppl": hf["ppl"], "rel": rel,
           "llama_s": lc["seconds"], "hf_s": hf["seconds"], "tokens": agree,
           "command": " ".join(["llama-perplexity"] + [shlex.quote(c) for c in lc["command"][1:]]).replace(
               str(Path.home()), "~"),
           "date": dt.date.today().isoformat(), "ok": abs(rel) <= TOLERANCE}
    print(json.dumps(row), file=sys.stderr)
    return row


# ---------------------------------------------------------------------------------------------------- report

HEADER = ("| model | chunks × ctx | scored tokens | BOS | llama.cpp PPL | transformers PPL | difference | "
          "llama.cpp s | transformers s | HF tokenizer vs llama.cpp ids | date |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|\n")


def table_row(r: dict) -> str:
    return (f"| {r['model']} (de-gridded) | {r['chunks']} × {r['ctx']} | {r['scored']} | "
            f"{'yes' if r['add_bos'] else 'no'} | {r['llama_ppl']:.4f} ± {r['llama_err']:.4f} | {r['hf_ppl']:.4f} | "
            f"{100 * r['rel']:+.4f} % | {r['llama_s']:.0f} | {r['hf_s']:.0f} | {r['tokens']} | {r['date']} |")


def section_text(rows: dict[str, str], commands: dict[str, str]) -> str:
    lines = [SECTION, "",
             f"Machine: {MACHINE}. Text: asset `austen` (Jane Austen's six novels). Models: the de-gridded assets, "
             "converted with `qgguf convert-hf --outtype f32`. transformers runs fp32 on the very tokens "
             "llama-perplexity evaluated (read from its logits stream), with its protocol: 512-token windows, "
             "BOS swapped in first when the vocab adds BOS, the second half of each window scored. "
             f"Acceptance: the two agree within {100 * TOLERANCE:.0f} %. Difference = transformers / llama.cpp "
             "- 1. Seconds are wall time of each side (llama.cpp's includes loading the F32 GGUF and tokenising "
             "the whole text), taken while other jobs shared the CPU: indicative only.", "",
             "Reproduce: `python tools/ppl_parity.py --write-doc` (both models; `--model NAME --chunks N` for "
             "one). It runs, per model:", ""]
    lines += [f"- {m}: `{c}`" for m, c in commands.items()]
    lines += ["", HEADER.rstrip("\n")]
    lines += list(rows.values())
    return "\n".join(lines) + "\n"


def parse_section(body: str) -> tuple[dict[str, str], dict[str, str]]:
    rows, commands = {}, {}
    for line in body.splitlines():
        m = re.match(r"\| (\S+) \(de-gridded\) \|", line)
        if m:
            rows[m.group(1)] = line
        m = re.match(r"- (\S+): `(.*)`$", line)
        if m:
            commands[m.group(1)] = m.group(2)
    return rows, commands


def write_doc(doc: Path, results: list[dict]) -> None:
    """Replace this tool's section of docs/benchmarks.md (keeping rows of models not run now); nothing else."""
    text = doc.read_text(encoding="utf-8") if doc.is_file() else ""
    rows, commands = parse_section(split_heading_section(text, SECTION)[1])
    for r in results:
        rows[r["model"]] = table_row(r)
        commands[r["model"]] = r["command"]
    write_heading_section(doc, section_text(rows, commands))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", action="append", choices=list(DEFAULT_CHUNKS),
                   help="model asset (repeatable; default: both)")
    p.add_argument("--chunks", type=int, default=None, help="windows per model (default: 40 SmolLM2, 20 Qwen)")
    p.add_argument("--ctx", type=int, default=512)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--write-doc", action="store_true", help="update this benchmark's section of docs/benchmarks.md")
    args = p.parse_args(argv)
    results = []
    try:
        for name in args.model or list(DEFAULT_CHUNKS):
            results.append(run_model(name, args.chunks or DEFAULT_CHUNKS[name], args.ctx, args.threads))
    except QggufError as e:
        print(f"ppl_parity: error: {e}", file=sys.stderr)
        return 2
    print(HEADER + "\n".join(table_row(r) for r in results))
    if args.write_doc:
        write_doc(REPO / "docs" / "benchmarks.md", results)
    bad = [r["model"] for r in results if not r["ok"]]
    if bad:
        print(f"ppl_parity: FAIL: {', '.join(bad)} differ by more than {100 * TOLERANCE:.0f} %", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
