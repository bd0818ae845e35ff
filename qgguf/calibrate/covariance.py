"""Input covariance of every Linear input (optionally weighted by the output gradient), one layer at a time.

Error-feedback rounding (formats/feedback.py) and its error metric need, per Linear weight W (rows × n, GGUF
layout), a second-moment matrix H of its input over the calibration tokens. With the per-output-row factor d_r =
E_t[g_tr²] that the Fisher pass keeps (`row_fisher` in the statistics file), the Kronecker-factored (K-FAC) Fisher
of W is F ≈ diag(d) ⊗ H, so a weight error δ (rows × n) costs ΔKL ≈ ½ Σ_r d_r · δ_r H δ_rᵀ nats per token. Two H:

- `uniform` (the default): H = E_t[x_t x_tᵀ], GPTQ's, with g and x taken as independent. The tensors that read the
  same input (attn_q/k/v, ffn_gate/up) share one H, computed once: the first of them to run is the group's
  leader and its GGUF name keys the matrix.
- `gradient`: token t adds g_t x_tᵀ to W's gradient, so with rows uncorrelated δ costs Σ_r g_tr² (δ_r·x_t)² on it;
  splitting g_tr² ≈ (d_r / Σd) · ‖g_t‖² gives H = E_t[w_t x_t x_tᵀ], w_t = ‖g_t‖² / E_t[‖g‖²] (mean 1), one H per
  tensor (q/k/v read one input but have their own gradients). The weights come from the Fisher pass (one float per
  token and tensor, FisherCollector.token_weights); the covariance passes replay its sequences in its order. A
  tensor whose gradient is zero or non-finite on every token gets the unweighted H and a line in the log.

Which measures better depends on the bits: with every Linear weight of SmolLM2 in a 4-bit type the weighted H
turns feedback rounding's −7 % into −41 % of held-out KL, but at the plans' own mixed types (mostly 5–8 bits) the
uniform one measures better on both assets (docs/design.md, "The error model": the decision and its figures).

The statistics' ΣF comes from the sequence estimator, which also counts the terms between positions that attention
couples, so measure rescales d to c·d with c = ΣF / (Σ_r d_r · tr H): the metric's trace equals ΣF, and with a
diagonal H it is ½·Σ_rj F_rj δ_rj² under F_rj = c·d_r·H_jj.

An untied input embedding has no H (its rows are looked up, not multiplied): it is rounded plainly. A tied one
(token_embd.weight, also the output head) has the head input's H (weighted by the logits' gradient under
`gradient`): on SmolLM2 the head carries 87 % of the tied tensor's channel Fisher, and feedback through it halves
the KL its rounding costs (docs/design.md, "Error-feedback rounding").

Memory. H is n² values per distinct input (an 8B model: 3 of 4096² and one of 14336² per layer, 1.0 GB per layer in
float32, 33 GB for 32 layers; weighted, 6 of 4096², 39 GB). The collector never holds all layers: a dry forward of
a few tokens finds which Linear inputs exist, in execution order, and groups them by transformer layer; then each pass over the calibration
text accumulates only the layers that fit `budget_bytes` (float64 accumulators, at least one layer), stops the
forward after the last of them, and writes each layer's file before the next pass starts. Passes are forward
only (no gradient): a pass costs at most one forward over the text, usually less (it stops early).

On disk (a folder): `layer-<key>.safetensors` per layer (float32 H of each group, metadata: the group members and
the token count) and `index.json` (tensor name → file and leader, tokens), written last: a folder without it is
incomplete and is computed again.

Held-out split (`split=True`). Feedback rounding fits its integers to H, so δHδᵀ scored on the same H is a training
error: it promises about three times the KLD gain the rounding delivers (docs/design.md, "Error-feedback
rounding"). A split run also keeps H_a, the covariance of the even-numbered sequences (`<leader>@a`, its token
count in the index as `tokens_a`); the odd ones' H_b = (N·H − N_a·H_a)/N_b follows from it, so one extra matrix per
input serves both halves. Measure then rounds with H_a and scores with H_b: the error of a rounding on tokens it
never saw. The accumulators double (a pass holds about half the layers) and so does the folder.
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from qgguf.errors import QggufError
from qgguf.files import atomic_output

INDEX = "index.json"
HALF = "@a"  # suffix of the even sequences' H in a split folder
COV_VERSION = 2  # 2: gradient-weighted H, one per tensor
WEIGHTINGS = ("gradient", "uniform")
DEFAULT_WEIGHTING = "uniform"  # measured better at plans' mixed types (docs/design.md, "The error model")
DEFAULT_BUDGET_BYTES = 4 << 30  # float64 accumulators held at once (at least one layer's)


class _Stop(Exception):
    """Raised by the last hooked module of a pass: the rest of the forward is not needed."""


@dataclass
class _Group:
    leader: str                     # GGUF name of the first tensor reading this input
    members: list[str]              # every GGUF tensor reading it, in execution order
    module: nn.Module               # the leader's module (hooked in its pass)
    n_in: int
    layer: str                      # "blk.N" or the GGUF name's first part ("output")
    modules: list[nn.Module] = field(default_factory=list, repr=False)  # each member's module
    weights: torch.Tensor | None = field(default=None, repr=False)  # w_t per calibration token (mean 1), or None
    acc: torch.Tensor | None = field(default=None, repr=False)
    acc_a: torch.Tensor | None = field(default=None, repr=False)  # even sequences only (split runs)


def layer_of(gguf_name: str) -> str:
    m = re.match(r"(blk\.\d+)\.", gguf_name)
    return m.group(1) if m else gguf_name.split(".")[0]


def find_groups(model: nn.Module, modules: dict[nn.Module, str], probe: torch.Tensor) -> list[_Group]:
    """Run `probe` (a few tokens) through the model and group the hooked Linear modules by the input object they
    read (q/k/v share one), in execution order. `modules`: Linear/Conv1D module → GGUF tensor name."""
    seen: dict[int, _Group] = {}
    order: list[_Group] = []
    keep: list[torch.Tensor] = []  # keep inputs alive so their ids stay unique during the probe

    def hook_for(mod: nn.Module, name: str):
        def hook(module, args, output):
            x = args[0]
            g = seen.get(id(x))
            if g is None:
                keep.append(x)
                g = seen[id(x)] = _Group(name, [], mod, int(x.shape[-1]), layer_of(name))
                order.append(g)
            g.members.append(name)
            g.modules.append(mod)
        return hook

    handles = [m.register_forward_hook(hook_for(m, n)) for m, n in modules.items()]
    try:
        with torch.no_grad():
            model(input_ids=probe, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    missing = set(modules.values()) - {n for g in order for n in g.members}
    if missing:
        raise QggufError(f"covariance: {', '.join(sorted(missing)[:3])} never ran in a forward pass of the model; "
                         "its input covariance cannot be collected (calibrate without --covariance)")
    return order


def per_tensor(groups: list[_Group], token_weights: dict[str, torch.Tensor], n_tok: int,
               progress: bool = True) -> list[_Group]:
    """One group per tensor, each with its token weights w_t = ‖g_t‖² / mean ‖g‖² (or None: unweighted, logged)."""
    out = []
    for g in groups:
        for name, mod in zip(g.members, g.modules):
            w = token_weights.get(name)
            why = None
            if w is None or w.numel() != n_tok:
                why = "the Fisher pass gave no per-token gradient for it"
            else:
                w = w.to(torch.float64)
                total = float(w.sum())
                if not bool(torch.isfinite(w).all()) or not total > 0:
                    why = "its output gradient is zero or not finite on every calibration token"
                else:
                    w = (w * (n_tok / total)).to(torch.float32)
            if why:
                w = None
                if progress:
                    print(f"qgguf: covariance: {name}: {why}; its input covariance is unweighted", file=sys.stderr)
            out.append(_Group(name, [name], mod, g.n_in, g.layer, [mod], w))
    return out


def _passes(groups: list[_Group], budget_bytes: int, accumulators: int = 1) -> list[list[str]]:
    """Layers in execution order, packed into passes whose float64 accumulators fit the budget."""
    layers: dict[str, int] = {}
    for g in groups:
        layers[g.layer] = layers.get(g.layer, 0) + 8 * accumulators * g.n_in * g.n_in
    passes: list[list[str]] = [[]]
    used = 0
    for layer, size in layers.items():
        if passes[-1] and used + size > budget_bytes:
            passes.append([])
            used = 0
        passes[-1].append(layer)
        used += size
    return passes


def layer_file(folder: Path, layer: str) -> Path:
    return Path(folder) / f"layer-{layer.replace('.', '-')}.safetensors"


def collect_covariance(model: nn.Module, modules: dict[nn.Module, str], chunks: list[torch.Tensor], folder: Path,
                       in_dev: torch.device, budget_bytes: int = DEFAULT_BUDGET_BYTES, progress: bool = True,
                       meta: dict | None = None, split: bool = False,
                       token_weights: dict[str, torch.Tensor] | None = None) -> dict:
    """Accumulate H = (1/N) Σ_t w_t x_t x_tᵀ of every Linear input over `chunks` (1-D token tensors) and write it
    to `folder`, layer by layer (see the module docstring). `token_weights`: GGUF name → ‖g_t‖² per token in
    `chunks`' order (FisherCollector.token_weights); None: unweighted (w_t = 1), one H per distinct input. `split`
    also keeps H_a of the even-numbered chunks (the held-out split). Returns the index."""
    from safetensors.numpy import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    groups = find_groups(model, modules, chunks[0][: min(8, chunks[0].numel())].unsqueeze(0).to(in_dev))
    if split and len(chunks) < 2:
        raise QggufError("covariance: a held-out split needs at least two calibration sequences; calibrate on more "
                         "tokens")
    n_tok = sum(int(c.numel()) for c in chunks)
    if token_weights is not None:
        groups = per_tensor(groups, token_weights, n_tok, progress)
    unweighted = sorted(g.leader for g in groups if token_weights is not None and g.weights is None)
    passes = _passes(groups, budget_bytes, 2 if split else 1)
    starts = np.cumsum([0] + [int(c.numel()) for c in chunks]).tolist()
    n_a = sum(int(c.numel()) for c in chunks[0::2])
    if progress:
        gib = sum(8 * g.n_in ** 2 for g in groups) * (2 if split else 1) / 2 ** 30
        what = "Linear weights, gradient-weighted" if token_weights is not None else "distinct Linear inputs"
        print(f"qgguf: covariance: {len(groups)} {what} ({gib:.3g} GiB of float64 H in all) in "
              f"{len(passes)} forward pass(es) over {n_tok:,} tokens", file=sys.stderr)
    index: dict[str, dict] = {}
    bar = tqdm(total=n_tok * len(passes), unit="tok", unit_scale=True, desc="covariance",
               disable=not progress, file=sys.stderr)
    try:
        for layers in passes:
            active = [g for g in groups if g.layer in layers]
            last = active[-1]
            for g in active:
                g.acc = torch.zeros(g.n_in, g.n_in, dtype=torch.float64, device=_param_device(g.module))
                g.acc_a = torch.zeros_like(g.acc) if split else None
            even = [True]  # whether the chunk in flight is even-numbered (read by the hooks)
            at = [0]  # the chunk in flight's first token in the text (its weights' offset)

            def hook_for(g: _Group, last: _Group = last):
                def hook(module, args, output):
                    x = args[0].detach().float().reshape(-1, g.n_in)
                    if g.weights is not None:  # √w_t x_t: the product stays a Gram matrix (symmetric)
                        x = x * g.weights[at[0]:at[0] + x.shape[0]].to(x.device).sqrt()[:, None]
                    # one float32 product per sequence (≤ seq_len terms), summed in float64 across sequences
                    xx = (x.T @ x).to(torch.float64).to(g.acc.device)
                    g.acc += xx
                    if g.acc_a is not None and even[0]:
                        g.acc_a += xx
                    if g is last:
                        raise _Stop
                return hook

            handles = [g.module.register_forward_hook(hook_for(g)) for g in active]
            try:
                with torch.no_grad():
                    for i, c in enumerate(chunks):
                        even[0] = i % 2 == 0
                        at[0] = starts[i]
                        try:
                            model(input_ids=c.unsqueeze(0).to(in_dev), use_cache=False)
                        except _Stop:
                            pass
                        bar.update(int(c.numel()))
            finally:
                for h in handles:
                    h.remove()
            for layer in layers:
                mine = [g for g in active if g.layer == layer]
                arrays = {g.leader: (g.acc / n_tok).to(torch.float32).cpu().numpy() for g in mine}
                if split:
                    arrays.update({g.leader + HALF: (g.acc_a / n_a).to(torch.float32).cpu().numpy() for g in mine})
                info = {"groups": {g.leader: g.members for g in mine}, "tokens": n_tok}
                path = layer_file(folder, layer)
                with atomic_output(path) as tmp:
                    save_file(arrays, str(tmp), metadata={"qgguf_covariance": json.dumps(info, sort_keys=True)})
                for g in mine:
                    g.acc = g.acc_a = g.weights = None  # freed before the next pass allocates
                    for name in g.members:
                        index[name] = {"file": path.name, "leader": g.leader}
    finally:
        bar.close()
    out = {"version": COV_VERSION, "tokens": n_tok, "tensors": dict(sorted(index.items())),
           "weighting": "gradient" if token_weights is not None else "uniform",
           "unweighted": unweighted,
           **(meta or {})}
    if split:
        out["tokens_a"] = n_a
    with atomic_output(folder / INDEX) as tmp:
        tmp.write_text(json.dumps(out, indent=1, sort_keys=True))
    return out


def _param_device(mod: nn.Module) -> torch.device:
    return next(mod.parameters()).device


class CovarianceStore:
    """Read-only view of a covariance folder: the H of one tensor at a time, read from its layer's file."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        path = self.folder / INDEX
        try:
            self.index = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise QggufError(f"{path}: no readable covariance index ({e}); run `qgguf calibrate --covariance DIR` "
                             "again") from None
        if self.index.get("version") != COV_VERSION:
            raise QggufError(f"{self.folder}: covariance format {self.index.get('version')!r}, this qgguf reads "
                             f"{COV_VERSION}; run `qgguf calibrate --covariance DIR` again")

    def __contains__(self, name: str) -> bool:
        return name in self.index["tensors"]

    def leader(self, name: str) -> str | None:
        e = self.index["tensors"].get(name)
        return None if e is None else e["leader"]

    @property
    def has_split(self) -> bool:
        """Whether the folder holds the held-out split (calibrate --covariance-split)."""
        return "tokens_a" in self.index

    @property
    def tokens(self) -> int:
        """Calibration tokens behind every H of the folder."""
        return int(self.index["tokens"])

    @property
    def tokens_a(self) -> int | None:
        """Tokens behind the split's H_a (the even sequences), None without a split."""
        return int(self.index["tokens_a"]) if self.has_split else None

    def get(self, name: str) -> np.ndarray | None:
        """H (n × n float32) of the input `name` reads, or None when the tensor has none (an embedding)."""
        e = self.index["tensors"].get(name)
        return None if e is None else self._read(name, e, e["leader"])

    def get_split(self, name: str) -> tuple[np.ndarray, np.ndarray] | None:
        """(H_a, H_b): the input covariance of `name` over the even and the odd calibration sequences, or None
        when the folder has no split or the tensor no H."""
        e = self.index["tensors"].get(name)
        if e is None or not self.has_split:
            return None
        n, n_a = int(self.index["tokens"]), int(self.index["tokens_a"])
        H, H_a = self._read(name, e, e["leader"]), self._read(name, e, e["leader"] + HALF)
        # in float64: H_b is a difference of two sums (the odd sequences' share of H)
        H_b = (n * H.astype(np.float64) - n_a * H_a.astype(np.float64)) / (n - n_a)
        return H_a, H_b.astype(np.float32)

    def _read(self, name: str, e: dict, key: str) -> np.ndarray:
        from safetensors import SafetensorError, safe_open

        path = self.folder / e["file"]
        try:
            with safe_open(str(path), framework="numpy") as f:
                return f.get_tensor(key)
        except (OSError, SafetensorError) as err:
            raise QggufError(f"{path}: cannot read the covariance of {name} ({err}); run `qgguf calibrate "
                             "--covariance DIR` again") from None
