"""`qgguf calibrate --covariance`: the input covariance of every Linear weight equals a direct computation, is shared
by the tensors reading one input, does not depend on how many layers a pass holds, and the per-row Fisher factor
is in GGUF row order."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from qgguf.assets.tiny import tiny_text
from qgguf.calibrate.covariance import CovarianceStore
from qgguf.calibrate.fisher import FisherCollector
from qgguf.calibrate.names import TensorNameMap
from qgguf.calibrate.runner import calibrate, collect_weights, load_model
from qgguf.calibrate.stats import load_stats
from qgguf.calibrate.text import token_chunks
from qgguf.cli import main

TOKENS, SEQ = 600, 128


@pytest.fixture(scope="module")
def text(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("text") / "cal.txt"
    p.write_text(tiny_text(8000, seed=0))
    return p


@pytest.fixture(scope="module")
def cov_run(tiny_llama, text, tmp_path_factory):
    d = tmp_path_factory.mktemp("cov")
    rc = main(["calibrate", str(tiny_llama), "-o", str(d / "s.safetensors"), "--text", str(text), "--tokens",
               str(TOKENS), "--seq-len", str(SEQ), "--covariance", str(d / "cov"), "--estimator", "token"])
    assert rc == 0
    return d / "s.safetensors", d / "cov"


def _inputs(model, modules, chunks):
    """Every hooked module's input rows over the text, by a plain forward hook (no qgguf code)."""
    xs = {n: [] for n in modules.values()}
    hs = [m.register_forward_hook(lambda mod, a, o, n=n: xs[n].append(a[0].detach().reshape(-1, a[0].shape[-1])))
          for m, n in modules.items()]
    with torch.no_grad():
        for c in chunks:
            model(input_ids=c[None], use_cache=False)
    for h in hs:
        h.remove()
    return {n: torch.cat(v).double() for n, v in xs.items()}


def test_covariance_equals_direct_and_is_shared(cov_run, tiny_llama, text):
    stats_path, cov = cov_run
    store = CovarianceStore(cov)
    stats = load_stats(stats_path)
    linear = {n for n, t in stats.tensors.items() if t.kind == "linear"}
    assert set(store.index["tensors"]) == linear and "token_embd.weight" not in linear
    assert store.index["tokens"] == TOKENS == store.tokens and store.tokens_a is None
    for blk in (0, 1):  # q/k/v read one input, gate/up another: one H each, the first to run leads
        assert {store.leader(f"blk.{blk}.attn_{k}.weight") for k in "qkv"} == {f"blk.{blk}.attn_q.weight"}
        assert {store.leader(f"blk.{blk}.ffn_{k}.weight") for k in ("gate", "up")} == {f"blk.{blk}.ffn_gate.weight"}
        assert store.leader(f"blk.{blk}.ffn_down.weight") == f"blk.{blk}.ffn_down.weight"
    assert len(list(cov.glob("layer-*.safetensors"))) == 3  # blk.0, blk.1 and the output head

    model = load_model(tiny_llama, torch.device("cpu"), "float32")
    weights, targets = collect_weights(model, TensorNameMap(tiny_llama))
    modules = {m: targets[weights[id(m.weight)]].name for m in model.modules()
               if isinstance(m, torch.nn.Linear) and id(m.weight) in weights}
    chunks = token_chunks(AutoTokenizer.from_pretrained(tiny_llama), text.read_text(), TOKENS, SEQ)
    xs = _inputs(model, modules, chunks)
    for name in ("blk.0.attn_k.weight", "blk.1.ffn_up.weight", "blk.1.ffn_down.weight", "output.weight"):
        x = xs[name]
        direct = (x.T @ x / x.shape[0]).numpy()
        H = store.get(name)
        assert H.dtype == np.float32 and H.shape == direct.shape
        np.testing.assert_allclose(H, direct, rtol=2e-5, atol=2e-6 * np.abs(direct).max())
        np.testing.assert_allclose(np.diag(H), stats[name].act_sq, rtol=1e-4)  # diag(H) = E[x²], as before
        assert np.array_equal(H, H.T) or np.allclose(H, H.T, rtol=1e-6)


def test_layer_by_layer_passes_give_the_same_files(cov_run, tiny_llama, text, tmp_path):
    """A budget below one layer's H runs one pass per layer: same bytes as the single pass."""
    _, cov = cov_run
    calibrate(tiny_llama, tmp_path / "s.safetensors", text=text, tokens=TOKENS, seq_len=SEQ, estimator="token",
              covariance=tmp_path / "cov", covariance_budget=1, progress=False)
    for f in sorted(cov.glob("layer-*.safetensors")):
        assert (tmp_path / "cov" / f.name).read_bytes() == f.read_bytes(), f.name
    assert json.loads((tmp_path / "cov" / "index.json").read_text()) == json.loads((cov / "index.json").read_text())


def test_split_halves_equal_direct_and_full_h_is_unchanged(cov_run, tiny_llama, text, tmp_path):
    """--covariance-split keeps the even sequences' H beside the full one: H_a and the derived H_b equal a direct
    computation over the even and the odd sequences, the full H is the same as without the split, and a layer per
    pass gives the same files."""
    _, cov = cov_run
    rc = main(["calibrate", str(tiny_llama), "-o", str(tmp_path / "s.safetensors"), "--text", str(text), "--tokens",
               str(TOKENS), "--seq-len", str(SEQ), "--covariance", str(tmp_path / "cov"), "--estimator", "token",
               "--covariance-split"])
    assert rc == 0
    split, plain = CovarianceStore(tmp_path / "cov"), CovarianceStore(cov)
    assert split.has_split and not plain.has_split and plain.get_split("blk.0.attn_q.weight") is None

    model = load_model(tiny_llama, torch.device("cpu"), "float32")
    weights, targets = collect_weights(model, TensorNameMap(tiny_llama))
    modules = {m: targets[weights[id(m.weight)]].name for m in model.modules()
               if isinstance(m, torch.nn.Linear) and id(m.weight) in weights}
    chunks = token_chunks(AutoTokenizer.from_pretrained(tiny_llama), text.read_text(), TOKENS, SEQ)
    assert len(chunks) >= 4
    even, odd = _inputs(model, modules, chunks[0::2]), _inputs(model, modules, chunks[1::2])
    assert split.index["tokens_a"] == split.tokens_a == sum(int(c.numel()) for c in chunks[0::2])
    for name in ("blk.0.attn_v.weight", "blk.1.ffn_down.weight", "output.weight"):
        np.testing.assert_array_equal(split.get(name), plain.get(name))
        H_a, H_b = split.get_split(name)
        for got, x in ((H_a, even[name]), (H_b, odd[name])):
            direct = (x.T @ x / x.shape[0]).numpy()
            np.testing.assert_allclose(got, direct, rtol=1e-4, atol=1e-5 * np.abs(direct).max())
        assert not np.allclose(H_a, H_b)  # two samples of the text, not one matrix twice

    calibrate(tiny_llama, tmp_path / "s1.safetensors", text=text, tokens=TOKENS, seq_len=SEQ, estimator="token",
              covariance=tmp_path / "cov1", covariance_budget=1, covariance_split=True, progress=False)
    for f in sorted((tmp_path / "cov").glob("layer-*.safetensors")):
        assert (tmp_path / "cov1" / f.name).read_bytes() == f.read_bytes(), f.name


def test_split_without_covariance_is_refused(tiny_llama, text, tmp_path, capsys):
    rc = main(["calibrate", str(tiny_llama), "-o", str(tmp_path / "s.safetensors"), "--text", str(text),
               "--covariance-split"])
    assert rc != 0 and "--covariance DIR" in capsys.readouterr().err
    assert not (tmp_path / "s.safetensors").exists()


def test_row_fisher_is_per_output_row_in_gguf_order(cov_run, tiny_llama, text, tmp_path):
    from qgguf.llamacpp.converter import convert_hf

    stats_path, _ = cov_run
    stats = load_stats(stats_path)
    model = load_model(tiny_llama, torch.device("cpu"), "float32")
    weights, _ = collect_weights(model, TensorNameMap(tiny_llama))
    col = FisherCollector(model, weights, estimator="token", per_element=lambda n: True)
    chunks = token_chunks(AutoTokenizer.from_pretrained(tiny_llama), text.read_text(), TOKENS, SEQ)
    gen = torch.Generator().manual_seed(0)
    grads: dict[str, torch.Tensor] = {}
    hs = []
    for hf, p in model.named_modules():
        if isinstance(p, torch.nn.Linear) and p.weight.shape[0] != 320:
            def hook(mod, a, o, hf=hf):
                o.register_hook(lambda g: grads.__setitem__(hf, grads.get(hf, 0) + g.reshape(-1, g.shape[-1])
                                                            .double().square().sum(0)))
            hs.append(p.register_forward_hook(hook))
    for c in chunks:
        col.step(c[None], generator=gen)
    tensors = {t.name: t for t in gguf.GGUFReader(convert_hf(tiny_llama, tmp_path / "t.gguf")).tensors}
    params = dict(model.named_parameters())
    for name in ("blk.0.attn_q.weight", "blk.1.attn_k.weight", "blk.0.ffn_down.weight"):
        t = stats[name]
        assert t.row_fisher is not None and t.row_fisher.shape == (t.shape[0],)
        hf_w = params[t.hf_name].detach().numpy()
        order = [int(np.flatnonzero((hf_w == row).all(1))[0]) for row in np.asarray(tensors[name].data)]
        expect = (grads[t.hf_name.removesuffix(".weight")] / TOKENS).numpy()[order]
        np.testing.assert_allclose(t.row_fisher, expect, rtol=1e-4)
    assert stats["token_embd.weight"].row_fisher is None


def test_split_of_one_sequence_is_refused_before_calibrating(tiny_llama, text, tmp_path, capsys):
    rc = main(["calibrate", str(tiny_llama), "-o", str(tmp_path / "s.safetensors"), "--text", str(text), "--tokens",
               "100", "--seq-len", "128", "--covariance", str(tmp_path / "cov"), "--covariance-split"])
    err = capsys.readouterr().err
    assert rc != 0 and "at least two calibration sequences" in err and "Traceback" not in err
    assert not (tmp_path / "s.safetensors").exists() and not (tmp_path / "cov" / "index.json").exists()
