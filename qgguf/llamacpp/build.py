"""The pinned llama.cpp fork: fetch the tree, apply cpp_ext/, build it with CMake, find its tools.

The tree is the one vendored in the PyPI sdist of llama-cpp-python (llama.cpp commit 0c1e570, ggml 0.25.3).
cpp_ext/overlay/ is copied over it (new source files, mirroring the tree's paths), then cpp_ext/patches/*.patch
are applied in name order. Each build lives in the user cache under a key that hashes the sdist, cpp_ext/, the
top-level CMakeLists.txt and the CMake options, so changing a patch gives a fresh build and nothing goes stale.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from qgguf.errors import QggufError
from qgguf.files import cache_dir
from qgguf.hashing import sha256_file

SDIST_NAME = "llama-cpp-python"
SDIST_VERSION = "0.3.36"
SDIST_FILE = "llama_cpp_python-0.3.36.tar.gz"
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
TREE_PREFIX = "llama_cpp_python-0.3.36/vendor/llama.cpp/"
LLAMA_CPP_COMMIT = "0c1e570"

# Parts of the tree nothing here builds or reads; leaving them out keeps the tree small (~29 MiB) to ship.
SKIP_DIRS = ("models/", "docs/", "media/", "tests/snapshots/", "app/", "tools/ui/", "tools/server/",
             "examples/", "ggml/src/ggml-vulkan/", "ggml/src/ggml-sycl/", "ggml/src/ggml-opencl/",
             "ggml/src/ggml-metal/", "ggml/src/ggml-cann/", "ggml/src/ggml-hexagon/", "ggml/src/ggml-webgpu/",
             "ggml/src/ggml-openvino/", "ggml/src/ggml-et/", "ggml/src/ggml-musa/", "ggml/src/ggml-zdnn/",
             "ggml/src/ggml-kompute/", "ggml/src/ggml-virtgpu/", "ggml/src/ggml-zendnn/")

TOOLS = ("llama-quantize", "llama-perplexity", "llama-imatrix", "llama-completion", "llama-bench",
         "test-quantize-fns", "test-backend-ops")

BASE_CMAKE_OPTIONS = {
    "CMAKE_BUILD_TYPE": "Release",
    "BUILD_SHARED_LIBS": "ON",
    "LLAMA_BUILD_TESTS": "ON",
    "LLAMA_BUILD_TOOLS": "ON",
    "LLAMA_BUILD_COMMON": "ON",
    "LLAMA_BUILD_SERVER": "OFF",
    "LLAMA_BUILD_APP": "OFF",
    "LLAMA_BUILD_EXAMPLES": "OFF",
    "LLAMA_OPENSSL": "OFF",
    "LLAMA_CURL": "OFF",
    "GGML_NATIVE": "ON",
}
CUDA_CMAKE_OPTIONS = {"GGML_CUDA": "ON"}
# Compute capabilities a CUDA build covers unless --cuda-arch or CMAKE_CUDA_ARCHITECTURES says otherwise: Ampere
# data-centre (A100, 80) and consumer (RTX 30xx, A10, 86), Ada (RTX 40xx, L4, L40, 89), Hopper (H100, H200, 90).
DEFAULT_CUDA_ARCHS = "80;86;89;90"
RECIPE_VERSION = "1"  # bump when the way a build is made changes in a way the key cannot see


def repo_root() -> Path:
    """The source checkout qgguf runs from: cpp_ext/ and the top-level CMakeLists.txt live there."""
    root = Path(__file__).resolve().parents[2]
    if not (root / "CMakeLists.txt").is_file() or not (root / "cpp_ext").is_dir():
        raise QggufError("cannot find cpp_ext/ and CMakeLists.txt beside the qgguf package; "
                         "install qgguf from a source checkout with `pip install -e .`")
    return root


def cpp_ext_dir() -> Path:
    """cpp_ext/ of the checkout, or QGGUF_CPP_EXT (to try another patch series)."""
    env = os.environ.get("QGGUF_CPP_EXT")
    return Path(env).resolve() if env else repo_root() / "cpp_ext"


def _ext_files(ext: Path) -> list[Path]:
    return sorted(p for p in ext.rglob("*") if p.is_file() and "__pycache__" not in p.parts)


def patch_files(ext: Path | None = None) -> list[Path]:
    ext = ext or cpp_ext_dir()
    return sorted((ext / "patches").glob("*.patch"))


def host_cpu_flags() -> str:
    """This CPU's architecture and feature flags: what decides which instructions -march=native may emit."""
    import platform

    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.machine() + " " + platform.processor()
    flags = next((ln.split(":", 1)[1].split() for ln in info.splitlines()
                  if ln.startswith(("flags", "Features"))), [])
    return platform.machine() + " " + " ".join(sorted(set(flags)))


USER_TREE_SUFFIXES = {".c", ".cc", ".cpp", ".h", ".hpp", ".cu", ".cuh", ".m", ".metal", ".py", ".cmake", ".txt",
                      ".in", ".comp", ".glsl"}
USER_TREE_SKIP = {".git", "build", "models", "docs", "media", "__pycache__"}


@functools.lru_cache(maxsize=8)
def user_tree_sha256(tree: Path) -> str:
    """The content of a user's llama.cpp checkout: every source and build file (not its build outputs)."""
    from qgguf.hashing import files_sha256

    tree = Path(tree)
    files = [p for p in tree.rglob("*") if p.is_file() and (p.suffix in USER_TREE_SUFFIXES or p.name ==
             "CMakeLists.txt") and not USER_TREE_SKIP & set(p.relative_to(tree).parts[:-1])]
    return files_sha256(files, tree)


@dataclass
class BuildSpec:
    """One build of llama.cpp: which tree, which options, and where it goes."""

    cuda: bool = False
    user_tree: Path | None = None  # LLAMA_CPP_DIR: the user's own checkout, built as it is
    extra: dict[str, str] = field(default_factory=dict)
    cuda_arch: str = DEFAULT_CUDA_ARCHS

    @classmethod
    def from_env(cls, cuda: bool = False, cuda_arch: str | None = None) -> "BuildSpec":
        """cuda_arch: --cuda-arch, else the environment's CMAKE_CUDA_ARCHITECTURES, else DEFAULT_CUDA_ARCHS."""
        user = os.environ.get("LLAMA_CPP_DIR")
        extra = {}
        for item in os.environ.get("QGGUF_CMAKE_ARGS", "").split():
            k, _, v = item.removeprefix("-D").partition("=")
            extra[k] = v
        arch = normalise_cuda_arch(cuda_arch or os.environ.get("CMAKE_CUDA_ARCHITECTURES") or DEFAULT_CUDA_ARCHS)
        return cls(cuda=cuda, user_tree=Path(user).resolve() if user else None, extra=extra, cuda_arch=arch)

    def cmake_options(self) -> dict[str, str]:
        opts = dict(BASE_CMAKE_OPTIONS)
        if self.cuda:
            opts.update(CUDA_CMAKE_OPTIONS)
            opts["CMAKE_CUDA_ARCHITECTURES"] = self.cuda_arch
            opts.update(cuda_host_options())
        opts.update(self.extra)
        return opts

    def tree_sha256(self) -> str:
        """The content of the llama.cpp tree this spec builds: the pinned sdist plus cpp_ext/, or the user's tree."""
        h = hashlib.sha256()
        if self.user_tree is not None:
            h.update(b"user-tree\0" + user_tree_sha256(self.user_tree).encode())
        else:
            h.update(f"sdist={SDIST_SHA256}\n".encode())
            ext = cpp_ext_dir()
            for p in _ext_files(ext):
                h.update(str(p.relative_to(ext)).encode() + b"\0" + p.read_bytes() + b"\0")
        return h.hexdigest()

    def key(self) -> str:
        h = hashlib.sha256()
        h.update(f"recipe={RECIPE_VERSION}\n".encode())
        opts = self.cmake_options()
        for k, v in sorted(opts.items()):
            h.update(f"{k}={v}\n".encode())
        if opts.get("GGML_NATIVE", "").upper() in ("ON", "1", "TRUE"):
            # -march=native: the binaries hold this CPU's instructions; a cache shared with another CPU must
            # not run them
            h.update(f"cpu={host_cpu_flags()}\n".encode())
        h.update((repo_root() / "CMakeLists.txt").read_bytes())
        h.update(self.tree_sha256().encode())
        return ("cuda-" if self.cuda else "cpu-") + h.hexdigest()[:16]

    @property
    def root(self) -> Path:
        return cache_dir("llama") / self.key()

    @property
    def tree(self) -> Path:
        return self.user_tree if self.user_tree is not None else self.root / "llama.cpp"

    @property
    def build_dir(self) -> Path:
        return self.root / "build"

    @property
    def stamp(self) -> Path:
        return self.build_dir / "qgguf-build.json"


def normalise_cuda_arch(arch: str) -> str:
    """"80,86" / "80;86" / "sm_80 sm_86" / "8.6" -> "80;86"; CMake's keywords (native, all, all-major) pass through."""
    parts = [p for p in re.split(r"[;,\s]+", arch.strip()) if p]
    if len(parts) == 1 and parts[0] in ("native", "all", "all-major"):
        return parts[0]
    out = []
    for p in parts:
        m = re.fullmatch(r"(?:sm_|compute_)?(\d)\.?(\d+[af]?)(-real|-virtual)?", p)
        if not m:
            raise QggufError(f"--cuda-arch: {p!r} is not a CUDA compute capability (e.g. 80, 86, 8.9, sm_90, 90a)")
        out.append(m.group(1) + m.group(2) + (m.group(3) or ""))
    if not out:
        raise QggufError("--cuda-arch is empty; give compute capabilities such as 80;86;89;90")
    return ";".join(out)


def _nvidia_wheel_dirs() -> list[Path]:
    """The nvidia/cu*/ folders of NVIDIA's pip wheels (nvidia-cublas puts cuBLAS there)."""
    try:
        import nvidia  # namespace package of NVIDIA's wheels
    except ImportError:
        return []
    return sorted(d for root in getattr(nvidia, "__path__", []) for d in Path(root).glob("cu*") if d.is_dir())


def _toolkit_dirs() -> tuple[list[Path], list[Path]]:
    """Include and library folders of the CUDA toolkit next to nvcc."""
    nvcc = shutil.which("nvcc")
    if not nvcc:
        return [], []
    root = Path(nvcc).resolve().parents[1]
    incs = [root / "include"] + sorted((root / "targets").glob("*/include"))
    libs = [root / "lib64", root / "lib"] + sorted((root / "targets").glob("*/lib"))
    return [d for d in incs if d.is_dir()], [d for d in libs if d.is_dir()]


def _has_libcuda(lib_dirs: list[Path]) -> bool:
    """Whether the driver library (or the toolkit's link stub) can be linked: needed unless GGML_CUDA_NO_VMM."""
    for d in lib_dirs + [Path("/usr/lib/x86_64-linux-gnu"), Path("/usr/lib64"), Path("/usr/lib/wsl/lib")]:
        if (d / "libcuda.so").exists() or (d / "stubs" / "libcuda.so").exists():
            return True
    return False


def cuda_host_options(make_links: bool = False) -> dict[str, str]:
    """CMake options a CUDA build needs on this machine beyond GGML_CUDA: cuBLAS from the nvidia-cublas wheel where
    the toolkit has none (a folder of unversioned links, which CMake's FindCUDAToolkit can find, and its headers on
    nvcc's include path), and GGML_CUDA_NO_VMM=ON where no libcuda.so exists to link (a machine without a driver:
    the build still runs on one that has it; VMM only changes how the memory pool grows). make_links: create the
    links (configure does; the build key needs only their folder)."""
    incs, libs = _toolkit_dirs()
    opts: dict[str, str] = {}
    if not any((d / "cublas_v2.h").is_file() for d in incs):
        for w in _nvidia_wheel_dirs():
            inc, lib = w / "include", w / "lib"
            if (inc / "cublas_v2.h").is_file() and any(lib.glob("libcublas.so*")):
                shim = cache_dir("cuda") / ("cublas-" + hashlib.sha256(str(w).encode()).hexdigest()[:12])
                if make_links:
                    shim.mkdir(parents=True, exist_ok=True)
                    for so in sorted(lib.glob("lib*.so.*")):
                        link = shim / (so.name.split(".so")[0] + ".so")
                        if not link.is_symlink() or link.resolve() != so.resolve():
                            link.unlink(missing_ok=True)
                            link.symlink_to(so)
                opts["CMAKE_LIBRARY_PATH"] = str(shim)
                opts["CMAKE_CUDA_FLAGS"] = f"-I{inc}"
                break
    if not _has_libcuda(libs):
        opts["GGML_CUDA_NO_VMM"] = "ON"
    return opts


# ---------------------------------------------------------------------------------------------------- fetching

def fetch_sdist() -> Path:
    """The pinned sdist in the download cache, fetched with pip and checked against its sha256."""
    dest = cache_dir("downloads") / SDIST_FILE
    if dest.is_file():
        if sha256_file(dest) == SDIST_SHA256:
            return dest
        dest.unlink()  # a corrupt or truncated download: fetch it again
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        print(f"qgguf: downloading {SDIST_NAME}=={SDIST_VERSION} (the pinned llama.cpp tree) with pip ...",
              file=sys.stderr)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--quiet",
               f"{SDIST_NAME}=={SDIST_VERSION}", "-d", tmp]
        res = subprocess.run(cmd, capture_output=True, text=True)
        got = Path(tmp) / SDIST_FILE
        if res.returncode != 0 or not got.is_file():
            raise QggufError(f"pip could not download {SDIST_NAME}=={SDIST_VERSION}: "
                             f"{(res.stderr or res.stdout).strip()[-800:]}\n"
                             f"fix the network or pip configuration, or set LLAMA_CPP_DIR to a llama.cpp checkout")
        digest = sha256_file(got)
        if digest != SDIST_SHA256:
            raise QggufError(f"{SDIST_FILE} has sha256 {digest}, expected {SDIST_SHA256}; "
                             "the registry served a different file: check your pip index")
        os.replace(got, dest)
    return dest


def extract_tree(sdist: Path, dest: Path) -> None:
    """Extract vendor/llama.cpp from the sdist into dest (which must not exist)."""
    with tarfile.open(sdist, "r:gz") as tar:
        members = []
        for m in tar.getmembers():
            if not m.name.startswith(TREE_PREFIX):
                continue
            rel = m.name[len(TREE_PREFIX):]
            # .git is the sdist's submodule pointer to a repository that is not there: `git apply` refuses to
            # run inside a tree that has it
            if not rel or rel == ".git" or any(rel.startswith(s) for s in SKIP_DIRS):
                continue
            m.name = rel
            members.append(m)
        dest.mkdir(parents=True)
        tar.extractall(dest, members=members, filter="data")


def apply_ext(tree: Path, ext: Path) -> None:
    """Copy cpp_ext/overlay over the tree, then apply cpp_ext/patches/*.patch in order."""
    overlay = ext / "overlay"
    if overlay.is_dir():
        shutil.copytree(overlay, tree, dirs_exist_ok=True)
    for patch in patch_files(ext):
        check = subprocess.run(["git", "apply", "--check", "-p1", str(patch)], cwd=tree,
                               capture_output=True, text=True)
        if check.returncode != 0:
            raise QggufError(f"patch {patch.name} does not apply to llama.cpp {LLAMA_CPP_COMMIT} "
                             f"({patch}):\n{check.stderr.strip()[-1500:]}\n"
                             "rebase the patch on the pinned tree (see cpp_ext/README.md)")
        subprocess.run(["git", "apply", "-p1", str(patch)], cwd=tree, check=True, capture_output=True)


def prepare_tree(spec: BuildSpec) -> Path:
    """The patched source tree for spec, made once; a failed patch leaves nothing behind."""
    if spec.user_tree is not None:
        if not (spec.user_tree / "CMakeLists.txt").is_file() or not (spec.user_tree / "ggml").is_dir():
            raise QggufError(f"LLAMA_CPP_DIR={spec.user_tree} is not a llama.cpp checkout "
                             "(no CMakeLists.txt and ggml/); point it at the top of one, or unset it")
        return spec.user_tree
    tree = spec.tree
    if (tree / ".qgguf-patched").is_file():
        return tree
    ext = cpp_ext_dir()
    sdist = fetch_sdist()
    spec.root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="tree.", dir=spec.root))
    try:
        work = tmp / "llama.cpp"
        extract_tree(sdist, work)
        apply_ext(work, ext)
        (work / ".qgguf-patched").write_text("\n".join(p.name for p in patch_files(ext)) + "\n")
        if tree.exists():
            shutil.rmtree(tree)
        os.replace(work, tree)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return tree


# ---------------------------------------------------------------------------------------------------- building

# CPU seconds of a cold build of the tools (make, Release): measured on a 2-core CPU at 844 s wall; the CUDA figure
# (one architecture) is a rough one. The message before a build divides them by the parallel jobs.
BUILD_CPU_S = {"CPU": 1000.0, "CUDA": 6000.0}

_PCT_MAKE = re.compile(r"^\[\s*(\d+)%\]")          # make:  "[ 42%] Building CXX object ..."
_PCT_NINJA = re.compile(r"^\[(\d+)/(\d+)\]")       # ninja: "[123/456] Building CXX object ..."


def progress_percent(line: str) -> int | None:
    """The build's percentage from one line of make's or ninja's output, None if the line has none."""
    m = _PCT_MAKE.match(line)
    if m:
        return int(m.group(1))
    m = _PCT_NINJA.match(line)
    if m and int(m.group(2)) > 0:
        return 100 * int(m.group(1)) // int(m.group(2))
    return None


def expected_minutes(kind: str, jobs: int) -> int:
    """Minutes a cold build should take: the recorded CPU seconds over the jobs that can run at once."""
    return max(1, round(BUILD_CPU_S[kind] / max(1, min(jobs, os.cpu_count() or 1)) / 60))


def _run_logged(cmd: list[str], log: Path, desc: str, env: dict | None = None) -> None:
    """Run a build step, its output to a log; show the percentage from make's "[ NN%]" (ninja's "[N/M]") lines:
    a bar on a terminal, else a line at every tenth, so a log or CI shows the build moving."""
    tty = sys.stderr.isatty()
    t0 = time.monotonic()
    with open(log, "a") as f, tqdm(total=100, desc=desc, unit="%", file=sys.stderr, disable=not tty,
                                   bar_format="{desc}: {percentage:3.0f}%|{bar}| {elapsed}") as bar:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        assert proc.stdout is not None
        shown = 0
        for line in proc.stdout:
            f.write(line)
            pct = progress_percent(line)
            if pct is None or pct <= bar.n:
                continue
            bar.n = pct
            bar.refresh()
            if not tty and pct // 10 > shown // 10:
                shown = pct
                print(f"{desc}: {pct}% ({time.monotonic() - t0:.0f} s)", file=sys.stderr, flush=True)
        if proc.wait() != 0:
            f.flush()  # the tail below is read from the file: its last lines must be in it
            tail = log.read_text(errors="replace").splitlines()[-40:]
            raise QggufError(f"{desc} failed (exit {proc.returncode}); the last lines of {log}:\n" + "\n".join(tail))


def configure(spec: BuildSpec) -> Path:
    """CMake's configure step for spec (the patched tree is prepared first); returns the build dir."""
    if shutil.which("cmake") is None:
        raise QggufError("cmake is not on PATH; install it (apt-get install cmake, or pip install cmake)")
    tree = prepare_tree(spec).resolve()  # configure through the real path, not a symlink
    bdir = spec.build_dir
    bdir.mkdir(parents=True, exist_ok=True)
    if spec.cuda:
        cuda_host_options(make_links=True)
    _forget_other_source(bdir, repo_root())
    cmd = ["cmake", "-S", str(repo_root()), "-B", str(bdir), f"-DQGGUF_LLAMA_SOURCE_DIR={tree}"]
    cmd += [f"-D{k}={v}" for k, v in sorted(spec.cmake_options().items())]
    _run_logged(cmd, spec.root / "build.log", "configure llama.cpp")
    return bdir


def _forget_other_source(bdir: Path, source: Path) -> None:
    """Drop a CMake cache that another checkout configured. The build key hashes content, not paths, so two
    checkouts (or a moved one) share a build folder, but CMake refuses a cache made for another source folder."""
    cache = bdir / "CMakeCache.txt"
    if not cache.is_file():
        return
    m = re.search(r"^CMAKE_HOME_DIRECTORY:INTERNAL=(.*)$", cache.read_text(errors="replace"), re.M)
    if m and Path(m.group(1)).resolve() != source.resolve():
        cache.unlink()
        shutil.rmtree(bdir / "CMakeFiles", ignore_errors=True)


def build(spec: BuildSpec, jobs: int | None = None, install_gguf_py: bool = True) -> Path:
    """Build the tools for spec (reusing a finished build), install the tree's gguf-py; return the build dir."""
    if spec.stamp.is_file():
        if install_gguf_py:
            ensure_gguf_py(spec)
        return spec.build_dir
    t0 = time.time()
    bdir = configure(spec)
    tree = prepare_tree(spec).resolve()
    log = spec.root / "build.log"
    opts = spec.cmake_options()
    jobs = jobs or os.cpu_count() or 2
    kind = "CUDA" if spec.cuda else "CPU"
    minutes = expected_minutes(kind, jobs)
    print(f"qgguf: building llama.cpp ({kind}): about {minutes} min with {jobs} jobs on {os.cpu_count()} cores "
          f"(log: {log})", file=sys.stderr)
    targets = list(TOOLS)
    cmd = ["cmake", "--build", str(bdir), "--config", "Release", "-j", str(jobs), "--target", *targets]
    _run_logged(cmd, log, f"build llama.cpp ({kind}, {jobs} jobs)")
    missing = [t for t in TOOLS if not (bdir / "bin" / t).is_file()]
    if missing:
        raise QggufError(f"the build finished but {', '.join(missing)} are missing in {bdir / 'bin'}; see {log}")
    spec.stamp.write_text(json.dumps({
        "key": spec.key(), "cuda": spec.cuda, "tree": str(tree), "options": opts,
        "patches": [p.name for p in patch_files()] if spec.user_tree is None else [],
        "seconds": round(time.time() - t0, 1), "jobs": jobs, "built": time.strftime("%Y-%m-%d %H:%M:%S"),
    }, indent=2))
    if install_gguf_py:
        ensure_gguf_py(spec)
    return bdir


def gguf_py_dir(spec: BuildSpec) -> Path:
    return prepare_tree(spec) / "gguf-py"


def gguf_py_matches(spec: BuildSpec) -> bool:
    """Whether the importable gguf is the (patched) tree's own gguf-py."""
    try:
        import importlib.util
        found = importlib.util.find_spec("gguf")
    except (ImportError, ValueError):
        return False
    if found is None or not found.origin:
        return False
    installed = Path(found.origin).parent
    ours = gguf_py_dir(spec) / "gguf"
    names = ("constants.py", "quants.py", "gguf_writer.py", "gguf_reader.py", "tensor_mapping.py")
    return all((installed / n).is_file() and (installed / n).read_bytes() == (ours / n).read_bytes() for n in names)


def ensure_gguf_py(spec: BuildSpec) -> None:
    """Install the tree's gguf-py as this environment's `gguf` (the PyPI release lacks what the converter uses)."""
    if gguf_py_matches(spec):
        return
    src = gguf_py_dir(spec)
    print(f"qgguf: installing the pinned tree's gguf-py from {src}", file=sys.stderr)
    res = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--force-reinstall", "--quiet",
                          str(src)], capture_output=True, text=True)
    if res.returncode != 0:
        raise QggufError(f"pip could not install gguf-py from {src}:\n{res.stderr.strip()[-1500:]}")


# ---------------------------------------------------------------------------------------------------- finding

def find_build(cuda: bool | None = None) -> Path:
    """The build dir of a finished build for the current sources: CUDA if asked (or if built and not refused)."""
    choices = [True, False] if cuda is None else [cuda]
    for c in choices:
        spec = BuildSpec.from_env(cuda=c)
        if spec.stamp.is_file():
            return spec.build_dir
    what = "a CUDA build" if cuda else "a build"
    flag = " --cuda" if cuda else ""
    raise QggufError(f"{what} of llama.cpp for the current cpp_ext/ is missing; run `qgguf llama build{flag}`")


def tool_path(name: str, cuda: bool | None = None) -> Path:
    """Absolute path of a built llama.cpp tool (e.g. llama-perplexity) or shared library (e.g. libggml-base.so)."""
    bdir = find_build(cuda)
    for cand in (bdir / "bin" / name, bdir / "bin" / f"lib{name}.so", bdir / "bin" / f"{name}.so"):
        if cand.is_file():
            return cand.resolve()
    known = sorted(p.name for p in (bdir / "bin").iterdir())
    raise QggufError(f"no tool or library {name!r} in {bdir / 'bin'}; known: {', '.join(known)}")


def tree_path(cuda: bool | None = None) -> Path:
    """The source tree the current build was made from (its convert_hf_to_gguf.py, gguf-py, ...)."""
    bdir = find_build(cuda)
    return Path(json.loads((bdir / "qgguf-build.json").read_text())["tree"])


def source_tree() -> Path:
    """The patched source tree for the current cpp_ext/, prepared if needed (no build required)."""
    return prepare_tree(BuildSpec.from_env(cuda=False))


def tool_env() -> dict[str, str]:
    """Environment for running built tools: quiet, deterministic thread counts are the caller's choice."""
    env = dict(os.environ)
    return env


# ---------------------------------------------------------------------------------------------------- CLI

def add_parser(sub) -> None:
    p = sub.add_parser("llama", help="build and locate the pinned llama.cpp fork")
    lsub = p.add_subparsers(dest="llama_cmd", required=True)
    b = lsub.add_parser("build", help="fetch the pinned tree, apply cpp_ext/, build the tools (cached)")
    b.add_argument("--cuda", action="store_true", help="build the CUDA backend too")
    b.add_argument("--cuda-arch", default=None,
                   help=f"CUDA compute capabilities, e.g. 86 or 80;89 (default: CMAKE_CUDA_ARCHITECTURES from the "
                        f"environment, else {DEFAULT_CUDA_ARCHS}); `qgguf llama path` finds the build with the "
                        "same environment")
    b.add_argument("--configure-only", action="store_true",
                   help="run CMake's configure step and stop (checks the toolchain; nothing is built)")
    b.add_argument("-j", "--jobs", type=int, default=None, help="parallel build jobs (default: all cores)")
    b.set_defaults(func=_cmd_build)
    q = lsub.add_parser("path", help="print the absolute path of a built tool or library")
    q.add_argument("tool", help="e.g. llama-perplexity, test-backend-ops, ggml-base, tree")
    g = q.add_mutually_exclusive_group()
    g.add_argument("--cuda", dest="cuda", action="store_true", default=None)
    g.add_argument("--cpu", dest="cuda", action="store_false")
    q.set_defaults(func=_cmd_path)


def _cmd_build(args) -> int:
    if args.cuda_arch and not args.cuda:
        raise QggufError("--cuda-arch needs --cuda")
    spec = BuildSpec.from_env(cuda=args.cuda, cuda_arch=args.cuda_arch)
    if args.configure_only:
        print(configure(spec))
        return 0
    bdir = build(spec, jobs=args.jobs)
    print(bdir)
    return 0


def _cmd_path(args) -> int:
    if args.tool == "tree":
        print(tree_path(args.cuda))
    else:
        print(tool_path(args.tool, args.cuda))
    return 0
