"""`qgguf convert-hf`: an HF folder to an F32/F16/BF16 GGUF with the pinned tree's own converter.

qgguf never re-implements per-architecture tensor naming, tokenizer export or metadata: llama.cpp's
convert_hf_to_gguf.py does that, run with the pinned tree's own gguf-py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from .errors import QggufError
from .files import atomic_output, require_dir
from .llama import source_tree

OUTTYPES = ("f32", "f16", "bf16")


def resolve_model(arg: str | Path) -> Path:
    """An HF folder, or the name of a model asset from `qgguf fetch` (e.g. smollm2-135m)."""
    path = Path(arg)
    if path.exists() or "/" in str(arg):
        return path
    from . import assets

    try:
        return assets.asset_path(str(arg))
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


def converter_env(tree: Path) -> dict[str, str]:
    """Environment for the converter: the tree's gguf-py first on the path, and no hub access."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(tree / "gguf-py"), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    return env


def convert_hf(model_dir: Path, out: Path, outtype: str = "f32", quiet: bool = True) -> Path:
    """Convert an HF folder to a GGUF at `out` (atomically). Returns `out`."""
    model_dir, out = resolve_model(model_dir), Path(out)
    if outtype not in OUTTYPES:
        raise QggufError(f"--outtype {outtype!r} is not one of {', '.join(OUTTYPES)}; use `qgguf convert` "
                         "for quantised output")
    check_model_dir(model_dir)
    tree = source_tree()
    script = tree / "convert_hf_to_gguf.py"
    with atomic_output(out, inputs=[model_dir]) as tmp:
        cmd = [sys.executable, str(script), str(model_dir), "--outfile", str(tmp), "--outtype", outtype]
        res = subprocess.run(cmd, env=converter_env(tree), capture_output=quiet, text=True)
        if res.returncode != 0:
            detail = (res.stderr or "").strip().splitlines()[-15:] if quiet else []
            raise QggufError(f"llama.cpp's converter failed on {model_dir} (exit {res.returncode}):\n"
                             + "\n".join(detail))
    return out


def add_parser(sub) -> None:
    p = sub.add_parser("convert-hf", help="convert an HF model folder to an F32/F16/BF16 GGUF "
                                          "(llama.cpp's own converter)")
    p.add_argument("model_dir", type=Path)
    p.add_argument("-o", "--out", type=Path, required=True, help="output GGUF path")
    p.add_argument("--outtype", default="f32", choices=OUTTYPES)
    p.add_argument("-v", "--verbose", action="store_true", help="show the converter's own output")
    p.set_defaults(func=_cmd)


def _cmd(args) -> int:
    out = convert_hf(args.model_dir, args.out, args.outtype, quiet=not args.verbose)
    print(out)
    return 0
