"""`qgguf convert --rounding feedback|auto` end to end on a tiny random Llama: the plan records the rounding of every
tensor, export writes exactly the error-feedback bytes of that rounding (read back by gguf-py), the file runs in
the built llama-completion, and reruns are byte-identical (with and without the encode cache)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from qgguf import formats
from qgguf.assets.tiny import make_tiny_llama, tiny_text
from qgguf.llamacpp.build import tool_path


def qgguf(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qgguf", *map(str, args)], capture_output=True, text=True)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, llama_build):
    d = tmp_path_factory.mktemp("fbconvert")
    model = make_tiny_llama(d / "model", seed=3)
    text = d / "calib.txt"
    text.write_text(tiny_text(seed=1))
    res = qgguf("calibrate", model, "-o", d / "stats.safetensors", "--text", text, "--tokens", 1024, "--seq-len", 128,
                "--covariance", d / "cov", "--covariance-split")
    assert res.returncode == 0, res.stderr[-2000:]
    return model, d


def _convert(setup, name: str, *extra):
    model, d = setup
    out = d / f"{name}.gguf"
    res = qgguf("convert", model, "-o", out, "--target-bpw", 4.5, "--stats", d / "stats.safetensors",
                "--covariance", d / "cov", *extra)
    assert res.returncode == 0, res.stderr[-3000:]
    return out, json.loads(out.with_name(f"{name}.plan.json").read_text())


@pytest.fixture(scope="module")
def feedback_file(setup):
    return _convert(setup, "fb", "--rounding", "feedback")


def test_plan_records_the_rounding_and_export_writes_it(feedback_file, setup):
    import gguf

    from qgguf.calibrate.covariance import CovarianceStore
    from qgguf.calibrate.stats import load_stats
    from qgguf.export.writer import open_gguf, tensor_f32
    from qgguf.formats.feedback import Feedback

    model, d = setup
    out, plan = feedback_file
    rounding = {t["name"]: t["rounding"] for t in plan["tensors"]}
    types = {t["name"]: t["type"] for t in plan["tensors"]}
    for name, how in rounding.items():
        has_h = name != "token_embd.weight"
        assert how == ("feedback" if has_h and formats.get(types[name]).feedback else "plain"), name
    assert sum(h == "feedback" for h in rounding.values()) >= 10
    r = gguf.GGUFReader(out)
    written = {t.name: t for t in r.tensors}
    assert {n: written[n].tensor_type.name for n in types} == types
    assert r.fields["qgguf.rounding"].contents() == "feedback"

    # the bytes of a feedback tensor are those of Feedback.encode on the converter's weights with its H
    stats, store = load_stats(d / "stats.safetensors"), CovarianceStore(d / "cov")
    from qgguf.convert import converter_gguf
    from qgguf.models import model_sha256

    reader = open_gguf(converter_gguf(model, model_sha256(model)))
    checked = 0
    for t in reader.tensors:
        if rounding.get(t.name) != "feedback":
            continue
        fmt = formats.get(types[t.name])
        w = tensor_f32(t, "cpu", reader)
        imp = torch.from_numpy(stats[t.name].importance)
        # damped for the folder's token count, as export's
        fb = Feedback(store.get(t.name), t.name, tokens=store.tokens).encode(fmt, w, imp).numpy().reshape(-1)
        got = np.asarray(written[t.name].data).view(np.uint8).reshape(-1)
        assert np.array_equal(got, fb), t.name
        assert not np.array_equal(got, fmt.encode(w, imp).reshape(-1)), f"{t.name}: same bytes as plain rounding"
        checked += 1
        if checked == 3:
            break
    assert checked == 3


def test_feedback_file_runs_in_llama_completion(feedback_file):
    out, _ = feedback_file
    r = subprocess.run([str(tool_path("llama-completion")), "-m", str(out), "-p", "the old", "-n", "16", "-no-cnv",
                        "--temp", "0", "-t", "1"], capture_output=True, text=True, errors="replace",
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "the old" in r.stdout and len(r.stdout.strip()) > len("the old")


def test_reruns_are_byte_identical_and_auto_picks_per_tensor(feedback_file, setup):
    _, d = setup
    out, _ = feedback_file
    again, _ = _convert(setup, "fb2", "--rounding", "feedback", "--encode-cache", d / "enc")
    assert again.read_bytes() == out.read_bytes()
    cached, _ = _convert(setup, "fb3", "--rounding", "feedback", "--encode-cache", d / "enc")
    assert cached.read_bytes() == out.read_bytes()
    _, auto = _convert(setup, "auto", "--rounding", "auto")
    for t in auto["tensors"]:  # auto takes, for the chosen type, the rounding whose K-FAC ΔKL is lower
        assert t["rounding"] in ("plain", "feedback")
    assert any(t["rounding"] == "feedback" for t in auto["tensors"])
    _, pplan = _convert(setup, "plain")
    assert all(t["rounding"] == "plain" for t in pplan["tensors"])


def test_feedback_without_covariance_is_a_clear_error(setup, tmp_path):
    model, d = setup
    res = qgguf("convert", model, "-o", tmp_path / "x.gguf", "--target-bpw", 4.5, "--stats", d / "stats.safetensors",
                "--rounding", "feedback")
    assert res.returncode != 0 and "Traceback" not in res.stderr
    assert "--covariance DIR" in res.stderr
    assert not (tmp_path / "x.gguf").exists()
    for extra in (["--stats", d / "stats.safetensors", "--rounding", "feedback-on-plain"], []):
        res = qgguf("convert", model, "-o", tmp_path / "x.gguf", "--target-bpw", 4.5, "--covariance-weight",
                    "gradient", *extra)
        assert res.returncode == 2 and "Traceback" not in res.stderr
        assert "--covariance-weight gradient" in res.stderr and "drop it" in res.stderr
        assert not (tmp_path / "x.gguf").exists()


def test_feedback_on_plain_keeps_the_plain_plan_and_rounds_with_feedback(setup):
    """--rounding feedback-on-plain: the plain plan's types and predicted ΔKL, every tensor with an input covariance
    (and a type feedback rounding writes) rounded with feedback, the others' bytes as in the plain file; it runs."""
    import gguf

    plain, pplan = _convert(setup, "plain-ref")
    out, plan = _convert(setup, "fop", "--rounding", "feedback-on-plain")
    assert {t["name"]: t["type"] for t in plan["tensors"]} == {t["name"]: t["type"] for t in pplan["tensors"]}
    assert plan["totals"]["predicted_kl"] == pytest.approx(pplan["totals"]["predicted_kl"])
    rounding = {t["name"]: t["rounding"] for t in plan["tensors"]}
    types = {t["name"]: t["type"] for t in plan["tensors"]}
    for name, how in rounding.items():
        assert how == ("feedback" if name != "token_embd.weight" and formats.get(types[name]).feedback
                       else "plain"), name
    assert sum(h == "feedback" for h in rounding.values()) >= 10
    a, b = gguf.GGUFReader(plain), gguf.GGUFReader(out)
    assert b.fields["qgguf.rounding"].contents() == "feedback-on-plain"
    pa = {t.name: np.asarray(t.data).view(np.uint8).reshape(-1) for t in a.tensors}
    changed = 0
    for t in b.tensors:
        got = np.asarray(t.data).view(np.uint8).reshape(-1)
        if rounding.get(t.name) == "feedback":
            changed += not np.array_equal(got, pa[t.name])
        else:
            assert np.array_equal(got, pa[t.name]), f"{t.name}: a plain tensor changed"
    assert changed >= 10
    r = subprocess.run([str(tool_path("llama-completion")), "-m", str(out), "-p", "the old", "-n", "16", "-no-cnv",
                        "--temp", "0", "-t", "1"], capture_output=True, text=True, errors="replace", timeout=300)
    assert r.returncode == 0 and "the old" in r.stdout, r.stderr[-2000:]


def test_feedback_plans_with_the_held_out_error_and_says_when_it_cannot(setup, feedback_file, tmp_path):
    """A split covariance makes --rounding feedback plan with held-out errors; a folder without the split still
    works, with a line saying its errors are in-sample, and its plan predicts a lower ΔKL (the optimism)."""
    model, d = setup
    res = qgguf("calibrate", model, "-o", tmp_path / "stats.safetensors", "--text", d / "calib.txt", "--tokens", 1024,
                "--seq-len", 128, "--covariance", tmp_path / "cov")
    assert res.returncode == 0, res.stderr[-2000:]
    out = tmp_path / "insample.gguf"
    res = qgguf("convert", model, "-o", out, "--target-bpw", 4.5, "--stats", tmp_path / "stats.safetensors",
                "--covariance", tmp_path / "cov", "--rounding", "feedback")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "has no held-out split" in res.stderr
    _, held_plan = feedback_file
    in_plan = json.loads(out.with_suffix(".plan.json").read_text())
    assert in_plan["totals"]["predicted_kl"] < held_plan["totals"]["predicted_kl"]
    res = qgguf("convert", model, "-o", tmp_path / "held.gguf", "--target-bpw", 4.5, "--stats", d / "stats.safetensors",
                "--covariance", d / "cov", "--rounding", "feedback")
    assert res.returncode == 0 and "has no held-out split" not in res.stderr


def test_tied_embedding_is_rounded_with_feedback_through_the_heads_covariance(tmp_path, llama_build):
    """A tied embedding (one GGUF tensor, also the output head) has the head input's H: feedback-on-plain rounds it
    with feedback — the bytes of Feedback.encode with that H — and the file runs in llama.cpp."""
    import gguf

    from qgguf.calibrate.covariance import CovarianceStore
    from qgguf.calibrate.stats import load_stats
    from qgguf.convert import converter_gguf
    from qgguf.export.writer import open_gguf, tensor_f32
    from qgguf.formats.feedback import Feedback
    from qgguf.models import model_sha256

    model = make_tiny_llama(tmp_path / "model", seed=4, tie=True)
    text = tmp_path / "calib.txt"
    text.write_text(tiny_text(seed=2))
    res = qgguf("calibrate", model, "-o", tmp_path / "s.safetensors", "--text", text, "--tokens", 1024,
                "--seq-len", 128, "--covariance", tmp_path / "cov")
    assert res.returncode == 0, res.stderr[-2000:]
    out = tmp_path / "fop.gguf"
    res = qgguf("convert", model, "-o", out, "--target-bpw", 4.5, "--stats", tmp_path / "s.safetensors",
                "--covariance", tmp_path / "cov", "--rounding", "feedback-on-plain", "--max-type", "Q6_K")
    assert res.returncode == 0, res.stderr[-3000:]
    plan = {t["name"]: t for t in json.loads(out.with_name("fop.plan.json").read_text())["tensors"]}
    emb = plan["token_embd.weight"]
    assert "output.weight" not in plan and emb["rounding"] == "feedback", emb["type"]
    fmt = formats.get(emb["type"])
    store = CovarianceStore(tmp_path / "cov")
    reader = open_gguf(converter_gguf(model, model_sha256(model)))
    src = next(t for t in reader.tensors if t.name == "token_embd.weight")
    w = tensor_f32(src, "cpu", reader)
    imp = torch.from_numpy(load_stats(tmp_path / "s.safetensors")["token_embd.weight"].importance)
    fb = Feedback(store.get("token_embd.weight"), "token_embd", tokens=store.tokens).encode(fmt, w, imp)
    got = next(t for t in gguf.GGUFReader(out).tensors if t.name == "token_embd.weight")
    assert np.array_equal(np.asarray(got.data).view(np.uint8).reshape(-1), fb.numpy().reshape(-1))
    assert not np.array_equal(fb.numpy().reshape(-1), fmt.encode(w, imp).reshape(-1))
    r = subprocess.run([str(tool_path("llama-completion")), "-m", str(out), "-p", "the old", "-n", "16", "-no-cnv",
                        "--temp", "0", "-t", "1"], capture_output=True, text=True, errors="replace", timeout=300)
    assert r.returncode == 0 and "the old" in r.stdout, r.stderr[-2000:]
