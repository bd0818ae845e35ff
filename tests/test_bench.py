"""`qgguf bench` on the tiny model: the tools' real output parsed, rows resumed after an interruption, the
report and docs section written, and the interpolation along a curve. The full bench is a benchmark, not a test."""

from __future__ import annotations

import copy
import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qgguf.assets.tiny import tiny_text
from qgguf.bench.config import BenchConfig, Source
from qgguf.bench.pareto import bpw_at_kld, kld_at_bpw, pareto_front, rate_gap, savings
from qgguf.bench.reference import gguf_sizes
from qgguf.bench.report import update_docs
from qgguf.bench.rows import Row, auto_targets, convert_help, extended_palette_exists, load_row, qgguf_rows
from qgguf.cli import main
from qgguf.errors import QggufError
from qgguf.llamacpp import toolout

CTX, CHUNKS = 128, 8


@pytest.fixture(scope="module")
def texts(tmp_path_factory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("texts")
    ev, cal = d / "eval.txt", d / "calib.txt"
    ev.write_text(tiny_text(seed=1))  # the tokenizer was trained on seed 0; both texts are new to it
    cal.write_text(tiny_text(seed=2))
    return ev, cal


def bench_args(model: Path, texts, out: Path, cache: Path, *extra: str) -> list[str]:
    return ["bench", str(model), "--text", str(texts[0]), "--calib", str(texts[1]), "--ctx", str(CTX),
            "--chunks", str(CHUNKS), "--imatrix-chunks", str(CHUNKS), "-t", "2", "--targets", "--palettes",
            "stock", "-o", str(out), "--cache", str(cache), "--attempts", "10", *extra]


@pytest.fixture(scope="module")
def first_run(tiny_llama, llama_build, texts, tmp_path_factory):
    """One bench: Q4_K_M and Q6_K with the imatrix and without; qgguf at Q4_K_M's size; quantised files kept."""
    root = tmp_path_factory.mktemp("bench")
    out, cache = root / "out", root / "cache"
    args = bench_args(tiny_llama, texts, out, cache, "--presets", "Q4_K_M", "Q6_K", "--plain-rows", "--keep-gguf",
                      "--sizes", "Q4_K_M", "--calib-tokens", "1024", "--convert-arg=--max-rows=64")
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "qgguf", *args], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"out": out, "cache": cache, "stderr": proc.stderr, "stdout": proc.stdout, "seconds": time.time() - t0,
            "results": json.loads((out / "results.json").read_text())}


def _ref_files(cache: Path) -> tuple[Path, Path]:
    (folder,) = [p for p in cache.iterdir() if p.is_dir()]
    (f32,) = folder.glob("f32-*.gguf")
    (logits,) = folder.glob("logits-*.kld")
    return f32, logits


def _run(cmd: list) -> str:
    res = subprocess.run([str(c) for c in cmd], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    return res.stderr + "\n" + res.stdout


# ------------------------------------------------------------------------------------------ parsers, real output
def test_kld_parser_on_real_output(first_run, llama_build):
    from qgguf.llamacpp.build import tool_path

    f32, logits = _ref_files(first_run["cache"])
    q4 = first_run["out"] / "gguf" / "stock-imatrix-Q4_K_M.gguf"
    ppl = tool_path("llama-perplexity", cuda=False)
    for _ in range(10):  # the tool's asynchronous log may drop its last lines at exit: take a complete run
        text = _run([ppl, "-m", q4, "--kl-divergence-base", logits, "--kl-divergence", "-c", CTX, "-t", 2, "-lv", 4])
        try:
            k = toolout.parse_kl_divergence(text)
            break
        except toolout.ToolOutputIncomplete:
            continue
    else:
        pytest.fail("ten llama-perplexity runs in a row lost their statistics block")
    assert k.chunks == CHUNKS and k.tokens_per_chunk == CTX - 1 - CTX // 2
    last_chunk, last_mean, last_err = toolout.kld_chunk_rows(text)[-1]
    assert last_chunk == CHUNKS and last_mean == pytest.approx(k.kld_mean, abs=1e-5)  # table: running means
    assert 0 < k.kld_median <= k.kld_p90 <= k.kld_p95 <= k.kld_p99 <= k.kld_p999 <= k.kld_max
    assert k.kld_mean_err < k.kld_mean
    assert k.ppl_ratio == pytest.approx(k.ppl / k.ppl_base, rel=1e-4)
    assert 0 < k.same_top_p < 100 and k.same_top_p_err > 0
    # The same file measured by the bench gives the same numbers: same machine, same text and the same -t 2 as
    # the bench's run, so exact equality holds (across thread counts or machines it need not).
    row = json.loads((first_run["out"] / "rows" / "stock-imatrix-Q4_K_M.json").read_text())
    assert row["kld"] == k.to_dict()
    # llama.cpp's own BPW (2 decimals) is what gguf_sizes computes from the tensors.
    info = toolout.parse_model_info(text)
    sizes = gguf_sizes(q4)
    assert info.bpw == pytest.approx(sizes["bpw"], abs=0.006)
    assert info.tensor_types == sizes["tensor_types"]

    # The F32 model against its own logits: no divergence (up to the file's 16-bit log-probabilities).
    self_text = _run([ppl, "-m", f32, "--kl-divergence-base", logits, "--kl-divergence", "-c", CTX, "-t", 2])
    rows = toolout.kld_chunk_rows(self_text)
    assert rows and rows[-1][1] < 1e-3
    assert [r[0] for r in rows] == list(range(1, len(rows) + 1))


def test_cut_output_is_reported(first_run):
    """A log cut short at any line of the statistics block raises ToolOutputIncomplete naming what is missing."""
    text = (first_run["out"] / "logs" / "stock-imatrix-Q6_K.kld.log").read_text()
    toolout.parse_kl_divergence(text)  # the kept log is complete
    lines = text.splitlines()
    block = next(i for i, line in enumerate(lines) if "KL divergence statistics" in line)
    for cut in (block - 12, block + 2, block + 6):
        with pytest.raises(toolout.ToolOutputIncomplete) as e:
            toolout.parse_kl_divergence("\n".join(lines[:cut]))
        assert e.value.missing and "Same top p" in str(e.value)
    same = next(i for i, line in enumerate(lines) if line.startswith("Same top p"))
    with pytest.raises(toolout.ToolOutputIncomplete, match="Same top p"):
        toolout.parse_kl_divergence("\n".join(lines[:same]))


def test_quantize_and_bench_parsers_on_real_output(first_run, llama_build, tmp_path):
    from qgguf.llamacpp.build import tool_path

    f32, _ = _ref_files(first_run["cache"])
    log = (first_run["out"] / "logs" / "stock-imatrix-Q4_K_M.quantize.log").read_text()
    q = toolout.parse_quantize(log)
    sizes = gguf_sizes(first_run["out"] / "gguf" / "stock-imatrix-Q4_K_M.gguf")
    assert q.quant_bpw == pytest.approx(sizes["bpw"], abs=0.006)
    assert q.quant_mib == pytest.approx(sizes["tensor_bytes"] / 2**20, abs=0.006)
    assert q.model_bpw == 32.0
    assert q.tensor_types == sizes["tensor_types"]  # what it says it wrote is what the file holds

    speed_text = _run([tool_path("llama-bench", cuda=False), "-m", f32, "-p", 32, "-n", 8, "-r", 1, "-t", 2,
                       "-o", "json"])
    speeds = {s.test: s for s in toolout.parse_llama_bench_json(speed_text)}
    assert set(speeds) == {"pp32", "tg8"}
    assert all(s.tokens_per_s > 0 and s.repetitions == 1 and "CPU" in s.backends for s in speeds.values())

    with pytest.raises(toolout.ToolOutputIncomplete):
        toolout.parse_quantize(log[: log.index("quant size")])
    with pytest.raises(toolout.ToolOutputIncomplete):
        toolout.parse_llama_bench_json(speed_text[: len(speed_text) // 2])


# ------------------------------------------------------------------------------------------ the bench run
def test_bench_results(first_run, tiny_llama):
    res, out = first_run["results"], first_run["out"]
    ids = {r["id"] for r in res["rows"]}
    assert {"stock-imatrix-Q4_K_M", "stock-imatrix-Q6_K", "stock-plain-Q4_K_M", "stock-plain-Q6_K"} <= ids
    stock = {r["id"]: r for r in res["rows"] if r["kind"] == "stock"}
    q4, q6 = stock["stock-imatrix-Q4_K_M"], stock["stock-imatrix-Q6_K"]
    assert q4["file_bytes"] == (out / "gguf" / "stock-imatrix-Q4_K_M.gguf").stat().st_size
    assert q4["bpw"] < q6["bpw"] < 8 and q4["kld"]["kld_mean"] > q6["kld"]["kld_mean"] > 0
    assert q4["llama_bpw"] == pytest.approx(q4["bpw"], abs=0.006)
    assert q4["bpw_file"] > q4["bpw"]  # the header and tokenizer count in the file's bits
    # The KLD run's base PPL is recomputed from the logits file, which keeps each token's log-probabilities as
    # 16-bit steps of (max - min logit) / 65535: every token's NLL moves by up to half a step, and so the PPL's log.
    # The tiny model's logits span well under 20 nats, so the two PPLs agree to 20 / 131070 ≈ 1.5e-4 (seen: 3e-6).
    assert res["f32"]["bpw"] == 32.0
    assert res["f32"]["ppl"] == pytest.approx(q4["kld"]["ppl_base"], rel=1.5e-4)
    assert res["chunks"] == CHUNKS and res["scored_tokens"] == CHUNKS * (CTX - 1 - CTX // 2)
    assert res["machine"].endswith("CPU") and res["command"].startswith("qgguf bench ")

    # qgguf rows run when `qgguf convert` exists; until then they are skipped with the reason printed.
    help_text, why_not = convert_help()
    qrows = [r for r in res["rows"] if r["kind"] == "qgguf"]
    if help_text is None:
        assert not qrows and why_not == "qgguf convert not available"
        assert "skipping 1 qgguf row(s): qgguf convert not available" in first_run["stderr"]
        assert [s["id"] for s in res["skipped"]] == ["qgguf-stock-size-Q4_K_M"]
    else:
        (qr,) = qrows
        assert qr["id"] == "qgguf-stock-size-Q4_K_M" and not res["skipped"] and not res["failed"]
        assert qr["file_bytes"] <= q4["file_bytes"] and qr["target"]["value"] == q4["file_bytes"]
        assert qr["kld"]["kld_mean"] > 0 and qr["kld"]["chunks"] == CHUNKS
        plan = json.loads((out / qr["plan"]).read_text())  # the plan JSON is kept, and describes the file
        assert plan["totals"]["file_bytes"] <= q4["file_bytes"]
        assert plan["totals"]["bpw"] == pytest.approx(qr["bpw"], abs=0.01)
        # convert's plan JSON gives ΔKL and ΣF per tensor: the gap uses the Fisher-weighted MSE 2·ΔKL/ΣF
        assert qr["rate_gap"]["mean_gap_bits"] is not None and qr["rate_gap"]["mse_from"] == "2·ΔKL/ΣF"
        run = qr["convert_run"]  # convert's own rusage: its peak memory holds at least the F32 model's tensors
        assert run["peak_rss_mib"] > 0 and run["cpu_s"] > 0 and run["wall_s"] > 0
        assert all(len(r["load_avg"]) == 3 for r in res["rows"] if r["kind"] != "reference")
        (sv,) = [x for x in res["savings"] if x["preset"] == "Q4_K_M"]
        assert sv["curve"] == "qgguf (stock palette)"

    md = (out / "results.md").read_text()
    assert "| F32 | reference |" in md and "Q4_K_M" in md and "![mean KLD against bpw](pareto.png)" in md
    png = (out / "pareto.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert not list(out.rglob("*.partial"))
    # the summary on stdout names every measured row
    assert all(r["label"] in first_run["stdout"] for r in res["rows"])


def test_resume_after_interrupt(first_run, tiny_llama, texts, tmp_path):
    """Ctrl-C mid-bench keeps the finished rows (and no partial file); the rerun reuses them."""
    out = tmp_path / "out"
    args = bench_args(tiny_llama, texts, out, first_run["cache"], "--presets", "Q4_K_M", "Q6_K", "Q5_K_M",
                      "--no-qgguf")
    proc = subprocess.Popen([sys.executable, "-m", "qgguf", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not list((out / "rows").glob("*.json")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    finished = sorted(p.name for p in (out / "rows").glob("*.json"))
    assert proc.returncode == 130, err[-2000:]
    assert 1 <= len(finished) < 3
    assert not list(out.rglob("*.partial")) and not list((out / "gguf").glob("*"))
    kept = {n: (out / "rows" / n).read_bytes() for n in finished}

    res = subprocess.run([sys.executable, "-m", "qgguf", *args], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    assert f"reused {len(finished)} finished stock row(s)" in res.stderr
    assert {n: (out / "rows" / n).read_bytes() for n in finished} == kept  # reused, not re-measured
    assert len(list((out / "rows").glob("*.json"))) == 3

    # A row whose spec differs is measured again; --redo re-measures and gets the same numbers.
    row = json.loads((out / "rows" / "stock-imatrix-Q6_K.json").read_text())
    spec_row = Row("stock-imatrix-Q6_K", "stock", "Q6_K", "llama-quantize + imatrix", row["spec"])
    assert load_row(out, spec_row) is not None
    spec_row.spec = {**row["spec"], "chunks": CHUNKS + 1}
    assert load_row(out, spec_row) is None
    assert main(args + ["--redo", "stock-*-Q6_K"]) == 0
    again = json.loads((out / "rows" / "stock-imatrix-Q6_K.json").read_text())
    assert again["kld"] == row["kld"] and again["file_bytes"] == row["file_bytes"]


def test_update_docs_keeps_other_sections(first_run, tmp_path):
    docs = tmp_path / "docs" / "benchmarks.md"
    docs.parent.mkdir()
    docs.write_text("# Benchmarks\n\n## Someone else's section\n\nTheir numbers.\n")
    plot = first_run["out"] / "pareto.png"
    update_docs(first_run["results"], plot, docs)
    once = docs.read_text()
    update_docs(first_run["results"], plot, docs)  # again: the section is replaced, not added twice
    text = docs.read_text()
    assert text == once
    assert text.startswith("# Benchmarks\n\n## Someone else's section\n\nTheir numbers.\n")
    assert text.count("<!-- qgguf-bench:") == 2 and "## qgguf bench: " in text
    assert first_run["results"]["command"] in text and "-core" in text
    img = [line for line in text.splitlines() if line.startswith("![")][0]
    assert (docs.parent / img[img.index("(") + 1:-1]).is_file()
    # a row made by other code (another build of the tools, or other qgguf code) is not published
    for kind, field in (("stock", "tools"), ("qgguf", "code")):
        stale = copy.deepcopy(first_run["results"])
        row = next(r for r in stale["rows"] if r["kind"] == kind)
        row["spec"][field] = "0" * 16
        with pytest.raises(QggufError, match="other code than this checkout"):
            update_docs(stale, plot, docs)
    assert docs.read_text() == once


def test_bad_input_is_one_clear_error(tiny_llama, texts, tmp_path, capsys):
    assert main(["bench", str(tmp_path / "nope"), "-o", str(tmp_path / "o")]) == 2
    assert "is not a folder (or does not exist)" in capsys.readouterr().err
    assert main(bench_args(tiny_llama, texts, tmp_path / "o", tmp_path / "c", "--presets", "Q4_K_X")) == 2
    err = capsys.readouterr().err
    assert "Q4_K_X" in err and "Q4_K_M" in err and "Traceback" not in err
    assert main(bench_args(tiny_llama, texts, tmp_path / "o", tmp_path / "c", "--ctx", "127")) == 2
    stats = tmp_path / "s.safetensors"
    stats.write_bytes(b"x")
    assert main(bench_args(tiny_llama, texts, tmp_path / "o", tmp_path / "c", "--stats", str(stats),
                           "--rounding", "plain", "feedback")) == 2
    err = capsys.readouterr().err
    assert "--rounding feedback needs the input covariance" in err and "Traceback" not in err
    assert main(bench_args(tiny_llama, texts, tmp_path / "o", tmp_path / "c", "--covariance-weight", "gradient")) == 2
    err = capsys.readouterr().err
    assert "--covariance-weight gradient" in err and "--rounding feedback-on-plain" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------------------ interpolation
def test_interpolation_along_curve():
    # KLD = exp(-b): log-linear interpolation is exact for it.
    pts = [(b, math.exp(-b)) for b in (3.0, 4.0, 5.5, 7.0)]
    front = pareto_front(pts + [(4.5, 1.0), (5.0, math.exp(-3.5))])  # two dominated points are dropped
    assert front == sorted(pts)
    assert bpw_at_kld(front, math.exp(-4.7)) == pytest.approx(4.7)
    assert kld_at_bpw(front, 6.1) == pytest.approx(math.exp(-6.1))
    assert bpw_at_kld(front, math.exp(-2.0)) is None and bpw_at_kld(front, math.exp(-8.0)) is None
    s = {x.preset: x for x in savings([("A", 5.0, math.exp(-4.5)), ("B", 4.0, math.exp(-4.5)),
                                       ("C", 9.0, math.exp(-9.0))], "q", pts)}
    assert s["A"].saving_bpw == pytest.approx(0.5) and s["A"].saving_pct == pytest.approx(10.0)
    assert s["B"].saving_bpw == pytest.approx(-0.5)  # the curve needs more bits: a negative saving
    assert s["C"].saving_bpw is None and "outside the curve's range" in s["C"].reason


def test_rate_gap_from_plan():
    n1, n2 = 256 * 512, 256 * 256
    plan = {"tensors": [
        {"name": "a", "shape": [256, 512], "bpw": 4.5, "mse": 0.01 * 4 ** -4, "variance": 0.01},
        {"name": "b", "shape": [256, 256], "bytes": 256 * 256 * 6.5 / 8, "mse": 0.04 * 4 ** -6, "rms": 0.2},
        {"name": "c", "shape": [256], "bpw": 32.0},  # no MSE: left out, counted
    ]}
    g = rate_gap(plan)
    assert g["mean_gap_bits"] == pytest.approx((n1 * 0.5 + n2 * 0.5) / (n1 + n2))
    assert g["tensors"] == 2 and g["missing"] == 1 and g["variance_from"] == "rms²+variance"
    g = rate_gap({"tensors": [{"name": "a", "shape": [4, 4], "bpw": 4, "rms": 0.1}]})
    assert g["mean_gap_bits"] is None and g["reason"] == "the plan JSON has no per-tensor 'mse'"
    # convert's plan: no 'mse', but ΔKL = ½·ΣF·err gives the Fisher-weighted err = 2·ΔKL/ΣF
    g = rate_gap({"tensors": [{"name": "a", "shape": [16, 32], "bpw": 5.0, "rms": 0.1, "fisher_sum": 8.0,
                               "dkl": 0.5 * 8.0 * 0.01 * 4 ** -4}]})
    assert g["mean_gap_bits"] == pytest.approx(1.0) and g["mse_from"] == "2·ΔKL/ΣF"


def test_qgguf_rows_say_why_they_cannot_run(tmp_path):
    src = Source(tmp_path, "m", "0" * 64, "m")
    cfg = BenchConfig(model=src, text=src, calib=src, out=tmp_path, presets=("Q4_K_M", "Q6_K"),
                            targets=(4.0,), palettes=("stock", "extended"))
    stock = {"Q4_K_M": {"file_bytes": 123456}}
    rows = qgguf_rows(cfg, None, stock, {}, None, "qgguf convert not available")
    assert len(rows) == 6 and all(r.skip == "qgguf convert not available" for r in rows)
    rows = {r.id: r for r in qgguf_rows(cfg, None, stock, {}, "usage: convert --stats", "")}
    assert rows["qgguf-stock-size-Q4_K_M"].skip == "" and rows["qgguf-stock-size-Q4_K_M"].spec["value"] == 123456
    assert "Q6_K row did not finish" in rows["qgguf-stock-size-Q6_K"].skip
    assert rows["qgguf-stock-bpw-4.00"].skip == "" and rows["qgguf-stock-bpw-4.00"].spec["budget"] == "target-bpw"
    assert auto_targets({"Q2_K": {"bpw": 5.139}, "Q8_0": {"bpw": 8.506}}) == (4.5, 9.25)
    assert auto_targets({}) == ()
    ext = rows["qgguf-extended-bpw-4.00"].skip
    assert ext == "" if extended_palette_exists() else ext.startswith("the extended palette does not exist")


def test_qgguf_rows_per_rounding(tmp_path):
    """--rounding plain feedback: the plain rows keep their ids, series and spec; the feedback rows are a series
    of their own whose spec names the rounding and the covariance's digest and whose convert gets both."""
    src = Source(tmp_path, "m", "0" * 64, "m")
    cfg = BenchConfig(model=src, text=src, calib=src, out=tmp_path, presets=("Q4_K_M",), targets=(),
                      palettes=("stock",), roundings=("plain", "feedback"))
    plain_stats, fb_stats, cov = tmp_path / "p.safetensors", tmp_path / "f.safetensors", tmp_path / "cov"
    plain_stats.write_bytes(b"p")
    fb_stats.write_bytes(b"f")
    cov.mkdir()
    (cov / "index.json").write_text("{}")
    stats = {"plain": (plain_stats, None), "feedback": (fb_stats, cov)}
    rows = {r.id: r for r in qgguf_rows(cfg, None, {"Q4_K_M": {"file_bytes": 1000}}, {}, "usage: --stats", "",
                                        stats)}
    assert set(rows) == {"qgguf-stock-size-Q4_K_M", "qgguf-stock-feedback-size-Q4_K_M"}
    plain, fb = rows["qgguf-stock-size-Q4_K_M"], rows["qgguf-stock-feedback-size-Q4_K_M"]
    assert plain.series == "qgguf (stock palette)" and "rounding" not in plain.spec
    assert fb.series == "qgguf (stock palette, feedback rounding)" and fb.spec["rounding"] == "feedback"
    assert fb.spec["covariance"] and fb.spec["stats"] != plain.spec["stats"]

    ran = []

    class FakeTools:
        times = type("T", (), {"last_run": {}})()

        def run(self, cmd, *a, **k):
            ran.append(cmd)
            Path(cmd[cmd.index("-o") + 1]).write_bytes(b"g" * 10)

    qgguf_rows(cfg, FakeTools(), {"Q4_K_M": {"file_bytes": 1000}}, {}, "usage: --stats", "", stats)[1].make(
        tmp_path / "x.gguf")
    cmd = ran[-1]
    assert cmd[cmd.index("--rounding") + 1] == "feedback" and cmd[cmd.index("--covariance") + 1] == str(cov)
    assert cmd[cmd.index("--stats") + 1] == str(fb_stats)
    qgguf_rows(cfg, FakeTools(), {"Q4_K_M": {"file_bytes": 1000}}, {}, "usage: --stats", "", stats)[0].make(
        tmp_path / "y.gguf")
    assert "--rounding" not in ran[-1] and ran[-1][ran[-1].index("--stats") + 1] == str(plain_stats)
    assert "--rounding plain feedback" in cfg.command()
    from qgguf.bench.report import section_slug

    res = {"model": {"name": "SmolLM2-135M (de-gridded)"}, "text": {"name": "austen"}, "backend": "cpu"}
    assert section_slug(res) == section_slug({**res, "roundings": ["plain"]}) == "smollm2-135m-de-gridded-austen-cpu"
    assert section_slug({**res, "roundings": ["plain", "feedback"]}).endswith("-cpu-rounding-plain-feedback")


def test_docs_section_replaced_between_its_own_markers():
    """An `end` marker left before its `begin` (a hand-edited docs file) must not duplicate the section."""
    from qgguf.docs import replace_marked_section
    text = "head\n<e>\nmiddle\n<b>\nold\n<e>\ntail\n"
    assert replace_marked_section(text, "<b>", "<e>", "<b>\nnew\n<e>\n") == "head\n<e>\nmiddle\n<b>\nnew\n<e>\ntail\n"
    assert replace_marked_section("only <e> here", "<b>", "<e>", "x") is None


def test_feedback_rows_calibrate_the_held_out_split(tmp_path):
    """A bench with --rounding feedback|auto asks `qgguf calibrate` for the split covariance, cached apart from the
    plain covariance (feedback-on-plain alone does not need the split)."""
    import contextlib

    from qgguf.bench.rows import calibration_stats

    src = Source(tmp_path, "m", "0" * 64, "m")
    cfg = BenchConfig(model=src, text=src, calib=src, out=tmp_path, presets=("Q4_K_M",), targets=(),
                      palettes=("stock",), roundings=("plain", "feedback"), cache=tmp_path / "cache")
    ran = []

    class FakeTools:
        class times:
            @staticmethod
            def step(name):
                return contextlib.nullcontext()

        def run(self, cmd, *a, **k):
            ran.append(cmd)
            out = Path(cmd[cmd.index("-o") + 1])
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(b"s")
            cov = Path(cmd[cmd.index("--covariance") + 1])
            cov.mkdir(parents=True)
            (cov / "index.json").write_text("{}")

    _, split = calibration_stats(cfg, FakeTools(), "usage: --stats", covariance=True, split=True)
    assert "--covariance-split" in ran[-1] and split.name.endswith("-cov-split.covariance")
    _, plain = calibration_stats(cfg, FakeTools(), "usage: --stats", covariance=True)
    assert "--covariance-split" not in ran[-1] and plain != split
    calibration_stats(cfg, FakeTools(), "usage: --stats", covariance=True, split=True)
    assert len(ran) == 2  # cached
