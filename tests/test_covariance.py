"""`qgguf calibrate --covariance`: the input covariance of every Linear weight equals a direct computation (uniform:
E[x xᵀ], shared by the tensors reading one input; gradient-weighted: E[‖g‖² x xᵀ] / E[‖g‖²] per tensor, with the
Fisher pass's own gradients), does not depend on how many layers a pass holds, and the per-row Fisher factor is in
GGUF row order."""

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
               str(TOKENS), "--seq-len", str(SEQ), "--covariance", str(d / "cov"), "--estimator", "token",
               "--covariance-weight", "uniform"])
    assert rc == 0
    return d / "s.safetensors", d / "cov"


@pytest.fixture(scope="module")
def weighted_run(tiny_llama, text, tmp_path_factory):
    d = tmp_path_factory.mktemp("wcov")
    rc = main(["calibrate", str(tiny_llama), "-o", str(d / "s.safetensors"), "--text", str(text), "--tokens",
               str(TOKENS), "--seq-len", str(SEQ), "--covariance", str(d / "cov"), "--covariance-weight",
               "gradient"])
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


def test_gradient_weighted_covariance_equals_direct(weighted_run, tiny_llama, text):
    """The gradient-weighted covariance weighs token t's x_t x_tᵀ by ‖g_t‖² / mean ‖g‖², g_t the tensor's output gradient in
    the Fisher pass (the same seed, so the same sampled labels): one H per tensor, q/k/v apart."""
    stats_path, cov = weighted_run
    store = CovarianceStore(cov)
    assert store.index["weighting"] == "gradient" and store.index["unweighted"] == []
    assert store.leader("blk.0.attn_k.weight") == "blk.0.attn_k.weight"  # its own H, not attn_q's

    model = load_model(tiny_llama, torch.device("cpu"), "float32")
    weights, targets = collect_weights(model, TensorNameMap(tiny_llama))
    gguf_of = {hf: t.name for hf, t in targets.items()}
    col = FisherCollector(model, weights)  # calibrate's defaults: sequence estimator, label probe
    xs: dict[str, list] = {}
    gs: dict[str, list] = {}
    hs = []
    for hf, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and f"{hf}.weight" in gguf_of:
            def hook(mod, a, o, n=gguf_of[f"{hf}.weight"]):
                xs.setdefault(n, []).append(a[0].detach().reshape(-1, a[0].shape[-1]).double())
                o.register_hook(lambda g: gs.setdefault(n, []).append(g.reshape(-1, g.shape[-1]).double()))
            hs.append(m.register_forward_hook(hook))
    gen = torch.Generator().manual_seed(0)
    for c in token_chunks(AutoTokenizer.from_pretrained(tiny_llama), text.read_text(), TOKENS, SEQ):
        col.step(c[None], generator=gen)
    for h in hs:
        h.remove()
    col.close()
    for name in ("blk.0.attn_q.weight", "blk.0.attn_k.weight", "blk.1.ffn_up.weight", "blk.1.ffn_down.weight"):
        x, g = torch.cat(xs[name]), torch.cat(gs[name])
        w = g.square().sum(1)
        w = w / w.mean()
        direct = ((x * w[:, None]).T @ x / x.shape[0]).numpy()
        H = store.get(name)
        np.testing.assert_allclose(H, direct, rtol=1e-4, atol=1e-5 * np.abs(direct).max())
        plain = (x.T @ x / x.shape[0]).numpy()
        assert not np.allclose(H, plain, rtol=0.05)  # the weights matter
    assert not np.allclose(store.get("blk.0.attn_q.weight"), store.get("blk.0.attn_k.weight"))


def test_layer_by_layer_passes_give_the_same_files(cov_run, weighted_run, tiny_llama, text, tmp_path):
    """A budget below one layer's H runs one pass per layer: same bytes as the single pass, weighted or not."""
    _, wcov = weighted_run
    calibrate(tiny_llama, tmp_path / "w.safetensors", text=text, tokens=TOKENS, seq_len=SEQ,
              covariance=tmp_path / "wcov", covariance_budget=1, progress=False, covariance_weight="gradient")
    for f in sorted(wcov.glob("layer-*.safetensors")):
        assert (tmp_path / "wcov" / f.name).read_bytes() == f.read_bytes(), f.name
    _, cov = cov_run
    calibrate(tiny_llama, tmp_path / "s.safetensors", text=text, tokens=TOKENS, seq_len=SEQ, estimator="token",
              covariance=tmp_path / "cov", covariance_budget=1, progress=False, covariance_weight="uniform")
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
               "--covariance-split", "--covariance-weight", "uniform"])
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
              covariance=tmp_path / "cov1", covariance_budget=1, covariance_split=True, progress=False,
              covariance_weight="uniform")
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


def test_tensor_without_usable_gradient_weights_gets_the_unweighted_h(capsys):
    """A tensor whose output gradient is zero (its output never reaches the loss) or not finite on every token, or
    that the Fisher pass did not see, keeps the unweighted H, with a line in the log; the others are normalised to
    mean weight 1."""
    from qgguf.calibrate.covariance import _Group, per_tensor

    mods = [torch.nn.Linear(4, 3) for _ in range(4)]
    names = ["blk.0.attn_q.weight", "blk.0.attn_k.weight", "blk.0.attn_v.weight", "blk.0.attn_output.weight"]
    groups = [_Group(names[0], names[:3], mods[0], 4, "blk.0", mods[:3]), _Group(names[3], names[3:], mods[3], 4,
                                                                                 "blk.0", mods[3:])]
    tw = {names[0]: torch.tensor([1.0, 3.0, 0.0, 4.0]), names[1]: torch.zeros(4),
          names[2]: torch.tensor([1.0, float("nan"), 1.0, 1.0])}
    out = per_tensor(groups, tw, 4)
    assert [g.leader for g in out] == names and [g.members for g in out] == [[n] for n in names]
    assert out[0].weights.tolist() == [0.5, 1.5, 0.0, 2.0] and out[0].module is mods[0]
    assert all(g.weights is None for g in out[1:])
    err = capsys.readouterr().err
    assert "attn_k.weight: its output gradient is zero or not finite" in err
    assert "attn_v.weight: its output gradient is zero or not finite" in err
    assert "attn_output.weight: the Fisher pass gave no per-token gradient" in err


def test_tied_embedding_gets_the_output_heads_covariance(tmp_path):
    """A tied input/output embedding is one GGUF tensor (token_embd.weight) whose output-head role is a Linear:
    its H is the head input's (weighted by the logits' gradient, or not), and it keeps the head's per-row Fisher."""
    from qgguf.assets.tiny import make_tiny_llama

    model_dir = make_tiny_llama(tmp_path / "tied", tie=True)
    text = tmp_path / "t.txt"
    text.write_text(tiny_text(3000, seed=1))
    calibrate(model_dir, tmp_path / "s.safetensors", text=text, tokens=256, seq_len=SEQ,
              covariance=tmp_path / "cov", progress=False, covariance_weight="gradient")
    stats, store = load_stats(tmp_path / "s.safetensors"), CovarianceStore(tmp_path / "cov")
    t = stats["token_embd.weight"]
    assert t.kind == "tied" and "token_embd.weight" in store and "output.weight" not in store
    assert t.row_fisher is not None and t.row_fisher.shape == (t.shape[0],) and (t.row_fisher > 0).all()

    model = load_model(model_dir, torch.device("cpu"), "float32")
    weights, _ = collect_weights(model, TensorNameMap(model_dir))
    col = FisherCollector(model, weights)
    xs, gs = [], []

    def hook(mod, a, o):
        xs.append(a[0].detach().reshape(-1, a[0].shape[-1]).double())
        o.register_hook(lambda g: gs.append(g.reshape(-1, g.shape[-1]).double()))
    h = model.lm_head.register_forward_hook(hook)
    gen = torch.Generator().manual_seed(0)
    for c in token_chunks(AutoTokenizer.from_pretrained(model_dir), text.read_text(), 256, SEQ):
        col.step(c[None], generator=gen)
    h.remove()
    col.close()
    x, g = torch.cat(xs), torch.cat(gs)
    w = g.square().sum(1)
    direct = ((x * (w / w.mean())[:, None]).T @ x / x.shape[0]).numpy()
    np.testing.assert_allclose(store.get("token_embd.weight"), direct, rtol=1e-4, atol=1e-5 * np.abs(direct).max())
    # unweighted, the same tensor gets the head input's E[x xᵀ]
    calibrate(model_dir, tmp_path / "u.safetensors", text=text, tokens=256, seq_len=SEQ,
              covariance=tmp_path / "ucov", progress=False, covariance_weight="uniform")
    plain = (x.T @ x / x.shape[0]).numpy()
    np.testing.assert_allclose(CovarianceStore(tmp_path / "ucov").get("token_embd.weight"), plain, rtol=1e-4,
                               atol=1e-5 * np.abs(plain).max())
