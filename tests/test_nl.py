"""The non-linear block types (NL*): Python encoder/decoder, gguf-py registration, and the fork's C side.

The fork's C quantiser is written float op for float op like qgguf's, so the checks are byte equality (C encode =
Python encode) and bit equality (C decode = Python decode = gguf-py dequantize), on random, corner-case and real
(tiny Llama) tensors. The fork runs files with NL tensors; stock llama.cpp refuses them.
"""

from __future__ import annotations

import ast
import ctypes
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from qgguf import formats
from qgguf.errors import QggufError
from qgguf.formats import nl, nl_tables
from qgguf.formats.common import seq_sum
from qgguf.llamacpp import ggml_ref
from qgguf.llamacpp.build import BuildSpec, prepare_tree, repo_root, tool_path

NL_TYPES = [f.name for f in formats.all_formats() if isinstance(f, nl.NLFormat)]
XS_TYPES = [n for n in NL_TYPES if n.endswith("_XS")]


# ------------------------------------------------------------------------------------------------ inputs
def student_t(rows: int, cols: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_t(5, size=(rows, cols)) * 0.02).astype(np.float32)


def importance(cols: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    imp = np.exp(rng.normal(0.0, 1.0, size=cols)).astype(np.float32)
    imp[: cols // 16] = 0.0  # channels that never fire
    return imp


def corner_rows(cols: int) -> np.ndarray:
    """Zeros, a constant, subnormals, a single outlier, alternating signs, exact grid values."""
    rng = np.random.default_rng(7)
    x = student_t(7, cols, seed=8)
    x[0] = 0.0
    x[1] = 0.25
    x[2, : cols // 2] = 1e-39
    x[3, 5] = 40.0
    x[4] = np.where(np.arange(cols) % 2, 0.5, -0.5)
    x[5] = rng.integers(-8, 8, size=cols) * 0.125
    x[6, :32] = -3.0
    return x


def same_floats(a, b) -> bool:
    a, b = np.ascontiguousarray(a, np.float32), np.ascontiguousarray(b, np.float32)
    return a.shape == b.shape and np.array_equal(a.view(np.uint32), b.view(np.uint32))


def rel_mse(f, x: np.ndarray) -> float:
    y = f.decode(f.encode(x), x.shape).numpy().astype(np.float64)
    return float(((y - x) ** 2).mean() / (x.astype(np.float64) ** 2).mean())


# Block absmax of the huge-weight rows: beyond fp16 scales (8e6 · 127 ≈ the largest a _32 scale can stand for), where
# Σx² overflows float32 (1e20), and where Σq·x does (1e36, 3e38).
HUGE = (1e5, 1e7, 1e9, 1e20, 1e36, 3e38)


def huge_rows(cols: int) -> np.ndarray:
    """Student-t rows whose second 32-weight block is scaled to each absmax in HUGE (one row each), plus two
    whole rows at 1e7 and 1e30."""
    x = student_t(len(HUGE) + 2, cols, seed=21).astype(np.float64)
    for r, s in enumerate(HUGE):
        blk = x[r, 32:64]
        x[r, 32:64] = blk / np.abs(blk).max() * s
    x[-2] *= 1e7 / np.abs(x[-2]).max()
    x[-1] *= 1e30 / np.abs(x[-1]).max()
    return x.astype(np.float32)


def negative_importance(cols: int, seed: int) -> np.ndarray:
    """Importance with negative entries, as a corrupt imatrix could hold: ggml's quantiser takes it as given (qgguf's
    encode refuses it), so Σw·x² can be negative where the least-squares scale is not."""
    imp = importance(cols, seed)
    imp[::3] *= -1.0
    imp[1::3] *= 0.2
    return imp


def scales_of(f, raw: np.ndarray) -> np.ndarray:
    """The fp16 scale of every block (the first two bytes of each), as float32."""
    return raw.reshape(-1, f.type_size)[:, :2].copy().view(np.float16).astype(np.float32).reshape(-1)


def encode_blocks_raw(f, x: np.ndarray, imp: np.ndarray) -> np.ndarray:
    """qgguf's encoder without encode's input checks (which refuse negative importance): the same block maths."""
    xb = torch.from_numpy(np.ascontiguousarray(x).reshape(-1, f.block_size))
    wb = torch.from_numpy(np.tile(imp, x.shape[0]).reshape(-1, f.block_size))
    return f.encode_blocks(xb, wb, x.shape[1]).numpy().reshape(x.shape[0], -1)


# ------------------------------------------------------------------------------------------------ Python side
def test_family_registered():
    got = {f.name: (f.type_id, f.block_size, f.type_size, f.stock) for f in map(formats.get, NL_TYPES)}
    assert got == {
        "NL2_XS": (102, 256, 72, False), "NL3_XS": (103, 256, 104, False),
        "NL5_XS": (105, 256, 168, False), "NL6_XS": (106, 256, 200, False),
        "NL2_32": (112, 32, 10, False), "NL3_32": (113, 32, 14, False),
        "NL5_32": (115, 32, 22, False), "NL6_32": (116, 32, 26, False),
    }
    for n in NL_TYPES:
        f = formats.get(n)
        assert len(f.values) == 1 << f.bits and f.values[0] == -127 and list(f.values) == sorted(set(f.values))


# Relative MSE on Gaussian weights with the encoder's gain-unbiased scales (docs/design.md, "Gain-unbiased NL
# scales": the design study's least-squares numbers times about 1/(1 - error)), with a 3% margin.
GAUSS_REL_MSE = {"NL2_XS": 0.1066, "NL2_32": 0.1067, "NL3_XS": 0.02378, "NL3_32": 0.02372,
                 "NL5_XS": 0.001410, "NL5_32": 0.001321, "NL6_XS": 0.000383, "NL6_32": 0.000325}


@pytest.mark.parametrize("name", NL_TYPES)
def test_gaussian_error_as_designed(name):
    x = np.random.default_rng(0).standard_normal((64, 1024)).astype(np.float32)
    assert rel_mse(formats.get(name), x) <= 1.03 * GAUSS_REL_MSE[name]


def _weighted_gain_and_error(f, x: np.ndarray, imp: np.ndarray) -> tuple[float, float]:
    """Importance-weighted Σw·x̂·x / Σw·x² - 1 (the reconstruction's shrinkage) and relative error."""
    y = f.decode(f.encode(x, imp), x.shape).numpy().astype(np.float64)
    w = imp[None].astype(np.float64)
    energy = float((w * x.astype(np.float64) ** 2).sum())
    return float((w * y * x).sum()) / energy - 1, float((w * (y - x) ** 2).sum()) / energy


@pytest.mark.parametrize("name", NL_TYPES)
def test_reconstruction_is_not_shrunk(name, monkeypatch):
    """The stored block scales are gain-unbiased: least-squares scales on a centroid codebook shrink the weights by
    their relative error (gain - 1 = -error), which adds up across tensors; the encoder removes most of it."""
    f = formats.get(name)
    x, imp = student_t(64, 1024, seed=31), importance(1024, seed=2)
    gain, err = _weighted_gain_and_error(f, x, imp)
    orig = nl.NLFormat.block_scales
    monkeypatch.setattr(nl.NLFormat, "block_scales", lambda self, *a, **k: orig(self, *a, **{**k, "unbiased": False}))
    gain_ls, err_ls = _weighted_gain_and_error(f, x, imp)
    assert gain_ls < 0 and abs(gain) < 0.75 * abs(gain_ls)
    if f.bits <= 3:  # where the shrinkage is large: about the whole error with least squares, a third or less now
        assert gain_ls < -0.9 * err_ls and abs(gain) < 0.35 * err
    assert err < 1.15 * err_ls  # the price: a little more error (most at 2 bits)


def _frontier_bits(points: list[tuple[float, float]], err: float) -> float:
    """Bits the Pareto front of (bpw, error) points needs for `err`, linear in log error between its points."""
    env = []
    for b, e in sorted(points):
        if not env or e < env[-1][1]:
            env.append((b, e))
    for (b0, e0), (b1, e1) in zip(env, env[1:]):
        if e1 <= err <= e0:
            return b0 + (np.log(e0) - np.log(err)) / (np.log(e0) - np.log(e1)) * (b1 - b0)
    return float("nan")


# The keep rule of the design study, re-checked against ggml's own stock encoders: each kept type is below the
# front of the stock types that can take the same rows (block 256: the palette's K- and IQ4 types; block 32: the
# legacy types and IQ4_NL), or smaller than all of them.
KEPT_AGAINST = {
    "NL2_XS": ("Q2_K", "Q3_K", "IQ4_XS", "Q4_K", "Q5_K", "Q6_K", "Q8_0"),
    "NL3_XS": ("Q2_K", "Q3_K", "IQ4_XS", "Q4_K", "Q5_K", "Q6_K", "Q8_0"),
    "NL5_XS": ("Q2_K", "Q3_K", "IQ4_XS", "Q4_K", "Q5_K", "Q6_K", "Q8_0"),
    "NL6_XS": ("Q2_K", "Q3_K", "IQ4_XS", "Q4_K", "Q5_K", "Q6_K", "Q8_0"),
    "NL2_32": ("Q4_0", "IQ4_NL", "Q4_1", "Q5_0", "Q5_1", "Q8_0"),
    "NL3_32": ("Q4_0", "IQ4_NL", "Q4_1", "Q5_0", "Q5_1", "Q8_0"),
    "NL5_32": ("Q4_0", "IQ4_NL", "Q4_1", "Q5_0", "Q5_1", "Q8_0"),
    "NL6_32": ("Q4_0", "IQ4_NL", "Q4_1", "Q5_0", "Q5_1", "Q8_0"),
}
STOCK_IDS = {"Q2_K": 10, "Q3_K": 11, "IQ4_XS": 23, "Q4_K": 12, "Q5_K": 13, "Q6_K": 14, "Q8_0": 8, "Q4_0": 2,
             "IQ4_NL": 20, "Q4_1": 3, "Q5_0": 6, "Q5_1": 7}


@pytest.mark.parametrize("name", NL_TYPES)
def test_beats_the_stock_front(name, llama_build):
    x = student_t(64, 1024, seed=31)
    f = formats.get(name)
    points = []
    for s in KEPT_AGAINST[name]:
        tid = STOCK_IDS[s]
        y = ggml_ref.dequantize(tid, ggml_ref.quantize(tid, x, np.ones(1024, np.float32)), x.shape)
        t = ggml_ref.traits(tid)
        points.append((8.0 * t.type_size / t.blck_size, float(((y.astype(np.float64) - x) ** 2).mean())))
    ours = float(((f.decode(f.encode(x), x.shape).numpy().astype(np.float64) - x) ** 2).mean())
    needed = _frontier_bits(points, ours)
    if np.isnan(needed):  # worse than the smallest stock type: only allowed when it is smaller too
        assert f.bpw < min(points)[0] and ours < 0.5 * float(np.mean(x.astype(np.float64) ** 2))
    else:
        assert needed > f.bpw, f"{name}: the stock front reaches its error with {needed:.3f} bpw"


@pytest.mark.parametrize("name", NL_TYPES)
def test_encode_is_deterministic_and_importance_weighted(name):
    f = formats.get(name)
    x = student_t(32, 512, seed=1)
    imp = importance(512, seed=2)
    a = f.encode(x, imp)
    assert a.dtype == np.uint8 and a.shape == (32, f.row_bytes(512))
    assert np.array_equal(a, f.encode(x.copy(), imp.copy()))
    plain = f.encode(x)

    def werr(raw):
        y = f.decode(raw, x.shape).numpy().astype(np.float64)
        return float((((y - x) ** 2) * imp).sum())

    assert werr(a) < werr(plain), "the importance-weighted encoding must have the lower weighted error"


@pytest.mark.parametrize("name", NL_TYPES)
def test_bad_input_is_refused(name):
    f = formats.get(name)
    x = student_t(4, 512, seed=3)
    with pytest.raises(QggufError, match="multiple of"):
        f.encode(x[:, :f.block_size + 32] if f.block_size == 256 else x[:, :48])
    x[1, 7] = np.nan
    with pytest.raises(QggufError, match="NaN or Inf"):
        f.encode(x)
    with pytest.raises(QggufError, match="importance has"):
        f.encode(student_t(4, 512, seed=3), np.ones(256, np.float32))
    with pytest.raises(QggufError, match="bytes given"):
        f.decode(np.zeros(7, np.uint8), (4, 512))


@pytest.mark.parametrize("name", NL_TYPES)
def test_huge_weights_give_finite_scales(name):
    """A block whose scale would overflow fp16 is stored at the largest finite fp16 scale, not as Inf (the
    gain-unbiased scale is larger still than the least-squares one), and every block decodes to finite values."""
    f = formats.get(name)
    x = huge_rows(512)
    raw = f.encode(x)
    d = scales_of(f, raw)
    assert np.isfinite(d).all()
    assert np.isfinite(f.decode(raw, x.shape).numpy()).all()
    if f.layout == "32":  # the blocks at 1e7 and above need a scale past 65504: clamped to it (sign: -max/127)
        per_row = d.reshape(x.shape[0], -1)
        assert (np.abs(per_row[1:len(HUGE), 1]) == nl.SCALE_MAX).all(), per_row[:len(HUGE), 1]
        assert abs(per_row[0, 1]) < nl.SCALE_MAX  # 1e5 / 127 fits


@pytest.mark.parametrize("name", NL_TYPES)
def test_unbiased_scale_keeps_the_least_squares_sign(name):
    """Where Σw·x² / Σw·q·x has the other sign than the least-squares scale (negative importance: Σw·x² < 0), the
    block keeps its least-squares scale; nowhere does the gain-unbiased step flip or zero a block."""
    f = formats.get(name)
    x = student_t(16, 512, seed=22)
    imp = negative_importance(512, seed=23)
    xt = torch.from_numpy(x.reshape(-1, 32)).t().contiguous()
    wt = torch.from_numpy(np.tile(imp, 16).reshape(-1, 32)).t().contiguous()
    ls = f.block_scales(xt, wt, unbiased=False).numpy()
    ub = f.block_scales(xt, wt).numpy()
    energy = seq_sum(wt * xt * xt).numpy()  # Σw·x² as the encoder sums it
    flipped = (ls != 0) & (energy < 0)
    assert flipped.sum() >= 4, "the case is not exercised: no block with Σw·x² < 0 and a least-squares scale"
    assert np.array_equal(np.sign(ub), np.sign(ls))
    assert np.array_equal(ub[flipped], ls[flipped])
    raw = encode_blocks_raw(f, x, imp)
    assert np.isfinite(scales_of(f, raw)).all()


def test_planes_round_trip():
    rng = np.random.default_rng(4)
    for k in (1, 2, 4):
        for group in (32, 256 // k):
            L = torch.from_numpy(rng.integers(0, 1 << k, size=(5, 256)).astype(np.int32))
            q = nl.pack_plane(L, k, group)
            assert q.shape == (5, 256 * k // 8)
            assert torch.equal(nl.unpack_plane(q, k, group), L)


# ------------------------------------------------------------------------------------------------ one definition
# nl.py defines the codebooks, plane widths and candidate scales; the fork's ggml-nl.h and gguf-py patch hold copies
# written from it (qgguf/formats/nl_tables.py). These checks need no build.
def test_fork_tables_are_written_from_nl_py():
    assert nl_tables.stale() == [], "run python -m qgguf.formats.nl_tables --write"


def _c_tables(text: str) -> tuple[dict[int, tuple[int, ...]], dict[int, tuple[int, ...]]]:
    """ggml-nl.h's codebooks and (klo, khi) per bits, read from the C source."""
    values = {}
    for b, n, body in re.findall(r"ggml_nl_values_(\d+)\[(\d+)\] = \{([^}]*)\}", text):
        values[int(b)] = tuple(int(v) for v in body.split(",") if v.strip())
        assert len(values[int(b)]) == int(n), f"ggml_nl_values_{b}: {n} declared"
    specs = {int(b): (int(lo), int(hi)) for b, lo, hi in
             re.findall(r"\{ (\d+), (\d+), (\d+), ggml_nl_values_\d+,", text)}
    return values, specs


def _patch_tables(text: str) -> tuple[dict, dict]:
    """The NL_VALUES and NL_PLANES that patch 0003 adds to gguf-py's quants.py, read as Python literals."""
    added = [line[1:] for line in text.split("\n") if line.startswith("+") and not line.startswith("+++")]
    i = next(i for i, line in enumerate(added) if line.startswith("NL_VALUES:"))
    j = added.index("}", i)
    values = "\n".join(added[i:j + 1]).split("= ", 1)[1]
    planes = next(line for line in added if line.startswith("NL_PLANES:")).split("= ", 1)[1]
    return ast.literal_eval(values), ast.literal_eval(planes)


def test_fork_copies_hold_nl_py_tables():
    """Read without the writer: the C header's and the patch's codebooks and plane widths are nl.py's."""
    ext = nl_tables.default_ext()
    values, specs = _c_tables((ext / "overlay/ggml/src/ggml-nl.h").read_text())
    assert values == nl.VALUES
    assert specs == {b: (nl.PLANES[b] + (0,))[:2] for b in nl.VALUES}
    values, planes = _patch_tables((ext / "patches/0003-gguf-py-nl-types.patch").read_text())
    assert values == nl.VALUES and planes == {b: nl.PLANES[b] for b in nl.VALUES}


@pytest.mark.parametrize("copy", nl_tables.COPIES, ids=lambda c: Path(c.path).name)
def test_a_copy_edited_by_hand_is_caught(copy, tmp_path):
    """One codebook value changed in one copy: the check names that file, and --write puts the value back."""
    for c in nl_tables.COPIES:
        (tmp_path / c.path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / c.path).write_text((nl_tables.default_ext() / c.path).read_text())
    f = tmp_path / copy.path
    good = f.read_text()
    assert good.count("-117, -101, -90") == 1  # in the 5-bit codebook
    f.write_text(good.replace("-117, -101, -90", "-117, -102, -90"))
    assert nl_tables.stale(tmp_path) == [copy.path]
    assert nl_tables.main(["--check", "--cpp-ext", str(tmp_path)]) == 1
    assert nl_tables.write(tmp_path) == [copy.path] and f.read_text() == good


def _hunks_consistent(patch: str) -> bool:
    """Every hunk's line counts match its body (what git apply checks before it looks at the context)."""
    lines = patch.split("\n")
    for i, line in enumerate(lines):
        m = re.match(r"@@ -\d+,(\d+) \+\d+,(\d+) @@", line)
        if not m:
            continue
        old = new = 0
        for body in lines[i + 1:]:
            if body.startswith(("@@ ", "diff --git ")) or body == "":  # an empty context line is " "
                break
            old += body[:1] in (" ", "-")
            new += body[:1] in (" ", "+")
        if (old, new) != (int(m[1]), int(m[2])):
            return False
    return True


def test_a_grown_table_keeps_the_patch_whole(monkeypatch):
    """A new codebook adds lines to patch 0003's hunk: the writer recounts it."""
    monkeypatch.setattr(nl, "VALUES", {**nl.VALUES, 4: tuple(range(-127, 128, 17))[:16]})
    copy = next(c for c in nl_tables.COPIES if c.patch)
    text = (nl_tables.default_ext() / copy.path).read_text()
    assert _hunks_consistent(text)
    grown = nl_tables.render(copy, text)
    assert grown.count("\n") > text.count("\n") and _hunks_consistent(grown)
    assert _patch_tables(grown)[0][4] == nl.VALUES[4]


# ------------------------------------------------------------------------------------------------ the fork
@pytest.fixture(scope="module")
def fork(llama_build) -> Path:
    t = ggml_ref.traits(formats.get("NL3_XS").type_id)
    if not t.type_name or t.type_name.decode() != "nl3_xs":
        pytest.fail("the built llama.cpp has no NL types: cpp_ext/ lacks the NL patch series")
    return llama_build


@pytest.mark.parametrize("name", NL_TYPES)
def test_ggml_traits_match(name, fork):
    f = formats.get(name)
    t = ggml_ref.traits(f.type_id)
    assert t.type_name.decode() == name.lower()
    assert (t.blck_size, t.type_size, bool(t.is_quantized)) == (f.block_size, f.type_size, True)


@pytest.mark.parametrize("name", NL_TYPES)
def test_c_encoder_gives_the_same_bytes(name, fork):
    """ggml_quantize_chunk of the fork = qgguf's encoder, with and without importance, corner rows included."""
    f = formats.get(name)
    x = np.concatenate([student_t(16, 768, seed=5), corner_rows(768)])
    for imp in (None, importance(768, seed=6)):
        assert np.array_equal(f.encode(x, imp), ggml_ref.quantize(f.type_id, x, imp)), \
            f"{name} {'with' if imp is not None else 'without'} importance"


@pytest.mark.parametrize("name", NL_TYPES)
def test_c_decoder_is_bit_exact(name, fork):
    """ggml's to_float = qgguf's decode, on encoded weights and on random bytes (any scale, NaN/Inf included)."""
    f = formats.get(name)
    x = np.concatenate([student_t(16, 512, seed=9), corner_rows(512)])
    raw = f.encode(x, importance(512, seed=10))
    assert same_floats(f.decode(raw, x.shape).numpy(), ggml_ref.dequantize(f.type_id, raw, x.shape))
    rnd = np.random.default_rng(11).integers(0, 256, size=(6, f.row_bytes(512)), dtype=np.uint8)
    ours = f.decode(rnd, (6, 512)).numpy()
    ref = ggml_ref.dequantize(f.type_id, rnd, (6, 512))
    assert np.array_equal(np.isnan(ours), np.isnan(ref))
    assert same_floats(np.nan_to_num(ours), np.nan_to_num(ref))


def test_c_and_python_agree_on_real_weights(fork, tiny_llama):
    """Every 2-D weight of the tiny Llama, in every NL type that takes its rows: same bytes, same floats."""
    from safetensors.numpy import load_file

    weights = {k: v for k, v in load_file(tiny_llama / "model.safetensors").items() if v.ndim == 2}
    for name in NL_TYPES:
        f = formats.get(name)
        for key, w in weights.items():
            if not f.accepts(w.shape[1]):
                continue
            x = np.ascontiguousarray(w[:64], dtype=np.float32)
            raw = f.encode(x)
            assert np.array_equal(raw, ggml_ref.quantize(f.type_id, x)), f"{name} {key}"
            assert same_floats(f.decode(raw, x.shape).numpy(), ggml_ref.dequantize(f.type_id, raw, x.shape))


@pytest.mark.parametrize("name", NL_TYPES)
def test_c_encoder_clamps_and_sign_checks_as_python(name, fork):
    """Huge weights (scales past fp16, sums past float32) and negative importance: the C quantiser gives the bytes
    of the Python encoder, every scale finite; without the clamp the C encoder stored Inf scales here."""
    f = formats.get(name)
    x = huge_rows(512)
    for imp in (None, importance(512, seed=24)):
        c = ggml_ref.quantize(f.type_id, x, imp)
        assert np.array_equal(f.encode(x, imp), c), f"{name} huge, {'with' if imp is not None else 'no'} importance"
        assert np.isfinite(scales_of(f, c)).all()
        assert np.isfinite(ggml_ref.dequantize(f.type_id, c, x.shape)).all()
    x = student_t(16, 512, seed=22)
    imp = negative_importance(512, seed=23)
    c = ggml_ref.quantize(f.type_id, x, imp)
    assert np.array_equal(encode_blocks_raw(f, x, imp), c), f"{name} negative importance"
    assert np.isfinite(scales_of(f, c)).all()


def _ggml_type_count() -> int:
    from qgguf.llamacpp.build import tree_path

    m = re.search(r"GGML_TYPE_COUNT\s*=\s*(\d+)", (tree_path(False) / "ggml/include/ggml.h").read_text())
    assert m, "GGML_TYPE_COUNT not found in the built tree's ggml.h"
    return int(m.group(1))


def test_every_type_id_has_a_name(fork):
    """ggml prints type_name with %s (gguf.cpp's errors among others): every id below GGML_TYPE_COUNT has one. Real
    types keep their names (gguf-py's, lower-cased), ids no type has are unused_<id> with no block size."""
    import gguf

    count = _ggml_type_count()
    assert count == max(formats.get(n).type_id for n in NL_TYPES) + 1
    known = {int(q): q.name for q in gguf.GGMLQuantizationType}
    removed = {4, 5, 31, 32, 33, 36, 37, 38}  # upstream's removed types, named by upstream
    for i in range(count):
        t = ggml_ref.traits(i)
        assert t.type_name, f"type id {i} has no name"
        name = t.type_name.decode()
        if i in known:
            assert name.lower() == known[i].lower() and t.blck_size > 0, (i, name, known[i])
        elif i in removed:
            assert t.blck_size == 0 and ("DEPRECATED" in name or "REMOVED" in name), (i, name)
        else:
            assert name == f"unused_{i}" and t.blck_size == 0 and t.type_size == 0, (i, name)


@pytest.mark.parametrize("name", NL_TYPES)
def test_gguf_py_dequantizes_bit_exact(name, fork):
    import gguf
    from gguf.quants import dequantize

    f = formats.get(name)
    qtype = gguf.GGMLQuantizationType[name]
    assert int(qtype) == f.type_id and gguf.GGML_QUANT_SIZES[qtype] == (f.block_size, f.type_size)
    x = np.concatenate([student_t(8, 512, seed=12), corner_rows(512)])
    raw = f.encode(x)
    assert same_floats(f.decode(raw, x.shape).numpy(), dequantize(raw, qtype).reshape(x.shape))


def _cpu_lib() -> ctypes.CDLL:
    so = ctypes.CDLL(str(tool_path("libggml-cpu.so")))
    so.ggml_cpu_init()
    return so


class _TraitsCPU(ctypes.Structure):
    _fields_ = [("from_float", ctypes.c_void_p), ("vec_dot", ctypes.c_void_p), ("vec_dot_type", ctypes.c_int),
                ("nrows", ctypes.c_int64)]


_FROM_FLOAT = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)
_VEC_DOT = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.POINTER(ctypes.c_float), ctypes.c_size_t, ctypes.c_void_p,
                            ctypes.c_size_t, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)


def _activations(type_id: int, raw: np.ndarray, n: int) -> np.ndarray:
    """Decoded Q8_0 / Q8_K activations (ggml has no to_float for Q8_K: float d, int8 qs[256], int16 bsums[16])."""
    if ggml_ref.traits(type_id).to_float:
        return ggml_ref.dequantize(type_id, raw, (n,)).astype(np.float64)
    blocks = raw.reshape(n // 256, -1)
    d = blocks[:, :4].copy().view(np.float32).astype(np.float64)
    return (d * blocks[:, 4:260].view(np.int8).astype(np.float64)).reshape(-1)


def _check_dot(name: str, dots: dict) -> None:
    """Each dot product (ggml's vec_dot signature) against the exact dot product of the decoded weights with the
    decoded int8 activations, on Student-t weights and Gaussian activations."""
    so = _cpu_lib()
    so.ggml_get_type_traits_cpu.restype = ctypes.POINTER(_TraitsCPU)
    f = formats.get(name)
    tr = so.ggml_get_type_traits_cpu(f.type_id).contents
    act = so.ggml_get_type_traits_cpu(tr.vec_dot_type).contents
    n = 2048
    x = student_t(1, n, seed=13)
    a = np.random.default_rng(14).standard_normal(n).astype(np.float32)
    wq = f.encode(x).reshape(-1)
    aq = np.zeros(ggml_ref.row_size(tr.vec_dot_type, n), np.uint8)
    _FROM_FLOAT(act.from_float)(a.ctypes.data, aq.ctypes.data, n)
    exact = float(f.decode(wq, (1, n)).numpy().astype(np.float64).reshape(-1) @ _activations(tr.vec_dot_type, aq, n))
    scale = float(np.abs(f.decode(wq, (1, n)).numpy()).sum() * np.abs(a).max())
    for what, dot in dots.items():
        out = ctypes.c_float()
        dot(n, ctypes.byref(out), 0, wq.ctypes.data, 0, aq.ctypes.data, 0, 1)
        assert abs(out.value - exact) <= 1e-5 * scale, (what, out.value, exact)


def _dot_symbol(name: str) -> str:
    return f"ggml_vec_dot_{name.lower()}_{'q8_K' if name.endswith('_XS') else 'q8_0'}"


@pytest.mark.parametrize("name", NL_TYPES)
def test_cpu_dot_products(name, fork):
    """The CPU backend's dot product (SIMD where the machine has it) and the scalar one."""
    so = _cpu_lib()
    so.ggml_get_type_traits_cpu.restype = ctypes.POINTER(_TraitsCPU)
    tr = so.ggml_get_type_traits_cpu(formats.get(name).type_id).contents
    generic = getattr(so, _dot_symbol(name) + "_generic")

    def scalar(n, s, bs, x, bx, y, by, nrc):
        generic(n, s, ctypes.c_void_p(x), ctypes.c_void_p(y))

    _check_dot(name, {"backend": _VEC_DOT(tr.vec_dot), "scalar": scalar})


# Instruction sets the NL kernels have paths for, beyond the one the build's -march=native picks: each is compiled
# from cpp_ext's nl-cpu.c on its own and checked where this CPU can run it.
_ISAS = {"avx2": (["-mavx2", "-mfma", "-mf16c"], {"avx2", "fma", "f16c"}),
         "avx512vbmi": (["-mavx2", "-mfma", "-mf16c", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vbmi"],
                        {"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512vbmi"})}


@pytest.fixture(scope="module")
def isa_kernels(fork, tmp_path_factory) -> dict[str, ctypes.CDLL]:
    import platform
    import shutil

    if platform.machine() not in ("x86_64", "AMD64") or not shutil.which("cc"):
        pytest.skip("the SIMD kernel variants are x86 ones and need a C compiler")
    flags = set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    tree = Path(json.loads((tool_path("libggml-base.so").parent.parent / "qgguf-build.json").read_text())["tree"])
    src = repo_root() / "cpp_ext" / "overlay" / "ggml" / "src" / "ggml-cpu" / "nl-cpu.c"
    lib_dir = tool_path("libggml-base.so").parent
    out = {}
    for isa, (cflags, needs) in _ISAS.items():
        if not needs <= flags:
            continue
        so = tmp_path_factory.mktemp("isa") / f"nl-{isa}.so"
        cmd = ["cc", "-O2", "-shared", "-fPIC", "-std=gnu11", *cflags, f"-I{tree / 'ggml/include'}",
               f"-I{tree / 'ggml/src'}", f"-I{tree / 'ggml/src/ggml-cpu'}", str(src), f"-L{lib_dir}", "-lggml-cpu", "-lggml-base",
               f"-Wl,-rpath,{lib_dir}", "-o", str(so)]
        res = subprocess.run(cmd, capture_output=True, text=True)
        assert res.returncode == 0, res.stderr[-3000:]
        out[isa] = ctypes.CDLL(str(so))
    if not out:
        pytest.skip("this CPU has none of the SIMD extensions the NL kernels have paths for")
    return out


@pytest.mark.parametrize("name", NL_TYPES)
def test_cpu_dot_products_each_isa(name, isa_kernels):
    """Every SIMD path of the kernels this CPU can run (AVX2 alone, AVX2 with AVX512-VBMI), not only the one the
    build selected."""
    _check_dot(name, {isa: _VEC_DOT(ctypes.cast(getattr(so, _dot_symbol(name)), ctypes.c_void_p).value)
                      for isa, so in isa_kernels.items()})


def test_test_quantize_fns_passes(fork):
    res = subprocess.run([str(tool_path("test-quantize-fns")), "-v"], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:]
    for n in NL_TYPES:
        assert f"Testing {n.lower()}" in res.stdout
        assert f"{n.lower()} dot product error:              ok" in res.stdout


def test_test_backend_ops_passes(fork):
    """Every op test-backend-ops has for the NL types (mat-mul and mat-vec, get_rows, set_rows, cpy, ...) on CPU."""
    res = subprocess.run([str(tool_path("test-backend-ops")), "-b", "CPU", "-p", "nl[0-9]_"],
                         capture_output=True, text=True, timeout=1200)
    out = res.stdout + res.stderr
    assert res.returncode == 0 and "1/1 backends passed" in out, out[-3000:]
    for op in ("MUL_MAT(type_a=nl", "GET_ROWS(type=nl", "type_dst=nl", "CPY(type_src=nl"):
        assert op in out, op
    assert "FAIL" not in out


# ------------------------------------------------------------------------------------------------ whole files
def _stock_libggml_base(tmp_path_factory) -> Path:
    """libggml-base of unpatched llama.cpp (an empty cpp_ext/: the same cache key as a checkout without patches).

    Every llama.cpp tool reads GGUF through this library's `gguf_init_from_file`, which is where an unknown type is
    refused. The full stock build's copy is used when the cache has one; otherwise only the ggml-base target is
    built (a handful of C/C++ files, not the ~6 minutes of the tools)."""
    ext = tmp_path_factory.mktemp("stock-ext")
    for d in ("overlay", "patches"):
        (ext / d).mkdir()
        (ext / d / ".keep").write_text("")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("QGGUF_CPP_EXT", str(ext))
        mp.delenv("LLAMA_CPP_DIR", raising=False)
        mp.delenv("QGGUF_CMAKE_ARGS", raising=False)
        spec = BuildSpec.from_env(cuda=False)
        if spec.stamp.is_file():
            return spec.build_dir / "bin" / "libggml-base.so"
        tree = prepare_tree(spec).resolve()
        bdir = spec.root / "build-ggml-base"
        lib = bdir / "bin" / "libggml-base.so"
        if not lib.is_file():
            opts = [f"-D{k}={v}" for k, v in sorted(spec.cmake_options().items())]
            subprocess.run(["cmake", "-S", str(repo_root()), "-B", str(bdir), f"-DQGGUF_LLAMA_SOURCE_DIR={tree}",
                            *opts], check=True, capture_output=True)
            subprocess.run(["cmake", "--build", str(bdir), "--config", "Release", "-j", "2", "--target",
                            "ggml-base"], check=True, capture_output=True)
        return lib


# gguf_init_from_file(path, {no_alloc, ctx}) of a given libggml-base, in a child process so that its log is captured
_READ_GGUF = """
import ctypes, sys
lib = ctypes.CDLL(sys.argv[1])
class Params(ctypes.Structure):
    _fields_ = [("no_alloc", ctypes.c_bool), ("ctx", ctypes.c_void_p)]
lib.gguf_init_from_file.restype = ctypes.c_void_p
lib.gguf_init_from_file.argtypes = [ctypes.c_char_p, Params]
sys.exit(0 if lib.gguf_init_from_file(sys.argv[2].encode(), Params(True, None)) else 3)
"""


@pytest.fixture(scope="module")
def tiny_gguf(fork, tiny_llama, tmp_path_factory) -> Path:
    from qgguf.llamacpp.converter import convert_hf

    out = tmp_path_factory.mktemp("nl-f32") / "tiny-f32.gguf"
    return convert_hf(tiny_llama, out, "f32")


@pytest.fixture(scope="module")
def mixed_gguf(tiny_gguf, tmp_path_factory) -> Path:
    """The tiny Llama with every NL type and some stock types, as qgguf's exporter writes it."""
    import gguf

    from qgguf.export.writer import export_gguf

    names = [t.name for t in gguf.GGUFReader(tiny_gguf).tensors if len(t.shape) == 2]
    cycle = NL_TYPES + ["Q4_0", "Q8_0"]
    plan = {n: cycle[i % len(cycle)] for i, n in enumerate(sorted(names))}
    out = tmp_path_factory.mktemp("nl-mixed") / "tiny-mixed.gguf"
    return export_gguf(tiny_gguf, out, plan, progress=False)


def _perplexity(exe: Path, model: Path, text: Path) -> subprocess.CompletedProcess:
    cmd = [str(exe), "-m", str(model), "-f", str(text), "-c", "128", "--chunks", "3", "-t", "2", "-b", "128"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def _final_ppl(res: subprocess.CompletedProcess) -> float:
    """The final estimate (the fork flushes the tools' log at exit, patch 0006: the line is always there)."""
    from qgguf.llamacpp.toolout import parse_perplexity

    return parse_perplexity(res.stdout + res.stderr).ppl


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    from qgguf.assets.tiny import tiny_text

    p = tmp_path_factory.mktemp("nl-text") / "text.txt"
    p.write_text(tiny_text(6000, seed=3))
    return p


def test_mixed_file_reads_back_and_runs_in_the_fork(mixed_gguf, text_file):
    import gguf

    r = gguf.GGUFReader(mixed_gguf)
    seen = {gguf.GGMLQuantizationType(int(t.tensor_type)).name for t in r.tensors}
    assert set(NL_TYPES) <= seen
    res = _perplexity(tool_path("llama-perplexity"), mixed_gguf, text_file)
    assert res.returncode == 0, res.stderr[-3000:]
    ppl = _final_ppl(res)
    assert np.isfinite(ppl) and 1 < ppl < 2000, ppl


def test_stock_llama_cpp_refuses_nl_files(mixed_gguf, tiny_gguf, tmp_path_factory):
    """Stock llama.cpp's GGUF reader refuses a file with NL tensors with its own invalid-type error; the fork's
    reads it (and the stock reader reads the same model without NL tensors)."""
    stock = _stock_libggml_base(tmp_path_factory)
    res = subprocess.run([sys.executable, "-c", _READ_GGUF, str(stock), str(mixed_gguf)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 3, res.stderr[-2000:]
    assert "has invalid ggml type 1" in res.stderr and "should be in [0, 43)" in res.stderr, res.stderr[-2000:]
    for lib, model in ((stock, tiny_gguf), (tool_path("libggml-base.so"), mixed_gguf)):
        res = subprocess.run([sys.executable, "-c", _READ_GGUF, str(lib), str(model)],
                             capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, (lib, model, res.stderr[-2000:])


def _gguf_with_type_id(path: Path, type_id: int | None) -> Path:
    """A small valid GGUF (one F32 tensor, written by gguf-py) with the tensor's type id overwritten in its bytes."""
    import struct

    import gguf

    w = gguf.GGUFWriter(path, "llama")
    w.add_tensor("token_embd.weight", np.zeros((8, 256), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    if type_id is not None:
        data = bytearray(path.read_bytes())
        name = b"token_embd.weight"
        pos = data.index(name) + len(name)  # then n_dims (u32), the dims (u64 each), the type (i32)
        n_dims = struct.unpack_from("<I", data, pos)[0]
        assert struct.unpack_from("<i", data, pos + 4 + 8 * n_dims)[0] == 0  # F32: the field found
        struct.pack_into("<i", data, pos + 4 + 8 * n_dims, type_id)
        path.write_bytes(bytes(data))
    return path


# type ids a corrupt file may name: removed upstream (Q4_2, Q4_3, Q4_0_8_8, IQ4_NL_4_4), ids no type has (between
# upstream's and the NL ids, between the NL ids), and ids at or past GGML_TYPE_COUNT or negative
_BAD_TYPE_IDS = {4: "DEPRECATED", 5: "DEPRECATED", 33: "TYPE_Q4_0_8_8 REMOVED", 36: "TYPE_IQ4_NL_4_4 REMOVED",
                 43: "unused_43", 77: "unused_77", 104: "unused_104", 114: "unused_114",
                 117: None, 1000: None, -1: None}


@pytest.mark.parametrize("type_id", list(_BAD_TYPE_IDS))
def test_unreadable_type_ids_are_refused(type_id, fork, tmp_path):
    """A GGUF naming a type this ggml cannot read is refused by the GGUF reader with a line naming the tensor, the id
    and its name: a clean non-zero exit of llama-completion, no signal, no model loaded."""
    good = _gguf_with_type_id(tmp_path / "good.gguf", None)
    res = subprocess.run([sys.executable, "-c", _READ_GGUF, str(tool_path("libggml-base.so")), str(good)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]  # the file is readable before its type id is changed
    bad = _gguf_with_type_id(tmp_path / "bad.gguf", type_id)
    res = subprocess.run([str(tool_path("llama-completion")), "-m", str(bad), "-p", "hi", "-n", "1", "-t", "1"],
                         capture_output=True, text=True, timeout=120)
    out = res.stdout + res.stderr
    assert res.returncode > 0, (res.returncode, out[-2000:])  # < 0: killed by a signal
    name = _BAD_TYPE_IDS[type_id]
    if name is None:
        wants = [f"tensor 'token_embd.weight' has invalid ggml type {type_id}. should be in [0, "
                 f"{_ggml_type_count()})"]
    else:
        wants = [f"tensor 'token_embd.weight' has ggml type {type_id} ({name}", "a removed type or an id no type has, "
                 "which this ggml cannot read"]
    assert all(w in out for w in wants), out[-2000:]
    assert "(null)" not in out


def test_llama_quantize_refuses_unused_type_names(fork, tmp_path):
    """unused_<id> names an id, not a type: llama-quantize's --output-tensor-type refuses it (and upstream's
    DEPRECATED) as it refuses any unknown name, before reading the model."""
    src = _gguf_with_type_id(tmp_path / "in.gguf", None)
    for name in ("unused_50", "DEPRECATED"):
        res = subprocess.run([str(tool_path("llama-quantize")), "--output-tensor-type", name, str(src),
                              str(tmp_path / "out.gguf"), "Q4_0"], capture_output=True, text=True, timeout=120)
        assert res.returncode > 0 and f"invalid ggml_type '{name}'" in res.stdout + res.stderr, res.stderr[-2000:]
        assert not (tmp_path / "out.gguf").exists()


@pytest.mark.parametrize("ftype", ["NL3_XS", "NL5_32"])
def test_llama_quantize_writes_nl_types(ftype, tiny_gguf, text_file, tmp_path):
    import gguf

    out = tmp_path / f"tiny-{ftype}.gguf"
    res = subprocess.run([str(tool_path("llama-quantize")), str(tiny_gguf), str(out), ftype, "2"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    f = formats.get(ftype)
    types = {t.name: int(t.tensor_type) for t in gguf.GGUFReader(out).tensors}
    blocks = [n for n in types if n.startswith("blk.") and n.endswith(("attn_q.weight", "ffn_up.weight"))]
    assert blocks and all(types[n] == f.type_id for n in blocks), types
    # llama-quantize's bytes are the C quantiser's: decode them with qgguf and compare with the F32 weights
    src = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(tiny_gguf).tensors}
    for t in gguf.GGUFReader(out).tensors:
        if t.name in blocks:
            x = src[t.name].reshape(-1, src[t.name].shape[-1]).astype(np.float32)
            raw = np.asarray(t.data).view(np.uint8).reshape(x.shape[0], -1)
            assert np.array_equal(raw, f.encode(x)), t.name
    res = _perplexity(tool_path("llama-perplexity"), out, text_file)
    assert res.returncode == 0, res.stderr[-3000:]
    assert np.isfinite(_final_ppl(res))


def test_convert_extended_palette_runs(tiny_llama, text_file, tmp_path):
    """`qgguf convert --palette extended`: a mixed stock + NL file that fits the budget and runs in llama-perplexity,
    with a KL divergence to the F32 model near the planner's prediction."""
    import gguf

    from qgguf.llamacpp.toolout import parse_kl_divergence

    def qgguf(*args: str) -> subprocess.CompletedProcess:
        res = subprocess.run([sys.executable, "-m", "qgguf", *args], capture_output=True, text=True, timeout=900)
        assert res.returncode == 0, (args[0], res.stderr[-3000:])
        return res

    from qgguf.assets.tiny import tiny_text

    calib = tmp_path / "calib.txt"
    calib.write_text(tiny_text(seed=1))
    stats = tmp_path / "stats.safetensors"
    qgguf("calibrate", str(tiny_llama), "-o", str(stats), "--text", str(calib), "--tokens", "1024", "--seq-len", "128")
    out = tmp_path / "ext.gguf"
    qgguf("convert", str(tiny_llama), "-o", str(out), "--target-bpw", "3.5", "--palette", "extended",
          "--stats", str(stats))
    r = gguf.GGUFReader(out)
    types = {t.tensor_type.name for t in r.tensors if len(t.shape) == 2}
    assert types & set(NL_TYPES) and types - set(NL_TYPES), types
    bpw = 8 * sum(int(t.n_bytes) for t in r.tensors) / sum(int(t.n_elements) for t in r.tensors)
    assert bpw <= 3.5, bpw
    plan = json.loads(out.with_name("ext.plan.json").read_text())
    in_file = {t.name: t.tensor_type.name for t in r.tensors}
    assert all(in_file[t["name"]] == t["type"] for t in plan["tensors"])

    f32 = tmp_path / "f32.gguf"
    qgguf("convert-hf", str(tiny_llama), "-o", str(f32))
    logits = tmp_path / "f32.kld"
    ppl = [str(tool_path("llama-perplexity")), "-f", str(text_file), "-c", "128", "--chunks", "3", "-t", "2",
           "-b", "128"]
    res = subprocess.run(ppl + ["-m", str(f32), "--kl-divergence-base", str(logits)], capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    res = subprocess.run(ppl + ["-m", str(out), "--kl-divergence-base", str(logits), "--kl-divergence"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    kld = parse_kl_divergence(res.stdout + res.stderr)
    # measured 0.170 against 0.210 predicted (the stock palette at 3.5 bpw: 0.200 against 0.229)
    predicted = plan["totals"]["predicted_kl"]
    assert 0.5 * predicted <= kld.kld_mean <= 2.0 * predicted, (kld.kld_mean, predicted)
