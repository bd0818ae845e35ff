"""Real model sizes: a sharded bf16 folder converts with a BF16 intermediate no larger than the source, an F32
source keeps its F32 intermediate, memory does not grow with the model's depth, and calibration with gradient
checkpointing gives the statistics it gives without."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from qgguf.assets.tiny import make_tiny_llama, tiny_text
from qgguf.files import cache_dir
from qgguf.llamacpp.build import tool_path
from qgguf.models import source_float_type
from qgguf.procmem import Sampler

ROOT = Path(__file__).resolve().parents[1]


def fresh_cache(d: Path) -> Path:
    """An empty qgguf cache sharing the built llama.cpp and compiled kernels: what a run adds is all that is in it."""
    d.mkdir(parents=True, exist_ok=True)
    for shared in ("llama", "assets", "torch-compile"):
        (d / shared).symlink_to(cache_dir(shared), target_is_directory=True)
    return d


def disk_bytes(path: Path) -> int:
    """Bytes of the files under a folder (not their 4 KiB blocks: on a tiny model the block rounding of a few
    hundred small measurement files would outweigh the model)."""
    return sum((Path(r) / f).stat().st_size for r, _, fs in os.walk(path) for f in fs
               if not (Path(r) / f).is_symlink())


def qgguf(*args: str, cache: Path, **kw) -> subprocess.CompletedProcess:
    env = dict(os.environ, QGGUF_CACHE=str(cache))
    return subprocess.run([sys.executable, "-m", "qgguf", *args], capture_output=True, text=True, env=env, **kw)


@pytest.fixture(scope="module")
def sharded(tmp_path_factory, llama_build):
    """A bf16 model saved in shards of 300 KB with its index, config and tokenizer, and nothing else."""
    d = tmp_path_factory.mktemp("scale")
    model = make_tiny_llama(d / "model", seed=3, dtype="bfloat16", max_shard_size="300KB")
    (model / "generation_config.json").unlink(missing_ok=True)
    text = d / "calib.txt"
    text.write_text(tiny_text(seed=1))
    return model, text, d


def test_sharded_bf16_folder_converts_with_a_bf16_intermediate(sharded):
    import gguf
    from safetensors import safe_open

    model, text, d = sharded
    names = sorted(p.name for p in model.iterdir())
    assert "model.safetensors.index.json" in names and "model.safetensors" not in names
    assert sum(n.endswith(".safetensors") for n in names) > 3
    assert source_float_type(model) == "bf16"
    cache = fresh_cache(d / "cache")
    out = d / "q45.gguf"
    args = ("convert", str(model), "-o", str(out), "--target-bpw", "4.5", "--text", str(text), "--tokens", "512",
            "--seq-len", "128", "-t", "1")
    res = qgguf(*args, cache=cache)
    assert res.returncode == 0, res.stderr[-3000:]
    # the estimates are printed before the long steps start
    assert "qgguf: measure:" in res.stderr and "G weights to encode" in res.stderr
    assert "qgguf: export:" in res.stderr and "qgguf: calibrate:" in res.stderr

    # the converter's intermediate is BF16, holds the source's weights exactly, and is no larger than the source
    [inter] = list((cache / "convert").glob("*/model-bf16.gguf"))
    source = sum(p.stat().st_size for p in model.glob("*.safetensors"))
    assert inter.stat().st_size <= 1.1 * source
    r = gguf.GGUFReader(inter)
    types = {t.name: t.tensor_type.name for t in r.tensors}
    assert types["blk.0.ffn_down.weight"] == "BF16" and types["blk.0.attn_norm.weight"] == "F32"
    index = json.loads((model / "model.safetensors.index.json").read_text())["weight_map"]
    for hf, gg in (("model.layers.1.mlp.down_proj.weight", "blk.1.ffn_down.weight"),
                   ("model.embed_tokens.weight", "token_embd.weight")):
        with safe_open(model / index[hf], "pt") as f:
            src = f.get_tensor(hf)
        t = next(t for t in r.tensors if t.name == gg)
        got = torch.from_numpy(np.asarray(t.data).view(np.uint16).astype(np.int32)).to(torch.int16)
        assert torch.equal(got.view(torch.bfloat16).reshape(src.shape), src)
    # the cache holds about one copy of the source: the intermediate, the statistics and measurements
    assert disk_bytes(cache) <= 1.1 * source + out.stat().st_size

    # the output: planned types read back by gguf-py, unplanned tensors copied as the converter wrote them (F32
    # norms), and it runs in the built llama.cpp
    plan = json.loads(out.with_name("q45.plan.json").read_text())
    o = gguf.GGUFReader(out)
    seen = {t.name: t.tensor_type.name for t in o.tensors}
    assert all(seen[t["name"]] == t["type"] for t in plan["tensors"])
    assert seen["blk.0.attn_norm.weight"] == "F32"
    run = subprocess.run([str(tool_path("llama-completion")), "-m", str(out), "-p", "the of and", "-n", "8",
                          "-no-cnv", "--temp", "0", "-t", "1"], capture_output=True, text=True, errors="replace",
                         timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]

    # same inputs, byte-identical output (warm caches)
    again = d / "again.gguf"
    res = qgguf(*args[:2], "-o", str(again), *args[4:], cache=cache)
    assert res.returncode == 0, res.stderr[-3000:]
    assert again.read_bytes() == out.read_bytes()


def test_f32_source_keeps_its_f32_intermediate(tiny_llama, tmp_path):
    """An F32 model's intermediate is the F32 GGUF under the same key as before BF16 intermediates existed, so its
    bytes, and everything made from them, are unchanged; mixed matrices also give F32."""
    import hashlib

    from qgguf.convert import converter_gguf
    from qgguf.llamacpp.converter import converter_sha256
    from qgguf.models import model_sha256

    assert source_float_type(tiny_llama) == "f32"
    h = model_sha256(tiny_llama)
    key = hashlib.sha256(f"{h}|{converter_sha256()}".encode()).hexdigest()
    path = converter_gguf(tiny_llama, h)
    assert path == cache_dir("convert", key[:16]) / "model-f32.gguf"

    from safetensors.torch import save_file

    mixed = tmp_path / "mixed"
    mixed.mkdir()
    save_file({"a.weight": torch.zeros(4, 4, dtype=torch.bfloat16), "b.weight": torch.zeros(4, 4)},
              str(mixed / "model.safetensors"))
    assert source_float_type(mixed) == "f32"
    save_file({"a.weight": torch.zeros(4, 4, dtype=torch.float16), "n.weight": torch.zeros(4)},
              str(mixed / "model.safetensors"))
    assert source_float_type(mixed) == "f16"
    (mixed / "model.safetensors").write_bytes(b"\xff" * 16)
    from qgguf.errors import QggufError

    with pytest.raises(QggufError, match="not a readable safetensors file"):
        source_float_type(mixed)


def _peak_memory(model: Path, stats: Path, out: Path, cache: Path) -> dict[str, int]:
    """Peak RssAnon and RssAnon + RssFile (KiB) of a `qgguf convert` process (measure and export of a plan of Q8_0
    only, so encoding is quick), sampled every 20 ms."""
    env = dict(os.environ, QGGUF_CACHE=str(cache))
    cmd = [sys.executable, "-m", "qgguf", "convert", str(model), "-o", str(out), "--target-bpw", "9",
           "--stats", str(stats), "--min-type", "Q8_0", "--max-type", "Q8_0", "--max-rows", "32", "-t", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    s = Sampler(proc.pid, every=0.02)
    s.start()
    _, err = proc.communicate(timeout=600)
    s.stop.set()
    s.join()
    assert proc.returncode == 0, err[-3000:]
    return {"anon": max(a for _, a, _ in s.timeline), "total": max(a + f for _, a, f in s.timeline)}


def test_memory_does_not_grow_with_depth(tmp_path):
    """Two bf16 models alike but for depth (4 and 28 layers: 28 layers hold 0.3 GB of float32 weights more, the
    largest tensor 3 MiB): the peak anonymous memory and the peak resident memory (anonymous + mapped file pages) of
    measure and export are the same within 48 MiB (what remains grows with the number of tensors, not their size:
    tensor infos, measurements, the plan, the heat map), because one tensor is upcast at a time and the mapped
    intermediate's pages are released after each tensor."""
    text = tmp_path / "calib.txt"
    text.write_text(tiny_text(seed=2))
    peaks, sizes = {}, {}
    for layers in (4, 28):
        model = make_tiny_llama(tmp_path / f"m{layers}", hidden=512, ffn=1536, layers=layers, heads=8, kv_heads=4,
                                dtype="bfloat16", seed=1)
        sizes[layers] = sum(p.stat().st_size for p in model.glob("*.safetensors"))
        stats = tmp_path / f"s{layers}.safetensors"
        cache = fresh_cache(tmp_path / f"cache{layers}")
        res = qgguf("calibrate", str(model), "-o", str(stats), "--text", str(text), "--tokens", "64",
                    "--seq-len", "32", "--threads", "1", cache=cache)
        assert res.returncode == 0, res.stderr[-2000:]
        t = time.monotonic()
        peaks[layers] = _peak_memory(model, stats, tmp_path / f"o{layers}.gguf", cache)
        print(layers, "layers:", {k: v // 1024 for k, v in peaks[layers].items()}, "MiB",
              f"{time.monotonic() - t:.0f} s")
    grown = 2 * (sizes[28] - sizes[4])  # float32 bytes the deeper model adds
    assert grown > 280e6
    for kind in ("anon", "total"):
        assert peaks[28][kind] - peaks[4][kind] < 48 << 10, (kind, peaks)


def test_gradient_checkpointing_gives_the_same_statistics(tiny_llama, tmp_path):
    from qgguf.calibrate.runner import calibrate

    text = tmp_path / "calib.txt"
    text.write_text(tiny_text(seed=4))
    plain = calibrate(tiny_llama, tmp_path / "a.safetensors", text=text, tokens=256, seq_len=64, seed=2,
                      progress=False)
    ckpt = calibrate(tiny_llama, tmp_path / "b.safetensors", text=text, tokens=256, seq_len=64, seed=2,
                     progress=False, grad_checkpoint=True)
    assert plain.tensors.keys() == ckpt.tensors.keys()
    for name, t in plain.tensors.items():
        np.testing.assert_allclose(ckpt[name].importance, t.importance, rtol=1e-4, atol=1e-12, err_msg=name)
        if t.act_sq is not None:
            np.testing.assert_allclose(ckpt[name].act_sq, t.act_sq, rtol=1e-5, err_msg=name)
