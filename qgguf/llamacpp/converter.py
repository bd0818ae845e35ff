"""llama.cpp's own `convert_hf_to_gguf.py`, run with the pinned tree's gguf-py (`qgguf convert-hf`)."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from qgguf.errors import QggufError
from qgguf.files import atomic_output
from qgguf.llamacpp.build import source_tree
from qgguf.models import check_model_dir, resolve_model

OUTTYPES = ("f32", "f16", "bf16")


def converter_env(tree: Path) -> dict[str, str]:
    """Environment for the converter: the tree's gguf-py first on the path, and no hub access."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(tree / "gguf-py"), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    return env


def converter_sha256() -> str:
    """What a converted GGUF depends on besides the model: the llama.cpp tree (its converter and gguf-py, with our
    patches) and this module. Caches of converter output are keyed by it."""
    from qgguf.hashing import code_sha256
    from qgguf.llamacpp.build import BuildSpec

    h = hashlib.sha256(BuildSpec.from_env(cuda=False).tree_sha256().encode())
    h.update(code_sha256("llamacpp/converter.py").encode())
    return h.hexdigest()


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
            reason = failure_reason(res.stderr or "", tmp) if quiet else ""
            raise QggufError(f"llama.cpp's converter failed on {model_dir} (exit {res.returncode}){reason} (its "
                             f"full output: `qgguf convert-hf {model_dir} -o FILE.gguf -v`)")
    return out


_EXCEPTION_LINE = re.compile(r"^[\w.]*(Error|Exception|Interrupt)\b.*|^error:.*", re.I)


def failure_reason(stderr: str, out: Path) -> str:
    """The converter's reason, as ': …' for one message: a full disk named as such (its progress bar is the last
    thing it prints then), else its exception line (its traceback stays behind `convert-hf -v`), else its last
    line that is not a progress-bar redraw."""
    if "No space left on device" in stderr or "[Errno 28]" in stderr:
        free = shutil.disk_usage(out.parent).free / 1e9
        return (f": the disk holding {out.parent} is full ({free:.1f} GB free now); free space there, or point "
                "QGGUF_CACHE at a larger disk")
    lines = [l.strip() for l in re.split(r"[\r\n]+", stderr) if l.strip()]
    exc = [l for l in lines if _EXCEPTION_LINE.match(l)]
    text = [l for l in lines if not re.search(r"\d+%\|", l)]  # tqdm redraws: 'Writing:  65%|██  | …'
    line = exc[-1] if exc else text[-1] if text else ""
    return f": {line}" if line else ""


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
