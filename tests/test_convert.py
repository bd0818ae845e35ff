"""`qgguf convert` end to end on a tiny random Llama: the file fits the budget, has the planned types (read back by
gguf-py), runs in the built llama.cpp, is reproducible, and stock llama-quantize reproduces a stock plan."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from qgguf.assets.tiny import make_tiny_llama, tiny_text
from qgguf.llamacpp.build import tool_path


def qgguf(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qgguf", *args], capture_output=True, text=True)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, llama_build):
    d = tmp_path_factory.mktemp("convert")
    model = make_tiny_llama(d / "model", seed=3)
    text = d / "calib.txt"
    text.write_text(tiny_text(seed=1))
    stats = d / "stats.safetensors"
    res = qgguf("calibrate", str(model), "-o", str(stats), "--text", str(text), "--tokens", "1024",
                "--seq-len", "128")
    assert res.returncode == 0, res.stderr[-2000:]
    return model, stats, d


@pytest.fixture(scope="module")
def converted(setup):
    model, stats, d = setup
    out = d / "q45.gguf"
    res = qgguf("convert", str(model), "-o", str(out), "--target-bpw", "4.5", "--stats", str(stats))
    assert res.returncode == 0, res.stderr[-3000:]
    return out, res.stdout, res.stderr


def test_file_matches_plan_and_budget(converted):
    import gguf

    out, stdout, stderr = converted
    plan = json.loads(out.with_name("q45.plan.json").read_text())
    types = {t["name"]: t["type"] for t in plan["tensors"]}
    r = gguf.GGUFReader(out)
    seen = {t.name: t.tensor_type.name for t in r.tensors}
    for name, typ in types.items():
        assert seen[name] == typ
    assert len(set(types.values())) > 1, "a mixed plan was expected at 4.5 bpw"
    data_bits = 8 * sum(int(t.n_bytes) for t in r.tensors)
    bpw = data_bits / sum(int(t.n_elements) for t in r.tensors)
    assert 4.2 < bpw <= 4.5
    assert "predicted KL" in stdout
    assert out.with_name("q45.heatmap.png").stat().st_size > 1000
    # one file size everywhere, the written file's: the summary, the plan JSON and the closing line
    size = out.stat().st_size
    assert plan["totals"]["file_bytes"] == size
    assert f"file size         {size:,} bytes" in stdout and f"({size:,} bytes)" in stdout
    # each stage says its time as it ends, and the total names them all
    for stage in ("calibrate", "convert to F32 GGUF", "measure", "plan", "export"):
        assert re.search(rf"^qgguf: {stage}: \d+\.\d s \(CPU \d+\.\d s\)$", stderr, re.MULTILINE), stage
    total = re.search(r"^qgguf: total (\d+\.\d) s \(CPU [\d.]+ s\): calibrate .* export [\d.]+ s$", stderr, re.MULTILINE)
    assert total and float(total.group(1)) > 0
    assert "No CUDA runtime" not in stderr


def test_runs_in_llama_cpp_with_low_kld(converted, setup):
    """llama-perplexity measures the KL divergence of our file to the F32 model."""
    model, _, d = setup
    out, *_ = converted
    text = d / "eval.txt"
    text.write_text(tiny_text(seed=7))
    f32 = d / "f32.gguf"
    assert qgguf("convert-hf", str(model), "-o", str(f32)).returncode == 0
    ppl = str(tool_path("llama-perplexity"))
    base = d / "base.kld"
    common = ["-f", str(text), "-c", "128", "--chunks", "8", "-t", "2"]
    r = subprocess.run([ppl, "-m", str(f32), "--kl-divergence-base", str(base), *common],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    r = subprocess.run([ppl, "-m", str(out), "--kl-divergence-base", str(base), "--kl-divergence", *common],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    line = next(l for l in (r.stdout + r.stderr).splitlines() if l.startswith("Mean    KLD:"))
    kld = float(line.split()[2])
    assert 0 < kld < 0.2


def test_byte_identical_on_rerun(converted, setup):
    model, stats, d = setup
    out, *_ = converted
    again = d / "again.gguf"
    res = qgguf("convert", str(model), "-o", str(again), "--target-bpw", "4.5", "--stats", str(stats))
    assert res.returncode == 0, res.stderr[-2000:]
    assert again.read_bytes() == out.read_bytes()


def test_encode_cache_gives_the_same_bytes(converted, setup):
    """--encode-cache: the first run fills the cache, the second reads it; both files equal the uncached one,
    and a damaged entry is encoded again rather than served."""
    model, stats, d = setup
    out, *_ = converted
    cache = d / "encoded"
    args = ["--target-bpw", "4.5", "--stats", str(stats), "--encode-cache", str(cache)]
    first = d / "cached1.gguf"
    assert qgguf("convert", str(model), "-o", str(first), *args).returncode == 0
    entries = sorted(cache.rglob("*.bin"))
    assert entries, "the cache was not filled"
    assert first.read_bytes() == out.read_bytes()
    stamps = {p: p.stat().st_mtime_ns for p in entries}
    good = entries[0].read_bytes()
    entries[0].write_bytes(good[:-1])  # damaged: one byte short
    second = d / "cached2.gguf"
    assert qgguf("convert", str(model), "-o", str(second), *args).returncode == 0
    assert second.read_bytes() == out.read_bytes()
    assert sorted(cache.rglob("*.bin")) == entries
    assert entries[0].read_bytes() == good, "the damaged entry should be encoded again"
    rewritten = [p for p in entries if p.stat().st_mtime_ns != stamps[p]]
    assert rewritten == [entries[0]], "intact entries should be read, not encoded again"
    # a damaged entry of the right size: its digest no longer matches, so it is encoded again too
    flipped = bytearray(entries[1].read_bytes())
    flipped[0] ^= 0xFF
    entries[1].write_bytes(bytes(flipped))
    third = d / "cached3.gguf"
    assert qgguf("convert", str(model), "-o", str(third), *args).returncode == 0
    assert third.read_bytes() == out.read_bytes()
    assert entries[1].read_bytes() != bytes(flipped)


def test_stock_llama_quantize_reproduces_plan(converted, setup):
    import gguf

    model, _, d = setup
    out, *_ = converted
    f32 = d / "f32-lq.gguf"
    assert qgguf("convert-hf", str(model), "-o", str(f32)).returncode == 0
    lq = d / "lq.gguf"
    r = subprocess.run([str(tool_path("llama-quantize")), "--tensor-type-file",
                        str(out.with_name("q45.tensor-types.txt")), str(f32), str(lq), "Q8_0", "2"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    ours = {t.name: t.tensor_type for t in gguf.GGUFReader(out).tensors}
    theirs = {t.name: t.tensor_type for t in gguf.GGUFReader(lq).tensors}
    assert ours == theirs


def test_infeasible_budget_names_the_range(setup, tmp_path):
    model, stats, _ = setup
    out = tmp_path / "x.gguf"
    res = qgguf("convert", str(model), "-o", str(out), "--target-bpw", "1.0", "--stats", str(stats))
    assert res.returncode != 0 and "Traceback" not in res.stderr
    assert "smallest" in res.stderr and "largest" in res.stderr
    assert not out.exists()


def test_unknown_override_type(setup, tmp_path):
    model, stats, _ = setup
    out = tmp_path / "x.gguf"
    res = qgguf("convert", str(model), "-o", str(out), "--target-bpw", "5", "--stats", str(stats),
                "--tensor-type", "ffn_down=Q9_K")
    assert res.returncode != 0 and "Q9_K" in res.stderr and "Traceback" not in res.stderr
    assert not out.exists()


def test_stats_from_another_model(setup, tmp_path):
    _, stats, d = setup
    other = make_tiny_llama(tmp_path / "other", seed=11)
    out = tmp_path / "x.gguf"
    res = qgguf("convert", str(other), "-o", str(out), "--target-bpw", "5", "--stats", str(stats))
    assert res.returncode != 0 and "another model" in res.stderr
    assert not out.exists()


def test_output_equal_to_input(setup):
    model, stats, _ = setup
    res = qgguf("convert", str(model), "-o", str(model / "model.safetensors"), "--target-bpw", "5",
                "--stats", str(stats))
    assert res.returncode != 0 and "is the input" in res.stderr and "Traceback" not in res.stderr
    assert (model / "model.safetensors").stat().st_size > 1000


def test_encode_cache_not_a_folder(setup, tmp_path):
    """A --encode-cache that cannot be a folder fails before any work, with one message and no output file."""
    model, stats, _ = setup
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    out = tmp_path / "x.gguf"
    res = qgguf("convert", str(model), "-o", str(out), "--target-bpw", "5", "--stats", str(stats),
                "--encode-cache", str(blocker / "cache"))
    assert res.returncode != 0 and "--encode-cache" in res.stderr and "Traceback" not in res.stderr
    assert not out.exists() and blocker.read_text() == "not a folder"


def test_side_files_are_one_unit_and_a_stale_type_file_goes(setup, tmp_path):
    """The GGUF, plan, heat map (and, for a stock plan, the tensor-type file) appear together; an extended-palette
    plan written over a stock one removes the stock plan's tensor-type file, which would describe another plan."""
    model, stats, _ = setup
    out = tmp_path / "m.gguf"
    side = {x: tmp_path / f"m{x}" for x in (".plan.json", ".heatmap.png", ".tensor-types.txt")}
    assert qgguf("convert", str(model), "-o", str(out), "--target-bpw", "4.5", "--stats", str(stats)).returncode == 0
    assert out.is_file() and all(p.is_file() for p in side.values())
    res = qgguf("convert", str(model), "-o", str(out), "--target-bpw", "3.5", "--stats", str(stats),
                "--palette", "extended", "--min-type", "NL3_XS", "--max-type", "NL5_XS")
    assert res.returncode == 0, res.stderr[-2000:]
    plan = json.loads(side[".plan.json"].read_text())
    assert any(t["type"].startswith("NL") for t in plan["tensors"])
    assert not side[".tensor-types.txt"].exists()
    # a failure after the plan (a budget no type mix can meet) leaves no new file and keeps the earlier set intact
    before = {p: p.read_bytes() for p in [out, side[".plan.json"]]}
    res = qgguf("convert", str(model), "-o", str(out), "--target-bpw", "1.0", "--stats", str(stats))
    assert res.returncode != 0 and "Traceback" not in res.stderr
    assert {p: p.read_bytes() for p in before} == before
    assert not list(tmp_path.glob(".*.partial"))


def test_bad_device_fails_before_any_work(setup, tmp_path):
    model, stats, _ = setup
    out = tmp_path / "x.gguf"
    for device, words in (("tpu", "is not auto, cpu or cuda"), ("cuda", "CUDA")):
        res = qgguf("convert", str(model), "-o", str(out), "--target-bpw", "5", "--stats", str(stats),
                    "--device", device)
        if device == "cuda" and res.returncode == 0:
            continue  # a machine with a GPU: cuda is a valid device there
        assert res.returncode != 0 and words in res.stderr and "Traceback" not in res.stderr
        assert len(res.stderr.strip().splitlines()) == 1, res.stderr
        assert not out.exists()


def test_small_kquant_work_encodes_eagerly(monkeypatch):
    """Below COMPILE_MIN_WEIGHTS measured K-quant weights, convert turns compiling off for the run (same bytes,
    less CPU than a cold compile); QGGUF_COMPILE set by the user always wins."""
    from qgguf.convert import COMPILE_MIN_WEIGHTS, _compile_choice, _kquant_weights

    monkeypatch.delenv("QGGUF_COMPILE", raising=False)
    monkeypatch.setenv("QGGUF_ENCODER", "torch")  # the choice concerns the torch kernels (ggml's compile nothing)
    smollm2_down = (576, 1536)  # rows, row length: K-quants take it; 576-long rows they cannot
    assert _kquant_weights([smollm2_down, (1536, 576), (49152, 576)], 1024) == 576 * 1536
    assert _kquant_weights([(4096, 1536)], 1024) == 1024 * 1536 and _kquant_weights([(4096, 1536)], 0) == 4096 * 1536
    with _compile_choice(["Q8_0", "Q4_K"], "cpu", 576 * 1536) as key:
        assert key is None and os.environ["QGGUF_COMPILE"] == "0"
    assert "QGGUF_COMPILE" not in os.environ  # only for the run
    with _compile_choice(["Q8_0", "Q4_K"], "cpu", COMPILE_MIN_WEIGHTS) as key:
        assert key and key.startswith("cpu:") and "QGGUF_COMPILE" not in os.environ
    with _compile_choice(["Q8_0", "Q4_0"], "cpu", COMPILE_MIN_WEIGHTS) as key:
        assert key is None  # no K-quant in the palette: nothing compiles
    monkeypatch.setenv("QGGUF_COMPILE", "1")
    with _compile_choice(["Q4_K"], "cpu", 1) as key:
        assert key and os.environ["QGGUF_COMPILE"] == "1"


def test_ggml_engine_compiles_nothing(monkeypatch, llama_build):
    """On a CPU with the build, ggml's quantiser encodes (formats/engines.py): however much K-quant work, no compile."""
    from qgguf.convert import COMPILE_MIN_WEIGHTS, _compile_choice

    monkeypatch.delenv("QGGUF_COMPILE", raising=False)
    monkeypatch.delenv("QGGUF_ENCODER", raising=False)
    with _compile_choice(["Q8_0", "Q4_K"], "cpu", 10 * COMPILE_MIN_WEIGHTS) as key:
        assert key is None


def test_torch_and_ggml_engines_write_the_same_file(converted, setup):
    """The default CPU run encodes with ggml's quantiser; the torch kernels must give the same file, byte for byte
    (measure and export both change engine)."""
    model, stats, d = setup
    out, *_ = converted
    torch_out = d / "torch-engine.gguf"
    env = dict(os.environ, QGGUF_ENCODER="torch")
    res = subprocess.run([sys.executable, "-m", "qgguf", "convert", str(model), "-o", str(torch_out), "--target-bpw",
                          "4.5", "--stats", str(stats)], capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    assert torch_out.read_bytes() == out.read_bytes()


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_cuda_without_cuda_fails_before_any_stage(setup, tmp_path):
    model, _, _ = setup
    out = tmp_path / "x.gguf"
    res = qgguf("convert", str(model), "-o", str(out), "--target-bpw", "4.5", "--device", "cuda")
    assert res.returncode != 0 and "torch sees no CUDA device" in res.stderr
    assert "calibrating" not in res.stderr and "Traceback" not in res.stderr and not list(tmp_path.iterdir())
