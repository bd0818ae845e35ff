"""HF parameter names → GGUF tensor names and row order, as llama.cpp's own converter writes them.

The pinned tree's converter (conversion/ beside convert_hf_to_gguf.py) is the authority: for each HF weight we
ask the converter class of the model's architecture what it writes, by feeding its `modify_tensors` a probe — a
column holding each row's index. What comes out names the GGUF tensor and says which HF row each GGUF row holds
(llama.cpp permutes the Q and K rows of Llama-family models so that its RoPE sees the pairs it expects). So any
statistic with one entry per weight row (per-element Fisher) can be put in GGUF row order; per-input-channel
vectors are unaffected by row permutations.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import logging
import sys
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qgguf.errors import QggufError


@dataclass(frozen=True)
class GgufTensor:
    """Where one HF weight lands in the GGUF: its name and the HF row behind each GGUF row."""

    name: str
    rows: np.ndarray | None  # int64[n_gguf_rows]: GGUF row r holds HF row rows[r]; None means the same order

    def to_gguf_rows(self, x: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
        """Reorder a per-row array (first axis = HF output rows) into GGUF row order."""
        if self.rows is None:
            return x
        idx = self.rows if isinstance(x, np.ndarray) else torch.as_tensor(self.rows, device=x.device)
        return x[idx]


@lru_cache(maxsize=1)
def _conversion_package() -> Any:
    """The pinned tree's `conversion` package (imported from the tree, which the build has checked out)."""
    from qgguf.llamacpp.build import source_tree

    tree = str(source_tree())
    if tree not in sys.path:
        sys.path.insert(0, tree)
    logging.getLogger("hf-to-gguf").setLevel(logging.WARNING)
    return importlib.import_module("conversion")


class TensorNameMap:
    """The converter's view of one HF model folder: architecture, GGUF names and row orders of its weights."""

    def __init__(self, model_dir: Path):
        self.model_dir = Path(model_dir)
        cfg_path = self.model_dir / "config.json"
        try:
            self.config = json.loads(cfg_path.read_text())
        except (OSError, ValueError) as e:
            raise QggufError(f"cannot read {cfg_path} ({e}); give a Hugging Face model folder") from None
        archs = self.config.get("architectures") or []
        if not archs:
            raise QggufError(f"{cfg_path} names no architecture; give a Hugging Face causal-LM folder")
        self.hf_arch = archs[0]
        conv = _conversion_package()
        try:
            cls = conv.get_model_class(self.hf_arch)
        except NotImplementedError:
            raise QggufError(f"llama.cpp's converter does not support architecture {self.hf_arch!r}; "
                             "qgguf handles the models llama.cpp can convert") from None
        import gguf

        with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()):
            # dry_run + lazy tensors: the converter indexes the safetensors headers and writes nothing
            self._conv = cls(self.model_dir, gguf.LlamaFileType.ALL_F32, Path(tmp) / "probe.gguf", dry_run=True)
        self.arch = gguf.MODEL_ARCH_NAMES[self._conv.model_arch]
        self.block_count = getattr(self._conv, "block_count", None)

    def writes(self, hf_name: str) -> bool:
        """Whether the converter keeps HF weight `hf_name` at all (it drops e.g. rotary caches, unused heads)."""
        return self._conv.filter_tensors((hf_name, lambda: None)) is not None

    def gguf_tensor(self, hf_name: str, n_rows: int, transposed: bool = False) -> GgufTensor | None:
        """The GGUF tensor the converter writes for HF weight `hf_name` (n_rows output rows); None if none.

        `transposed`: the HF weight is stored in × out (transformers' Conv1D, GPT-2), so the probe is a row and
        the converter's transpose turns it into the column of GGUF rows."""
        item = self._conv.filter_tensors((hf_name, lambda: None))
        if item is None:
            return None
        name = item[0]
        bid = next((int(p) for p in name.split(".") if p.isdecimal()), None)  # as the converter derives it
        probe = torch.arange(n_rows, dtype=torch.float64).reshape((1, n_rows) if transposed else (n_rows, 1))
        try:
            with torch.inference_mode(), contextlib.redirect_stdout(io.StringIO()):
                out = list(self._conv.modify_tensors(probe, name, bid))
        except (ValueError, KeyError) as e:
            if "map" in str(e).lower():
                return None  # a weight the converter does not write
            raise
        if not out:
            return None
        if len(out) != 1:
            raise QggufError(f"llama.cpp's converter splits {hf_name!r} into {[n for n, _ in out]}; qgguf does not "
                             f"yet map statistics onto split tensors for architecture {self.hf_arch!r}")
        gname, data = out[0]
        rows = torch.as_tensor(data).reshape(-1).round().to(torch.int64).numpy()
        if rows.shape[0] == n_rows and np.array_equal(rows, np.arange(n_rows)):
            return GgufTensor(gname, None)
        return GgufTensor(gname, rows)

    def expert_tensors(self, model, params: dict[str, torch.Tensor]) -> list[ExpertTensor]:
        """Where the 3-D expert parameters of one experts module (HF name → parameter, experts × out × in in memory)
        land in the GGUF: one ExpertTensor per GGUF tensor.

        Two authorities are composed, each on a probe holding every (parameter, expert, row)'s index: transformers'
        own reverse weight conversion (`revert_weight_conversion`, what `save_pretrained` writes: the fused
        gate_up_proj split into per-expert gate_proj/up_proj, or Mixtral's w1/w3) and the converter's
        `modify_tensors`, which stacks the per-expert weights of a layer into ffn_{gate,up,down}_exps."""
        from transformers.core_model_loading import revert_weight_conversion

        names = sorted(params)
        probe = {}
        for pid, n in enumerate(names):
            e, r = params[n].shape[0], params[n].shape[1]
            probe[n] = (pid * _PARAM_STRIDE + torch.arange(e * r, dtype=torch.float64)).reshape(e, r, 1)
        try:
            saved = revert_weight_conversion(model, probe)
        except Exception as e:  # noqa: BLE001 - transformers' conversion machinery raises many kinds
            raise QggufError(f"transformers cannot map the expert weights {names[0]} … back to checkpoint names "
                             f"({type(e).__name__}: {e}); {self.hf_arch} is not supported") from None
        out: list[ExpertTensor] = []
        with torch.inference_mode(), contextlib.redirect_stdout(io.StringIO()):
            for disk_name in sorted(saved):
                item = self._conv.filter_tensors((disk_name, lambda: None))
                if item is None:
                    continue
                name = item[0]
                bid = next((int(p) for p in name.split(".") if p.isdecimal()), None)
                for gname, data in self._conv.modify_tensors(torch.as_tensor(saved[disk_name]), name, bid):
                    out.append(self._expert_target(gname, torch.as_tensor(data), names, params))
        if not out:
            raise QggufError(f"llama.cpp's converter writes no tensor for the expert weights {names}; "
                             f"{self.hf_arch} is not supported")
        return out

    @staticmethod
    def _expert_target(gname: str, data: torch.Tensor, names: list[str], params: dict) -> ExpertTensor:
        v = data.reshape(data.shape[0], -1).round().to(torch.int64).numpy() if data.ndim == 3 else None
        if v is None:
            raise QggufError(f"llama.cpp's converter writes {gname} as a {data.ndim}-D tensor from the expert "
                             "weights; qgguf maps only stacked 3-D expert tensors")
        pid = np.unique(v // _PARAM_STRIDE)
        if len(pid) != 1:
            raise QggufError(f"llama.cpp's converter mixes several parameters into {gname}; not supported")
        hf = names[int(pid[0])]
        r = params[hf].shape[1]
        flat = v % _PARAM_STRIDE
        experts, rows = flat // r, flat % r
        if not (experts == experts[:, :1]).all() or not (rows == rows[:1]).all():
            raise QggufError(f"llama.cpp's converter reorders rows of {gname} per expert; not supported")
        return ExpertTensor(gname, hf, experts[:, 0].copy(), rows[0].copy())


_PARAM_STRIDE = 1 << 40  # probe values: parameter index × stride + flat (expert, row) index, exact in float64


@dataclass(frozen=True)
class ExpertTensor:
    """One stacked GGUF expert tensor: GGUF expert k, row r holds expert `experts[k]`, row `rows[r]` of `hf_name`
    (a 3-D parameter, experts × out × in)."""

    name: str
    hf_name: str
    experts: np.ndarray  # int64[n_expert]
    rows: np.ndarray  # int64[n_rows]
