"""A model given on the command line: resolved to its Hugging Face folder, checked, and hashed.

`model_sha256` is the one model hash: calibration statistics, converter GGUFs and bench rows are all keyed by it.
It covers every file of the folder (config, weights, tokenizer), since each of them changes what the converter
writes."""

from __future__ import annotations

import json
import struct
from pathlib import Path

from qgguf.errors import QggufError
from qgguf.files import require_dir
from qgguf.hashing import folder_sha256


def resolve_model(arg: str | Path) -> Path:
    """An HF folder, or the name of a model asset from `qgguf fetch` (e.g. smollm2-135m)."""
    from qgguf.assets.fetch import asset_path

    path = Path(arg)
    if path.exists() or "/" in str(arg):
        return path
    try:
        return asset_path(str(arg))
    except QggufError as e:
        if "unknown asset" in str(e):
            raise QggufError(f"{str(arg)!r} is neither a model folder nor a model asset; give the path of a "
                             "Hugging Face model folder or an asset name (`qgguf fetch --list`)") from None
        raise


def check_model_dir(model_dir: Path) -> dict:
    """The folder's config.json, after checking it describes a causal LM the converter can take."""
    model_dir = require_dir(model_dir, "model folder", "give the path of a Hugging Face model folder "
                                                       "(config.json + safetensors), e.g. from `qgguf fetch`")
    cfg_path = model_dir / "config.json"
    if not cfg_path.is_file():
        raise QggufError(f"model folder {str(model_dir)!r} has no config.json; "
                         "give a Hugging Face model folder (config.json + *.safetensors)")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise QggufError(f"{cfg_path} is not valid JSON ({e}); the model folder is corrupt") from None
    archs = cfg.get("architectures") or []
    if not any(a.endswith("ForCausalLM") or a.endswith("LMHeadModel") for a in archs):
        raise QggufError(f"{cfg_path} describes {archs or 'no architecture'}, not a causal language model "
                         "(architectures must name a *ForCausalLM class); qgguf converts causal LMs only")
    if not any(model_dir.glob("*.safetensors")) and not any(model_dir.glob("*.bin")):
        raise QggufError(f"model folder {str(model_dir)!r} has no *.safetensors weights; save the model with "
                         "save_pretrained(..., safe_serialization=True)")
    return cfg


def model_sha256(model_dir: Path) -> str:
    """The model's content hash (every file of its folder)."""
    return folder_sha256(Path(model_dir))


# safetensors dtype → the converter's lossless --outtype for it
_OUTTYPE = {"BF16": "bf16", "F16": "f16"}


def source_float_type(model_dir: Path) -> str:
    """The converter's --outtype that holds every weight of the folder exactly: `bf16` or `f16` when every matrix
    (a floating tensor of 2 or more dimensions) in its safetensors files has that type, else `f32`. Vectors
    (norms, biases) do not count: the converter writes them as F32 whatever the outtype. Reads the files'
    headers only."""
    dtypes = set()
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        return "f32"  # PyTorch .bin weights: their types are not known without loading them
    for f in files:
        try:
            with open(f, "rb") as fh:
                n = struct.unpack("<Q", fh.read(8))[0]
                if n > 100_000_000:
                    raise ValueError(f"header of {n} bytes")
                header = json.loads(fh.read(n))
        except (OSError, ValueError, struct.error, UnicodeDecodeError) as e:
            raise QggufError(f"{f} is not a readable safetensors file ({e}); the model folder is corrupt") from None
        for name, info in header.items():
            if name != "__metadata__" and isinstance(info, dict) and len(info.get("shape", ())) >= 2 \
                    and str(info.get("dtype", "")).startswith(("F", "BF")):
                dtypes.add(info["dtype"])
    return _OUTTYPE.get(dtypes.pop(), "f32") if len(dtypes) == 1 else "f32"
