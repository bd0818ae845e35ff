"""Error-feedback rounding (qgguf/formats/feedback.py): it writes the registry's own blocks (same layout, decoded
bit-exactly by gguf-py and by the built libggml), lowers the output error δHδᵀ on correlated inputs by the
factor the theory gives room for, equals plain rounding byte for byte when H is diagonal, and falls back to plain
rounding, with a log line, on unusable covariances."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qgguf import formats
from qgguf.formats.feedback import DAMP, DAMP_PER_INPUT, Feedback, damping, h_error

FEEDBACK_TYPES = [f.name for f in formats.all_formats() if f.feedback]
N, ROWS = 512, 48


def test_every_quantised_type_but_q8_0_has_levels():
    quantised = {f.name for f in formats.all_formats() if f.quantized and f.name not in ("F32", "F16", "BF16")}
    assert set(FEEDBACK_TYPES) == quantised - {"Q8_0"}
    assert {"Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_XS", "IQ4_NL", "Q4_0", "Q4_1", "Q5_0", "Q5_1",
            "NL2_XS", "NL3_XS", "NL5_XS", "NL6_XS", "NL2_32", "NL6_32"} <= set(FEEDBACK_TYPES)


def _student(rows: int, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, n, generator=g) / torch.sqrt(torch.distributions.Chi2(5.0).sample((rows, n)) / 5)
    return x.float()


@pytest.mark.parametrize("name", FEEDBACK_TYPES)
def test_levels_describe_the_blocks(name):
    """levels / grid / with_levels read and write the same bits the decoder reads."""
    f = formats.get(name)
    x = _student(8, 512, 1)
    q = f.encode_torch(x, torch.rand(512) + 0.1).reshape(-1, f.type_size)
    L, (a, b), V = f.levels(q), f.grid(q), f.level_values("cpu")
    assert torch.equal(f.with_levels(q, L), q)
    assert torch.equal(a * V[L] + b, f.decode_blocks(q))
    L2 = torch.randint(0, V.numel(), L.shape, generator=torch.Generator().manual_seed(2))
    q2 = f.with_levels(q, L2)
    assert torch.equal(f.levels(q2), L2) and torch.equal(torch.stack(f.grid(q2)), torch.stack((a, b)))
    assert torch.equal(a * V[L2] + b, f.decode_blocks(q2))


@pytest.mark.parametrize("name", FEEDBACK_TYPES + ["Q8_0"])
def test_diagonal_h_is_plain_rounding_byte_for_byte(name):
    f = formats.get(name)
    x = _student(ROWS, N, 3)
    g = torch.Generator().manual_seed(4)
    h = torch.rand(N, generator=g, dtype=torch.float64) * 3 + 0.01
    imp = torch.rand(N, generator=g) + 0.05
    fb = Feedback(torch.diag(h), name)
    assert fb.fallback is None and fb.U is not None
    assert torch.equal(fb.encode(f, x, imp), f.encode_torch(x, imp))
    # without an importance vector the scale search weighs by diag(H), as the plain encoder given diag(H)
    assert torch.equal(fb.encode(f, x, None), f.encode_torch(x, h.float()))


def _ar1(n: int, rho: float) -> torch.Tensor:
    i = torch.arange(n)
    return rho ** (i[:, None] - i[None, :]).abs().to(torch.float64)


# Inputs with AR(1) correlation ρ = 0.9 between neighbouring channels: H_ij = ρ^|i−j|. Sequential rounding with
# error feedback leaves each column the error of rounding its conditional part, so with independent rounding
# errors of equal size the output error falls from σ²·tr H to σ²·tr D (H = L D Lᵀ, D = (1, 1−ρ², 1−ρ², …)):
# tr H / tr D = n / (1 + (n−1)(1−ρ²)) ≈ 1/(1 − ρ²) = 5.2 here (checked below). Real grids get less (the scales are fixed per block before its columns move, levels
# clip; and the affine types' least-squares offsets already cancel part of the correlated error in plain
# rounding): measured 2.4–4.6 for every type; the test asks for 2.
RHO, MIN_GAIN = 0.9, 2.0


@pytest.mark.parametrize("name", FEEDBACK_TYPES)
def test_feedback_lowers_the_output_error_on_correlated_inputs(name):
    f = formats.get(name)
    H = _ar1(N, RHO)
    D = torch.linalg.cholesky(H).diagonal() ** 2
    assert abs(float(H.trace() / D.sum()) - N / (1 + (N - 1) * (1 - RHO ** 2))) < 1e-9  # D = (1, 1−ρ², 1−ρ², …)
    x = torch.randn(ROWS, N, generator=torch.Generator().manual_seed(5))
    fb = Feedback(H, name)
    qf, qp = fb.encode(f, x, None), f.encode_torch(x, torch.ones(N))
    assert qf.shape == qp.shape and qf.dtype == torch.uint8
    ef = float(h_error(x, f.decode(qf, x.shape), H).sum())
    ep = float(h_error(x, f.decode(qp, x.shape), H).sum())
    assert ep / ef >= MIN_GAIN, f"{name}: plain {ep:.4g}, feedback {ef:.4g}"


@pytest.mark.parametrize("name", ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_XS", "IQ4_NL", "Q4_0", "Q4_1",
                                  "Q5_0", "Q5_1", "NL3_XS", "NL5_32"])
def test_feedback_bytes_decode_identically_in_gguf_py_and_ggml(name, llama_build):
    import gguf

    from qgguf.llamacpp import ggml_ref

    f = formats.get(name)
    x = _student(16, N, 6)
    raw = Feedback(_ar1(N, RHO), name).encode(f, x, torch.rand(N) + 0.1).numpy()
    ours = f.decode(torch.from_numpy(raw), x.shape).numpy()
    assert np.isfinite(ours).all()
    assert np.array_equal(ggml_ref.dequantize(f.type_id, raw, tuple(x.shape)).view(np.uint32), ours.view(np.uint32))
    if f.stock:
        py = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType(f.type_id))
        assert np.array_equal(py.astype(np.float32).reshape(x.shape), ours)


def _check_finite(f, raw: torch.Tensor, shape) -> np.ndarray:
    y = f.decode(raw, shape)
    q = raw.reshape(-1, f.type_size)
    a, b = f.grid(q)
    assert bool(torch.isfinite(a).all() and torch.isfinite(b).all() and torch.isfinite(y).all())
    return y


@pytest.mark.parametrize("name", ["Q4_K", "Q2_K", "IQ4_XS", "Q4_1", "NL3_32"])
def test_unusable_covariances_fall_back_with_a_log_line(name, capsys):
    f = formats.get(name)
    x = _student(ROWS, N, 7)
    imp = torch.rand(N) + 0.1
    plain = f.encode_torch(x, imp)
    H = _ar1(N, RHO)

    nan = H.clone()
    nan[3, 5] = float("nan")
    fb = Feedback(nan, "blk.0.t")
    assert fb.fallback and torch.equal(fb.encode(f, x, imp), plain)
    assert "blk.0.t: its input covariance holds NaN or Inf; plain rounding" in capsys.readouterr().err

    fb = Feedback(torch.zeros(N, N, dtype=torch.float64), "blk.1.t")  # an input that never fired
    assert fb.fallback and torch.equal(fb.encode(f, x, imp), plain)
    assert "blk.1.t: its input never fired" in capsys.readouterr().err

    dead = H.clone()
    dead[:, 10:42] = 0
    dead[10:42, :] = 0  # a zero input column (32 channels that never fired)
    fb = Feedback(dead, "blk.2.t")
    _check_finite(f, fb.encode(f, x, imp), x.shape)  # factorised on first use: the line comes then
    assert "blk.2.t: error feedback: 32 input channel(s) never fired" in capsys.readouterr().err

    g = torch.Generator().manual_seed(8)
    A = torch.randn(N, 3, generator=g, dtype=torch.float64)
    low = A @ A.T  # rank 3: damping makes it definite
    fb = Feedback(low, "blk.3.t")
    assert fb.fallback is None
    yf = _check_finite(f, fb.encode(f, x, imp), x.shape)
    assert float(h_error(x, yf, low).sum()) < float(h_error(x, f.decode(plain, x.shape), low).sum())

    # a constant input channel: x_j = c for every token, so H's row j is c·E[x]; still positive semi-definite
    X = torch.randn(4 * N, N, generator=g, dtype=torch.float64) @ torch.linalg.cholesky(H).T
    X[:, 100] = 2.5
    Hc = X.T @ X / X.shape[0]
    fb = Feedback(Hc, "blk.4.t")
    assert fb.fallback is None
    yf = _check_finite(f, fb.encode(f, x, imp), x.shape)
    assert float(h_error(x, yf, Hc).sum()) < float(h_error(x, f.decode(plain, x.shape), Hc).sum())

    # not positive semi-definite (a damaged file): λ grows to 10·mean diag(H), still no factor: plain rounding
    bad = torch.eye(N, dtype=torch.float64)
    bad[0, 1] = bad[1, 0] = 50.0
    fb = Feedback(bad, "blk.5.t")
    assert fb.fallback and torch.equal(fb.encode(f, x, imp), plain)
    assert "blk.5.t: its damped input covariance does not factorise" in capsys.readouterr().err


def test_tensors_reading_one_input_share_its_factor(capsys):
    """q/k/v (gate/up) read one input: its Cholesky factor is computed once, and each tensor still logs its own
    fallback line; another H (or the same H in another dtype) gets its own factor; none is made before use."""
    from qgguf.formats import feedback as fbm

    H = _ar1(N, RHO)
    a, b = Feedback(H.clone(), "blk.0.attn_q"), Feedback(H.clone(), "blk.0.attn_k")
    assert a._f is None  # nothing factorised yet (measure on a warm cache never needs it)
    assert a.U is not None and b.U is a.U
    c = Feedback(_ar1(N, 0.5), "blk.0.ffn_up")
    assert c.U is not None and not torch.equal(c.U, a.U)
    assert Feedback(H.to(torch.float32), "t").U is not a.U
    dead = torch.zeros(N, N, dtype=torch.float64)
    for name in ("blk.1.attn_q", "blk.1.attn_v"):
        assert Feedback(dead, name).fallback
        assert f"{name}: its input never fired" in capsys.readouterr().err
    big = fbm.FACTOR_CACHE_FLOATS
    try:
        fbm.FACTOR_CACHE_FLOATS = N * N - 1  # an input over the limit (an ffn_down's) is not kept
        x, y = Feedback(_ar1(N, 0.7), "d1"), Feedback(_ar1(N, 0.7), "d2")
        assert x.U is not None and y.U is not x.U and torch.equal(y.U, x.U)
    finally:
        fbm.FACTOR_CACHE_FLOATS = big
    assert len(fbm._factors) <= fbm.FACTOR_CACHE_SIZE


def test_lockstep_types_give_each_types_own_bytes():
    """encode_many (measure's path: every type's column loop at once) = encode one type at a time, byte for byte,
    with block-32 and super-block types, uniform grids and codebooks mixed, and a plain-only type among them."""
    names = ["Q4_K", "Q4_0", "IQ4_NL", "NL3_XS", "Q6_K", "Q5_1", "Q8_0"]
    x = _student(ROWS, N, 9)
    imp = torch.rand(N, generator=torch.Generator().manual_seed(10)) + 0.1
    fb = Feedback(_ar1(N, RHO), "t")
    many = fb.encode_many([formats.get(n) for n in names], x, imp)
    assert list(many) == names
    for n in names:
        assert torch.equal(many[n], fb.encode(formats.get(n), x, imp)), n


def test_ggml_block_scales_give_the_same_bytes(llama_build, monkeypatch):
    """On a CPU with ggml's encoder, the block scale searches that read only the block (K-quants, IQ4, NL types)
    run in ggml: every type's feedback bytes are those of the torch path."""
    from qgguf.formats import engines

    monkeypatch.delenv(engines.ENV, raising=False)
    engine = engines.choose("cpu")
    assert engine.name == "ggml"
    names = [n for n in ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_XS", "IQ4_NL", "NL3_XS", "NL5_32", "Q4_0",
                         "Q5_1") if n in formats.names()]
    x = _student(ROWS, N, 11)
    imp = torch.rand(N, generator=torch.Generator().manual_seed(12)) + 0.1
    fb = Feedback(_ar1(N, RHO), "t")
    fmts = [formats.get(n) for n in names]
    want, got = fb.encode_many(fmts, x, imp), fb.encode_many(fmts, x, imp, engine)
    for n in names:
        assert torch.equal(got[n], want[n]), n


def test_damping_grows_with_inputs_per_calibration_token():
    assert damping(512, None) == DAMP
    assert damping(512, 4096) == pytest.approx(DAMP + DAMP_PER_INPUT / 8)
    assert damping(8960, 4096) > damping(1536, 4096) > damping(1536, 16384) > DAMP
    H = _ar1(N, RHO) * 3.0
    assert Feedback(H, "t", tokens=1024).damping == pytest.approx(damping(N, 1024) * 3.0)
    assert Feedback(H, "t").damping == pytest.approx(DAMP * 3.0)
    assert Feedback(H, "t", damp=0.5, tokens=1024).damping == pytest.approx(1.5)  # an explicit damp wins
    with pytest.raises(ValueError):
        damping(N, 0)


def _held_out_ratios(rho: float, tokens: int, names: list[str]) -> dict[str, tuple[float, float]]:
    """Feedback rounding fitted to H from `tokens` heavy-tailed samples of inputs with covariance AR(1, ρ), scored on
    the true covariance (tokens never seen): (GPTQ's damping, the token-count damping), each / plain rounding's."""
    S = _ar1(N, rho)
    g = torch.Generator().manual_seed(20)
    X = torch.randn(tokens, N, generator=g, dtype=torch.float64) @ torch.linalg.cholesky(S).T
    chi2 = torch.distributions.Chi2(torch.tensor(2.5, dtype=torch.float64))
    torch.manual_seed(21)
    X = X / torch.sqrt(chi2.sample((tokens, 1)) / 2.5)  # multivariate t, ν = 2.5: a few tokens dominate H
    H = X.T @ X / tokens
    x, imp = _student(ROWS, N, 22), H.diagonal().float()
    out = {}
    for name in names:
        f = formats.get(name)
        err = lambda q: float(h_error(x, f.decode(q, tuple(x.shape)), S).sum())
        plain = err(f.encode_torch(x, imp))
        out[name] = (err(Feedback(H, "t", damp=DAMP, log=False).encode(f, x, imp)) / plain,
                     err(Feedback(H, "t", tokens=tokens, log=False).encode(f, x, imp)) / plain)
    return out


def test_token_damping_keeps_an_over_fitted_h_from_losing_to_plain_rounding():
    """Fewer tokens than inputs, weakly correlated inputs: feedback fitted with GPTQ's damping doubles the error on
    tokens it did not see (Qwen2.5-Coder-1.5B's ffn_down from 4,096 tokens: 1.4–1.8×); damped for the token count
    it stays at plain rounding's error. With strongly correlated inputs it still gains."""
    names = ["Q4_K", "IQ4_XS", "Q4_0"]
    for name, (gptq, tok) in _held_out_ratios(0.5, N // 2, names).items():
        assert gptq > 1.5 and tok < 1.05, (name, gptq, tok)
    for name, (gptq, tok) in _held_out_ratios(RHO, N // 2, names).items():
        assert tok < 0.8, (name, gptq, tok)


def test_export_cache_keys_feedback_bytes_on_the_token_count(tmp_path):
    """The same H from another token count is damped otherwise: export's encode cache must not serve its bytes."""
    from qgguf.export.encode_cache import EncodeCache
    from qgguf.formats.engines import TORCH

    f, H = formats.get("Q4_K"), _ar1(N, 0.5)
    x, imp = _student(ROWS, N, 23), torch.rand(N, generator=torch.Generator().manual_seed(24)) + 0.1
    cache = EncodeCache(tmp_path)
    assert cache.path(x, imp, f, TORCH, H, 256) != cache.path(x, imp, f, TORCH, H, 4096)
    few = cache.encode(f, x, imp, "t", "cpu", TORCH, H, 256)
    many = cache.encode(f, x, imp, "t", "cpu", TORCH, H, 4096)
    assert np.array_equal(few, Feedback(H, "t", tokens=256).encode(f, x, imp).numpy().reshape(-1))
    assert np.array_equal(many, Feedback(H, "t", tokens=4096).encode(f, x, imp).numpy().reshape(-1))
    assert not np.array_equal(few, many)


# On a GPU the factor is the same float64 Cholesky and the column loop the same float32 operations, summed in
# another order: a level whose value lies within rounding of a decision boundary can flip, and the feedback carries
# the flip along its row, so bytes may differ while the error does not. The check is the error, per type, and the
# gain over plain rounding on the same device.
CUDA_TYPES = ["Q2_K", "Q4_K", "Q6_K", "IQ4_XS", "IQ4_NL", "Q4_0", "Q5_1", "NL3_XS", "NL2_32"]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_feedback_rounding_matches_the_cpu():
    H = _ar1(N, RHO)
    x = _student(ROWS, N, 11)
    imp = torch.rand(N, generator=torch.Generator().manual_seed(12)) + 0.1
    fmts = [formats.get(n) for n in CUDA_TYPES]
    cpu = Feedback(H, "t").encode_many(fmts, x, imp)
    fb = Feedback(H, "t", device="cuda")
    assert fb.U.is_cuda
    gpu = fb.encode_many(fmts, x.cuda(), imp.cuda())
    for f in fmts:
        g = gpu[f.name]
        assert g.is_cuda and g.dtype == torch.uint8 and g.shape == cpu[f.name].shape, f.name
        g = g.cpu()
        same = float((g.reshape(-1, f.type_size) == cpu[f.name].reshape(-1, f.type_size)).all(1).float().mean())
        ec = float(h_error(x, f.decode(cpu[f.name], x.shape), H).sum())
        eg = float(h_error(x, f.decode(g, x.shape), H).sum())
        ep = float(h_error(x, f.decode(f.encode_torch(x, imp), x.shape), H).sum())
        assert abs(eg / ec - 1) < 0.01, f"{f.name}: H-error {eg:.5g} on the GPU, {ec:.5g} on the CPU ({same:.1%} " \
                                        "of blocks identical)"
        assert ep / eg >= MIN_GAIN, f"{f.name}: plain {ep:.4g}, feedback on the GPU {eg:.4g}"


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_measure_with_covariance_matches_the_cpu():
    """measure's K-FAC errors of plain and feedback rounding (every type in lockstep) on the GPU are the CPU's."""
    from qgguf.plan.measure import TensorInput, measure_tensor

    x = _student(ROWS, N, 13)
    H = _ar1(N, RHO)
    imp = torch.rand(N, generator=torch.Generator().manual_seed(14)) + 0.1
    d = torch.rand(ROWS, generator=torch.Generator().manual_seed(15)) + 0.5
    types = ["Q4_K", "Q6_K", "IQ4_XS", "Q4_0", "Q8_0"]

    def run(dev: str):
        t = TensorInput("t", x.to(dev), importance=imp, channel_fisher=imp, covariance=H.to(dev), row_fisher=d,
                        fit_tokens=4096)
        return measure_tensor(t, types, cache=False, max_rows=None, device=dev).results

    cpu, gpu = run("cpu"), run("cuda")
    for name in types:
        assert gpu[name].nbytes == cpu[name].nbytes
        assert gpu[name].kfac_plain == pytest.approx(cpu[name].kfac_plain, rel=1e-4), name
        if cpu[name].kfac_feedback is not None:
            assert gpu[name].kfac_feedback == pytest.approx(cpu[name].kfac_feedback, rel=0.01), name
            if formats.get(name).feedback:  # Q8_0 stays plain
                assert gpu[name].kfac_feedback < gpu[name].kfac_plain, name


@pytest.mark.parametrize("name", ["Q4_K", "Q2_K", "IQ4_XS", "Q4_0", "Q5_1", "IQ4_NL", "NL3_32"])
def test_update_tiers_round_as_one_column_at_a_time(name, monkeypatch):
    """The three update tiers (products to the later batches, group products inside a batch, column updates in a
    group) are one algebra: with one batch and one group over the whole row, every column's residual is pushed one
    by one through V = U⁻¹ (GPTQ's textbook loop). The tiers give that loop's error up to float32 rounding."""
    from qgguf.formats import feedback as fbm

    f = formats.get(name)
    H = _ar1(N, RHO)
    x = _student(ROWS, N, 17)
    imp = torch.rand(N, generator=torch.Generator().manual_seed(18)) + 0.1
    assert N // fbm.LAZY_COLUMNS >= 2 and fbm.LAZY_COLUMNS // fbm.PUSH_COLUMNS >= 2  # every tier is used
    tiers = Feedback(H, "t").encode(f, x, imp)
    monkeypatch.setattr(fbm, "LAZY_COLUMNS", N)
    monkeypatch.setattr(fbm, "PUSH_COLUMNS", N)
    loop = Feedback(H, "t").encode(f, x, imp)
    et = float(h_error(x, f.decode(tiers, x.shape), H).sum())
    el = float(h_error(x, f.decode(loop, x.shape), H).sum())
    same = float((tiers.reshape(-1, f.type_size) == loop.reshape(-1, f.type_size)).all(1).float().mean())
    assert abs(et / el - 1) < 0.01 and same > 0.5, f"{name}: {et:.5g} against {el:.5g}, {same:.1%} blocks equal"
