"""Export: the converter's GGUF, streamed tensor by tensor into the planned types.

Export: rewrite a GGUF made by llama.cpp's own converter with each tensor in its planned type.

The converter's F32 (or F16/BF16) GGUF carries the metadata, tokenizer, tensor names, order and the Q/K
permutation; we copy all of it and only re-encode tensor data with qgguf.formats, one tensor at a time
(memory-mapped in, streamed out), so memory does not grow with the model: each tensor is upcast to float32 on
its own, and the pages of the mapped file it occupied are handed back to the kernel once it is read
(`release_pages`), so neither anonymous nor file-backed memory grows with the model's depth.

With an encode cache (a folder), each encoded tensor is kept under a key of its weights, importance, type and
that type's encoder sources: runs that export the same model at several budgets (`qgguf bench`) encode each
(tensor, type) pair once.
"""

from __future__ import annotations

import mmap
import sys
import warnings
from collections import Counter
from pathlib import Path
from typing import Mapping

import numpy as np
import torch
from tqdm import tqdm

from qgguf import __version__, formats
from qgguf.errors import QggufError
from qgguf.export.encode_cache import EncodeCache
from qgguf.formats import engines
from qgguf.files import atomic_output, require_file

# llama_ftype values for general.file_type: llama.cpp only displays it; we name the type holding most weights.
_FTYPE = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9, "Q2_K": 10, "Q3_K": 12,
          "Q4_K": 15, "Q5_K": 17, "Q6_K": 18, "IQ4_NL": 25, "IQ4_XS": 30, "BF16": 32}


def open_gguf(path: Path):
    import gguf

    require_file(path, "GGUF file", "convert the model first with `qgguf convert-hf`")
    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # gguf-py raises ValueError/struct errors on corrupt files
        raise QggufError(f"{path} is not a readable GGUF file ({e}); re-create it with `qgguf convert-hf`") from None


def release_pages(reader, reader_tensor) -> None:
    """Drop this process's mapping of a tensor's pages (madvise MADV_DONTNEED on the read-only file mapping): the
    data stays in the page cache and is read again if touched, but it no longer counts in this process's memory.
    A no-op where the platform has no madvise."""
    mm = getattr(reader.data, "_mmap", None)
    if mm is None or not hasattr(mm, "madvise") or not hasattr(mmap, "MADV_DONTNEED"):
        return
    start = int(reader_tensor.data_offset) // mmap.PAGESIZE * mmap.PAGESIZE
    end = min(len(mm), int(reader_tensor.data_offset) + int(reader_tensor.n_bytes))
    if end > start:
        mm.madvise(mmap.MADV_DONTNEED, start, end - start)


def tensor_f32(reader_tensor, device: str | torch.device = "cpu", reader=None) -> torch.Tensor:
    """A GGUF tensor as float32 torch, GGUF layout (rows × row length), decoded with the registry (a BF16 or F16
    tensor is upcast exactly). With `reader` (the tensor's GGUFReader) the tensor's mapped pages are released once
    it is read (`release_pages`)."""
    fmt = formats.by_id(int(reader_tensor.tensor_type))
    shape = tuple(int(s) for s in reversed(reader_tensor.shape.tolist()))
    if fmt.name == "F32":
        out = torch.from_numpy(np.array(reader_tensor.data, dtype=np.float32).reshape(shape)).to(device)  # one copy in flight
    else:
        with warnings.catch_warnings():  # the mapped file is read-only, and decode only reads it
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            out = fmt.decode(np.asarray(reader_tensor.data).view(np.uint8).reshape(-1), shape, device=device,
                             tensor=reader_tensor.name)
    if reader is not None:
        release_pages(reader, reader_tensor)
    return out


def export_gguf(src: Path, out: Path, types: Mapping[str, str],
                importance: Mapping[str, torch.Tensor] | None = None, *,
                extra_metadata: Mapping[str, str] | None = None, device: str = "cpu",
                progress: bool = True, reader=None, encode_cache: Path | None = None,
                roundings: Mapping[str, str] | None = None, covariance=None,
                covariance_tokens: int | None = None) -> Path:
    """Write `out`: `src` with every tensor named in `types` encoded in that type (others copied as they are).

    `importance` maps tensor names to per-input-channel vectors for the importance-weighted encoders.
    `reader`: `src` already opened with open_gguf (reading a GGUF's metadata takes seconds on a large
    vocabulary). `encode_cache`: a folder that keeps encoded tensors for later exports (see the module docstring).
    `roundings`: tensor name → "plain" | "feedback" (the plan's); the feedback tensors are rounded with error
    feedback (formats/feedback.py) against `covariance(name)`, their input covariance H (one tensor's at a time),
    estimated from `covariance_tokens` calibration tokens (they set the damping).
    """
    import gguf

    src, out = Path(src), Path(out)
    reader = reader if reader is not None else open_gguf(src)
    cache = EncodeCache(encode_cache) if encode_cache is not None else None
    engine = engines.choose(device)
    by_name = {t.name: t for t in reader.tensors}
    unknown = sorted(set(types) - set(by_name))
    if unknown:
        raise QggufError(f"the plan names tensors that {src.name} does not have: {', '.join(unknown[:5])}; "
                         "the plan or statistics belong to another model")
    for name, tname in types.items():
        fmt = formats.get(tname)
        fmt.check_row_len(int(by_name[name].shape[0]), name)
    importance = importance or {}
    roundings = roundings or {}
    # the covariance is per Linear input: stacked experts (3-D) have none yet, they are rounded plain
    stacked = sorted(n for n, v in roundings.items() if v == "feedback" and n in by_name
                     and len(by_name[n].shape) == 3)
    if stacked:
        print(f"qgguf: export: {len(stacked)} stacked expert tensors ({stacked[0]}, …) have no input covariance; "
              "rounded plain", file=sys.stderr)
        roundings = {n: ("plain" if n in stacked else v) for n, v in roundings.items()}
    if any(v == "feedback" for v in roundings.values()) and covariance is None:
        raise QggufError("the plan rounds tensors with error feedback but no input covariance was given; "
                         "calibrate with --covariance")

    arch = reader.fields["general.architecture"].contents()
    with atomic_output(out, inputs=[src]) as tmp:
        writer = gguf.GGUFWriter(tmp, arch=arch)
        for field in reader.fields.values():
            if field.name == "general.architecture" or field.name.startswith("GGUF."):
                continue
            if field.name in ("general.file_type", "general.quantized_by"):
                continue
            vtype = field.types[0]
            sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(field.name, field.contents(), vtype, sub_type=sub)
        weights = Counter()
        for t in reader.tensors:
            weights[types.get(t.name, formats.by_id(int(t.tensor_type)).name)] += int(t.n_elements)
        main_type = next((n for n, _ in weights.most_common() if n in _FTYPE and n != "F32"), "F32")
        writer.add_file_type(_FTYPE[main_type])
        writer.add_quantized_by(f"qgguf {__version__}")
        for k, v in (extra_metadata or {}).items():
            writer.add_string(k, v)

        plan_fmt = {}
        for t in reader.tensors:
            fmt = formats.get(types[t.name]) if t.name in types else formats.by_id(int(t.tensor_type))
            plan_fmt[t.name] = fmt
            shape = tuple(int(s) for s in reversed(t.shape.tolist()))
            nbytes = fmt.nbytes(shape)
            byte_shape = shape[:-1] + (fmt.row_bytes(shape[-1]),)
            writer.add_tensor_info(t.name, byte_shape, np.dtype(np.uint8), nbytes, raw_dtype=fmt.type_id)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        total = sum(int(t.n_elements) for t in reader.tensors)
        if progress:
            coded = [t for t in reader.tensors if t.name in types]
            kinds = Counter(types[t.name] for t in coded)
            print(f"qgguf: export: {len(coded)} tensors to encode ({sum(int(t.n_elements) for t in coded) / 1e9:.3g} "
                  f"G weights; {', '.join(f'{n} {k}' for k, n in sorted(kinds.items()))}), "
                  f"{len(reader.tensors) - len(coded)} copied as they are", file=sys.stderr)
        with tqdm(total=total, desc="export", unit="w", unit_scale=True, disable=not progress or None) as bar:
            for t in reader.tensors:
                fmt = plan_fmt[t.name]
                if t.name in types:
                    w = tensor_f32(t, device, reader)
                    imp = importance.get(t.name)
                    H = covariance(t.name) if roundings.get(t.name) == "feedback" else None
                    if w.ndim == 3 and imp is not None and imp.ndim == 2:
                        # stacked experts with one importance vector each: encoded expert by expert, which is
                        # the tensor's byte layout (llama-quantize does the same with a per-expert imatrix)
                        raw = np.concatenate([np.asarray(_encode(fmt, w[g], imp[g], t.name, device, cache, engine))
                                              .view(np.uint8).reshape(-1) for g in range(w.shape[0])])
                    else:
                        raw = _encode(fmt, w, imp, t.name, device, cache, engine, H, covariance_tokens)
                    del w
                else:  # not planned: copy the bytes unchanged (as the converter wrote them)
                    raw = np.asarray(t.data).view(np.uint8)
                writer.write_tensor_data(np.ascontiguousarray(raw).reshape(-1))
                del raw
                release_pages(reader, t)
                bar.update(int(t.n_elements))
        writer.close()
        verify_gguf(tmp, {n: f.name for n, f in plan_fmt.items()})
    return out


def encode_tensor(fmt: formats.Format, w: torch.Tensor, importance: torch.Tensor | None, name: str, device: str,
                  engine: engines.Engine, covariance=None, tokens: int | None = None) -> np.ndarray:
    """One tensor's bytes: plain rounding through `engine`, or error feedback against `covariance` (H) when given
    (feedback.py's torch code: it needs the torch kernels' levels and grid, whatever the engine), from `tokens`
    calibration tokens."""
    if covariance is None:
        return fmt.encode(w, importance, tensor=name, device=device, engine=engine)
    from qgguf.formats.feedback import Feedback

    return Feedback(covariance, name, device=device, tokens=tokens).encode(fmt, w.to(device), importance, engine).cpu().numpy()


def _encode(fmt, w: torch.Tensor, imp, name: str, device, cache: EncodeCache | None, engine: engines.Engine,
            covariance=None, tokens: int | None = None):
    return (cache.encode(fmt, w, imp, name, device, engine, covariance, tokens) if cache is not None
            else encode_tensor(fmt, w, imp, name, device, engine, covariance, tokens))


def verify_gguf(path: Path, expected: Mapping[str, str]) -> None:
    """Read a written file back with gguf-py; every tensor must have its planned type and size."""
    reader = open_gguf(path)
    seen = {t.name: t for t in reader.tensors}
    if set(seen) != set(expected):
        raise QggufError(f"{path} was written with tensors {sorted(set(seen) ^ set(expected))[:5]} "
                         "differing from the plan; this is a bug in qgguf's exporter")
    for name, tname in expected.items():
        t = seen[name]
        fmt = formats.get(tname)
        shape = tuple(int(s) for s in reversed(t.shape.tolist()))
        if int(t.tensor_type) != fmt.type_id or int(t.n_bytes) != fmt.nbytes(shape):
            raise QggufError(f"{path}: tensor {name} was written as type id {int(t.tensor_type)} with "
                             f"{int(t.n_bytes)} bytes, the plan says {tname} ({fmt.nbytes(shape)} bytes); "
                             "this is a bug in qgguf's exporter")
