"""The CUDA kernels of the NL types, checked without a GPU (docs/design.md, "CUDA kernels").

* The per-thread maths (ggml-cuda/nl-math.cuh: one MMVQ (block, iqs) dot product, one thread's four dequantised
  weights) compiled with the host compiler and played over every thread index of a launch, against ggml-nl.c's
  reference dequantiser: values bit for bit, dot products against the exact dot of the decoded operands
  (tests/cuda/nl_math_harness.cpp).
* nvcc compiles the new translation units (nl.cu, and the MMVQ dot products through a probe that expands mmvq.cu's
  case macros) for sm_80, sm_86, sm_89 and sm_90, every kernel for every architecture (skipped only where nvcc is
  absent).
* `qgguf llama build --cuda`: the architecture option and the host checks; the configure step on a machine with
  nvcc.
What only a GPU can show (the registration in mmvq.cu/convert.cu/getrows.cu/ggml-cuda.cu at run time, speed) is
tools/gpu_check.sh's job.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from qgguf.llamacpp import build as lb

HERE = Path(__file__).resolve().parent
HARNESS = HERE / "cuda" / "nl_math_harness.cpp"
PROBE = HERE / "cuda" / "nl_vecdot_probe.cu"
NL_TYPES = ("nl2_xs", "nl3_xs", "nl5_xs", "nl6_xs", "nl2_32", "nl3_32", "nl5_32", "nl6_32")
ARCHS = ("80", "86", "89", "90")


@pytest.fixture(scope="module")
def tree() -> Path:
    """The patched tree for the current cpp_ext/ (extracted and patched; nothing built)."""
    return lb.source_tree()


def _compile_harness(tree: Path, out: Path) -> Path:
    src = tree / "ggml" / "src"
    incs = [f"-I{tree / 'ggml' / 'include'}", f"-I{src}", f"-I{src / 'ggml-cuda'}"]
    obj = out / "ggml-nl.o"
    subprocess.run(["gcc", "-std=c11", "-O2", "-c", *incs, str(src / "ggml-nl.c"), "-o", str(obj)], check=True)
    exe = out / "nl_math_harness"
    subprocess.run(["g++", "-std=c++17", "-O2", "-Wall", "-Wextra", "-Werror", *incs, str(HARNESS), str(obj),
                    "-o", str(exe), "-lm"], check=True)
    return exe


def test_per_thread_maths_match_the_reference(tree, tmp_path):
    exe = _compile_harness(tree, tmp_path)
    res = subprocess.run([str(exe)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.strip().splitlines()[-1] == "ALL OK"
    counts = {}
    for line in res.stdout.splitlines():
        m = re.match(r"(nl\d_\w+) rows=(\d+) vec_dot_calls=(\d+) exact_rows=(\d+) dequant_values=(\d+) lookups=(\d+)",
                     line)
        if m:
            counts[m.group(1)] = [int(g) for g in m.groups()[1:]]
    assert sorted(counts) == sorted(NL_TYPES)
    for name, (rows, calls, exact, values, lookups) in counts.items():
        xs = name.endswith("_xs")
        bits = int(name[2])
        # row sizes 1, 2, 7 super-blocks (_XS) or 1, 3, 18, 37 blocks (_32); 31 rows per size (7 kinds of row)
        assert rows == (3 if xs else 4) * 31
        blocks = (1 + 2 + 7) if xs else (1 + 3 + 18 + 37)
        assert calls == 31 * blocks * (8 if xs else 2)  # every (kbx, iqs) of every row: qi/vdr = 8 or 2
        assert values == 31 * blocks * (256 if xs else 32)
        assert exact == (3 if xs else 4) * 4  # unit-scale rows compared exactly
        assert lookups == (1 << bits) * 32  # every index at every byte position, 8 random neighbours each
    assert "failures=0" in res.stdout


def _nvcc() -> str | None:
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    res = subprocess.run([nvcc, "--version"], capture_output=True, text=True)
    return nvcc if res.returncode == 0 else None


def _cuda_include_flags() -> list[str]:
    """-I for cuBLAS's headers where the toolkit has none (the nvidia-cublas wheel, as `qgguf llama build` finds)."""
    flags = lb.cuda_host_options().get("CMAKE_CUDA_FLAGS", "")
    return flags.split()


@pytest.mark.slow
def test_nvcc_compiles_the_new_units(tree, tmp_path):
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found: the CUDA translation units are compiled only where a CUDA toolkit is installed")
    incs = _cuda_include_flags()
    dirs = [f[2:] for f in incs] + [str(Path(nvcc).resolve().parents[1] / "include")]
    if not any(Path(d, "cublas_v2.h").is_file() for d in dirs):
        pytest.fail("nvcc is installed but cuBLAS's headers are not: `pip install nvidia-cublas` (or the toolkit's "
                    "cuBLAS) is needed to build the CUDA backend")
    src = tree / "ggml" / "src"
    incs += [f"-I{tree / 'ggml' / 'include'}", f"-I{src}", f"-I{src / 'ggml-cuda'}"]
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in ARCHS]

    def compile_one(cu: Path) -> subprocess.CompletedProcess:
        obj = tmp_path / (cu.stem + ".o")
        # -Xptxas -v: ptxas names every kernel it compiles and the architecture it compiles it for
        cmd = [nvcc, "-std=c++17", "-O3", "-c", "-DGGML_CUDA_NO_VMM", "-Xptxas", "-v", *incs, *gencode, str(cu),
               "-o", str(obj)]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=900)

    # nl.cu: 8 types x (3 converters + 4 GET_ROWS destination types); the probe: 8 types
    units = {src / "ggml-cuda" / "nl.cu": (("k_nl_dequantize", 8 * 3), ("k_nl_get_rows", 8 * 4)),
             PROBE: (("nl_probe_row", 8),)}
    with ThreadPoolExecutor(max_workers=2) as ex:
        results = list(ex.map(compile_one, units))
    for (cu, kernels), res in zip(units.items(), results):
        assert res.returncode == 0, f"{cu.name}:\n{res.stderr[-3000:]}"
        entries = re.findall(r"Compiling entry function '(\w+)' for 'sm_(\d+)'", res.stdout + res.stderr)
        assert sorted({a for _, a in entries}) == sorted(ARCHS), cu.name
        for arch in ARCHS:
            for name, count in kernels:
                assert sum(name in f and a == arch for f, a in entries) == count, (cu.name, name, arch)


# ------------------------------------------------------------------------------------------------- build options

def test_cuda_arch_option(monkeypatch):
    monkeypatch.delenv("CMAKE_CUDA_ARCHITECTURES", raising=False)
    monkeypatch.delenv("QGGUF_CMAKE_ARGS", raising=False)
    monkeypatch.setattr(lb, "cuda_host_options", lambda make_links=False: {})
    default = lb.BuildSpec.from_env(cuda=True)
    assert default.cmake_options()["CMAKE_CUDA_ARCHITECTURES"] == "80;86;89;90"
    assert default.cmake_options()["GGML_CUDA"] == "ON"
    assert "CMAKE_CUDA_ARCHITECTURES" not in lb.BuildSpec.from_env(cuda=False).cmake_options()
    one = lb.BuildSpec.from_env(cuda=True, cuda_arch="86")
    assert one.cmake_options()["CMAKE_CUDA_ARCHITECTURES"] == "86"
    assert one.key() != default.key()  # a build per architecture set
    monkeypatch.setenv("CMAKE_CUDA_ARCHITECTURES", "sm_89, 9.0")
    assert lb.BuildSpec.from_env(cuda=True).cmake_options()["CMAKE_CUDA_ARCHITECTURES"] == "89;90"
    assert lb.BuildSpec.from_env(cuda=True, cuda_arch="80").cuda_arch == "80"  # the flag beats the environment
    assert lb.normalise_cuda_arch("80;86-real;90a") == "80;86-real;90a"
    assert lb.normalise_cuda_arch("native") == "native"
    for bad in ("ampere", "8", ";"):
        with pytest.raises(lb.QggufError):
            lb.normalise_cuda_arch(bad)


def test_cuda_host_options_use_the_cublas_wheel(monkeypatch, tmp_path):
    toolkit = tmp_path / "cuda"
    (toolkit / "include").mkdir(parents=True)
    (toolkit / "lib64").mkdir()
    wheel = tmp_path / "site" / "nvidia" / "cu13"
    (wheel / "include").mkdir(parents=True)
    (wheel / "include" / "cublas_v2.h").write_text("")
    (wheel / "lib").mkdir()
    for name in ("libcublas.so.13", "libcublasLt.so.13"):
        (wheel / "lib" / name).write_text("")
    monkeypatch.setenv("QGGUF_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(lb, "_toolkit_dirs", lambda: ([toolkit / "include"], [toolkit / "lib64"]))
    monkeypatch.setattr(lb, "_nvidia_wheel_dirs", lambda: [wheel])
    monkeypatch.setattr(lb, "_has_libcuda", lambda dirs: False)
    opts = lb.cuda_host_options(make_links=True)
    assert opts["CMAKE_CUDA_FLAGS"] == f"-I{wheel / 'include'}"
    assert opts["GGML_CUDA_NO_VMM"] == "ON"
    shim = Path(opts["CMAKE_LIBRARY_PATH"])
    assert (shim / "libcublas.so").resolve() == (wheel / "lib" / "libcublas.so.13").resolve()
    assert (shim / "libcublasLt.so").resolve() == (wheel / "lib" / "libcublasLt.so.13").resolve()
    # a toolkit with its own cuBLAS and a driver needs neither
    (toolkit / "include" / "cublas_v2.h").write_text("")
    monkeypatch.setattr(lb, "_has_libcuda", lambda dirs: True)
    assert lb.cuda_host_options() == {}


@pytest.mark.slow
def test_cuda_configure_succeeds():
    if _nvcc() is None:
        pytest.skip("nvcc not found: a CUDA build cannot be configured here")
    spec = lb.BuildSpec.from_env(cuda=True)
    bdir = lb.configure(spec)
    cache = (bdir / "CMakeCache.txt").read_text()
    assert re.search(r"^GGML_CUDA:BOOL=ON$", cache, re.M)
    assert re.search(rf"^CMAKE_CUDA_ARCHITECTURES:\w+={re.escape(spec.cuda_arch)}$", cache, re.M)
    assert re.search(r"^CUDA_cublas_LIBRARY:FILEPATH=.*libcublas\.so", cache, re.M)
    assert (bdir / "Makefile").is_file() or (bdir / "build.ninja").is_file()
