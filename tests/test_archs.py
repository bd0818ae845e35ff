"""Architectures beyond Llama, on tiny random models: each supported one converts (`qgguf convert`, read back by
gguf-py) and runs in the built llama.cpp; calibrate's statistics for GPT-2's transposed Conv1D and Gemma's scaled
embedding equal brute-force per-sequence weight gradients. Mixture-of-experts models: tests/test_moe.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qgguf.assets.tiny import make_tiny, tiny_text
from qgguf.calibrate.fisher import FisherCollector
from qgguf.calibrate.names import TensorNameMap
from qgguf.calibrate.runner import collect_weights, load_model
from qgguf.calibrate.text import token_chunks
from qgguf.llamacpp.build import tool_path

# architecture of the tiny model -> llama.cpp's name for it (general.architecture)
RUNS = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma2": "gemma2", "gemma3": "gemma3", "phi3": "phi3"}


def qgguf(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qgguf", *map(str, args)], capture_output=True, text=True)


@pytest.fixture(scope="module")
def text(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("text") / "cal.txt"
    p.write_text(tiny_text(6000, seed=1))
    return p


def convert_args(model: Path, out: Path, text: Path) -> list:
    # few measured rows and no type under Q4_0 keep a convert to seconds on a tiny model; the pipeline is the same
    return ["convert", model, "-o", out, "--target-bpw", "5", "--tokens", "256", "--seq-len", "64", "--text", text,
            "--max-rows", "8", "--min-type", "Q4_0"]


@pytest.mark.parametrize("arch", list(RUNS))
def test_converts_and_runs(arch, text, tmp_path, llama_build):
    import gguf

    model = make_tiny(arch, tmp_path / arch, ffn=256)
    out = tmp_path / "q5.gguf"
    res = qgguf(*convert_args(model, out, text))
    assert res.returncode == 0, res.stderr[-3000:]
    plan = {t["name"]: t["type"] for t in json.loads((tmp_path / "q5.plan.json").read_text())["tensors"]}
    r = gguf.GGUFReader(out)
    assert r.fields["general.architecture"].contents() == RUNS[arch]
    seen = {t.name: t.tensor_type.name for t in r.tensors}
    assert plan and all(seen[n] == t for n, t in plan.items())
    assert any(n.startswith("blk.1.") for n in plan) and "token_embd.weight" in plan
    assert all(t not in ("F32", "F16", "BF16") for t in plan.values()), plan
    gen = subprocess.run([str(tool_path("llama-completion")), "-m", str(out), "-p", "The world", "-n", "4",
                          "--temp", "0", "-t", "2", "-no-cnv"], capture_output=True, text=True, errors="replace",
                         timeout=120)
    assert gen.returncode == 0, gen.stderr[-2000:]
    # the prompt echoed (SentencePiece's space prefix may lead it) and something generated after it
    assert gen.stdout.lstrip().startswith("The world") and len(gen.stdout.strip()) > len("The world"), gen.stdout


def test_gpt2_with_an_unknown_tokenizer_fails_in_one_line(text, tmp_path):
    """llama.cpp's converter knows a byte-level BPE tokenizer only by a hash of its output, so it refuses the tiny
    GPT-2's own tokenizer: the refusal is one line with the converter's reason, and nothing is written."""
    model = make_tiny("gpt2", tmp_path / "gpt2")
    out = tmp_path / "g.gguf"
    res = qgguf(*convert_args(model, out, text))
    assert res.returncode != 0 and "Traceback" not in res.stderr
    errors = [l for l in res.stderr.splitlines() if "error" in l]
    assert len(errors) == 1 and "pre-tokenizer was not recognized" in errors[0], res.stderr[-2000:]
    assert not out.exists()


# ---------------------------------------------------------------------------------------------------- brute force

@pytest.mark.parametrize("arch", ["gpt2", "gemma2"])
def test_fisher_matches_brute_force(arch, tmp_path, per_sequence_fisher):
    """GPT-2: Conv1D weights (in × out) and a position table shared by the batch; Gemma 2: an embedding whose output
    is √hidden·W[id], so its Fisher is hidden × that of the gradient at its output (missing it is off 256×)."""
    from transformers import AutoTokenizer

    model_dir = make_tiny(arch, tmp_path / arch, tie=False)
    model = load_model(model_dir, torch.device("cpu"), "float32")
    weights, _ = collect_weights(model, TensorNameMap(model_dir))
    ids = torch.stack(token_chunks(AutoTokenizer.from_pretrained(model_dir), tiny_text(3000, seed=2), 64, 32))
    col = FisherCollector(model, weights, per_element=lambda n: True, estimator="sequence")
    cotangent = col.step(ids, generator=torch.Generator().manual_seed(1))
    col.close()
    # the output head's own term is per token by design (tests/test_calibrate.py checks it); the rest per sequence
    names = {n for n, a in col.accs.items() if not a.head}
    ref = per_sequence_fisher(model, names, ids, cotangent)
    from transformers.pytorch_utils import Conv1D

    conv = {n for n, m in model.named_modules() if isinstance(m, Conv1D) for n in [n + ".weight"]}
    embed = "transformer.wte.weight" if arch == "gpt2" else "model.embed_tokens.weight"
    assert embed in names and (conv if arch == "gpt2" else True)
    for n in names:
        F = ref[n].T if n in conv else ref[n]  # GGUF layout: rows = outputs
        acc = col.accs[n]
        torch.testing.assert_close(acc.fisher / col.n_tokens, F, rtol=2e-4, atol=1e-6 * F.max().item())
        torch.testing.assert_close(acc.importance / col.n_tokens, F.sum(0), rtol=2e-4,
                                   atol=1e-6 * F.sum(0).max().item())


def test_statistics_missing_a_tensor_are_not_blamed_on_another_model(text, tmp_path):
    """Statistics of this very model that lack a tensor (a calibration that skipped it) say so, not 'another
    model', and nothing is written."""
    from qgguf.calibrate.runner import calibrate
    from qgguf.calibrate.stats import save_stats

    model = make_tiny("qwen3", tmp_path / "m", ffn=256)
    stats = calibrate(model, tmp_path / "full.safetensors", text=text, tokens=128, seq_len=64, progress=False)
    del stats.tensors["blk.1.ffn_down.weight"]
    partial = save_stats(stats, tmp_path / "partial.safetensors")
    out = tmp_path / "x.gguf"
    res = qgguf("convert", model, "-o", out, "--target-bpw", "5", "--stats", partial)
    assert res.returncode != 0 and "Traceback" not in res.stderr
    line = next(l for l in res.stderr.splitlines() if "error" in l)
    assert "blk.1.ffn_down.weight" in line and "skipped" in line and "another model" not in line
    assert not out.exists()
