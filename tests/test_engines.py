"""formats/engines.py: on a CPU ggml's quantiser encodes for measure and export; it must give the torch kernels'
bytes for every quantised type, whatever the thread split, and the choice must follow QGGUF_ENCODER."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qgguf import formats
from qgguf.errors import QggufError
from qgguf.formats import engines

QUANTISED = [f.name for f in formats.all_formats() if f.quantized]


@pytest.fixture()
def ggml_engine(llama_build, monkeypatch) -> engines.Engine:
    monkeypatch.delenv(engines.ENV, raising=False)
    e = engines.choose("cpu")
    assert e.name == "ggml" and e.library is not None and e.library.is_file()
    return e


@pytest.mark.parametrize("name", QUANTISED)
def test_ggml_engine_gives_the_torch_bytes(name, ggml_engine):
    f = formats.get(name)
    rng = np.random.default_rng(7)
    row = 512 if f.accepts(512) else f.block_size * 4
    x = (rng.standard_t(5, size=(300, row)) * rng.lognormal(0, 1, size=(300, 1))).astype(np.float32)
    x[3] = 0.0  # an all-zero row
    imp = rng.gamma(0.5, size=row).astype(np.float32)
    torch_bytes = f.encode(x, imp)
    assert np.array_equal(f.encode(x, imp, engine=ggml_engine), torch_bytes)
    assert np.array_equal(f.encode(x, None, engine=ggml_engine), f.encode(x, None))
    # the rows are split over threads: one thread or three give the same bytes
    old = torch.get_num_threads()
    try:
        for n in (1, 3):
            torch.set_num_threads(n)
            assert np.array_equal(f.encode(x, imp, engine=ggml_engine), torch_bytes)
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("name", ["Q4_0", "Q4_1", "Q5_0", "Q5_1"])
def test_row_statistic_given_to_ggml(name, ggml_engine):
    """The fork's qgguf_quantize_rows_sigma2 (patch 0011): with each row's own Σx²/n it is ggml_quantize_chunk;
    with another σ² it is the torch encoder's block path with that σ² (error feedback encodes one block column of
    a long row, whose σ² it passes)."""
    from qgguf.formats.legacy import _row_sigma2

    f = formats.get(name)
    assert ggml_engine.takes_row_sigma2()
    rng = np.random.default_rng(11)
    x = torch.from_numpy((rng.standard_t(4, size=(200, 128)) * rng.lognormal(0, 1, size=(200, 1))).astype(np.float32))
    imp = torch.from_numpy(rng.gamma(0.5, size=128).astype(np.float32))
    own = _row_sigma2(x, 128)  # one value per row (the row is one "block" of 128 here)
    assert torch.equal(ggml_engine.encode_rows(f, x, imp, own), ggml_engine.encode_rows(f, x, imp))
    block = x[:, 32:64].contiguous()  # one block column of the rows, with the whole rows' σ²
    want = f.encode_blocks_sigma(block, imp[32:64].expand(200, 32).contiguous(), own)
    assert torch.equal(ggml_engine.encode_rows(f, block, imp[32:64].contiguous(), own), want)
    assert not torch.equal(want, ggml_engine.encode_rows(f, block, imp[32:64].contiguous()))  # σ² matters
    with pytest.raises(QggufError, match="needs the importance"):
        ggml_engine.encode_rows(f, block, None, own)


def test_ggml_engine_keeps_the_input_checks(ggml_engine):
    f = formats.get("Q4_0")
    x = np.ones((4, 64), dtype=np.float32)
    x[2, 5] = np.nan
    with pytest.raises(QggufError, match="NaN or Inf"):
        f.encode(x, engine=ggml_engine)
    with pytest.raises(QggufError, match="importance has 3 values"):
        f.encode(np.ones((4, 64), dtype=np.float32), np.ones(3, dtype=np.float32), engine=ggml_engine)


def test_choice_follows_the_device_and_the_environment(ggml_engine, monkeypatch):
    assert engines.choose("cuda").name == "torch"  # the torch kernels run on the GPU
    monkeypatch.setenv(engines.ENV, "torch")
    assert engines.choose("cpu") == engines.TORCH
    monkeypatch.setenv(engines.ENV, "ggml")
    assert engines.choose("cpu").name == "ggml"
    with pytest.raises(QggufError, match="CPU only"):
        engines.choose("cuda")
    monkeypatch.setenv(engines.ENV, "fast")
    with pytest.raises(QggufError, match="QGGUF_ENCODER='fast' is not an encoder; use torch, ggml or auto"):
        engines.choose("cpu")


def test_cache_keys_name_the_code_that_encodes(ggml_engine):
    q4 = formats.get("Q4_0")
    assert ggml_engine.key(q4).startswith("ggml:") and engines.TORCH.key(q4).startswith("torch:")
    assert ggml_engine.key(formats.get("F16")) == engines.TORCH.key(formats.get("F16"))  # floats: torch casts


def test_without_a_build_the_torch_kernels_encode(monkeypatch):
    monkeypatch.delenv(engines.ENV, raising=False)
    monkeypatch.setattr(engines, "_cpu_library", lambda: None)
    assert engines.choose("cpu") == engines.TORCH
    monkeypatch.setenv(engines.ENV, "ggml")
    with pytest.raises(QggufError, match="qgguf llama build"):
        engines.choose("cpu")
