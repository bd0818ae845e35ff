"""De-gridding: turn a quantised GGUF into an fp32 Hugging Face folder whose weights are off the source grid.

A model that ships as Q4_1 or Q4_K holds weights that sit exactly on a 4-bit grid, so re-quantising it to the
same type looks lossless and every comparison between types is skewed. Each weight here gets seeded uniform
dither of ±½ the local level spacing, the spacing read per sub-block from the source type's own scales:

    Q4_0, Q4_1, Q5_0, Q5_1, Q8_0    |d|        per block of 32
    Q4_K, Q5_K                      |d·sc|     per sub-block of 32
    Q6_K                            |d·sc|     per sub-block of 16
    F32, F16, BF16                  untouched (norms, biases: not on a grid)

Route (transformers stays in charge of tensor names and the Q/K permutation): read the GGUF with gguf-py,
dequantise and dither each tensor, stream them into an F32 GGUF with the same metadata and tokenizer, load that
with transformers (`gguf_file=`), and save an HF folder (fp32 safetensors + tokenizer). A fixed seed gives
byte-identical safetensors: each tensor's dither comes from its own generator seeded by (seed, tensor name).
"""

from __future__ import annotations

import copy
import gc
import hashlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
from tqdm import tqdm

from qgguf.errors import QggufError
from qgguf.hashing import sha256_file

BLOCKS_PER_CHUNK = 1 << 15  # blocks dithered at a time: bounds the temporaries to ~32 MiB per array


def _f16(col: np.ndarray) -> np.ndarray:
    return col.copy().view(np.float16).astype(np.float32)


def level_spacing(blocks: np.ndarray, qtype) -> tuple[np.ndarray, int]:
    """The level spacing of each sub-block of raw blocks (uint8[nb, type_size]) and the sub-block length."""
    from gguf import GGMLQuantizationType as T
    from gguf.quants import Q4_K

    if qtype in (T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0):  # d is the block's first fp16
        return np.abs(_f16(blocks[:, 0:2])), 32
    if qtype in (T.Q4_K, T.Q5_K):  # d, dmin, then 12 bytes of packed 6-bit scales and mins
        d = _f16(blocks[:, 0:2])
        sc, _ = Q4_K.get_scale_min(blocks[:, 4:16].copy())
        return np.abs(d * sc.astype(np.float32)), 32
    if qtype == T.Q6_K:  # ql[128], qh[64], int8 scales[16], d
        scales = blocks[:, 192:208].copy().view(np.int8).astype(np.float32)
        return np.abs(_f16(blocks[:, 208:210]) * scales), 16
    raise QggufError(f"cannot de-grid {qtype.name} tensors (supported: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, "
                     "Q6_K, F32, F16, BF16); use a source GGUF of those types")


def tensor_rng(seed: int, name: str) -> np.random.Generator:
    """One generator per tensor, so a tensor's dither does not depend on the order tensors are processed in."""
    key = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little")
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, key])))


def degrid_tensor(tensor, seed: int) -> np.ndarray:
    """float32 values of one GGUFReader tensor (numpy shape), dithered if it is quantised."""
    from gguf import GGML_QUANT_SIZES
    from gguf import GGMLQuantizationType as T
    from gguf.quants import dequantize

    qtype = tensor.tensor_type
    shape = tuple(int(n) for n in reversed(tensor.shape))
    if qtype in (T.F32, T.F16, T.BF16):
        return dequantize(tensor.data, qtype).astype(np.float32, copy=False).reshape(shape)
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    blocks = np.asarray(tensor.data).reshape(-1, type_size)
    out = np.empty((blocks.shape[0], block_size), dtype=np.float32)
    rng = tensor_rng(seed, tensor.name)
    for i in range(0, blocks.shape[0], BLOCKS_PER_CHUNK):
        b = blocks[i:i + BLOCKS_PER_CHUNK]
        spacing, sub = level_spacing(b, qtype)
        step = np.repeat(spacing, sub, axis=1)  # [nb, block_size]
        noise = rng.random(step.shape, dtype=np.float32) - np.float32(0.5)
        out[i:i + len(b)] = dequantize(b, qtype) + step * noise
    return out.reshape(shape)


def _copy_metadata(reader, writer) -> None:
    """Every key-value of the source except the reader's own GGUF.* fields and the file type (now all F32)."""
    from gguf import GGUFValueType, LlamaFileType

    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        if key == "general.file_type":
            writer.add_file_type(int(LlamaFileType.ALL_F32))
            continue
        vtype = field.types[0]
        sub_type = field.types[-1] if vtype == GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), vtype, sub_type)


def degrid_gguf(src: Path, out: Path, seed: int) -> None:
    """Write `out`: an F32 GGUF with src's metadata and tensors, quantised ones de-gridded. Streams tensors."""
    from gguf import GGMLQuantizationType, GGUFReader, GGUFWriter

    reader = GGUFReader(src)
    arch = reader.fields["general.architecture"].contents()
    writer = GGUFWriter(out, arch)
    _copy_metadata(reader, writer)
    for t in reader.tensors:
        shape = [int(n) for n in reversed(t.shape)]
        writer.add_tensor_info(t.name, shape, np.dtype(np.float32), 4 * int(np.prod(shape)),
                               raw_dtype=GGMLQuantizationType.F32)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for t in tqdm(reader.tensors, desc=f"de-grid {src.name}", unit="tensor", file=sys.stderr, disable=None):
        writer.write_tensor_data(degrid_tensor(t, seed))
    writer.close()


def tensor_digest(folder: Path) -> str:
    """sha256 over the folder's safetensors tensors (name, dtype, shape, bytes, in name order): file-layout free."""
    from safetensors import safe_open

    h = hashlib.sha256()
    handles = {}
    names: list[tuple[str, Path]] = []
    for f in sorted(folder.glob("*.safetensors")):
        handles[f] = safe_open(str(f), framework="numpy")
        names += [(n, f) for n in handles[f].keys()]
    for name, f in sorted(names):
        arr = handles[f].get_tensor(name)
        h.update(f"{name}\0{arr.dtype.str}\0{list(arr.shape)}\0".encode())
        h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()


def save_hf_folder(gguf_dir: Path, gguf_name: str, out: Path) -> None:
    """Load an F32 GGUF with transformers and save a plain fp32 HF folder (safetensors + tokenizer) at out."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    loaded = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)
    # transformers will not save a GGUF-loaded model (it counts as quantised): rebuild it from a clean config,
    # on the meta device, and hand it the loaded tensors themselves (assign=True: no second copy).
    config = copy.deepcopy(loaded.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = ""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True, assign=True)
    model.tie_weights()
    del loaded
    gc.collect()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def write_manifest(folder: Path, info: dict) -> None:
    files = {}
    for f in sorted(p for p in folder.iterdir() if p.is_file() and p.name != "qgguf-asset.json"):
        files[f.name] = {"size": f.stat().st_size, "sha256": sha256_file(f)}
    (folder / "qgguf-asset.json").write_text(json.dumps({**info, "files": files}, indent=2) + "\n")


def degrid_to_hf(src: Path, out: Path, seed: int, expected_tensor_sha256: str = "", source_sha256: str = "") -> Path:
    """De-grid the GGUF `src` into an HF folder at `out` (built beside it, renamed into place at the end)."""
    import transformers

    out = Path(out)
    if out.exists():
        raise QggufError(f"{out} already exists; remove it first")
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        gguf_dir = work / "gguf"
        gguf_dir.mkdir()
        f32 = gguf_dir / (src.stem + ".degrid-f32.gguf")
        degrid_gguf(src, f32, seed)
        hf = work / "hf"
        print("qgguf: saving the de-gridded model as an HF folder (transformers) ...", file=sys.stderr)
        save_hf_folder(gguf_dir, f32.name, hf)
        shutil.rmtree(gguf_dir)
        digest = tensor_digest(hf)
        if expected_tensor_sha256 and digest != expected_tensor_sha256:
            raise QggufError(f"the de-gridded tensors of {src.name} have sha256 {digest}, expected "
                             f"{expected_tensor_sha256}: this numpy/gguf-py/transformers produced other weights "
                             "than the pinned ones; use the versions in pyproject.toml")
        write_manifest(hf, {
            "source": src.name, "source_sha256": source_sha256, "degrid_seed": seed,
            "tensor_sha256": digest, "transformers": transformers.__version__,
        })
        try:
            os.replace(hf, out)
        except OSError:
            if out.exists():  # another fetch of the same model finished first
                raise QggufError(f"{out} was written by another run meanwhile; run `qgguf fetch` again to "
                                 "check it") from None
            raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out
