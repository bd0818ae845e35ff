"""Which tensors are planned and with which types: llama-quantize's rules, --tensor-type overrides, palettes."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from qgguf.errors import QggufError


def llama_quantizes(name: str, n_dims: int) -> bool:
    """Whether stock llama-quantize would quantise this tensor (tensor_allows_quantization in llama-quant.cpp).

    Tensors it keeps as they are (1-D tensors, norms, MoE routers, positional embeddings, ...) are not planned,
    so that a --tensor-type-file reproduces the plan exactly. Architecture-specific exclusions are included by
    name, as llama.cpp lists them.
    """
    if n_dims < 2 or not name.endswith("weight"):
        return False
    if name in ("position_embd.weight", "token_types.weight"):
        return False
    return not any(s in name for s in _NOT_QUANTIZED)


_NOT_QUANTIZED = (
    "_norm.weight", "ffn_gate_inp.weight", "ffn_gate_tid2eid.weight", "altup", "laurel", "per_layer_model_proj",
    "ssm_conv1d", "shortconv.conv.weight", "indexer.k_proj.weight", "indexer.q_proj.weight",
    "time_mix_first.weight", "time_mix_w0.weight", "time_mix_w1.weight", "time_mix_w2.weight",
    "time_mix_v0.weight", "time_mix_v1.weight", "time_mix_v2.weight", "time_mix_a0.weight", "time_mix_a1.weight",
    "time_mix_a2.weight", "time_mix_g1.weight", "time_mix_g2.weight", "time_mix_decay_w1.weight",
    "time_mix_decay_w2.weight", "time_mix_lerp_fused.weight", "attn_rel_b.weight", ".position_embd",
    "sam.pos_embd", "sam.neck.", "sam.net_", ".rel_pos", ".patch_embd", ".patch_merger", "a.rvq.codebook",
    "mm.a.code_embd",
)


@dataclass(frozen=True)
class Override:
    """One `pattern=type` of llama-quantize's --tensor-type: a regex searched in the tensor name."""

    pattern: str
    type: str

    def matches(self, name: str) -> bool:
        return re.search(self.pattern, name) is not None


def parse_overrides(specs: Iterable[str]) -> list[Override]:
    """Parse `pattern=type` strings as llama-quantize does (pattern lower-cased, type case-insensitive).

    As in llama-quantize, the first override whose pattern is found in a tensor's name decides its type.
    """
    from qgguf import formats

    out = []
    for spec in specs:
        pattern, sep, tname = str(spec).partition("=")
        if not sep or not pattern or not tname:
            raise QggufError(f"tensor type override {spec!r} is not of the form PATTERN=TYPE "
                             "(e.g. --tensor-type 'attn_v=Q6_K')")
        try:
            fmt = formats.get(tname)
        except QggufError:
            raise QggufError(f"tensor type override {spec!r}: unknown type {tname!r}; known types: "
                             f"{', '.join(formats.names())}") from None
        pattern = pattern.lower()
        try:
            re.compile(pattern)
        except re.error as e:
            raise QggufError(f"tensor type override {spec!r}: the pattern is not a valid regular expression "
                             f"({e}); escape special characters, e.g. 'blk\\.0\\.attn_v=Q6_K'") from None
        out.append(Override(pattern, fmt.name))
    return out


def read_tensor_type_file(path: Path) -> list[Override]:
    """A --tensor-type-file: `pattern=type` entries separated by white space, as llama-quantize reads it."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise QggufError(f"cannot read tensor type file {str(path)!r} ({e.strerror}); check the path") from None
    return parse_overrides(text.split())


def exact_pattern(name: str) -> str:
    """An anchored regex matching exactly `name`, that survives llama-quantize lower-casing the pattern."""
    return "^" + "".join("." if c.isupper() else re.escape(c) for c in name) + "$"


def type_bpw(name: str) -> float:
    from qgguf import formats

    return formats.get(name).bpw


PALETTES = ("stock", "extended")


def palette_types(palette: str = "stock", *, min_type: str | None = None, max_type: str | None = None,
                  overrides: Sequence[Override] = ()) -> list[str]:
    """The types to measure: `stock` (types stock llama.cpp runs) or `extended` (every registered type),
    within --min-type/--max-type, plus every type an override names."""
    from qgguf import formats

    if palette not in PALETTES:
        raise QggufError(f"unknown palette {palette!r}; choose one of: {', '.join(PALETTES)}")
    lo = type_bpw(min_type) if min_type else -math.inf
    hi = type_bpw(max_type) if max_type else math.inf
    types = [f.name for f in formats.all_formats() if (palette == "extended" or f.stock) and lo <= f.bpw <= hi]
    for o in overrides:
        if o.type not in types:
            types.append(o.type)
    return types
