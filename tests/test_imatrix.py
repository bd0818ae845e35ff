"""llama.cpp imatrix files both ways: llama-imatrix's output (GGUF and legacy .dat) read by qgguf agrees with
E[x²] from our own calibration on the same text; our imatrix is accepted and used by llama-quantize."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest

from qgguf.assets.tiny import tiny_text
from qgguf.calibrate.imatrix import imatrix_from_stats, read_imatrix, write_imatrix
from qgguf.calibrate.stats import load_stats
from qgguf.cli import main
from qgguf.errors import QggufError
from qgguf.llamacpp.build import tool_path

CTX, CHUNKS = 128, 4


@pytest.fixture(scope="module")
def work(tiny_llama, llama_build, tmp_path_factory) -> dict[str, Path]:
    """The tiny model's F32 GGUF, a text, our statistics + imatrix, and llama-imatrix's on the same text."""
    from qgguf.llamacpp.converter import convert_hf

    d = tmp_path_factory.mktemp("imatrix")
    text = d / "cal.txt"
    text.write_text(tiny_text(6000, seed=2))
    f32 = convert_hf(tiny_llama, d / "tiny-f32.gguf")
    stats, ours = d / "stats.safetensors", d / "ours.gguf"
    assert main(["calibrate", str(tiny_llama), "-o", str(stats), "--text", str(text), "--tokens", str(CTX * CHUNKS),
                 "--seq-len", str(CTX), "--imatrix", str(ours)]) == 0
    theirs = {}
    for fmt, name in (("gguf", "theirs.gguf"), ("dat", "theirs.dat")):
        cmd = [str(tool_path("llama-imatrix")), "-m", str(f32), "-f", str(text), "-o", str(d / name), "-c", str(CTX),
               "--chunks", str(CHUNKS), "-t", "2", "--no-ppl", "--output-format", fmt]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr[-2000:]
        theirs[fmt] = d / name
    return {"dir": d, "text": text, "f32": f32, "stats": stats, "ours": ours, "theirs": theirs["gguf"],
            "theirs_dat": theirs["dat"]}


def test_llama_imatrix_file_agrees_with_our_activation_statistics(work):
    theirs = read_imatrix(work["theirs"])
    stats = load_stats(work["stats"])
    assert theirs.chunk_size == CTX and theirs.chunk_count == CHUNKS and not theirs.legacy
    assert theirs.datasets == [str(work["text"])]
    blk = [n for n in stats.names() if n.startswith("blk.")]
    assert sorted(theirs.entries) == sorted(blk)  # llama-imatrix collects every blk.* matmul weight
    for name in blk:
        e = theirs.entries[name]
        assert e.counts.tolist() == [CTX * CHUNKS]
        # same tokens (same BOS-per-chunk layout), same weights: E[x²] from llama.cpp's graph and from transformers
        np.testing.assert_allclose(theirs.mean(name), stats[name].act_sq, rtol=2e-3, atol=1e-6, err_msg=name)


def test_legacy_dat_reads_like_gguf(work):
    dat, gg = read_imatrix(work["theirs_dat"]), read_imatrix(work["theirs"])
    assert dat.legacy and sorted(dat.entries) == sorted(gg.entries)
    for name in gg.entries:
        np.testing.assert_allclose(dat.mean(name), gg.mean(name), rtol=1e-5, err_msg=name)


def test_our_imatrix_round_trips_and_holds_e_x2(work):
    stats = load_stats(work["stats"])
    im = read_imatrix(work["ours"])
    assert im.chunk_size == CTX and im.chunk_count == CHUNKS and im.datasets == ["cal.txt"]
    assert sorted(im.entries) == sorted(n for n, t in stats.tensors.items() if t.act_sq is not None)
    for name, e in im.entries.items():
        np.testing.assert_allclose(e.mean(), stats[name].act_sq, rtol=1e-6)
    fisher = imatrix_from_stats(stats, "fisher")
    write_imatrix(fisher, work["dir"] / "fisher.gguf")
    back = read_imatrix(work["dir"] / "fisher.gguf")
    assert "token_embd.weight" in back.entries  # Fisher importance exists for the embedding too
    for name in back.entries:
        np.testing.assert_allclose(back.mean(name), stats[name].importance, rtol=1e-6)


def _quantize(work, imatrix: Path | None, name: str) -> tuple[dict[str, np.ndarray], str]:
    import gguf

    out = work["dir"] / name
    cmd = [str(tool_path("llama-quantize"))] + (["--imatrix", str(imatrix)] if imatrix else []) + [
        str(work["f32"]), str(out), "Q4_K", "2"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    return {t.name: np.array(t.data) for t in gguf.GGUFReader(out).tensors}, res.stdout + res.stderr


@pytest.mark.parametrize("source", ["act", "fisher"])
def test_llama_quantize_uses_our_imatrix(work, source):
    imatrix = work["ours"]
    if source == "fisher":
        imatrix = work["dir"] / "ours-fisher.gguf"
        assert main(["imatrix", str(work["stats"]), "-o", str(imatrix), "--from", "fisher"]) == 0
    n = len(read_imatrix(imatrix).entries)
    plain, _ = _quantize(work, None, f"q4k-plain-{source}.gguf")
    with_im, log = _quantize(work, imatrix, f"q4k-{source}.gguf")
    assert f"loaded {n} importance matrix entries" in log
    assert "did not find weights for blk." not in log
    changed = [k for k in plain if k.startswith("blk.") and not np.array_equal(plain[k], with_im[k])]
    assert len(changed) >= 10, changed  # the importance changed the Q4_K encodings of the block weights
    # and the file runs
    res = subprocess.run([str(tool_path("llama-completion")), "-m", str(work["dir"] / f"q4k-{source}.gguf"), "-p",
                          "the world", "-n", "4", "-no-cnv", "--temp", "0", "-t", "2"], capture_output=True,
                         text=True, errors="replace", timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]


def test_imatrix_cli_shows_a_file(work, capsys):
    assert main(["imatrix", str(work["theirs"])]) == 0
    out = capsys.readouterr().out
    assert "blk.0.ffn_down.weight" in out and f"chunks {CHUNKS} × {CTX}" in out


def test_not_an_imatrix_is_a_clear_error(work, tmp_path):
    with pytest.raises(QggufError, match="not a llama.cpp imatrix|no <name>.in_sum2"):
        read_imatrix(work["f32"])  # a model GGUF has F32 tensors but no in_sum2
    junk = tmp_path / "junk.dat"
    junk.write_bytes(b"\x01\x00")
    with pytest.raises(QggufError, match="neither a GGUF nor a legacy"):
        read_imatrix(junk)
    with pytest.raises(QggufError, match="does not exist"):
        read_imatrix(tmp_path / "missing.gguf")
