"""Scale: `qgguf convert` on Llama-3-8B-shaped models cut to a few layers, timed and measured per step.

    python tools/scale_bench.py build --layers 2 -o /tmp/llama8b-2l        # the model only
    python tools/scale_bench.py run --layers 2 --layers 4 --work /tmp/scale [--device cpu|cuda] \
        [--json results.jsonl] -- --tokens 512 --seq-len 256 --max-rows 256 --target-bpw 4.5 -t 2

`build` writes a random bf16 Llama with the 8B shapes (hidden 4096, FFN 14336, 32 heads / 8 KV heads, vocab 128256,
untied head) as an HF folder: one safetensors shard per layer (plus one for the embedding, one for the norm and
head) and model.safetensors.index.json, a tiny SentencePiece tokenizer (the converter pads the vocabulary to
128256). Tensors are drawn one at a time (seeded, in row chunks), so building needs about one tensor in memory.

`run` builds each model (once), then runs `python -m qgguf convert MODEL -o OUT ARGS` with an empty cache
(QGGUF_CACHE=<work>/cache-L<n>, the built llama.cpp, the assets and the compiled kernels linked in), samples the process's RssAnon and
RssFile every 50 ms, and times each step from the lines convert prints when a step starts (calibrating …,
converting …, measure: …, export: …; the log, convert-L<n>.log, stamps every line with the seconds since the
start, so per-tensor times can be read from the progress bars). Per run: seconds and peak anonymous / total RSS per step, peak RSS
(wait4), the source folder's size, the cache's size on disk and the output's. With two or more layer counts it
fits t = a + b·layers per step and extrapolates to 32 layers (8B) and to 70B shapes (80 layers, hidden 8192,
FFN 28672, 64 / 8 heads: each layer has 3.92× the weights of an 8B layer, the embedding and head 2×).
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import pty
import shlex
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from qgguf.files import disk_bytes  # noqa: E402
from qgguf.procmem import Sampler  # noqa: E402

SHAPE_8B = dict(hidden=4096, ffn=14336, heads=32, kv_heads=8, vocab=128256)
SHAPE_70B = dict(hidden=8192, ffn=28672, heads=64, kv_heads=8, vocab=128256)
STEPS = ("calibrate", "convert", "measure", "plan", "export")
# the line convert prints as each step starts (a step that hits its cache prints none)
MARKERS = (("qgguf: calibrating", "calibrate"), ("qgguf: converting", "convert"), ("qgguf: measure:", "measure"),
           ("qgguf: export:", "export"))


def layer_weights(s: dict) -> int:
    h, f, kv = s["hidden"], s["ffn"], s["hidden"] // s["heads"] * s["kv_heads"]
    return 2 * h * h + 2 * h * kv + 3 * h * f


def tensors_of(layers: int, s: dict = SHAPE_8B) -> list[tuple[str, list[tuple[str, tuple[int, ...]]]]]:
    """(shard name, [(HF tensor name, shape)]) in the order they are written."""
    h, f, v = s["hidden"], s["ffn"], s["vocab"]
    kv = h // s["heads"] * s["kv_heads"]
    shards = [("embed", [("model.embed_tokens.weight", (v, h))])]
    for i in range(layers):
        p = f"model.layers.{i}."
        shards.append((f"layer{i}", [
            (p + "input_layernorm.weight", (h,)), (p + "self_attn.q_proj.weight", (h, h)),
            (p + "self_attn.k_proj.weight", (kv, h)), (p + "self_attn.v_proj.weight", (kv, h)),
            (p + "self_attn.o_proj.weight", (h, h)), (p + "post_attention_layernorm.weight", (h,)),
            (p + "mlp.gate_proj.weight", (f, h)), (p + "mlp.up_proj.weight", (f, h)),
            (p + "mlp.down_proj.weight", (h, f))]))
    shards.append(("head", [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]))
    return shards


def random_tensor(shape: tuple[int, ...], seed: int, index: int):
    """Seeded bf16 weights: N(0, 0.02²) for matrices (drawn in row chunks of float32), 1 ± 0.02 for norms."""
    import torch

    g = torch.Generator().manual_seed(seed * 1_000_003 + index)
    if len(shape) == 1:
        return (1.0 + 0.02 * torch.randn(shape, generator=g)).to(torch.bfloat16)
    out = torch.empty(shape, dtype=torch.bfloat16)
    step = max(1, (1 << 24) // shape[1])
    for r0 in range(0, shape[0], step):
        n = min(step, shape[0] - r0)
        out[r0:r0 + n] = (0.02 * torch.randn((n, shape[1]), generator=g)).to(torch.bfloat16)
    return out


def build(out: Path, layers: int, seed: int = 0) -> Path:
    """The layer-cut 8B-shaped model as a sharded bf16 HF folder (nothing if it is already complete)."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    from qgguf.assets.tiny import make_tokenizer

    out = Path(out)
    if (out / "model.safetensors.index.json").is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    s = SHAPE_8B
    make_tokenizer(out)
    cfg = LlamaConfig(vocab_size=s["vocab"], hidden_size=s["hidden"], intermediate_size=s["ffn"],
                      num_hidden_layers=layers, num_attention_heads=s["heads"], num_key_value_heads=s["kv_heads"],
                      max_position_embeddings=8192, rope_theta=500000.0, rms_norm_eps=1e-5,
                      tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, torch_dtype="bfloat16")
    cfg.architectures = ["LlamaForCausalLM"]
    cfg.save_pretrained(out)
    shards = tensors_of(layers)
    weight_map, total, index = {}, 0, 0
    for k, (_, items) in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        data = {}
        for name, shape in items:
            data[name] = random_tensor(shape, seed, index)
            index += 1
            weight_map[name] = fname
            total += data[name].numel() * 2
        save_file(data, str(out / fname), metadata={"format": "pt"})
        del data
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return out


def _pty_lines(fd: int):
    """Lines (split at \\n or \\r) read from a pseudo-terminal's master side until the child closes it."""
    buf = b""
    while True:
        try:
            chunk = os.read(fd, 65536)
        except OSError:  # EIO: the child side is closed
            chunk = b""
        if not chunk:
            break
        buf += chunk
        *done, buf = buf.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")
        for line in done:
            if line.strip():
                yield line.decode("utf-8", "replace")
    os.close(fd)
    if buf.strip():
        yield buf.decode("utf-8", "replace")


def run_one(model: Path, layers: int, work: Path, device: str, extra: list[str]) -> dict:
    from qgguf.files import cache_dir

    cache = work / f"cache-L{layers}"
    cache.mkdir(parents=True, exist_ok=True)
    for shared in ("llama", "assets", "torch-compile"):  # compiled kernels are shared: a run measures the model's cost
        link = cache / shared
        if not link.exists():
            link.symlink_to(cache_dir(shared), target_is_directory=True)
    out = work / f"out-L{layers}.gguf"
    cmd = [sys.executable, "-m", "qgguf", "convert", str(model), "-o", str(out), "--device", device, *extra]
    env = dict(os.environ, QGGUF_CACHE=str(cache), PYTHONPATH=str(ROOT))
    log_path = work / f"convert-L{layers}.log"
    t0 = time.monotonic()
    # a pseudo-terminal, so that convert shows its progress bars (they are off when output goes to a pipe)
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 200, 0, 0))  # tqdm draws nothing at 0 columns
    proc = subprocess.Popen(cmd, stdout=slave, stderr=slave, stdin=subprocess.DEVNULL, env=env, cwd=ROOT)
    os.close(slave)
    sampler = Sampler(proc.pid)
    sampler.start()
    marks: list[tuple[str, float]] = []
    with open(log_path, "w") as log:
        for line in _pty_lines(master):  # tqdm's \r updates arrive as lines too
            log.write(f"{time.monotonic() - t0:.1f}\t{line}\n")  # seconds since the start: per-tensor times
            log.flush()
            for prefix, stepname in MARKERS:
                if line.startswith(prefix) and stepname not in dict(marks):
                    marks.append((stepname, time.monotonic() - t0))
                    if stepname == "export":  # plan runs between the end of measure and the start of export
                        marks.insert(len(marks) - 1, ("plan", marks[-1][1]))
    _, status, usage = os.wait4(proc.pid, 0)
    end = time.monotonic() - t0
    sampler.stop.set()
    sampler.join()
    rc = os.waitstatus_to_exitcode(status)
    if rc != 0:
        raise SystemExit(f"qgguf convert failed (exit {rc}); see {log_path}")
    text = log_path.read_text()
    steps = {}
    times = dict(marks)
    order = [s for s in STEPS if s in times]
    for i, s in enumerate(order):
        t_end = times[order[i + 1]] if i + 1 < len(order) else end
        anon, total = sampler.peak_between(times[s], t_end)
        steps[s] = {"s": round(t_end - times[s], 1), "peak_anon_mib": round(anon / 1024), "peak_rss_mib":
                    round(total / 1024)}
    child = sampler.peak.get("children", {})
    return {"layers": layers, "device": device, "command": shlex.join(["qgguf", "convert", "MODEL", "-o", "OUT.gguf",
                                                                       "--device", device, *extra]),
            "wall_s": round(end, 1), "cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
            "steps": steps, "startup_s": round(min(times.values()) if times else end, 1),
            "peak_rss_mib": round(usage.ru_maxrss / 1024), "peak_anon_mib": round(sampler.peak["main"].get("RssAnon", 0) / 1024),
            "converter_peak_rss_mib": round(child.get("VmHWM", 0) / 1024) if child else None,
            "source_bytes": disk_bytes(model), "cache_bytes": disk_bytes(cache), "out_bytes": out.stat().st_size,
            "weights": sum(w for _, items in tensors_of(layers) for _, shape in items for w in [_prod(shape)]),
            "load_avg": [round(x, 2) for x in os.getloadavg()], "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "commit": _commit(), "log_tail": text.strip().splitlines()[-1][:200]}


def _prod(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _commit() -> str:
    try:
        c = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
        d = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True)
        return c.stdout.strip() + ("+dirty" if d.stdout.strip() else "")
    except OSError:
        return "unknown"


def extrapolate(recs: list[dict]) -> list[dict]:
    """Per step, t = a + b·layers fitted through the runs (least squares), and the 8B / 70B predictions."""
    import numpy as np

    recs = sorted(recs, key=lambda r: r["layers"])
    ls = np.array([r["layers"] for r in recs], dtype=float)
    ratio_layer = layer_weights(SHAPE_70B) / layer_weights(SHAPE_8B)
    ratio_fixed = SHAPE_70B["hidden"] / SHAPE_8B["hidden"]  # embedding and head
    rows = []
    for s in STEPS + ("total",):
        ts = np.array([r["wall_s"] if s == "total" else r["steps"].get(s, {}).get("s", 0.0) for r in recs])
        b, a = np.polyfit(ls, ts, 1) if len(set(ls)) > 1 else (float("nan"), float("nan"))
        rows.append({"step": s, "per_layer_s": float(b), "fixed_s": float(a), "t_8b_s": float(a + 32 * b),
                     "t_70b_s": float(ratio_fixed * a + 80 * ratio_layer * b),
                     "per_run": {int(r["layers"]): float(t) for r, t in zip(recs, ts)}})
    return rows


def _count(text: str) -> float:
    """tqdm's unit_scale count ('525M', '1.49G', '812k', '16') as a number."""
    mult = {"k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}
    return float(text[:-1]) * mult[text[-1]] if text[-1] in mult else float(text)


def _elapsed(text: str) -> float | None:
    """tqdm's elapsed time ('[01:10<', '[1:02:03<') in a bar line, in seconds."""
    import re

    m = re.search(r"\[(?:(\d+):)?(\d+):(\d+)<", text)
    return None if m is None else int(m.group(1) or 0) * 3600 + int(m.group(2)) * 60 + int(m.group(3))


def tensor_times(log: Path, gguf_path: Path) -> dict[str, dict[str, float]]:
    """Seconds per tensor in measure and in export, from a convert log's progress-bar lines and the converter's
    GGUF (tensor order and sizes).

    Times come from each bar line's own elapsed field (whole seconds since the bar started), not from the log's
    stamps: a bar line is only complete when the next redraw's carriage return arrives, so its stamp is one redraw
    late. measure: the line "k/N …, NAME" is drawn as tensor k (NAME) ends, so tensor k took elapsed(k) −
    elapsed(k−1). export: the bar counts weights; a tensor ends at the first line whose count reaches the weights
    up to it (counts are rounded to 3 digits, so small tensors blur into their neighbours). Per layer the sums
    are sound to a second."""
    import re

    import gguf

    tensors = [(t.name, int(t.n_elements)) for t in gguf.GGUFReader(gguf_path).tensors]
    texts = [raw.partition("\t")[2] for raw in log.read_text(errors="replace").splitlines()]
    out: dict[str, dict[str, float]] = {"measure": {}, "export": {}}
    prev = 0.0
    for text in texts:
        m = re.match(r"measure:.*?(\d+)/\d+ \[.*, ([\w.]+)\]\s*$", text)
        e = _elapsed(text) if m else None
        if m and e is not None and m.group(2) not in out["measure"] and int(m.group(1)) == len(out["measure"]) + 1:
            out["measure"][m.group(2)] = e - prev
            prev = e
    counts = []
    for text in texts:
        m = re.match(r"export:.*\| ([\d.]+[kMGT]?)/([\d.]+[kMGT]?) \[", text)
        e = _elapsed(text) if m else None
        if m and e is not None:
            counts.append((e, _count(m.group(1))))
    done, prev = 0, 0.0
    for name, n in tensors:
        done += n
        hit = next((e for e, c in counts if c >= done * 0.999), None)
        if hit is None:
            break
        out["export"][name] = hit - prev
        prev = hit
    return out


def per_layer(times: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """Per step, seconds of each layer (blk.N tensors) and of the rest (embedding, head, norms)."""
    res = {}
    for stepname, per in times.items():
        acc: dict[str, float] = {}
        for name, s in per.items():
            key = f"blk.{name.split('.')[1]}" if name.startswith("blk.") else "other"
            acc[key] = round(acc.get(key, 0.0) + s, 1)
        res[stepname] = acc
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build")
    b.add_argument("--layers", type=int, required=True)
    b.add_argument("-o", "--out", type=Path, required=True)
    b.add_argument("--seed", type=int, default=0)
    r = sub.add_parser("run")
    r.add_argument("--layers", type=int, action="append", required=True)
    r.add_argument("--work", type=Path, required=True, help="models, caches, outputs and logs go here")
    r.add_argument("--device", default="cpu", help="cpu or cuda")
    r.add_argument("--json", type=Path, default=None, help="append each run's record to this JSON-lines file")
    r.add_argument("--seed", type=int, default=0)
    sp = sub.add_parser("split", help="seconds per layer in measure and export, from a run's log")
    sp.add_argument("log", type=Path, help="convert-L<n>.log of a run")
    sp.add_argument("gguf", type=Path, help="the converter's GGUF of that run (in its cache folder)")
    argv = sys.argv[1:]
    cut = argv.index("--") if "--" in argv else len(argv)
    args = ap.parse_args(argv[:cut])
    extra = argv[cut + 1:]
    if args.cmd == "split":
        print(json.dumps(per_layer(tensor_times(args.log, args.gguf))))
        return 0
    if args.cmd == "build":
        print(build(args.out, args.layers, args.seed))
        return 0
    args.work.mkdir(parents=True, exist_ok=True)
    recs = []
    for n in args.layers:
        t = time.monotonic()
        model = build(args.work / f"llama8b-L{n}", n, args.seed)
        print(f"model with {n} layers ready in {time.monotonic() - t:.0f} s: {model}", file=sys.stderr)
        rec = run_one(model, n, args.work, args.device, extra)
        recs.append(rec)
        print(json.dumps(rec), flush=True)
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(rec) + "\n")
    if len(recs) > 1:
        for row in extrapolate(recs):
            print(json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
