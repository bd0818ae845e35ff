"""The calibration statistics file: one safetensors file keyed by GGUF tensor name.

Per GGUF tensor `T` (a weight of rows × row_len in GGUF layout, i.e. HF out_features × in_features):
  T.importance  float32[row_len]       per-input-channel Fisher importance I_j = Σ_rows F_ij
  T.act_sq      float32[row_len]       E[x_j²], the input's second moment (what llama.cpp's imatrix holds);
                                       absent for an input embedding that is not also the output head
  T.fisher      float32[rows, row_len] per-element diagonal Fisher, GGUF row order (only when asked for)
  T.row_fisher  float32[rows]          E_t[g_r²] per output row r, GGUF row order (Linear weights, only with
                                       `--covariance`): the row factor d of the Kronecker-factored Fisher
                                       F ≈ diag(d) ⊗ E[x xᵀ] (calibrate/covariance.py)
A stacked expert tensor (ffn_{gate,up,down}_exps: experts × rows × row_len) has one vector per expert:
  T.importance, T.act_sq  float32[experts, row_len]
  T.expert_tokens         float32[experts]  tokens routed to each expert during calibration
Experts routed fewer than the threshold of tokens carry a prior instead of their own estimate (calibrate's
`expert_prior`); the metadata lists them per tensor (`prior_experts`).
All Fisher values are per token: F is the expected diagonal Fisher of one token's predictive distribution, so
adding a weight error δ to the tensor costs about ½ Σ F δ² nats of KL per token.
The JSON metadata (key "qgguf") holds the run (model hash, tokens, sequence length, seed, version) and, per
tensor, its HF name, shape and ΣF.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from qgguf.errors import QggufError
from qgguf.files import atomic_output, require_file

FORMAT_VERSION = 1
META_KEY = "qgguf"


@dataclass
class TensorStats:
    """Calibration statistics of one GGUF weight tensor."""

    name: str  # GGUF tensor name
    hf_name: str
    shape: tuple[int, int]  # (rows, row_len): GGUF rows × the row length ne0 = HF (out_features, in_features)
    kind: str  # "linear", "embedding", or "tied" (an input embedding that is also the output head)
    importance: np.ndarray  # float32[row_len]: Σ_rows of the per-token diagonal Fisher
    act_sq: np.ndarray | None = None  # float32[row_len]: E[x²] of the input (None for a pure embedding)
    fisher: np.ndarray | None = None  # float32[rows, row_len]: per-element diagonal Fisher, GGUF row order
    row_fisher: np.ndarray | None = None  # float32[rows]: E_t[g_r²] per output row, GGUF row order (K-FAC)
    expert_tokens: np.ndarray | None = None  # float32[experts]: tokens routed to each expert (expert tensors only)
    prior_experts: list[int] = field(default_factory=list)  # experts whose statistics are the prior (too few tokens)

    @property
    def fisher_sum(self) -> float:
        """ΣF: the diagonal Fisher (per token) summed over every element of the tensor."""
        return float(self.importance.astype(np.float64).sum())

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape))

    @property
    def n_expert(self) -> int | None:
        """Experts stacked in the tensor (shape experts × rows × row_len), None for a 2-D tensor."""
        return self.shape[0] if len(self.shape) == 3 else None

    @property
    def fisher_mean(self) -> float:
        """F̄ = ΣF / number of elements."""
        return self.fisher_sum / self.numel


@dataclass
class Stats:
    """All tensors' statistics plus the run's metadata (model_sha256, tokens, seq_len, seed, qgguf_version, …)."""

    meta: dict
    tensors: dict[str, TensorStats] = field(default_factory=dict)
    path: Path | None = None  # the file it was loaded from; per-element Fisher is read from it on demand
    timing: dict = field(default_factory=dict)  # seconds of the run that made it (not saved: files stay identical)

    def __getitem__(self, name: str) -> TensorStats:
        try:
            return self.tensors[name]
        except KeyError:
            raise QggufError(f"the statistics file has no tensor {name!r}; recalibrate the same model "
                             "(`qgguf calibrate`)") from None

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def names(self) -> list[str]:
        return list(self.tensors)

    def per_element(self, name: str) -> np.ndarray | None:
        """The per-element Fisher of `name` (rows × row_len, GGUF row order), or None if it was not collected."""
        t = self[name]
        if t.fisher is not None or self.path is None:
            return t.fisher
        from safetensors import safe_open

        with safe_open(str(self.path), framework="numpy") as f:
            key = f"{name}.fisher"
            return f.get_tensor(key) if key in f.keys() else None


def save_stats(stats: Stats, out: Path, inputs: list[Path] = ()) -> Path:
    """Write `stats` to `out` atomically (sorted keys, no timestamps: same statistics → same bytes)."""
    from safetensors.numpy import save_file

    arrays: dict[str, np.ndarray] = {}
    per_tensor = {}
    for name in sorted(stats.tensors):
        t = stats.tensors[name]
        arrays[f"{name}.importance"] = np.ascontiguousarray(t.importance, dtype=np.float32)
        if t.act_sq is not None:
            arrays[f"{name}.act_sq"] = np.ascontiguousarray(t.act_sq, dtype=np.float32)
        if t.fisher is not None:
            arrays[f"{name}.fisher"] = np.ascontiguousarray(t.fisher, dtype=np.float32)
        if t.row_fisher is not None:
            arrays[f"{name}.row_fisher"] = np.ascontiguousarray(t.row_fisher, dtype=np.float32)
        per_tensor[name] = {"hf_name": t.hf_name, "shape": list(t.shape), "kind": t.kind,
                            "fisher_sum": t.fisher_sum, "fisher_mean": t.fisher_mean}
        if t.expert_tokens is not None:
            arrays[f"{name}.expert_tokens"] = np.ascontiguousarray(t.expert_tokens, dtype=np.float32)
            per_tensor[name]["prior_experts"] = [int(e) for e in t.prior_experts]
    meta = dict(stats.meta, format=FORMAT_VERSION, tensors=per_tensor)
    with atomic_output(out, inputs) as tmp:
        save_file(arrays, str(tmp), metadata={META_KEY: json.dumps(meta, sort_keys=True)})
    return Path(out)


def load_stats(path: Path, per_element: bool = False) -> Stats:
    """Read a statistics file written by `qgguf calibrate`. Per-element Fisher is left on disk unless asked for
    (see Stats.per_element)."""
    from safetensors import SafetensorError, safe_open

    path = require_file(path, "statistics file", "run `qgguf calibrate MODEL_DIR -o FILE` first")
    try:
        with safe_open(str(path), framework="numpy") as f:
            raw = (f.metadata() or {}).get(META_KEY)
            if raw is None:
                raise QggufError(f"{path} is a safetensors file but not qgguf statistics; "
                                 "make one with `qgguf calibrate`")
            meta = json.loads(raw)
            if meta.get("format") != FORMAT_VERSION:
                raise QggufError(f"{path} has statistics format {meta.get('format')!r}, this qgguf reads "
                                 f"{FORMAT_VERSION}; recalibrate with this version")
            keys = set(f.keys())
            tensors = {}
            for name, info in meta.pop("tensors").items():
                tensors[name] = TensorStats(
                    name=name, hf_name=info["hf_name"], shape=tuple(info["shape"]), kind=info["kind"],
                    importance=f.get_tensor(f"{name}.importance"),
                    act_sq=f.get_tensor(f"{name}.act_sq") if f"{name}.act_sq" in keys else None,
                    fisher=f.get_tensor(f"{name}.fisher") if per_element and f"{name}.fisher" in keys else None,
                    row_fisher=f.get_tensor(f"{name}.row_fisher") if f"{name}.row_fisher" in keys else None,
                    expert_tokens=f.get_tensor(f"{name}.expert_tokens") if f"{name}.expert_tokens" in keys else None,
                    prior_experts=[int(e) for e in info.get("prior_experts", [])])
    except SafetensorError as e:
        raise QggufError(f"{path} is not a readable safetensors file ({e}); make one with `qgguf calibrate`") from None
    except (ValueError, KeyError) as e:
        raise QggufError(f"{path} has malformed qgguf statistics ({e}); recalibrate") from None
    return Stats(meta=meta, tensors=tensors, path=path)
