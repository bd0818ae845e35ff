"""Measure: the error it reports is the error llama.cpp sees, bytes are ggml's, row subsampling stays within 2%
of the full tensor, the cache is reused and keyed correctly, and bad input fails cleanly."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from qgguf import formats
from qgguf.errors import QggufError
from qgguf.plan.measure import (
    DEFAULT_MAX_ROWS,
    TensorInput,
    measure_tensor,
    measure_tensors,
    predicted_dkl,
    sample_rows,
)


def weights(rows: int, row_len: int, seed: int = 0) -> np.ndarray:
    """Heavy-tailed weights whose rows differ in scale, as trained ones do."""
    rng = np.random.default_rng(seed)
    scale = 0.02 * np.exp(rng.normal(0, 0.5, (rows, 1)))
    return (scale * rng.standard_t(5, (rows, row_len))).astype(np.float32)


def test_error_is_what_ggml_decodes_and_bytes_are_ggmls(llama_build):
    from qgguf.llamacpp import ggml_ref

    w = weights(8, 256)
    imp = np.random.default_rng(1).gamma(0.5, size=256).astype(np.float32)
    m = measure_tensor(TensorInput("blk.0.ffn_up.weight", w, imp), formats.names(), max_rows=None, cache=False)
    assert set(m.results) == set(formats.names())
    assert m.rms == pytest.approx(float(np.sqrt(np.mean(w.astype(np.float64) ** 2))))
    for name, r in m.results.items():
        fmt = formats.get(name)
        raw = fmt.encode(w, imp)
        assert r.nbytes == raw.nbytes == ggml_ref.quantize(fmt.type_id, w, imp).nbytes
        # llama.cpp's own decoder on our bytes: the error measured is the error the model will have
        dec = raw.view(np.float32).reshape(w.shape) if name == "F32" else \
            ggml_ref.dequantize(fmt.type_id, raw, w.shape)  # ggml has no to_float for F32 itself
        d2 = (dec.astype(np.float64) - w) ** 2
        assert r.mse == pytest.approx(d2.mean(), rel=1e-7, abs=1e-30)
        i64 = imp.astype(np.float64)
        assert r.channel_mse == pytest.approx((i64 * d2.mean(axis=0)).sum() / i64.sum(), rel=1e-7, abs=1e-30)
        assert r.fisher_mse is None and r.err == r.channel_mse
    assert m.results["F32"].mse == 0.0
    errs = [m.results[t].mse for t in ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_0") if t in m.results]
    assert errs == sorted(errs, reverse=True)  # more bits, less error


def test_per_element_fisher_and_predicted_dkl():
    w = weights(16, 64, seed=2)
    rng = np.random.default_rng(3)
    fisher = rng.gamma(0.3, size=w.shape).astype(np.float32)
    m = measure_tensor(TensorInput("t", w, importance=fisher.sum(0), fisher=fisher), ["Q8_0", "Q4_0"],
                       max_rows=None, cache=False)
    fmt = formats.get("Q4_0")
    d2 = (fmt.roundtrip(w, fisher.sum(0)).numpy().astype(np.float64) - w) ** 2
    r = m.results["Q4_0"]
    f64 = fisher.astype(np.float64)
    assert r.fisher_mse == pytest.approx((f64 * d2).sum() / f64.sum(), rel=1e-7)
    assert r.err == r.fisher_mse
    c = m.choices(float(fisher.sum()))
    assert c.options["Q4_0"] == (r.nbytes, pytest.approx(0.5 * (fisher.astype(np.float64) * d2).sum(), rel=1e-6))
    assert c.options["Q4_0"][1] == predicted_dkl(fisher.sum(), r.fisher_mse)
    assert c.fisher_sum == pytest.approx(float(fisher.sum())) and c.rms == m.rms
    with pytest.raises(QggufError, match="ΣF"):
        m.choices(float("nan"))


def test_row_subsampling_stays_within_two_percent():
    # heavy tails (t5), rows of very different scale and a heavy-tailed channel weighting: harder than real
    # tensors (docs/benchmarks.md has those); the encoder runs unweighted here only to keep the test quick
    w = weights(4096, 64, seed=4)
    chf = np.random.default_rng(5).gamma(0.5, size=64).astype(np.float32)
    full = measure_tensor(TensorInput("t", w, channel_fisher=chf), ["Q4_0", "Q8_0"], max_rows=None, cache=False)
    assert full.rows_measured == 4096
    worst = 0.0
    for seed in range(4):
        sub = measure_tensor(TensorInput("t", w, channel_fisher=chf), ["Q4_0", "Q8_0"], seed=seed, cache=False)
        assert abs(sub.rows_measured - DEFAULT_MAX_ROWS) <= 1 and sub.rows_total == 4096
        assert sub.rms == pytest.approx(full.rms, rel=1e-12)  # RMS is always of the whole tensor
        for t in ("Q4_0", "Q8_0"):
            assert sub.results[t].nbytes == full.results[t].nbytes
            for e in ("mse", "channel_mse"):
                worst = max(worst, abs(getattr(sub.results[t], e) / getattr(full.results[t], e) - 1))
    assert 0 < worst <= 0.02


def test_sample_rows_is_seeded_proportional_to_size_and_unbiased():
    rows, w = sample_rows(10_000, 100, seed=0)
    assert len(rows) == 100 and np.allclose(w, 100.0)  # equal sizes: every row has π = 1/100
    assert np.array_equal(rows, sample_rows(10_000, 100, seed=0)[0])
    assert not np.array_equal(rows, sample_rows(10_000, 100, seed=1)[0])
    assert np.array_equal(rows // 100, np.arange(100))  # systematic: one row in each run of 100
    assert np.array_equal(sample_rows(50, 100)[0], np.arange(50)) and (sample_rows(50, None)[1] == 1).all()
    sizes = np.random.default_rng(0).lognormal(0, 2, 5000)
    sizes[17] = 1e6  # a row far larger than its share is always measured
    rows, w = sample_rows(sizes, 200, seed=3)
    assert 17 in rows and w[list(rows).index(17)] == 1.0
    assert abs(len(rows) - 200) <= 1
    # Horvitz–Thompson: Σ x_r/π_r over the sample estimates Σ x_r over all rows, exactly so for x ∝ size
    assert (sizes[rows] * w).sum() == pytest.approx(sizes.sum(), rel=0.01)
    x = sizes * np.random.default_rng(1).uniform(0.5, 1.5, 5000)
    est = [(x[r] * ww).sum() for r, ww in (sample_rows(sizes, 200, seed=s) for s in range(30))]
    assert np.mean(est) == pytest.approx(x.sum(), rel=0.01)


def test_cache_is_reused_and_keyed_by_tensor_type_and_importance(tmp_path, monkeypatch):
    monkeypatch.setenv("QGGUF_CACHE", str(tmp_path / "cache"))
    w = weights(32, 128, seed=6)
    imp = np.ones(128, dtype=np.float32)
    types = ["Q8_0", "Q4_0", "F16"]
    first = measure_tensor(TensorInput("t", w, imp), types)
    files = sorted((tmp_path / "cache" / "measure").rglob("*.json"))
    assert len(files) == 3
    again = measure_tensor(TensorInput("renamed", w.copy(), imp.copy()), types)
    assert again.results == first.results
    assert sorted((tmp_path / "cache" / "measure").rglob("*.json")) == files
    # the cache is what answers: a changed entry comes back as it is ...
    f = next(p for p in files if json.loads(p.read_text())["type"] == "Q4_0")
    entry = json.loads(f.read_text())
    f.write_text(json.dumps({**entry, "mse": 123.0}))
    assert measure_tensor(TensorInput("t", w, imp), types).results["Q4_0"].mse == 123.0
    # ... a damaged one is measured again and rewritten
    f.write_text("{not json")
    assert measure_tensor(TensorInput("t", w, imp), types).results["Q4_0"] == first.results["Q4_0"]
    assert json.loads(f.read_text()) == entry
    # other importance, other weights, other subsampling: new entries
    measure_tensor(TensorInput("t", w, imp * 2), types)
    w2 = w.copy()
    w2[0, 0] += 1e-3
    measure_tensor(TensorInput("t", w2, imp), types)
    measure_tensor(TensorInput("t", w, imp), types, max_rows=8)
    assert len(list((tmp_path / "cache" / "measure").rglob("*.json"))) == 12


def test_only_types_that_take_the_row_length_are_measured():
    m = measure_tensor(TensorInput("t", weights(4, 48)), formats.names(), cache=False)
    assert set(m.results) == {f.name for f in formats.all_formats() if 48 % f.block_size == 0}
    assert "F16" in m.results and "Q4_0" not in m.results


def test_experts_with_per_expert_importance():
    w = np.stack([weights(8, 64, seed=7), 3 * weights(8, 64, seed=8)])
    imp = np.random.default_rng(9).gamma(0.5, size=(2, 64)).astype(np.float32)
    m = measure_tensor(TensorInput("blk.0.ffn_up_exps.weight", w, imp), ["Q4_0"], max_rows=None, cache=False)
    per = [measure_tensor(TensorInput("e", w[g], imp[g]), ["Q4_0"], max_rows=None, cache=False).results["Q4_0"]
           for g in range(2)]
    r = m.results["Q4_0"]
    assert r.nbytes == per[0].nbytes + per[1].nbytes
    assert r.mse == pytest.approx((per[0].mse + per[1].mse) / 2, rel=1e-7)
    want = sum(imp[g].sum() * per[g].channel_mse for g in range(2)) / imp.sum()
    assert r.channel_mse == pytest.approx(want, rel=1e-6)


def test_bad_input_is_a_clear_error():
    w = weights(4, 64)
    bad = w.copy()
    bad[1, 2] = np.nan
    with pytest.raises(QggufError, match="NaN"):
        measure_tensor(TensorInput("t", bad), ["Q8_0"], cache=False)
    with pytest.raises(QggufError, match="importance has 32 values"):
        measure_tensor(TensorInput("t", w, np.ones(32)), ["Q8_0"], cache=False)
    with pytest.raises(QggufError, match="2-D and 3-D"):
        measure_tensor(TensorInput("t", w[0]), ["Q8_0"], cache=False)
    with pytest.raises(QggufError, match="per-element Fisher has shape"):
        measure_tensor(TensorInput("t", w, fisher=np.ones((4, 32))), ["Q8_0"], cache=False)
    with pytest.raises(QggufError, match="unknown GGUF type"):
        measure_tensor(TensorInput("t", w), ["Q9_0"], cache=False)


def test_measure_tensors_streams_and_is_deterministic():
    items = lambda: (TensorInput(f"blk.{i}.attn_q.weight", torch.from_numpy(weights(16, 64, seed=i)))  # noqa: E731
                     for i in range(3))
    a = measure_tensors(items(), ["Q8_0", "Q4_0"], progress=False, cache=False)
    b = measure_tensors(items(), ["Q8_0", "Q4_0"], progress=False, cache=False)
    assert list(a) == [f"blk.{i}.attn_q.weight" for i in range(3)]
    assert {k: v.results for k, v in a.items()} == {k: v.results for k, v in b.items()}


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_tensors_measure_like_cpu():
    w = weights(64, 256)
    imp = np.ones(256, dtype=np.float32)
    cpu = measure_tensor(TensorInput("t", w, imp), ["Q8_0", "Q4_0"], cache=False)
    gpu = measure_tensor(TensorInput("t", torch.from_numpy(w).cuda(), imp), ["Q8_0", "Q4_0"], cache=False)
    for t in ("Q8_0", "Q4_0"):
        assert gpu.results[t].mse == pytest.approx(cpu.results[t].mse, rel=1e-6)


def test_every_expert_is_measured_when_rows_are_sampled():
    """A stacked tensor measured on a row sample visits every expert, even one whose Fisher is a millionth of the
    others' (a rarely routed expert's prior)."""
    from qgguf.plan.measure import _sample_per_expert

    rng = np.random.default_rng(3)
    sizes = rng.gamma(1.0, size=8 * 64)
    sizes[7 * 64:] *= 1e-6
    rows, inv_pi = _sample_per_expert(sizes, 8, 64, 32, seed=0)
    assert set(rows // 64) == set(range(8)) and np.bincount(rows // 64).min() >= 3
    w = np.stack([weights(64, 64, seed=s) for s in range(8)])
    imp = np.ones((8, 64), dtype=np.float32)
    imp[7] *= 1e-6
    m = measure_tensor(TensorInput("blk.0.ffn_up_exps.weight", w, imp), ["Q4_0"], max_rows=32, cache=False)
    full = measure_tensor(TensorInput("blk.0.ffn_up_exps.weight", w, imp), ["Q4_0"], max_rows=None, cache=False)
    assert m.rows_measured < full.rows_measured == 512
    assert m.results["Q4_0"].mse == pytest.approx(full.results["Q4_0"].mse, rel=0.05)


def _kfac(w: torch.Tensor, y: torch.Tensor, H: np.ndarray, d: np.ndarray) -> float:
    """Σ_r d_r δ_r H δ_rᵀ / (Σ_r d_r · tr H), computed directly in float64."""
    D = (y - w).double().numpy()
    return float((d * np.einsum("rj,jk,rk->r", D, H.astype(np.float64), D)).sum() / (d.sum() * np.trace(H)))


def test_kfac_errors_and_the_held_out_split():
    """The K-FAC errors measure records are δHδᵀ of the real roundings; with a held-out split, feedback rounding is
    fitted to H_a and both errors are scored on H_b, and on too few tokens that error shows the over-fitting the
    in-sample one hides."""
    from qgguf.formats.engines import TORCH
    from qgguf.formats.feedback import Feedback

    rng = np.random.default_rng(3)
    rows, n, tokens = 48, 256, 160  # fewer tokens per half than inputs: H_a is rank-deficient, the fit over-fits
    mix = rng.normal(size=(n, n)) / np.sqrt(n) + np.eye(n)
    xa, xb = rng.normal(size=(tokens, n)) @ mix, rng.normal(size=(tokens, n)) @ mix
    H_a, H_b = (xa.T @ xa / tokens).astype(np.float32), (xb.T @ xb / tokens).astype(np.float32)
    H = ((H_a.astype(np.float64) + H_b) / 2).astype(np.float32)
    w = torch.from_numpy(weights(rows, n, seed=4))
    d = rng.uniform(0.5, 2.0, rows)
    imp = torch.from_numpy(np.diag(H).copy())
    fmt = formats.get("Q4_K")

    def measured(split, fit_tokens=None):
        t = TensorInput("blk.0.ffn_down.weight", w, imp, covariance=H, row_fisher=d, covariance_split=split,
                        fit_tokens=fit_tokens)
        return measure_tensor(t, ["Q4_K"], max_rows=None, cache=False, engine=TORCH).results["Q4_K"]

    plain = fmt.decode(fmt.encode(w, imp), tuple(w.shape))

    def feedback(Hfit, tokens=None):
        return fmt.decode(Feedback(Hfit, log=False, tokens=tokens).encode(fmt, w, imp, TORCH), tuple(w.shape))

    r = measured(None)
    assert r.kfac_plain == pytest.approx(_kfac(w, plain, H, d), rel=1e-4)
    assert r.kfac_feedback == pytest.approx(_kfac(w, feedback(H), H, d), rel=1e-4)
    held = measured((H_a, H_b))
    assert held.kfac_plain == pytest.approx(_kfac(w, plain, H_b, d), rel=1e-4)
    assert held.kfac_feedback == pytest.approx(_kfac(w, feedback(H_a), H_b, d), rel=1e-4)
    # scored on its own tokens feedback promises more than it keeps on the others
    in_sample = _kfac(w, feedback(H_a), H_a, d) / _kfac(w, plain, H_a, d)
    assert held.kfac_feedback / held.kfac_plain > 1.2 * in_sample
    # damped for the tokens behind H_a (fit_tokens), the rounding over-fits less: a lower held-out error
    damped = measured((H_a, H_b), fit_tokens=tokens)
    assert damped.kfac_feedback == pytest.approx(_kfac(w, feedback(H_a, tokens), H_b, d), rel=1e-4)
    assert damped.kfac_plain == held.kfac_plain and damped.kfac_feedback < 0.9 * held.kfac_feedback
    with pytest.raises(QggufError, match="held-out split"):
        measured((H_a[:8, :8], H_b))
