"""`qgguf fetch` and de-gridding: pinned hashes, corruption handling, clean texts, dither bounds, HF round trip.

Network use is small: the exllamav2 wheel (1.5 MB, twice) and the janeaustenr .deb (1.6 MB). No model is
downloaded: de-gridding is checked on the tiny Llama, quantised by the built llama-quantize.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from qgguf.assets import fetch as assets
from qgguf.errors import QggufError
from qgguf.hashing import sha256_file


def run_cli(*args: str, cache: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, QGGUF_CACHE=str(cache))
    return subprocess.run([sys.executable, "-m", "qgguf", *args], env=env, capture_output=True, text=True)


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """A private, empty cache for this test (library calls and CLI runs alike)."""
    root = tmp_path / "cache"
    monkeypatch.setenv("QGGUF_CACHE", str(root))
    return root


# ---------------------------------------------------------------------------------------------------- CLI

def test_unknown_asset_is_a_clear_error(cache):
    res = run_cli("fetch", "wiki", "no-such-model", cache=cache)
    assert res.returncode != 0
    assert "unknown asset 'no-such-model'" in res.stderr and "smollm2-135m" in res.stderr
    assert "Traceback" not in res.stderr
    assert not (cache / "assets" / "wiki" / "wiki.txt").exists()  # names are checked before any download
    with pytest.raises(QggufError, match="unknown asset"):
        assets.asset_path("no-such-model")


def test_missing_asset_names_the_fetch_command(cache):
    with pytest.raises(QggufError, match=r"run `qgguf fetch austen`"):
        assets.asset_path("austen")


def test_wiki_fetch_reuse_and_corruption(cache):
    res = run_cli("fetch", "wiki", cache=cache)
    assert res.returncode == 0, res.stderr
    name, path = res.stdout.strip().split("\t")
    path = Path(path)
    assert name == "wiki" and path == assets.asset_path("wiki")
    assert sha256_file(path) == assets.WIKI_TXT_SHA256
    text = path.read_text(encoding="utf-8")
    assert len(text) > 1_500_000
    for markup in ("<doc", "</doc>", "[[", "]]", "&amp;", "&lt;", "Category:"):
        assert markup not in text, markup
    assert "2007 European Parliament election in Romania\n\nRomania elected" in text

    # A second run verifies and reuses: nothing is fetched, the file is untouched.
    mtime = path.stat().st_mtime_ns
    res = run_cli("fetch", "wiki", cache=cache)
    assert res.returncode == 0 and "fetching" not in res.stderr
    assert path.stat().st_mtime_ns == mtime

    # Corrupt the cached file: lookups refuse it, naming the file and the fix; the next fetch detects it,
    # says so and fetches it again.
    with open(path, "r+b") as f:
        f.seek(1000)
        f.write(b"XXXX")
    with pytest.raises(QggufError, match=r"wiki\.txt is corrupt .*run `qgguf fetch wiki`"):
        assets.asset_path("wiki")
    res = run_cli("fetch", "wiki", cache=cache)
    assert res.returncode == 0, res.stderr
    assert "wiki.txt is corrupt" in res.stderr and "fetching wiki again" in res.stderr
    assert sha256_file(path) == assets.WIKI_TXT_SHA256


def test_download_with_wrong_hash_is_rejected(tmp_path):
    """A registry file that does not match its pin is refused, and nothing is left at the output path."""
    wrong = assets.Wheel(assets.EXLLAMAV2_WHEEL.package, assets.EXLLAMAV2_WHEEL.version,
                         assets.EXLLAMAV2_WHEEL.wheel_sha256, assets.EXLLAMAV2_WHEEL.member, "0" * 64)
    out = tmp_path / "wiki.utf8"
    with pytest.raises(QggufError, match=r"wiki\.utf8 in exllamav2-0\.3\.2-py3-none-any\.whl has sha256 d53fe0a"
                                         r".*expected 0000"):
        assets.wheel_member(wrong, out, tmp_path)
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == [], "no partial or temporary files left"


def test_austen_fetch(cache):
    res = run_cli("fetch", "austen", cache=cache)
    assert res.returncode == 0, res.stderr
    path = assets.asset_path("austen")
    assert sha256_file(path) == assets.AUSTEN_TXT_SHA256
    text = path.read_text(encoding="utf-8")
    assert text.startswith("SENSE AND SENSIBILITY\n\n")
    pos = 0
    for title in ("PRIDE AND PREJUDICE", "MANSFIELD PARK", "EMMA", "NORTHANGER ABBEY", "Persuasion"):
        found = text.find(f"\n\n{title}\n\n", pos)  # each novel opens with its title paragraph, in order
        assert found > pos, title
        pos = found
    assert "It is a truth universally acknowledged, that a single man in possession of a good fortune, " \
           "must be in want of a wife." in text  # a paragraph wrapped over two source lines, joined
    assert "\n\n\n" not in text and "  " not in text


# ---------------------------------------------------------------------------------------------------- texts

def test_clean_wiki_markup():
    raw = ('<doc id="1" url="u" title="T">\nT\n\nA [[Link target|label]] and [[Plain]]; &quot;x&quot; &amp; y.\n'
           "In the [[Walker Art Gallery], Liverpool [sic].\n"
           "[[File:a.jpg|thumb|The 1856 watercolour, [[Tate Britain]]]]\n"
           "External links.\n[[Category:Things]]\n[[Category:Other things]]\n\n</doc>\n"
           '<doc id="2" url="v" title="U">\nU\n\nSecond.\n</doc>\n')
    assert assets.clean_wiki(raw) == ('T\n\nA label and Plain; "x" & y.\nIn the Walker Art Gallery, Liverpool [sic].\n'
                                      "External links.\n\nU\n\nSecond.\n")


def test_austen_paragraphs_joined():
    novels = {n: np.array([]) for n in assets.AUSTEN_NOVELS}
    novels["emma"] = np.array(["EMMA", "", "", "Emma Woodhouse, handsome,", "clever.  And rich.", "", "End"])
    assert assets.austen_text(novels) == "EMMA\n\nEmma Woodhouse, handsome, clever. And rich.\n\nEnd\n"


# ---------------------------------------------------------------------------------------------------- de-gridding

@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"])
def test_level_spacing_simple_types(qtype):
    """Dither stays within ±½ of the block's level spacing |d|, so the de-gridded value rounds back to the grid."""
    import gguf
    from gguf.quants import dequantize, quantize

    from qgguf.assets.degrid import level_spacing

    t = gguf.GGMLQuantizationType[qtype]
    x = np.random.default_rng(1).normal(size=(64, 256)).astype(np.float32)
    raw = quantize(x, t)
    blocks = raw.reshape(-1, gguf.GGML_QUANT_SIZES[t][1])
    grid = dequantize(blocks, t)  # [nb, 32]
    spacing, sub = level_spacing(blocks, t)
    assert sub == 32 and spacing.shape == (len(blocks), 1)
    # The spacing is the distance between neighbouring levels: every value is an integer number of steps apart.
    steps = (grid - grid.min(axis=1, keepdims=True)) / spacing
    assert np.allclose(steps, np.round(steps), atol=1e-3)
    assert np.all(spacing > 0)
    # ... and no coarser: the blocks span most of the type's levels (a multiple of |d| would span fewer).
    levels = {"Q4_0": 16, "Q4_1": 16, "Q5_0": 32, "Q5_1": 32, "Q8_0": 256}[qtype]
    assert np.median(steps.max(axis=1)) >= levels / 2 - 1


@pytest.fixture(scope="module")
def tiny_q4km(tiny_llama, llama_build, tmp_path_factory) -> Path:
    """The tiny Llama as a Q4_K_M GGUF (Q4_K and Q6_K tensors, F32 norms), made by the built llama-quantize."""
    from qgguf.llamacpp.build import tool_path
    from qgguf.llamacpp.converter import convert_hf

    d = tmp_path_factory.mktemp("tiny-q4km")
    f32 = convert_hf(tiny_llama, d / "tiny-f32.gguf", "f32")
    out = d / "tiny-q4_k_m.gguf"
    res = subprocess.run([str(tool_path("llama-quantize", cuda=False)), str(f32), str(out), "Q4_K_M", "2"],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    return out


def test_degrid_k_quants_bounded_and_seeded(tiny_q4km):
    import gguf
    from gguf.quants import dequantize

    from qgguf.assets.degrid import degrid_tensor, level_spacing

    reader = gguf.GGUFReader(tiny_q4km)
    seen = set()
    for t in reader.tensors:
        y = degrid_tensor(t, seed=7)
        assert y.dtype == np.float32 and y.shape == tuple(int(n) for n in reversed(t.shape))
        x = dequantize(t.data, t.tensor_type).reshape(y.shape)
        if t.tensor_type == gguf.GGMLQuantizationType.F32:
            assert np.array_equal(x, y)  # norms are not on a grid: untouched
            continue
        seen.add(t.tensor_type.name)
        blocks = np.asarray(t.data).reshape(-1, gguf.GGML_QUANT_SIZES[t.tensor_type][1])
        spacing, sub = level_spacing(blocks, t.tensor_type)
        step = np.repeat(spacing, sub, axis=1).reshape(y.shape)
        u = (y - x)[step > 0] / step[step > 0]
        assert np.all(np.abs(u) <= 0.5 + 1e-4), t.name
        assert abs(u.std() - 12 ** -0.5) < 0.02 and abs(u.mean()) < 0.02, t.name  # uniform over the step
        assert np.array_equal(y, degrid_tensor(t, seed=7))  # same seed, same values
        assert not np.array_equal(y, degrid_tensor(t, seed=8))
    assert {"Q4_K", "Q6_K"} <= seen


def test_degrid_to_hf_round_trip(tiny_q4km, tmp_path):
    """The HF folder loads with transformers and converts back (llama.cpp's converter) to exactly the de-gridded
    values: transformers and the converter undo each other's names and Q/K permutation."""
    import gguf
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qgguf.assets.degrid import degrid_tensor, degrid_to_hf, tensor_digest
    from qgguf.llamacpp.converter import convert_hf

    out = degrid_to_hf(tiny_q4km, tmp_path / "tiny-degrid", seed=3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny-degrid"]  # the work folder is gone
    manifest = assets.read_manifest(out)
    assert manifest["degrid_seed"] == 3 and manifest["tensor_sha256"] == tensor_digest(out)
    assert "model.safetensors" in manifest["files"] and "tokenizer.json" in manifest["files"]

    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok("the old man said", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()

    back = convert_hf(out, tmp_path / "back.gguf", "f32")
    src = {t.name: t for t in gguf.GGUFReader(tiny_q4km).tensors}
    got = {t.name: t for t in gguf.GGUFReader(back).tensors}
    assert set(got) == set(src)
    for name, t in got.items():
        assert np.array_equal(np.asarray(t.data), degrid_tensor(src[name], seed=3)), name

    # Deterministic: the same seed gives byte-identical safetensors.
    again = degrid_to_hf(tiny_q4km, tmp_path / "again", seed=3)
    assert sha256_file(again / "model.safetensors") == sha256_file(out / "model.safetensors")
