"""K-quant specifics (Q2_K … Q6_K): the encoders follow ggml's quantize_row_qN_K_ref / _impl step for step, so
their bytes equal ggml_quantize_chunk's — on the eager path that small tensors take and on the torch.compile
path that large ones take — and a machine where compiling fails still gets those bytes.

tests/test_formats.py covers what all types share (decode vs gguf-py and ggml, error parity, bad input, N-D and
chunking, llama.cpp loading the result).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from qgguf import formats
from qgguf.formats import kquants
from qgguf.formats.common import fdiv, fp16_round, sqrt_f32
from qgguf.llamacpp import ggml_ref

KQUANTS = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")


def student_t(rows: int, cols: int, seed: int) -> np.ndarray:
    return (np.random.default_rng(seed).standard_t(5, size=(rows, cols)) * 0.02).astype(np.float32)


def corner_rows(cols: int) -> np.ndarray:
    """Rows that take the searches' special branches: all-zero and constant sub-blocks (flat min/max), values
    whose fp16 super-block scale is subnormal, huge values, a lone outlier, one sign only, a lone non-zero."""
    x = student_t(10, cols, seed=3)
    x[0] = 0.0
    x[1] = 0.5
    x[2] = -0.25
    x[3] *= 1e-3
    x[4] *= 1e3
    x[5, 5] = 3.0
    x[6] = np.abs(x[6])
    x[7] = -np.abs(x[7])
    x[8, :256] = 0.0
    x[8, 3] = 1e-3
    x[9, ::7] = 0.0
    return x


def importances(cols: int) -> dict[str, np.ndarray | None]:
    rng = np.random.default_rng(4)
    gamma = rng.gamma(1.0, 1.0, size=cols).astype(np.float32)
    dead = gamma.copy()
    dead[: cols // 2 + 40] = 0.0  # channels that never fire, whole sub-blocks and super-blocks of them
    return {"plain": None, "importance": gamma, "dead-channels": dead, "all-zero": np.zeros(cols, np.float32)}


@pytest.mark.parametrize("name", KQUANTS)
def test_eager_bytes_equal_ggml(name, llama_build):
    """Small tensors (the eager path): ggml's very bytes, with and without importance, corner rows included."""
    f = formats.get(name)
    x = np.concatenate([student_t(6, 768, seed=1), corner_rows(768)])
    assert x.size // f.block_size < kquants.COMPILE_MIN_BLOCKS
    for what, imp in importances(768).items():
        assert np.array_equal(f.encode(x, imp), ggml_ref.quantize(f.type_id, x, imp)), f"{name} {what}"


# One variant per kernel family (the others run the same kernels with other constants): the qkx search with
# absolute error and Q2_K's tail; make_q3_quants and its greedy passes at full and compacted sizes; the _impl
# weighting with make_qx_quants at two levels; the _impl weighting with the qkx search and make_qp_quants;
# make_qx_quants with Q6_K's tail.
COMPILED_CASES = [("Q2_K", "plain"), ("Q3_K", "plain"), ("Q3_K", "importance"), ("Q4_K", "dead-channels"),
                  ("Q6_K", "plain")]


@pytest.mark.parametrize("name,what", COMPILED_CASES)
def test_compiled_bytes_equal_ggml(name, what, monkeypatch, llama_build):
    """The torch.compile path gives ggml's bytes too, over several pieces, the last one padded."""
    monkeypatch.setenv("QGGUF_COMPILE", "1")
    monkeypatch.setattr(kquants, "PIECE_BLOCKS_COMPILED", 16)  # 54 blocks: pieces of 16, 16, 16, 6 (+10 padding)
    monkeypatch.setattr(kquants, "_compile_broken", False)
    f = formats.get(name)
    x = np.concatenate([student_t(8, 768, seed=2), corner_rows(768)])
    imp = importances(768)[what]
    before = kquants._compiled.cache_info().currsize
    ours = f.encode(x, imp)
    assert not kquants._compile_broken, "torch.compile failed on this machine"
    assert kquants._compiled.cache_info().currsize > before or kquants._compiled.cache_info().hits > 0
    assert np.array_equal(ours, ggml_ref.quantize(f.type_id, x, imp))


def test_one_process_compiles_every_type_without_eager_fallback():
    """All five K-quants, plain and with importance, in one process (as `qgguf convert` does): the shared kernels
    are compiled for every type's constants and both piece shapes, without dynamo's recompile limit sending any of
    them back to eager (it warns "hit config.recompile_limit" on stderr when it does)."""
    code = textwrap.dedent("""
        import numpy as np
        from qgguf import formats
        from qgguf.formats import kquants
        kquants.PIECE_BLOCKS_COMPILED, kquants.PIECE_BLOCKS_TAIL = 32, 16
        rng = np.random.default_rng(3)
        x = rng.standard_t(5, size=(35, 1024)).astype(np.float32)  # 140 blocks: 4 pieces of 32, 12 padded to 16
        imp = rng.gamma(1.0, 1.0, 1024).astype(np.float32)
        for name in ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"):
            for w in (None, imp):
                formats.get(name).encode(x, w)
        print("broken", kquants._compile_broken)
    """)
    res = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, QGGUF_COMPILE="1"), capture_output=True,
                         text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "broken False" in res.stdout, res.stdout + res.stderr[-3000:]
    assert "recompile_limit" not in res.stderr and "cache_size_limit" not in res.stderr, res.stderr[-3000:]


def test_compile_failure_falls_back_to_eager(tmp_path, llama_build):
    """With no working C++ compiler, the encoder warns once and still returns ggml's bytes."""
    code = textwrap.dedent("""
        import warnings
        import numpy as np
        from qgguf import formats
        from qgguf.llamacpp import ggml_ref
        x = (np.random.default_rng(5).standard_t(5, size=(4, 512)) * 0.02).astype(np.float32)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            raw = formats.get("Q4_K").encode(x)
        print("warned", sum("torch.compile failed" in str(w.message) for w in caught))
        print("equal", np.array_equal(raw, ggml_ref.quantize(12, x)))
    """)
    env = dict(os.environ, QGGUF_COMPILE="1", CXX=str(tmp_path / "no-such-c++"), CC=str(tmp_path / "no-such-cc"),
               TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor"))
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "warned 1" in res.stdout and "equal True" in res.stdout, res.stdout + res.stderr[-3000:]


def test_float_helpers_round_like_c():
    """The common.py helpers the bytes depend on, eagerly and inside a kernel compiled with the kernels' settings:
    sqrt and number/tensor division correctly rounded as C's float ops (PyTorch's vectorised sqrt and
    `number / tensor` are not), fp16 round trips kept (not fused away)."""
    rng = np.random.default_rng(6)
    a = (rng.random(200_000) * 0.01).astype(np.float32)
    a[:4] = [0.0, 1e-45, 1e-38, 3e38]
    t = torch.from_numpy(a)

    def helpers(v: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return sqrt_f32(v), fdiv(15, v), fp16_round(v * 3.0) * 2.0

    with np.errstate(divide="ignore", over="ignore"):
        expected = (np.sqrt(a), np.float32(15) / a, (a * np.float32(3)).astype(np.float16).astype(np.float32) * 2)
    for got in (helpers(t), kquants._compiled(helpers)(t)):
        for g, e in zip(got, expected):
            assert np.array_equal(g.numpy(), e)


@pytest.mark.parametrize("nb", [1, 255, 256, 257, 2047, 2048, 2049, 4480, 5000])
def test_compiled_pieces_cover_every_block_once(nb):
    """The compiled path's pieces: two sizes only, every block once, in order, little padding."""
    bounds = kquants._piece_bounds(nb, kquants.PIECE_BLOCKS_COMPILED, pad=True)
    assert [b for b, _, _ in bounds] == list(np.cumsum([0] + [k for _, k, _ in bounds])[:-1])
    assert sum(k for _, k, _ in bounds) == nb
    assert {size for _, _, size in bounds} <= {kquants.PIECE_BLOCKS_COMPILED, kquants.PIECE_BLOCKS_TAIL}
    assert sum(size - k for _, k, size in bounds) < kquants.PIECE_BLOCKS_TAIL
