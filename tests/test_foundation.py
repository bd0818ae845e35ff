"""The foundation: the fork builds and is found, HF folders convert with the pinned converter, the result is read
back by gguf-py and generates with the built llama.cpp, and bad input fails cleanly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from qgguf.cli import main
from qgguf.llamacpp.build import tool_path


def qgguf(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qgguf", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def tiny_f32(tiny_llama, llama_build, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("conv") / "tiny-f32.gguf"
    res = qgguf("convert-hf", str(tiny_llama), "-o", str(out), "--outtype", "f32")
    assert res.returncode == 0, res.stderr
    return out


def test_converted_file_reads_back_with_gguf_py(tiny_f32, tiny_llama):
    import gguf
    from safetensors.numpy import load_file

    r = gguf.GGUFReader(tiny_f32)
    assert r.fields["general.architecture"].contents() == "llama"
    assert r.fields["llama.block_count"].contents() == 2
    assert r.fields["llama.embedding_length"].contents() == 256
    assert len(r.fields["tokenizer.ggml.tokens"].contents()) == 320
    tensors = {t.name: t for t in r.tensors}
    assert "token_embd.weight" in tensors and "output.weight" in tensors and "blk.1.ffn_down.weight" in tensors
    assert all(t.tensor_type == gguf.GGMLQuantizationType.F32 for t in r.tensors)
    # Values survive: the FFN down projection is stored as-is (GGUF shape is the reverse of torch's).
    hf = load_file(tiny_llama / "model.safetensors")["model.layers.1.mlp.down_proj.weight"]
    ours = np.asarray(tensors["blk.1.ffn_down.weight"].data)
    assert ours.shape == hf.shape
    np.testing.assert_array_equal(ours, hf)


def test_converted_file_generates_with_built_llama_cpp(tiny_f32):
    cmd = [str(tool_path("llama-completion")), "-m", str(tiny_f32), "-p", "the world", "-n", "8", "-no-cnv",
           "--temp", "0", "-t", "2", "--no-display-prompt"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    # With --no-display-prompt, stdout holds only the generated text (llama.cpp's log goes to stderr).
    assert len(res.stdout.strip()) >= 4, f"no text generated: {res.stdout!r}"


def _cpu_has(flag: str) -> bool:
    try:
        return any(line.startswith("flags") and f" {flag}" in line for line in open("/proc/cpuinfo"))
    except OSError:
        return False


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_K"])
def test_quantised_model_runs_on_both_cpu_paths(tiny_f32, qtype, tmp_path):
    """A llama-quantize file runs in llama-perplexity with the CPU backend's extra buffer types (AMX on CPUs that
    have it, repacked layouts; on by default) and without them (-nr), to nearly the same perplexity. On an AMX CPU
    the default path is the AMX one, which raised SIGILL before patch 0008."""
    from qgguf.assets.tiny import tiny_text
    from qgguf.llamacpp.toolout import parse_perplexity

    text = tmp_path / "text.txt"
    text.write_text(tiny_text(4000, seed=3))
    model = tmp_path / f"tiny-{qtype}.gguf"
    res = subprocess.run([str(tool_path("llama-quantize")), str(tiny_f32), str(model), qtype, "2"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    cmd = [str(tool_path("llama-perplexity")), "-m", str(model), "-f", str(text), "-c", "128", "--chunks", "3",
           "-t", "2", "-b", "128"]
    ppl = {}
    for path, extra in (("default", []), ("no extra buffers", ["-nr"])):
        res = subprocess.run(cmd + extra, capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, f"{path} (exit {res.returncode}, AMX CPU: {_cpu_has('amx_int8')}):\n" \
                                    + res.stderr[-2000:]
        ppl[path] = parse_perplexity(res.stdout + res.stderr).ppl
    assert abs(ppl["default"] / ppl["no extra buffers"] - 1) < 0.02, ppl


def test_doctor_reports_the_build(llama_build):
    res = qgguf("doctor", "--json")
    rows = {r["what"]: r for r in json.loads(res.stdout)}
    cpu = rows["llama.cpp CPU build"]
    assert cpu["ok"] and str(llama_build) in cpu["found"] and "llama-perplexity" in cpu["found"]
    assert rows["gguf-py"]["ok"]
    assert res.returncode == 0, res.stdout


def test_llama_path_prints_built_tools(llama_build):
    res = qgguf("llama", "path", "llama-quantize")
    assert res.returncode == 0 and Path(res.stdout.strip()).is_file()
    assert Path(res.stdout.strip()).parent == llama_build / "bin"
    res = qgguf("llama", "path", "no-such-tool")
    assert res.returncode != 0 and "no-such-tool" in res.stderr


def test_patch_that_does_not_apply_names_the_patch(tmp_path, llama_build):
    ext = tmp_path / "cpp_ext"
    (ext / "patches").mkdir(parents=True)
    bad = ext / "patches" / "0001-bad-context.patch"
    bad.write_text("--- a/ggml/include/ggml.h\n+++ b/ggml/include/ggml.h\n@@ -1,3 +1,3 @@\n"
                   " this line is not in ggml.h\n-nor this one\n+so the patch cannot apply\n context\n")
    cache = tmp_path / "cache"
    (cache / "downloads").mkdir(parents=True)
    # Reuse the downloaded sdist instead of fetching it again.
    from qgguf.files import cache_dir
    from qgguf.llamacpp.build import SDIST_FILE
    os.symlink(cache_dir("downloads") / SDIST_FILE, cache / "downloads" / SDIST_FILE)
    res = qgguf("llama", "build", env={"QGGUF_CPP_EXT": str(ext), "QGGUF_CACHE": str(cache)})
    assert res.returncode != 0
    assert "0001-bad-context.patch" in res.stderr and "does not apply" in res.stderr
    assert "Traceback" not in res.stderr
    trees = list((cache / "llama").rglob("llama.cpp"))
    assert trees == [], "a failed patch must leave no tree behind"


def test_missing_model_folder(tmp_path, llama_build):
    out = tmp_path / "x.gguf"
    res = qgguf("convert-hf", str(tmp_path / "nope"), "-o", str(out))
    assert res.returncode != 0 and "nope" in res.stderr and "Traceback" not in res.stderr
    assert not out.exists()


def test_folder_that_is_not_a_causal_lm(tmp_path, llama_build):
    model = tmp_path / "bert"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"architectures": ["BertModel"], "model_type": "bert"}))
    out = tmp_path / "x.gguf"
    res = qgguf("convert-hf", str(model), "-o", str(out))
    assert res.returncode != 0 and "BertModel" in res.stderr and "causal" in res.stderr
    assert not out.exists()


@pytest.mark.parametrize("where", ["missing-folder", "proc"])
def test_unwritable_output(tiny_llama, tmp_path, where, llama_build):
    out = tmp_path / "no" / "such" / "x.gguf" if where == "missing-folder" else Path("/proc/qgguf-x.gguf")
    res = qgguf("convert-hf", str(tiny_llama), "-o", str(out))
    assert res.returncode != 0 and "cannot write" in res.stderr and "Traceback" not in res.stderr
    assert not out.exists()


def test_failed_conversion_leaves_no_partial_file(tmp_path, tiny_llama, llama_build):
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in tiny_llama.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    (broken / "model.safetensors").write_bytes(b"\0" * 64)  # corrupt weights
    out = tmp_path / "x.gguf"
    assert main(["convert-hf", str(broken), "-o", str(out)]) != 0
    assert not out.exists() and not list(tmp_path.glob(".x.gguf*"))


def test_build_step_shows_progress_without_a_terminal(tmp_path, capsys):
    """make's "[ NN%]" and ninja's "[N/M]" lines become progress the user sees, also when stderr is a log."""
    from qgguf.errors import QggufError
    from qgguf.llamacpp.build import _run_logged, progress_percent

    assert [progress_percent(s) for s in ("[  7%] Building C object", "[30/40] Linking", "-- Configuring")] == \
        [7, 75, None]
    script = "; ".join(f"print('[{p:3d}%] Building CXX object o{p}.o')" for p in (0, 5, 12, 12, 48, 100))
    log = tmp_path / "build.log"
    _run_logged([sys.executable, "-c", script], log, "build x")
    shown = [ln.split(" (")[0] for ln in capsys.readouterr().err.splitlines() if ln.startswith("build x: ")]
    assert shown == ["build x: 12%", "build x: 48%", "build x: 100%"]  # one line per tenth reached
    assert "o48.o" in log.read_text()
    with pytest.raises(QggufError, match=r"(?s)build y failed \(exit 3\).*\nboom$"):  # the tail of the log
        _run_logged([sys.executable, "-c", "print('boom'); raise SystemExit(3)"], log, "build y")


def test_cuda_home_notice_is_dropped_and_compile_cache_is_ours(tmp_path):
    """On a CPU-only torch with nvcc around, compiling says nothing about CUDA_HOME; the kernels go to our cache."""
    code = ("import logging, os, sys; from qgguf.torch_env import setup; setup(); "
            "logging.basicConfig(); "
            "logging.getLogger('torch.utils.cpp_extension').warning(\"No CUDA runtime is found, using CUDA_HOME='/x'\"); "
            "logging.getLogger('torch.utils.cpp_extension').warning('other advice stays'); "
            "print(os.environ['TORCHINDUCTOR_CACHE_DIR'])")
    env = {k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_CACHE_DIR"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**env, "QGGUF_CACHE": str(tmp_path)})
    assert res.returncode == 0, res.stderr
    assert "No CUDA runtime" not in res.stderr and "other advice stays" in res.stderr
    assert res.stdout.strip() == str(tmp_path / "torch-compile")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**env, "QGGUF_CACHE": str(tmp_path), "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "mine")})
    assert res.stdout.strip() == str(tmp_path / "mine")  # the user's setting wins


def test_a_cmake_cache_of_another_checkout_is_dropped(tmp_path):
    """Build folders are keyed by content, so two checkouts of the same sources share one; CMake refuses a cache
    that another source folder made ("does not match the source ... used to generate cache"). configure drops it
    and keeps a cache of this checkout (and the built objects beside it)."""
    from qgguf.llamacpp.build import _forget_other_source, repo_root

    for configured_from, kept in ((tmp_path / "other-checkout", False), (repo_root(), True)):
        bdir = tmp_path / f"build-{kept}"
        (bdir / "CMakeFiles").mkdir(parents=True)
        (bdir / "bin").mkdir()
        (bdir / "bin" / "llama-x").write_text("built")
        (bdir / "CMakeCache.txt").write_text(f"# cache\nCMAKE_HOME_DIRECTORY:INTERNAL={configured_from}\n")
        _forget_other_source(bdir, repo_root())
        assert (bdir / "CMakeCache.txt").is_file() == kept
        assert (bdir / "CMakeFiles").is_dir() == kept
        assert (bdir / "bin" / "llama-x").read_text() == "built"
