"""`qgguf calibrate`: diagonal Fisher information and per-channel importance of every Linear/Embedding weight.

The HF model reads the calibration text in sequences of length L; at every position t a label y_t is drawn from
the model's own predictive distribution (the true Fisher, one sample per token — not the empirical Fisher with
the text's next token) and ℓ = Σ_t log p(y_t) is backpropagated. For a Linear weight W (out × in) with input x_t
and output gradient g_t = ∂ℓ/∂(W x_t), token t contributes g_t x_tᵀ to ∂ℓ/∂W. Two estimators of the per-token
diagonal Fisher F (normalised by the N calibration tokens):

  token     each token's contribution is one sample:   F_ij = (1/N) Σ_t g_ti² x_tj²
            I_j = Σ_i F_ij = (1/N) Σ_t ‖g_t‖² x_tj² — a matrix-vector product per layer.
  sequence  each sequence's whole gradient G = Σ_t g_t x_tᵀ is one sample:   F = (1/N) Σ_seq G²
            (default). With independently sampled labels, E[G²] = Σ_t E[(∂ log p(y_t)/∂W)²]: exactly the
            trace the KL model ½·Σ F δ² needs, including the terms between positions that attention couples
            (a token's value/key vector moves the predictions at every later position). The token estimator
            drops those and mispredicts KL, e.g. attn_v by 1.7–3.4× on SmolLM2 (docs/design.md, "Calibration").
            Per sequence, Σ_rows G² comes from G itself or from the T × T Gram matrix g gᵀ, whichever is cheaper;
            the output head's own term stays per token (logits at t depend on x_t alone, so the cross terms
            vanish in expectation and the per-token sum is the same estimate with less noise).

ΣF = Σ_j I_j. For an Embedding the looked-up row receives g_t (the gradient at the embedding output), so I_j runs
over the hidden dimension, the GGUF row (ne0) of token_embd. A tied input/output embedding is one GGUF tensor
(token_embd.weight): its statistics combine the head's and the lookup's gradients (under "sequence", with their
cross term). Alongside, E[x_j²] of every Linear input is kept (what llama.cpp's imatrix stores).

Weights stay frozen: the embedding output is made the autograd leaf, so the backward pass computes activation
gradients only (no weight gradients, no per-element gradient of the model held anywhere); hooks square and
reduce g and x layer by layer as the backward pass reaches them, in fp32.
"""

from __future__ import annotations

import fnmatch
import hashlib
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn
from tqdm import tqdm

from . import __version__
from .errors import QggufError
from .files import check_output_path, require_file, sha256_file
from .stats import Stats, TensorStats, save_stats

DEFAULT_TOKENS = 16384
DEFAULT_SEQ_LEN = 512
DEFAULT_SEED = 0


# ---------------------------------------------------------------------------------------------------- text

def read_text(path: Path) -> str:
    require_file(path, "calibration text", "give a UTF-8 text file with --text")
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise QggufError(f"calibration text {str(path)!r} is not UTF-8 ({e.reason} at byte {e.start}); "
                         "give a UTF-8 text file") from None
    if not text.strip():
        raise QggufError(f"calibration text {str(path)!r} is empty; give a text with at least a few thousand words")
    return text


def default_text_path() -> Path:
    try:
        from .assets import asset_path
    except ImportError:
        raise QggufError("no calibration text given and the assets module is missing; pass --text FILE") from None
    return asset_path("wiki")


def adds_bos(tokenizer) -> bool:
    """Whether the tokenizer starts a text with BOS (llama.cpp's tokenizer.ggml.add_bos_token follows it)."""
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("a", add_special_tokens=True).input_ids[:1] == [bos]


def token_chunks(tokenizer, text: str, n_tokens: int, seq_len: int, where: str = "the text") -> list[torch.Tensor]:
    """The first n_tokens tokens of `text`, cut into sequences of seq_len (the last one may be shorter).

    As llama-imatrix does: the text is tokenized as one document (with BOS if the tokenizer adds one) and each
    sequence starts with BOS in place of its first token, so the same text gives the same sequences here and there.
    """
    bos = tokenizer.bos_token_id if adds_bos(tokenizer) else None
    need = n_tokens + 64  # margin: cutting the text mid-word only changes tokens at the cut
    n_chars = min(len(text), 8 * need)
    while True:
        ids = tokenizer(text[:n_chars], add_special_tokens=False, verbose=False).input_ids
        if bos is not None:
            ids = [bos] + ids
        if len(ids) >= need or n_chars >= len(text):
            break
        n_chars = min(len(text), 2 * n_chars)
    if len(ids) < n_tokens:
        raise QggufError(f"{where} has only {len(ids)} tokens but --tokens is {n_tokens}; give a longer text "
                         f"with --text or lower --tokens")
    ids_t = torch.tensor(ids[:n_tokens], dtype=torch.long)
    chunks = list(torch.split(ids_t, seq_len))
    if bos is not None:
        for c in chunks:
            c[0] = bos
    return chunks


# ---------------------------------------------------------------------------------------------------- collector

ESTIMATORS = ("token", "sequence")
PROBES = ("label", "gaussian")
DEFAULT_ESTIMATOR = "sequence"  # predicts KL for every tensor kind (tools/kl_check.py); see the module docstring


@dataclass
class _Acc:
    """fp32 accumulators of one weight (shared by every module using it: a tied embedding is counted once)."""

    hf_name: str
    out_features: int
    in_features: int  # the GGUF row length
    importance: torch.Tensor  # Σ over samples of Σ_rows (score²), per input channel
    act_sq: torch.Tensor | None = None  # Σ_t x²
    act_count: int = 0
    fisher: torch.Tensor | None = None  # per-element Σ score² (HF row order), only when asked
    linear: bool = False
    embedding: bool = False
    ids: torch.Tensor | None = None  # tied + sequence: this step's token ids (B × T)
    head_grad: list | None = None  # tied + sequence: the head's per-sequence contribution, for the cross term
    head: bool = False  # the output head: its own term is per token under either estimator


def sample_labels(logits: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One label per position drawn from the model's predictive distribution (the true Fisher's labels)."""
    # inverse-CDF sampling: one uniform per position (torch.multinomial is ~10× slower over a 50k vocabulary)
    probs = torch.softmax(logits.detach().float().reshape(-1, logits.shape[-1]), dim=-1)
    cdf = probs.cumsum(-1)
    u = torch.rand(cdf.shape[0], 1, generator=generator, device=cdf.device, dtype=cdf.dtype) * cdf[:, -1:]
    labels = torch.searchsorted(cdf, u, right=True).clamp_(max=cdf.shape[-1] - 1)
    return labels.reshape(logits.shape[:-1])


def label_cotangent(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """∂ log p(y)/∂logits = onehot(y) − p: the gradient a sampled label sends into the model."""
    v = -torch.softmax(logits.detach().float(), dim=-1)
    v.scatter_add_(-1, labels.unsqueeze(-1), torch.ones_like(labels, dtype=v.dtype).unsqueeze(-1))
    return v


def gaussian_cotangent(logits: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """v = √p ⊙ z − p (√p · z), z ~ N(0, I): E[v vᵀ] = diag(p) − p pᵀ, the same covariance as onehot(y) − p with
    y ~ p, so it estimates the same true Fisher; but every vocabulary row contributes (weighted by √p) instead of
    one drawn row, which removes the heavy tail that a rarely drawn label with a large gradient gives."""
    p = torch.softmax(logits.detach().float(), dim=-1)
    sz = p.sqrt() * torch.randn(p.shape, generator=generator, device=p.device, dtype=p.dtype)
    return sz - p * sz.sum(-1, keepdim=True)


def _grouped(ids: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of one sequence's embedding gradient: (distinct ids, Σ of g over the positions holding each id)."""
    uniq, inv = torch.unique(ids, return_inverse=True)
    return uniq, torch.zeros(uniq.numel(), g.shape[-1], dtype=g.dtype, device=g.device).index_add_(0, inv, g)


class FisherCollector:
    """Hooks on a model's Linear and Embedding modules that accumulate the diagonal Fisher.

    `weights` maps each weight to collect (a Parameter of an nn.Linear/nn.Embedding) to its HF name; weights not
    listed are not hooked. `per_element(hf_name)` says for which weights to keep the full out × in Fisher.
    estimator "token": each token's contribution g_t x_tᵀ is one sample (F = Σ_t g_t² x_t²);
    estimator "sequence": each sequence's whole gradient G = Σ_t g_t x_tᵀ is one sample (F = Σ_seq G²).
    """

    def __init__(self, model: nn.Module, weights: dict[int, str], per_element: Callable[[str], bool] = lambda n: False,
                 estimator: str = DEFAULT_ESTIMATOR, probe: str = "label"):
        if estimator not in ESTIMATORS:
            raise QggufError(f"--estimator {estimator!r} is not one of {', '.join(ESTIMATORS)}")
        if probe not in PROBES:
            raise QggufError(f"--probe {probe!r} is not one of {', '.join(PROBES)}")
        self.model = model
        self.estimator = estimator
        self.probe = probe
        self.n_tokens = 0
        self.accs: dict[str, _Acc] = {}
        self._handles = []
        self._x_cache: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        for mod in model.modules():
            if not isinstance(mod, (nn.Linear, nn.Embedding)) or id(mod.weight) not in weights:
                continue
            name = weights[id(mod.weight)]
            w = mod.weight
            acc = self.accs.get(name)
            if acc is None:
                acc = _Acc(name, w.shape[0], w.shape[1], torch.zeros(w.shape[1], dtype=torch.float32, device=w.device))
                if per_element(name):
                    acc.fisher = torch.zeros(tuple(w.shape), dtype=torch.float32, device=w.device)
                self.accs[name] = acc
            if isinstance(mod, nn.Linear):
                acc.linear = True
                if acc.act_sq is None:
                    acc.act_sq = torch.zeros(w.shape[1], dtype=torch.float32, device=w.device)
                self._handles.append(mod.register_forward_hook(self._linear_hook(acc)))
            else:
                acc.embedding = True
                self._handles.append(mod.register_forward_hook(self._embedding_hook(acc)))
        self._tied = {n for n, a in self.accs.items() if a.linear and a.embedding}
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if head is not None and weights.get(id(head.weight)) in self.accs:
            self.accs[weights[id(head.weight)]].head = True

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    # x (fp32) and x² are shared by modules reading the same input (q/k/v, gate/up): made once per step
    def _inputs(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hit = self._x_cache.get(id(x))
        if hit is not None and hit[0] is x:
            return hit[1], hit[2]
        xf = x.detach().float()
        xf = xf.reshape(-1, xf.shape[-2], xf.shape[-1]) if xf.ndim >= 2 else xf.reshape(1, 1, -1)
        x2 = xf.square()
        self._x_cache[id(x)] = (x, xf, x2)
        return xf, x2

    def _linear_hook(self, acc: _Acc):
        def hook(module, args, output):
            xf, x2 = self._inputs(args[0])
            acc.act_sq += x2.sum((0, 1))
            acc.act_count += x2.shape[0] * x2.shape[1]
            if output.requires_grad:
                if self.estimator == "token":
                    output.register_hook(lambda g: self._linear_grad_token(acc, g, x2))
                else:
                    output.register_hook(lambda g: self._linear_grad_sequence(acc, g, xf, x2))
        return hook

    @staticmethod
    def _linear_grad_token(acc: _Acc, g: torch.Tensor, x2: torch.Tensor) -> None:
        g2 = g.detach().float().square().reshape(-1, g.shape[-1])
        x2 = x2.reshape(-1, x2.shape[-1])
        acc.importance += g2.sum(1) @ x2  # Σ_t ‖g_t‖² x_t²
        if acc.fisher is not None:
            acc.fisher.addmm_(g2.T, x2)  # Σ_t g_t² (x_t²)ᵀ

    def _linear_grad_sequence(self, acc: _Acc, g: torch.Tensor, xf: torch.Tensor, x2: torch.Tensor) -> None:
        if acc.head:
            # logits at t depend on x_t alone, so the cross-position terms of the head's own square vanish in
            # expectation over the sampled labels: the per-token sum is the same estimate with less noise
            self._linear_grad_token(acc, g, x2)
        g = g.detach().float().reshape(xf.shape[0], xf.shape[1], -1)
        if acc.hf_name in self._tied:
            # the lookup's gradient lands on this sequence's token rows: keep the head's gradient on those rows
            # for the cross term 2·G_lookup·G_head of the tied weight's squared gradient
            acc.head_grad = []
            for b in range(xf.shape[0]):
                uniq = torch.unique(acc.ids[b])
                acc.head_grad.append(g[b][:, uniq].T @ xf[b])
        if acc.head:
            return
        for b in range(xf.shape[0]):  # one sequence at a time bounds the transient memory to one layer
            gb, xb = g[b], xf[b]
            t, (n_out, n_in) = gb.shape[0], (gb.shape[1], xb.shape[1])
            if acc.fisher is not None or t * (n_out + n_in) >= n_out * n_in:
                G2 = (gb.T @ xb).square()  # this sequence's weight gradient, squared
                acc.importance += G2.sum(0)
                if acc.fisher is not None:
                    acc.fisher += G2
            else:
                # Σ_rows (Σ_t g_t x_tᵀ)² through the T × T Gram matrix of the gradients: no out × in tensor
                acc.importance += ((gb @ gb.T) @ xb * xb).sum(0)

    def _embedding_hook(self, acc: _Acc):
        def hook(module, args, output):
            ids = args[0].detach()
            ids = ids.reshape(-1, ids.shape[-1])
            acc.ids = ids
            if not output.requires_grad:  # frozen weights: the embedding output becomes the autograd leaf
                output = output.detach().requires_grad_(True)
            if self.estimator == "token":
                output.register_hook(lambda g: self._embedding_grad_token(acc, g, ids))
            else:
                output.register_hook(lambda g: self._embedding_grad_sequence(acc, g, ids))
            return output
        return hook

    @staticmethod
    def _embedding_grad_token(acc: _Acc, g: torch.Tensor, ids: torch.Tensor) -> None:
        g2 = g.detach().float().square().reshape(-1, g.shape[-1])
        acc.importance += g2.sum(0)
        if acc.fisher is not None:
            acc.fisher.index_add_(0, ids.reshape(-1), g2)

    @staticmethod
    def _embedding_grad_sequence(acc: _Acc, g: torch.Tensor, ids: torch.Tensor) -> None:
        g = g.detach().float().reshape(ids.shape[0], ids.shape[1], -1)
        for b in range(ids.shape[0]):
            uniq, rows = _grouped(ids[b], g[b])  # this sequence's gradient on the rows it looked up
            contrib = rows.square()
            if acc.head_grad is not None:
                contrib += 2 * rows * acc.head_grad[b]
            acc.importance += contrib.sum(0)
            if acc.fisher is not None:
                acc.fisher.index_add_(0, uniq, contrib)
        acc.head_grad = None

    def step(self, input_ids: torch.Tensor, generator: torch.Generator | None = None,
             cotangent: torch.Tensor | None = None) -> torch.Tensor:
        """One forward/backward over a batch of sequences (B × T). The gradient sent into the logits is the
        `cotangent` given, else a probe drawn from the model's predictive distribution ("label": ∂ log p(y)/∂logits
        for a sampled y; "gaussian": see gaussian_cotangent). Returns the cotangent used."""
        try:
            with torch.enable_grad():
                logits = self.model(input_ids=input_ids, use_cache=False).logits
                if cotangent is None:
                    cotangent = (label_cotangent(logits, sample_labels(logits, generator)) if self.probe == "label"
                                 else gaussian_cotangent(logits, generator))
                logits.backward(cotangent.to(logits.dtype))
                del logits
        finally:
            self._x_cache.clear()
            for acc in self.accs.values():
                acc.ids, acc.head_grad = None, None
        self.n_tokens += input_ids.numel()
        return cotangent


# ---------------------------------------------------------------------------------------------------- running

def model_sha256(model_dir: Path) -> str:
    """A hash of the model: config.json and every weight file, in name order."""
    h = hashlib.sha256()
    files = [model_dir / "config.json"] + sorted(model_dir.glob("*.safetensors")) + sorted(model_dir.glob("*.bin"))
    for f in files:
        h.update(f.name.encode() + b"\0" + sha256_file(f).encode() + b"\n")
    return h.hexdigest()


def resolve_device(device: str) -> torch.device:
    if device == "cuda" or device.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise QggufError(f"--device {device} but torch sees no CUDA device; use --device cpu")
        return torch.device(device)
    if device != "cpu":
        raise QggufError(f"--device {device!r} is not cpu or cuda")
    return torch.device("cpu")


DTYPES = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_model(model_dir: Path, device: torch.device, dtype: str = "auto") -> nn.Module:
    from transformers import AutoModelForCausalLM

    if dtype not in DTYPES:
        raise QggufError(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=DTYPES[dtype])
    except (OSError, ValueError, KeyError) as e:
        raise QggufError(f"transformers cannot load a causal LM from {str(model_dir)!r} ({e}); give a Hugging "
                         "Face causal-LM folder") from None
    model.eval()  # no dropout: the Fisher of the model as it is used
    model.requires_grad_(False)
    return model.to(device)


def collect_weights(model: nn.Module, name_map) -> tuple[dict[int, str], dict[str, object]]:
    """Which weights to collect: every nn.Linear / nn.Embedding weight the converter writes to the GGUF.

    Returns {id(parameter): HF name} and {HF name: GgufTensor}. A weight shared by several modules (a tied
    embedding) appears once, under its first name, as in model.named_parameters().
    """
    param_names = {id(p): n for n, p in model.named_parameters()}
    weights: dict[int, str] = {}
    targets: dict[str, object] = {}
    for mod in model.modules():
        if not isinstance(mod, (nn.Linear, nn.Embedding)):
            continue
        pid = id(mod.weight)
        hf_name = param_names.get(pid)
        if hf_name is None or pid in weights:
            continue
        target = name_map.gguf_tensor(hf_name, mod.weight.shape[0])
        if target is None:
            continue
        weights[pid] = hf_name
        targets[hf_name] = target
    return weights, targets


def build_stats(collector: FisherCollector, targets: dict, meta: dict) -> Stats:
    """Normalise the accumulators per token and key them by GGUF tensor name (per-element Fisher in GGUF rows)."""
    n = collector.n_tokens
    tensors: dict[str, TensorStats] = {}
    for hf_name, acc in collector.accs.items():
        target = targets[hf_name]
        kind = "tied" if acc.linear and acc.embedding else ("linear" if acc.linear else "embedding")
        fisher = None
        if acc.fisher is not None:
            fisher = target.to_gguf_rows((acc.fisher / n).cpu()).numpy()
        act_sq = (acc.act_sq / max(acc.act_count, 1)).cpu().numpy() if acc.act_sq is not None else None
        rows = acc.out_features if target.rows is None else len(target.rows)
        tensors[target.name] = TensorStats(
            name=target.name, hf_name=hf_name, shape=(rows, acc.in_features), kind=kind,
            importance=(acc.importance / n).cpu().numpy(), act_sq=act_sq, fisher=fisher)
    return Stats(meta=meta, tensors=dict(sorted(tensors.items())))


def calibrate(model_dir: Path, out: Path, text: Path | None = None, tokens: int = DEFAULT_TOKENS,
              seq_len: int = DEFAULT_SEQ_LEN, device: str = "cpu", seed: int = DEFAULT_SEED,
              per_element: Sequence[str] = (), dtype: str = "auto", batch_size: int = 1,
              imatrix_out: Path | None = None, imatrix_from: str = "act", estimator: str = DEFAULT_ESTIMATOR,
              probe: str = "label", progress: bool = True) -> Stats:
    """Run the calibration and write the statistics file (and optionally an llama.cpp imatrix GGUF)."""
    from .hfconvert import check_model_dir
    from .names import TensorNameMap

    model_dir = Path(model_dir)
    if tokens <= 0:
        raise QggufError(f"--tokens must be a positive number of tokens, not {tokens}")
    if seq_len < 2:
        raise QggufError(f"--seq-len must be at least 2, not {seq_len}")
    if estimator not in ESTIMATORS:
        raise QggufError(f"--estimator {estimator!r} is not one of {', '.join(ESTIMATORS)}")
    if probe not in PROBES:
        raise QggufError(f"--probe {probe!r} is not one of {', '.join(PROBES)}")
    if batch_size < 1:
        raise QggufError(f"--batch-size must be at least 1, not {batch_size}")
    cfg = check_model_dir(model_dir)
    check_output_path(out, [model_dir])
    if imatrix_out is not None:
        from .imatrix import SOURCES

        if imatrix_from not in SOURCES:
            raise QggufError(f"--imatrix-from {imatrix_from!r} is not one of {', '.join(SOURCES)}")
        check_output_path(imatrix_out, [model_dir])
        if Path(imatrix_out).resolve() == Path(out).resolve():
            raise QggufError("--imatrix and -o name the same file; give two different paths")
    max_pos = cfg.get("max_position_embeddings")
    if max_pos and seq_len > max_pos:
        raise QggufError(f"--seq-len {seq_len} exceeds the model's context ({max_pos}); lower --seq-len")
    dev = resolve_device(device)
    text_path = Path(text) if text is not None else default_text_path()
    raw = read_text(text_path)

    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError) as e:
        raise QggufError(f"cannot load the tokenizer of {str(model_dir)!r} ({e}); the folder needs its "
                         "tokenizer files") from None
    chunks = token_chunks(tokenizer, raw, tokens, seq_len, where=f"calibration text {str(text_path)!r}")

    t_start = time.perf_counter()
    model = load_model(model_dir, dev, dtype)
    name_map = TensorNameMap(model_dir)
    weights, targets = collect_weights(model, name_map)
    if not weights:
        raise QggufError(f"found no Linear/Embedding weights the converter writes in {str(model_dir)!r}")
    wanted = tuple(per_element)
    collector = FisherCollector(
        model, weights, per_element=lambda n: any(fnmatch.fnmatchcase(targets[n].name, p) for p in wanted),
        estimator=estimator, probe=probe)

    gen = torch.Generator(device=dev)
    gen.manual_seed(seed)
    try:
        t_loop = time.perf_counter()
        with tqdm(total=tokens, unit="tok", unit_scale=True, desc="calibrate", disable=not progress,
                  file=sys.stderr) as bar:
            i = 0
            while i < len(chunks):
                # batch sequences of equal length (only the last may be shorter)
                j = i + 1
                while j < len(chunks) and j - i < batch_size and chunks[j].numel() == chunks[i].numel():
                    j += 1
                batch = torch.stack(chunks[i:j]).to(dev)
                collector.step(batch, generator=gen)
                bar.update(batch.numel())
                i = j
        t_done = time.perf_counter()
    finally:
        collector.close()

    meta = {
        "qgguf_version": __version__, "estimator": estimator, "probe": probe,
        "model": model_dir.name, "model_sha256": model_sha256(model_dir),
        "hf_arch": name_map.hf_arch, "arch": name_map.arch,
        "text": text_path.name, "text_sha256": sha256_file(text_path),
        "tokens": collector.n_tokens, "seq_len": seq_len, "seed": seed,
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."), "device": dev.type,
        "add_bos": adds_bos(tokenizer), "per_element": list(wanted),
    }
    stats = build_stats(collector, targets, meta)
    stats.timing = {"load_s": t_loop - t_start, "loop_s": t_done - t_loop}
    save_stats(stats, out, inputs=[model_dir])
    if imatrix_out is not None:
        from .imatrix import imatrix_from_stats, write_imatrix

        write_imatrix(imatrix_from_stats(stats, imatrix_from), imatrix_out, inputs=[model_dir, Path(out)])
    return stats


# ---------------------------------------------------------------------------------------------------- CLI

def add_parser(sub) -> None:
    p = sub.add_parser("calibrate", help="estimate per-tensor Fisher information and per-channel importance "
                                         "(statistics for the planner, and a llama.cpp imatrix)")
    p.add_argument("model_dir", type=Path, help="Hugging Face causal-LM folder")
    p.add_argument("-o", "--out", type=Path, required=True, help="output statistics file (.safetensors)")
    p.add_argument("--text", type=Path, default=None, help="calibration text, UTF-8 (default: the wiki asset)")
    p.add_argument("--tokens", type=int, default=DEFAULT_TOKENS, help=f"tokens to read (default {DEFAULT_TOKENS})")
    p.add_argument("--seq-len", type=int, default=DEFAULT_SEQ_LEN,
                   help=f"sequence length (default {DEFAULT_SEQ_LEN})")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED, help="seed of the sampled labels (default 0)")
    p.add_argument("--dtype", default="auto", choices=tuple(DTYPES),
                   help="compute dtype of the model (default: as stored); statistics accumulate in fp32")
    p.add_argument("--batch-size", type=int, default=1, help="sequences per forward pass (default 1)")
    p.add_argument("--per-element", action="append", default=[], metavar="GLOB",
                   help="also keep the per-element Fisher of GGUF tensors matching GLOB (repeatable; e.g. "
                        "'blk.*.attn_v.weight'); costs 4 bytes per weight")
    p.add_argument("--imatrix", type=Path, default=None, metavar="OUT.gguf",
                   help="also write a llama.cpp imatrix GGUF (for llama-quantize --imatrix)")
    p.add_argument("--imatrix-from", default="act", choices=("act", "fisher"),
                   help="what the imatrix holds: act = E[x²] like llama-imatrix (default), fisher = the "
                        "per-channel Fisher importance")
    p.add_argument("--estimator", default=DEFAULT_ESTIMATOR, choices=ESTIMATORS,
                   help="sequence: each sequence's whole gradient is one sample, keeping the terms between "
                        "positions (default); token: each token's gradient contribution is one sample")
    p.add_argument("--probe", default="label", choices=PROBES,
                   help="label: one label per position drawn from the model (default); gaussian: a Gaussian "
                        "probe with the same covariance (same expectation, lighter tails)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.set_defaults(func=_cmd)


def _cmd(args) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    stats = calibrate(args.model_dir, args.out, text=args.text, tokens=args.tokens, seq_len=args.seq_len,
                      device=args.device, seed=args.seed, per_element=args.per_element, dtype=args.dtype,
                      batch_size=args.batch_size, imatrix_out=args.imatrix, imatrix_from=args.imatrix_from,
                      estimator=args.estimator, probe=args.probe)
    total = sum(t.fisher_sum for t in stats.tensors.values())
    print(f"{args.out}: {len(stats.tensors)} tensors, {stats.meta['tokens']} tokens, ΣF over all = {total:.4g}")
    if args.imatrix:
        print(args.imatrix)
    return 0
