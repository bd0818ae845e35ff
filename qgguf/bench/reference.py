"""The bench's reference: the F32 GGUF, its logits over the text and the imatrix, made once and cached."""

from __future__ import annotations

import hashlib
import json
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from qgguf.bench.config import BenchConfig
from qgguf.files import atomic_output, cache_dir, seal, sealed
from qgguf.llamacpp.runner import PPL_PROGRESS, Tools


@dataclass
class Reference:
    f32: Path
    logits: Path
    base: dict  # PPL of the F32 model over the text, chunks, tokens, seconds
    imatrix: Path | None
    imatrix_key: str | None


def reference(cfg: BenchConfig, tools: Tools, logs: Path) -> Reference:
    """The F32 GGUF, its logits over the text and the imatrix: made once, cached by what determines them."""
    from qgguf.llamacpp.converter import convert_hf, converter_sha256

    folder = (cfg.cache or cache_dir("bench")) / cfg.model.key
    folder.mkdir(parents=True, exist_ok=True)
    conv = converter_sha256()
    f32 = folder / f"f32-{conv[:16]}.gguf"
    if not sealed(f32, conv):
        print(f"qgguf: converting {cfg.model.name} to F32 with llama.cpp's converter -> {f32}", file=sys.stderr)
        with tools.times.step("convert_f32"):
            convert_hf(cfg.model.path, f32, "f32")
        seal(f32, conv)

    # logits and imatrix depend on the F32 file and on the tools that computed them
    made_by = hashlib.sha256(f"{conv}|{tools.key}".encode()).hexdigest()[:12]
    stem = f"logits-{cfg.text.key}-c{cfg.ctx}-n{cfg.chunks}-{cfg.backend}-{made_by}"
    logits, meta = folder / f"{stem}.kld", folder / f"{stem}.json"
    if not (sealed(logits, made_by) and meta.is_file()):
        t0, c0 = time.time(), tools.times.cpu_s
        with tools.times.step("f32_logits"), atomic_output(logits) as tmp:
            text = tools.run([tools.path("llama-perplexity"), "-m", f32, "-f", cfg.text.path, "-c", cfg.ctx,
                             "--chunks", cfg.chunks, "--kl-divergence-base", tmp, *tools.common],
                            logs / "f32.logits.log", "F32 logits", total=cfg.chunks, progress=PPL_PROGRESS,
                            timeout=cfg.timeout)
        m = re.search(r"calculating perplexity over (\d+) chunks, n_ctx=(\d+)", text)
        ppl = re.search(r"Final estimate: PPL = ([\d.]+) \+/- ([\d.]+)", text)  # may be lost at exit: optional
        base = {"chunks": int(m.group(1)) if m else None, "ctx": cfg.ctx,
                "ppl": float(ppl.group(1)) if ppl else None, "ppl_err": float(ppl.group(2)) if ppl else None,
                "seconds": round(time.time() - t0, 1), "cpu_seconds": round(tools.times.cpu_s - c0, 1),
                "text": cfg.text.name, "text_sha256": cfg.text.digest}
        if base["chunks"] is not None and base["chunks"] < cfg.chunks:
            print(f"qgguf: the text has only {base['chunks']} chunks of {cfg.ctx} tokens (asked {cfg.chunks})",
                  file=sys.stderr)
        with atomic_output(meta) as tmp:
            tmp.write_text(json.dumps(base, indent=1) + "\n")
        seal(logits, made_by)
    base = json.loads(meta.read_text())

    imatrix = key = None
    if cfg.presets:
        key = f"{cfg.calib.key}-c{cfg.ctx}-n{cfg.imatrix_chunks}-{cfg.backend}-{made_by}"
        imatrix = folder / f"imatrix-{key}.gguf"
        if not sealed(imatrix, made_by):
            with tools.times.step("imatrix"), atomic_output(imatrix) as tmp:
                tools.run([tools.path("llama-imatrix"), "-m", f32, "-f", cfg.calib.path, "-c", cfg.ctx,
                          "--chunks", cfg.imatrix_chunks, "-o", tmp, "--output-format", "gguf", *tools.common],
                         logs / "imatrix.log", "imatrix", total=cfg.imatrix_chunks, progress=PPL_PROGRESS,
                         timeout=cfg.timeout)
            seal(imatrix, made_by)
    return Reference(f32, logits, base, imatrix, key)


def gguf_sizes(path: Path) -> dict:
    """Bytes and bits per weight of a GGUF: llama.cpp's BPW (tensor bits / tensor elements) and the whole file's."""
    import gguf

    reader = gguf.GGUFReader(path)
    tensor_bytes = sum(int(t.n_bytes) for t in reader.tensors)
    elements = sum(int(t.n_elements) for t in reader.tensors)
    counts: dict[str, int] = {}
    for t in reader.tensors:
        name = t.tensor_type.name
        counts[name] = counts.get(name, 0) + 1
    file_bytes = path.stat().st_size
    return {"file_bytes": file_bytes, "tensor_bytes": tensor_bytes, "elements": elements,
            "bpw": 8.0 * tensor_bytes / elements, "bpw_file": 8.0 * file_bytes / elements,
            "tensor_types": dict(sorted(counts.items()))}
