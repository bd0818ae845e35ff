"""`qgguf calibrate`: the accumulated Fisher equals a brute-force per-sample gradient computation, the statistics
line up with the tensors of the converter's GGUF (names, shapes, Q/K row order), runs are deterministic, the
KL model holds on a tiny model, and bad input fails cleanly with no output."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from qgguf.assets.tiny import make_tiny_llama, tiny_text
from qgguf.calibrate import klcheck
from qgguf.calibrate.fisher import FisherCollector, gaussian_cotangent, label_cotangent, sample_labels
from qgguf.calibrate.names import TensorNameMap
from qgguf.calibrate.runner import collect_weights, load_model
from qgguf.calibrate.stats import load_stats
from qgguf.calibrate.text import token_chunks
from qgguf.cli import main


@pytest.fixture(scope="module")
def tiny_tied(tmp_path_factory) -> Path:
    """The tiny Llama with tied input/output embeddings (as SmolLM2 and Qwen2.5-1.5B have)."""
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-tied"), tie=True)


@pytest.fixture(scope="module")
def texts(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("texts")
    (d / "cal.txt").write_text(tiny_text(20000, seed=0))
    (d / "held.txt").write_text(tiny_text(6000, seed=1))
    (d / "empty.txt").write_text("  \n\n")
    (d / "short.txt").write_text("The world is old.\n")
    return {p.stem: p for p in d.iterdir()}


def run_cli(*args) -> int:
    return main([str(a) for a in args])


# ---------------------------------------------------------------------------------------------------- brute force

def brute_force_fisher(model: nn.Module, weights: dict[int, str], ids: torch.Tensor, cotangent: torch.Tensor,
                       estimator: str) -> dict[str, torch.Tensor]:
    """Per-element Fisher straight from its definition, with autograd weight gradients and no hooks.

    ℓ is the model's logits contracted with `cotangent` (for a sampled label y: onehot(y) − p, i.e. log p(y)).
    Every use of every weight gets its own zero perturbation D, one per token position ("token": token t's
    contribution g_t x_tᵀ = ∂ℓ/∂D_t) or one per sequence ("sequence": the sequence's whole gradient ∂ℓ/∂D_b;
    the output head's own term stays per token, and a tied weight adds 2·G_lookup·G_head). F = Σ samples (∂ℓ/∂D)²/N.
    """
    B, T = ids.shape
    head = model.get_output_embeddings()
    per_pos: dict[str, list[torch.Tensor]] = {}
    per_seq: dict[str, torch.Tensor] = {}
    head_d: dict[str, torch.Tensor] = {}
    saved = []
    for mod in model.modules():
        if not isinstance(mod, (nn.Linear, nn.Embedding)) or id(mod.weight) not in weights:
            continue
        key = weights[id(mod.weight)]
        if estimator == "token" or mod is head:
            D = torch.zeros(B, T, *mod.weight.shape, requires_grad=True)
            if estimator == "sequence":
                head_d[key] = D
            else:
                per_pos.setdefault(key, []).append(D)
        else:
            per_seq[key] = torch.zeros(B, 1, *mod.weight.shape, requires_grad=True)
            D = per_seq[key].expand(B, T, *mod.weight.shape)
        if isinstance(mod, nn.Linear):
            def fwd(x, mod=mod, D=D):
                return torch.einsum("bti,oi->bto", x, mod.weight) + torch.einsum("bti,btoi->bto", x, D)
        else:
            def fwd(x, mod=mod, D=D):
                W = mod.weight + D
                return torch.gather(W, 2, x[:, :, None, None].expand(B, T, 1, W.shape[-1])).squeeze(2)
        saved.append(mod)
        mod.forward = fwd
    try:
        with torch.enable_grad():
            logits = model(input_ids=ids, use_cache=False).logits
            (logits * cotangent).sum().backward()
    finally:
        for mod in saved:
            del mod.forward  # back to the class's forward
    N = B * T
    out = {}
    for key in set(per_pos) | set(per_seq) | set(head_d):
        F = sum(D.grad.square().sum((0, 1)) for D in per_pos.get(key, []))
        if key in per_seq:
            F = F + per_seq[key].grad.square().sum((0, 1))
        if key in head_d:
            Hg = head_d[key].grad
            F = F + Hg.square().sum((0, 1))
            if key in per_seq:
                F = F + 2 * (per_seq[key].grad[:, 0] * Hg.sum(1)).sum(0)
        out[key] = F / N
    return out


@pytest.mark.parametrize("estimator,probe", [("token", "label"), ("sequence", "label"), ("sequence", "gaussian")])
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_fisher_matches_brute_force(estimator, probe, tied, tiny_llama, tiny_tied, texts):
    from transformers import AutoTokenizer

    model_dir = tiny_tied if tied else tiny_llama
    model = load_model(model_dir, torch.device("cpu"), "float32")
    weights, targets = collect_weights(model, TensorNameMap(model_dir))
    ids = torch.stack(token_chunks(AutoTokenizer.from_pretrained(model_dir), texts["cal"].read_text(), 64, 32))
    # per-element on half the weights: both the full (out × in) and the Gram-matrix paths are checked
    full = set(sorted(weights.values())[::2])
    col = FisherCollector(model, weights, per_element=lambda n: n in full, estimator=estimator, probe=probe)
    cotangent = col.step(ids, generator=torch.Generator().manual_seed(1))
    col.close()
    ref = brute_force_fisher(model, weights, ids, cotangent, estimator)
    assert set(ref) == set(col.accs)
    if tied:
        assert "model.embed_tokens.weight" in ref and "lm_head.weight" not in ref  # one tensor, both uses
    n = col.n_tokens
    for key, F in ref.items():
        acc = col.accs[key]
        torch.testing.assert_close(acc.importance / n, F.sum(0), rtol=2e-5, atol=1e-6 * F.sum(0).max().item())
        if key in full:
            torch.testing.assert_close(acc.fisher / n, F, rtol=2e-5, atol=1e-6 * F.max().item())
        else:
            assert acc.fisher is None


def test_probes_are_drawn_from_the_model():
    """Inverse-CDF sampling reproduces the predictive distribution, a seed fixes the draws, and both probes
    have the covariance diag(p) − p pᵀ of the score (so both estimate the true Fisher)."""
    logits = torch.tensor([[0.0, 1.0, 2.0, -30.0]]).repeat(40000, 1)[None]
    a = sample_labels(logits, torch.Generator().manual_seed(3))[0]
    b = sample_labels(logits, torch.Generator().manual_seed(3))[0]
    assert torch.equal(a, b)
    freq = torch.bincount(a, minlength=4).double() / a.numel()
    p = torch.softmax(logits[0, 0].double(), 0)
    torch.testing.assert_close(freq, p, atol=0.01, rtol=0)
    assert freq[3] == 0
    cov = torch.diag(p) - torch.outer(p, p)
    for v in (label_cotangent(logits, a[None]), gaussian_cotangent(logits, torch.Generator().manual_seed(4))):
        v = v[0].double()
        torch.testing.assert_close(v.T @ v / v.shape[0], cov, atol=0.01, rtol=0)


# ---------------------------------------------------------------------------------------------------- end to end

@pytest.fixture(scope="module")
def stats_file(tiny_llama, texts, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("stats") / "tiny.safetensors"
    rc = run_cli("calibrate", tiny_llama, "-o", out, "--text", texts["cal"], "--tokens", 1000, "--seq-len", 128,
                 "--per-element", "blk.*.attn_[qk].weight", "--per-element", "output.weight", "--seed", 5)
    assert rc == 0 and out.is_file()
    return out


def test_stats_line_up_with_the_converted_gguf(stats_file, tiny_llama, texts, tmp_path):
    import gguf
    from transformers import AutoTokenizer

    from qgguf.llamacpp.converter import convert_hf

    stats = load_stats(stats_file)
    assert stats.meta["tokens"] == 1000 and stats.meta["seq_len"] == 128 and stats.meta["seed"] == 5
    assert stats.meta["arch"] == "llama" and len(stats.meta["model_sha256"]) == 64
    assert stats.meta["qgguf_version"]
    g = convert_hf(tiny_llama, tmp_path / "tiny.gguf")
    tensors = {t.name: t for t in gguf.GGUFReader(g).tensors}
    two_d = {n for n, t in tensors.items() if len(t.shape) == 2}
    assert set(stats.names()) == two_d  # every 2-D weight of the GGUF, nothing else
    for name, t in stats.tensors.items():
        ne0, ne1 = (int(x) for x in tensors[name].shape)
        assert t.shape == (ne1, ne0)  # rows × row length (ne0)
        assert t.importance.shape == (ne0,) and np.all(t.importance > 0)
        assert np.isclose(t.fisher_mean * t.numel, t.fisher_sum)
        assert (t.act_sq is None) == (name == "token_embd.weight")

    # Per-element Fisher is in GGUF row order: find each GGUF row of attn_q/attn_k among the HF rows (from the
    # converted file itself, not from qgguf.calibrate.names) and compare with a fresh HF-order collection on the same data.
    model = load_model(tiny_llama, torch.device("cpu"), "float32")
    weights, _ = collect_weights(model, TensorNameMap(tiny_llama))
    col = FisherCollector(model, weights, per_element=lambda n: True)
    chunks = token_chunks(AutoTokenizer.from_pretrained(tiny_llama), texts["cal"].read_text(), 1000, 128)
    gen = torch.Generator().manual_seed(5)
    for c in chunks:
        col.step(c[None], generator=gen)
    params = dict(model.named_parameters())
    for name in ("blk.0.attn_q.weight", "blk.1.attn_k.weight", "output.weight"):
        hf_name = stats[name].hf_name
        hf_w = params[hf_name].detach().numpy()
        gg_w = np.asarray(tensors[name].data)
        order = [int(np.flatnonzero((hf_w == row).all(1))[0]) for row in gg_w]
        if name != "output.weight":
            assert order != list(range(len(order)))  # the converter does permute Q and K rows
        expect = (col.accs[hf_name].fisher / col.n_tokens).numpy()[order]
        np.testing.assert_allclose(stats.per_element(name), expect, rtol=1e-5, atol=1e-7 * expect.max())
        np.testing.assert_allclose(stats.per_element(name).sum(0), stats[name].importance, rtol=1e-4)
    assert stats.per_element("blk.0.ffn_up.weight") is None


def test_same_seed_same_bytes_other_seed_close(stats_file, tiny_llama, texts, tmp_path):
    args = ["--text", texts["cal"], "--tokens", 1000, "--seq-len", 128, "--per-element", "blk.*.attn_[qk].weight",
            "--per-element", "output.weight"]
    assert run_cli("calibrate", tiny_llama, "-o", tmp_path / "a.safetensors", "--seed", 5, *args) == 0
    assert (tmp_path / "a.safetensors").read_bytes() == stats_file.read_bytes()
    assert run_cli("calibrate", tiny_llama, "-o", tmp_path / "b.safetensors", "--seed", 6, *args) == 0
    a, b = load_stats(stats_file), load_stats(tmp_path / "b.safetensors")
    assert (tmp_path / "b.safetensors").read_bytes() != stats_file.read_bytes()
    for name in a.names():
        assert abs(b[name].fisher_sum / a[name].fisher_sum - 1) < 0.3, name
        if a[name].act_sq is not None:  # the forward pass does not depend on the seed
            np.testing.assert_array_equal(a[name].act_sq, b[name].act_sq)


def test_bf16_model_and_tied_embedding(tmp_path, texts):
    """A bf16 checkpoint runs in bf16 (fp32 accumulation); the tied embedding is one tensor with both uses."""
    d32 = make_tiny_llama(tmp_path / "f32", tie=True, seed=3)
    d16 = make_tiny_llama(tmp_path / "bf16", tie=True, seed=3, dtype="bfloat16")
    common = ["--text", texts["cal"], "--tokens", 512, "--seq-len", 128]
    assert run_cli("calibrate", d32, "-o", tmp_path / "f32.safetensors", *common) == 0
    assert run_cli("calibrate", d16, "-o", tmp_path / "bf16.safetensors", *common) == 0
    s32, s16 = load_stats(tmp_path / "f32.safetensors"), load_stats(tmp_path / "bf16.safetensors")
    assert s16.meta["dtype"] == "bfloat16" and s32.meta["dtype"] == "float32"
    assert "output.weight" not in s16 and s16["token_embd.weight"].kind == "tied"
    assert s16["token_embd.weight"].act_sq is not None  # from the head's input
    for name in s32.names():
        assert s16[name].importance.dtype == np.float32 and np.isfinite(s16[name].importance).all()
        assert abs(s16[name].fisher_sum / s32[name].fisher_sum - 1) < 0.25, name


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu(stats_file, tiny_llama, texts, tmp_path):
    out = tmp_path / "cuda.safetensors"
    assert run_cli("calibrate", tiny_llama, "-o", out, "--text", texts["cal"], "--tokens", 1000, "--seq-len", 128,
                   "--seed", 5, "--device", "cuda") == 0
    a, b = load_stats(stats_file), load_stats(out)
    for name in a.names():
        assert abs(b[name].fisher_sum / a[name].fisher_sum - 1) < 0.3, name
        if a[name].act_sq is not None:
            np.testing.assert_allclose(b[name].act_sq, a[name].act_sq, rtol=1e-3)


def test_kl_model_holds_on_the_tiny_model(tiny_llama, texts, tmp_path):
    """½·σ²·ΣF predicts the KL of Gaussian weight noise on held-out text (qgguf.calibrate.klcheck, small)."""
    out = tmp_path / "s.safetensors"
    assert run_cli("calibrate", tiny_llama, "-o", out, "--text", texts["cal"], "--tokens", 2048,
                   "--seq-len", 256) == 0
    res = klcheck.run(tiny_llama, out, texts["held"], tokens=512, seq_len=256, target=0.01, draws=2, seed=0,
                       patterns=["blk.1.attn_v.weight", "blk.0.ffn_down.weight", "output.weight",
                                 "token_embd.weight"], blocks=None)
    ratios = {r["tensor"]: r["ratio"] for r in res["rows"]}
    assert len(ratios) == 4
    assert all(0.75 <= r <= 1.25 for r in ratios.values()), ratios


# ---------------------------------------------------------------------------------------------------- bad input

def _no_output(path: Path) -> bool:
    return not path.exists() and not list(path.parent.glob(f".{path.name}.*"))


@pytest.mark.parametrize("case", ["empty text", "short text", "zero tokens", "no folder", "output folder missing",
                                  "output under a file", "not a causal LM", "seq-len too long"])
def test_bad_input_fails_cleanly(case, tiny_llama, texts, tmp_path, capsys):
    out = tmp_path / "stats.safetensors"
    model, text, extra = tiny_llama, texts["cal"], []
    if case == "empty text":
        text = texts["empty"]
    elif case == "short text":
        text = texts["short"]
    elif case == "zero tokens":
        extra = ["--tokens", 0]
    elif case == "no folder":
        model = tmp_path / "nope"
    elif case == "output folder missing":
        out = tmp_path / "missing" / "stats.safetensors"
    elif case == "output under a file":
        (tmp_path / "afile").write_text("x")
        out = tmp_path / "afile" / "stats.safetensors"
    elif case == "not a causal LM":
        model = tmp_path / "base"
        model.mkdir()
        for f in tiny_llama.iterdir():
            (model / f.name).symlink_to(f)
        (model / "config.json").unlink()
        cfg = json.loads((tiny_llama / "config.json").read_text())
        (model / "config.json").write_text(json.dumps(dict(cfg, architectures=["LlamaModel"])))
    elif case == "seq-len too long":
        extra = ["--seq-len", 4096]
    rc = run_cli("calibrate", model, "-o", out, "--text", text, "--tokens", 256, "--seq-len", 128, *extra)
    err = capsys.readouterr().err
    assert rc != 0
    assert "qgguf: error:" in err and "Traceback" not in err
    assert len(err.strip().splitlines()[-1]) > 30  # a message that names the thing and the fix
    assert _no_output(out)


def test_cli_subprocess_reports_error_without_traceback(tiny_llama, texts, tmp_path):
    out = tmp_path / "s.safetensors"
    res = subprocess.run([sys.executable, "-m", "qgguf", "calibrate", str(tiny_llama), "-o", str(out), "--text",
                          str(texts["short"]), "--tokens", "300"], capture_output=True, text=True,
                         env={**os.environ})
    assert res.returncode != 0
    assert "has only" in res.stderr and "--tokens" in res.stderr and "Traceback" not in res.stderr
    assert _no_output(out)


def test_calibrate_takes_an_asset_name_like_convert(tiny_llama, texts, tmp_path, monkeypatch, capsys):
    """`qgguf calibrate smollm2-135m …` reads the fetched asset, as `qgguf convert smollm2-135m` does; a name that is
    neither a folder nor an asset is one line naming both fixes."""
    from qgguf.assets import fetch

    monkeypatch.setattr(fetch, "asset_path", lambda name: tiny_llama if name == "tiny-asset" else fetch._get(name))
    out = tmp_path / "a.safetensors"
    assert run_cli("calibrate", "tiny-asset", "-o", out, "--text", texts["cal"], "--tokens", 256, "--seq-len", 128) == 0
    assert out.is_file()
    assert run_cli("calibrate", "no-such-model", "-o", tmp_path / "b.safetensors") != 0
    err = capsys.readouterr().err
    assert "neither a model folder nor a model asset" in err and "Traceback" not in err
    assert not (tmp_path / "b.safetensors").exists()
