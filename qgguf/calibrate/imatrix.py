"""llama.cpp importance-matrix files: read theirs, write ours (for `llama-quantize --imatrix`).

GGUF layout, as tools/imatrix/imatrix.cpp writes and common/imatrix-loader.cpp reads it:
  general.type = "imatrix"; imatrix.datasets (string array), imatrix.chunk_count, imatrix.chunk_size (u32);
  per weight NAME: NAME.in_sum2 (F32, ne = [n_per_row, n_mat]): Σ over tokens of x²,
                   NAME.counts  (F32, ne = [1, n_mat]): the number of tokens summed (one per expert).
llama-quantize uses in_sum2 / counts per row element, per expert for stacked expert tensors (n_mat = experts; an
expert with count 0 gets all ones). The legacy binary (.dat) layout is read as well.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from qgguf.calibrate.stats import Stats
from qgguf.errors import QggufError
from qgguf.files import atomic_output, require_file

SOURCES = ("act", "fisher")


@dataclass
class ImatrixEntry:
    sums: np.ndarray  # float32[n_mat, n_per_row]: Σ x² (per expert matrix)
    counts: np.ndarray  # float32[n_mat]: tokens summed

    def mean(self) -> np.ndarray:
        """What llama-quantize hands the quantiser: sums / counts (1 where a matrix saw no token), flattened."""
        c = self.counts[:, None]
        return np.where(c > 0, self.sums / np.where(c > 0, c, 1), 1.0).astype(np.float32).reshape(-1)


@dataclass
class Imatrix:
    entries: dict[str, ImatrixEntry] = field(default_factory=dict)
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = 0
    legacy: bool = False

    def mean(self, name: str) -> np.ndarray:
        return self.entries[name].mean()


# ---------------------------------------------------------------------------------------------------- reading

def read_imatrix(path: Path) -> Imatrix:
    """An imatrix file from llama-imatrix (GGUF, or the legacy .dat binary) or from qgguf."""
    path = require_file(path, "imatrix file", "make one with `llama-imatrix` or `qgguf calibrate --imatrix`")
    with open(path, "rb") as f:
        magic = f.read(4)
    return _read_gguf(path) if magic == b"GGUF" else _read_legacy(path)


def _read_gguf(path: Path) -> Imatrix:
    import gguf

    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # gguf-py raises ValueError/struct errors on corrupt files
        raise QggufError(f"{path} is not a readable GGUF file ({e}); re-create the imatrix") from None
    im = Imatrix()
    fields = reader.fields
    if gguf.Keys.IMatrix.DATASETS in fields:
        fld = fields[gguf.Keys.IMatrix.DATASETS]
        im.datasets = [bytes(fld.parts[i]).decode("utf-8", "replace") for i in fld.data]
    for key, attr in ((gguf.Keys.IMatrix.CHUNK_COUNT, "chunk_count"), (gguf.Keys.IMatrix.CHUNK_SIZE, "chunk_size")):
        if key in fields:
            setattr(im, attr, int(fields[key].parts[-1][0]))
    sums, counts = {}, {}
    for t in reader.tensors:
        if t.tensor_type != gguf.GGMLQuantizationType.F32:
            raise QggufError(f"{path}: imatrix tensor {t.name!r} is {t.tensor_type.name}, not F32; the file is "
                             "not an imatrix")
        ne = [int(n) for n in t.shape]  # ne0 first
        data = np.asarray(t.data, dtype=np.float32).reshape(-1)
        if t.name.endswith(".in_sum2"):
            n_per_row = ne[0]
            sums[t.name[:-len(".in_sum2")]] = data.reshape(-1, n_per_row).copy()
        elif t.name.endswith(".counts"):
            counts[t.name[:-len(".counts")]] = data.copy()
    if not sums:
        raise QggufError(f"{path} holds no <name>.in_sum2 tensors; it is not a llama.cpp imatrix")
    for name in sorted(sums):
        if name not in counts:
            raise QggufError(f"{path}: {name}.in_sum2 has no {name}.counts; the imatrix is damaged")
        s, c = sums[name], counts[name]
        if s.shape[0] != c.shape[0]:
            if c.shape[0] == 1:
                c = np.repeat(c, s.shape[0])
            else:
                raise QggufError(f"{path}: {name} has {s.shape[0]} matrices but {c.shape[0]} counts")
        im.entries[name] = ImatrixEntry(s, c)
    return im


def _read_legacy(path: Path) -> Imatrix:
    """The pre-GGUF binary: n_entries, then (name, ncall, nval, values[nval]) where values = mean(x²)·ncall."""
    data = Path(path).read_bytes()
    im = Imatrix(legacy=True)
    try:
        (n_entries,), off = struct.unpack_from("<i", data, 0), 4
        if n_entries < 1:
            raise ValueError("no entries")
        for _ in range(n_entries):
            (length,) = struct.unpack_from("<i", data, off)
            off += 4
            name = data[off:off + length].decode("utf-8")
            off += length
            ncall, nval = struct.unpack_from("<ii", data, off)
            off += 8
            if nval < 1:
                raise ValueError(f"entry {name!r} has {nval} values")
            vals = np.frombuffer(data, dtype="<f4", count=nval, offset=off).astype(np.float32)
            off += 4 * nval
            # legacy sums are mean·ncall with counts ncall: the same sums/counts ratio as the GGUF layout
            im.entries[name] = ImatrixEntry(vals.reshape(1, -1).copy(), np.array([max(ncall, 0)], np.float32))
        if off + 4 <= len(data):
            (im.chunk_count,) = struct.unpack_from("<i", data, off)
            off += 4
            if off + 4 <= len(data):
                (length,) = struct.unpack_from("<i", data, off)
                off += 4
                if length > 0:
                    im.datasets = [data[off:off + length].decode("utf-8", "replace")]
    except (struct.error, ValueError, UnicodeDecodeError) as e:
        raise QggufError(f"{path} is neither a GGUF nor a legacy llama.cpp imatrix ({e})") from None
    return im


# ---------------------------------------------------------------------------------------------------- writing

def imatrix_from_stats(stats: Stats, source: str = "act") -> Imatrix:
    """An imatrix from calibration statistics: E[x²] (source "act", what llama-imatrix collects) or the
    per-channel Fisher importance (source "fisher"). Sums are mean × tokens, so in_sum2/counts is the vector.

    Stacked expert tensors get one matrix per expert with the tokens routed to it as its count, as llama-imatrix
    writes them. An expert whose statistics are calibrate's prior (routed fewer than the threshold) is written
    with at least one token, so llama-quantize uses the prior rather than all ones for an expert never routed."""
    if source not in SOURCES:
        raise QggufError(f"imatrix source {source!r} is not one of {', '.join(SOURCES)}")
    n = int(stats.meta["tokens"])
    seq_len = int(stats.meta["seq_len"])
    im = Imatrix(datasets=[str(stats.meta.get("text", ""))], chunk_count=n // seq_len, chunk_size=seq_len)
    for name, t in stats.tensors.items():
        vec = t.act_sq if source == "act" else t.importance
        if vec is None:
            continue  # a pure input embedding has no activation vector (llama-imatrix has none either)
        if t.expert_tokens is not None:
            counts = t.expert_tokens.astype(np.float64)
            counts[t.prior_experts] = np.maximum(counts[t.prior_experts], 1.0)
            if source == "fisher":  # importance is per calibration token: per expert, over its routed tokens
                vec = vec.astype(np.float64) * n / np.maximum(counts, 1.0)[:, None]
            im.entries[name] = ImatrixEntry((vec.astype(np.float64) * counts[:, None]).astype(np.float32),
                                            counts.astype(np.float32))
            continue
        im.entries[name] = ImatrixEntry((vec.astype(np.float64) * n).astype(np.float32).reshape(1, -1),
                                        np.array([n], dtype=np.float32))
    return im


def write_imatrix(im: Imatrix, out: Path, inputs: list[Path] = ()) -> Path:
    """Write `im` in llama.cpp's GGUF imatrix layout (atomically; entries in name order as llama-imatrix does)."""
    import gguf

    if not im.entries:
        raise QggufError(f"no imatrix entries to write to {out}")
    with atomic_output(out, inputs) as tmp:
        w = gguf.GGUFWriter(str(tmp), arch="")
        w.kv_data[0].pop(gguf.Keys.General.ARCHITECTURE, None)  # llama-imatrix writes no architecture
        w.add_type(gguf.GGUFType.IMATRIX)
        w.add_array(gguf.Keys.IMatrix.DATASETS, list(im.datasets))
        w.add_uint32(gguf.Keys.IMatrix.CHUNK_COUNT, int(im.chunk_count))
        w.add_uint32(gguf.Keys.IMatrix.CHUNK_SIZE, int(im.chunk_size))
        for name in sorted(im.entries):
            e = im.entries[name]
            w.add_tensor(f"{name}.in_sum2", np.ascontiguousarray(e.sums, dtype=np.float32))
            w.add_tensor(f"{name}.counts", np.ascontiguousarray(e.counts, dtype=np.float32).reshape(-1, 1))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return Path(out)


# ---------------------------------------------------------------------------------------------------- CLI

def add_parser(sub) -> None:
    p = sub.add_parser("imatrix", help="write a llama.cpp imatrix from qgguf statistics, or summarise an imatrix")
    p.add_argument("input", type=Path, help="qgguf statistics (.safetensors) to convert, or an imatrix to show")
    p.add_argument("-o", "--out", type=Path, default=None, help="output imatrix GGUF (omit to show the input)")
    p.add_argument("--from", dest="source", default="act", choices=SOURCES,
                   help="act = E[x²] like llama-imatrix (default), fisher = per-channel Fisher importance")
    p.set_defaults(func=_cmd)


def _cmd(args) -> int:
    from qgguf.calibrate.stats import load_stats

    if args.out is None:
        im = read_imatrix(args.input)
        print(f"{args.input}: {len(im.entries)} entries, chunks {im.chunk_count} × {im.chunk_size}, "
              f"datasets {im.datasets}{' (legacy format)' if im.legacy else ''}")
        for name, e in im.entries.items():
            m = e.mean()
            print(f"  {name:40s} n={m.size:6d} tokens={int(e.counts.max()):8d} mean={m.mean():.4g} max={m.max():.4g}")
        return 0
    write_imatrix(imatrix_from_stats(load_stats(args.input), args.source), args.out, inputs=[args.input])
    print(args.out)
    return 0
