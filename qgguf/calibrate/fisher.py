"""Fisher maths: the estimators and the hooks that accumulate them during the backward pass.

`qgguf calibrate`: diagonal Fisher information and per-channel importance of every Linear/Conv1D/Embedding weight.

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

transformers' Conv1D (GPT-2) is a Linear whose weight is stored transposed (in × out): it is hooked as a Linear with
out = weight.shape[1]. An embedding that scales its rows (Gemma: output = s·W[id], s = √hidden) is checked for a
constant scale once; the leaf below is its scaled output, so the row gradient is s·g and the Fisher s²·g².

Mixture-of-experts layers keep their experts in 3-D parameters (experts × out × in, used through F.linear on the
tokens routed to each expert), which no module hook sees. During calibration the experts module's forward is
replaced by an equivalent one that routes the same tokens to the same experts and hooks each expert's two
products: per expert, its input x (the routed tokens only), E[x²], the number of tokens routed, and the Fisher
importance from the output gradient, which already carries the routing weight. The replacement is checked once
against the module's own forward on the first batch.

Weights stay frozen: the embedding output is made the autograd leaf, so the backward pass computes activation
gradients only (no weight gradients, no per-element gradient of the model held anywhere); hooks square and
reduce g and x layer by layer as the backward pass reaches them, in fp32.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from qgguf.errors import QggufError

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
    row_sq: torch.Tensor | None = None  # Σ_t g_tr² per output row (Linear only, when asked): the K-FAC row factor
    token_sq: list | None = None  # ‖g_t‖² of every token, in text order (with row_sq): the covariance's weights


@dataclass
class _ExpertAcc:
    """fp32 accumulators of one 3-D expert parameter (experts × out × in). Its rows may feed several GGUF tensors
    (gate_up_proj → ffn_gate_exps + ffn_up_exps): importance is kept per such segment of rows."""

    hf_name: str
    segments: list  # [(GGUF name, int64 rows of the parameter's out dimension)]
    importance: torch.Tensor  # [n_segments, experts, in]: Σ over samples of Σ_segment rows (score²)
    act_sq: torch.Tensor  # [experts, in]: Σ over routed tokens of x²
    counts: torch.Tensor  # int64[experts]: tokens routed to each expert


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


def layer_kind(mod: nn.Module) -> str | None:
    """"linear", "conv1d" (transformers' transposed Linear), "embedding", "router" (a MoE router: a 2-D weight
    applied as W x, its forward returning the logits first), or None for layers not hooked."""
    from transformers.pytorch_utils import Conv1D

    if isinstance(mod, nn.Linear):
        return "linear"
    w = getattr(mod, "weight", None)
    if type(mod).__name__.endswith("Router") and isinstance(w, nn.Parameter) and w.ndim == 2:
        return "router"
    if isinstance(mod, Conv1D):
        return "conv1d"
    if isinstance(mod, nn.Embedding):
        return "embedding"
    return None


def weight_shape(mod: nn.Module) -> tuple[int, int]:
    """(out, in) of a hooked layer's weight in GGUF layout: rows = outputs, row = inputs."""
    w = mod.weight
    return (w.shape[1], w.shape[0]) if layer_kind(mod) == "conv1d" else (w.shape[0], w.shape[1])


def embedding_scale(mod: nn.Embedding, ids: torch.Tensor, output: torch.Tensor) -> float:
    """The constant s with output = s·weight[ids] (1 for a plain nn.Embedding, √hidden for Gemma's)."""
    ref = nn.functional.embedding(ids, mod.weight).detach().float()
    out = output.detach().float()
    if torch.equal(ref, out):
        return 1.0
    s = float((out * ref).sum() / ref.square().sum().clamp_min(1e-30))
    tol = 1e-5 if output.dtype == torch.float32 else 1e-2  # the scale is rounded to the weights' dtype
    if not torch.allclose(out, s * ref, rtol=tol, atol=tol * float(out.abs().max())):
        raise QggufError(f"the embedding layer {type(mod).__name__} changes its rows by more than a constant "
                         "scale, which qgguf's calibration cannot follow; this architecture is not supported")
    return s


def _grouped(ids: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of one sequence's embedding gradient: (distinct ids, Σ of g over the positions holding each id)."""
    uniq, inv = torch.unique(ids, return_inverse=True)
    return uniq, torch.zeros(uniq.numel(), g.shape[-1], dtype=g.dtype, device=g.device).index_add_(0, inv, g)


class FisherCollector:
    """Hooks on a model's Linear, Conv1D and Embedding modules that accumulate the diagonal Fisher.

    `weights` maps each weight to collect (a Parameter of an nn.Linear/Conv1D/nn.Embedding) to its HF name; weights not
    listed are not hooked. `per_element(hf_name)` says for which weights to keep the full out × in Fisher.
    estimator "token": each token's contribution g_t x_tᵀ is one sample (F = Σ_t g_t² x_t²);
    estimator "sequence": each sequence's whole gradient G = Σ_t g_t x_tᵀ is one sample (F = Σ_seq G²).
    """

    def __init__(self, model: nn.Module, weights: dict[int, str], per_element: Callable[[str], bool] = lambda n: False,
                 estimator: str = DEFAULT_ESTIMATOR, probe: str = "label", row_fisher: bool = False,
                 experts: dict | None = None, token_weights: bool = False):
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
        self._batch = 1  # this step's batch size: a lookup shared by the batch (positions) is expanded to it
        self._scales: dict[int, float] = {}  # id(embedding module) -> its constant output scale
        for mod in model.modules():
            kind = layer_kind(mod)
            if kind is None or id(mod.weight) not in weights:
                continue
            name = weights[id(mod.weight)]
            w = mod.weight
            n_out, n_in = weight_shape(mod)
            acc = self.accs.get(name)
            if acc is None:
                acc = _Acc(name, n_out, n_in, torch.zeros(n_in, dtype=torch.float32, device=w.device))
                if per_element(name):
                    acc.fisher = torch.zeros((n_out, n_in), dtype=torch.float32, device=w.device)
                self.accs[name] = acc
            if kind != "embedding":  # Linear or Conv1D: y = W x (+ b) either way
                acc.linear = True
                if row_fisher and acc.row_sq is None:
                    acc.row_sq = torch.zeros(n_out, dtype=torch.float64, device=w.device)
                    # one float per token and tensor, kept only for the gradient-weighted covariance
                    acc.token_sq = [] if token_weights else None
                if acc.act_sq is None:
                    acc.act_sq = torch.zeros(n_in, dtype=torch.float32, device=w.device)
                self._handles.append(mod.register_forward_hook(self._linear_hook(acc)))
            else:
                acc.embedding = True
                self._handles.append(mod.register_forward_hook(self._embedding_hook(acc)))
        self._tied = {n for n, a in self.accs.items() if a.linear and a.embedding}
        # experts: HF name of a 3-D expert parameter -> its GGUF targets (names.ExpertTensor)
        self.expert_accs: dict[str, _ExpertAcc] = {}
        self._patched: list[nn.Module] = []
        experts = experts or {}
        for mod_name, mod in model.named_modules():
            mine = {a: experts[f"{mod_name}.{a}"] for a in ("gate_up_proj", "up_proj", "down_proj")
                    if f"{mod_name}.{a}" in experts}
            if mine:
                self._patch_experts(mod_name, mod, mine)
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if head is not None and weights.get(id(head.weight)) in self.accs:
            self.accs[weights[id(head.weight)]].head = True

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for mod in self._patched:
            del mod.forward  # the class's own forward again
        self._patched.clear()

    # ------------------------------------------------------------------------------------------ experts
    def _patch_experts(self, mod_name: str, mod: nn.Module, targets: dict) -> None:
        """Replace the experts module's forward by `_experts_forward` (see the module docstring)."""
        if getattr(mod, "is_transposed", False) or getattr(mod, "has_post_expert_norm", False) \
                or not getattr(mod, "is_concatenated", True):
            raise QggufError(f"the experts layer {type(mod).__name__} ({mod_name}) stores its weights in a layout "
                             "qgguf's calibration does not follow yet (transposed, interleaved or with a post-expert "
                             "norm); quantise this model with llama.cpp's llama-quantize instead")
        accs = {}
        for attr, tgts in targets.items():
            p = getattr(mod, attr)
            n_exp, n_out, n_in = p.shape
            segs = [(t.name, torch.as_tensor(t.rows, device=p.device)) for t in tgts]
            accs[attr] = acc = _ExpertAcc(
                f"{mod_name}.{attr}", segs, torch.zeros(len(segs), n_exp, n_in, dtype=torch.float32, device=p.device),
                torch.zeros(n_exp, n_in, dtype=torch.float32, device=p.device),
                torch.zeros(n_exp, dtype=torch.int64, device=p.device))
            self.expert_accs[acc.hf_name] = acc
        checked = [False]

        def forward(hidden_states, top_k_index, top_k_weights, *args, **kwargs):
            out = self._experts_forward(mod, accs, hidden_states, top_k_index, top_k_weights)
            if not checked[0]:  # once: the replacement must compute what the module computes
                with torch.no_grad():
                    ref = type(mod).forward(mod, hidden_states, top_k_index, top_k_weights, *args, **kwargs)
                tol = 1e-4 if ref.dtype == torch.float32 else 3e-2
                if not torch.allclose(out.detach().float(), ref.float(), rtol=tol,
                                      atol=tol * max(float(ref.abs().max()), 1e-30)):
                    raise QggufError(f"the experts layer {type(mod).__name__} ({mod_name}) computes something other "
                                     "than gate/up → activation → down per routed token, which qgguf's calibration "
                                     "assumes; quantise this model with llama.cpp's llama-quantize instead")
                checked[0] = True
            return out
        mod.forward = forward
        self._patched.append(mod)

    def _experts_forward(self, mod: nn.Module, accs: dict, hidden: torch.Tensor, top_k_index: torch.Tensor,
                         top_k_weights: torch.Tensor) -> torch.Tensor:
        """The experts' output, one expert at a time over the tokens routed to it, with the Fisher hooks."""
        n_tok, k = top_k_index.shape
        n_exp = mod.num_experts
        seq_len = max(n_tok // self._batch, 1)
        out = torch.zeros_like(hidden)
        flat = top_k_index.reshape(-1)
        token = torch.arange(n_tok, device=flat.device).repeat_interleave(k)
        slot = torch.arange(k, device=flat.device).repeat(n_tok)
        valid = flat < n_exp  # expert-parallel sentinels (= n_exp) route nowhere
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat[valid], minlength=n_exp)
        starts = torch.cumsum(counts, 0) - counts
        first = "gate_up_proj" if "gate_up_proj" in accs else "up_proj"
        for e in torch.nonzero(counts).reshape(-1).tolist():
            sel = order[int(starts[e]):int(starts[e] + counts[e])]
            tok, pos = token[sel], slot[sel]
            x = hidden[tok]
            h = nn.functional.linear(x, getattr(mod, first)[e], getattr(mod, f"{first}_bias")[e]
                                     if getattr(mod, "has_bias", False) else None)
            self._expert_hooks(accs[first], e, x, h, tok // seq_len)
            a = mod._apply_gate(h) if getattr(mod, "has_gate", True) else mod.act_fn(h)
            y = nn.functional.linear(a, mod.down_proj[e], mod.down_proj_bias[e]
                                     if getattr(mod, "has_bias", False) else None)
            if "down_proj" in accs:
                self._expert_hooks(accs["down_proj"], e, a, y, tok // seq_len)
            y = y * top_k_weights[tok, pos, None]
            out.index_add_(0, tok, y.to(out.dtype))
        return out

    def _expert_hooks(self, acc: _ExpertAcc, e: int, x: torch.Tensor, y: torch.Tensor, seq: torch.Tensor) -> None:
        xf = x.detach().float()
        x2 = xf.square()
        acc.act_sq[e] += x2.sum(0)
        acc.counts[e] += x.shape[0]
        if y.requires_grad:
            y.register_hook(lambda g: self._expert_grad(acc, e, g, xf, x2, seq))

    def _expert_grad(self, acc: _ExpertAcc, e: int, g: torch.Tensor, xf: torch.Tensor, x2: torch.Tensor,
                     seq: torch.Tensor) -> None:
        g = g.detach().float()
        for s, (_, rows) in enumerate(acc.segments):
            gs = g.index_select(1, rows)
            if self.estimator == "token":
                acc.importance[s, e] += gs.square().sum(1) @ x2
                continue
            for b in torch.unique(seq).tolist():  # each sequence's gradient of this expert is one sample
                m = seq == b
                gb, xb = gs[m], xf[m]
                t, n_out, n_in = gb.shape[0], gb.shape[1], xb.shape[1]
                if t * (n_out + n_in) >= n_out * n_in:
                    acc.importance[s, e] += (gb.T @ xb).square().sum(0)
                else:  # Σ_rows (Σ_t g_t x_tᵀ)² through the Gram matrix of this sequence's routed tokens
                    acc.importance[s, e] += ((gb @ gb.T) @ xb * xb).sum(0)

    # x (fp32) and x² are shared by modules reading the same input (q/k/v, gate/up): made once per step
    def _inputs(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hit = self._x_cache.get(id(x))
        if hit is not None and hit[0] is x:
            return hit[1], hit[2]
        xf = x.detach().float()
        if xf.ndim == 2 and xf.shape[0] % self._batch == 0:  # tokens × features (a MoE block flattens the batch)
            xf = xf.reshape(self._batch, -1, xf.shape[-1])
        xf = xf.reshape(-1, xf.shape[-2], xf.shape[-1]) if xf.ndim >= 2 else xf.reshape(1, 1, -1)
        x2 = xf.square()
        self._x_cache[id(x)] = (x, xf, x2)
        return xf, x2

    def _linear_hook(self, acc: _Acc):
        def hook(module, args, output):
            if isinstance(output, tuple):  # a MoE router: (logits, routing weights, experts); logits = W x
                output = output[0]
            xf, x2 = self._inputs(args[0])
            acc.act_sq += x2.sum((0, 1))
            acc.act_count += x2.shape[0] * x2.shape[1]
            if output.requires_grad:
                if acc.row_sq is not None:
                    output.register_hook(lambda g: self._row_grad(acc, g))
                if self.estimator == "token":
                    output.register_hook(lambda g: self._linear_grad_token(acc, g, x2))
                else:
                    output.register_hook(lambda g: self._linear_grad_sequence(acc, g, xf, x2))
        return hook

    @staticmethod
    def _row_grad(acc: _Acc, g: torch.Tensor) -> None:
        # E_t[g_tr²]: the output-row factor d of the Kronecker-factored Fisher F ≈ diag(d) ⊗ H, and ‖g_t‖², the
        # weight of token t in H = E[‖g‖² x xᵀ] / E[‖g‖²] (calibrate/covariance.py)
        g2 = g.detach().float().reshape(-1, g.shape[-1]).square()
        acc.row_sq += g2.sum(0, dtype=torch.float64)
        if acc.token_sq is not None:
            acc.token_sq.append(g2.sum(1).cpu())

    def token_weights(self) -> dict[str, torch.Tensor]:
        """‖g_t‖² of every calibration token (text order, float32, CPU) per Linear weight (HF name), for those
        collected with `row_fisher` and `token_weights`."""
        return {n: torch.cat(a.token_sq) for n, a in self.accs.items() if a.token_sq}

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
            scale = self._scales.get(id(module))
            if scale is None:
                scale = self._scales[id(module)] = embedding_scale(module, ids, output.reshape(*ids.shape, -1))
            if ids.shape[0] == 1 and self._batch > 1:
                # one lookup broadcast over the batch (GPT-2's positions): each sequence is its own sample
                ids = ids.expand(self._batch, -1)
                output = output.reshape(1, *output.shape[-2:]).expand(self._batch, -1, -1)
            acc.ids = ids
            if not output.requires_grad:  # frozen weights: the embedding output becomes the autograd leaf
                output = output.detach().requires_grad_(True)
            # the gradient reaching the leaf is w.r.t. the scaled rows: the table row's gradient is scale times it
            if self.estimator == "token":
                output.register_hook(lambda g: self._embedding_grad_token(acc, g * scale, ids))
            else:
                output.register_hook(lambda g: self._embedding_grad_sequence(acc, g * scale, ids))
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
        self._batch = input_ids.shape[0]
        try:
            with torch.enable_grad():
                logits = self.model(input_ids=input_ids, use_cache=False).logits
                if cotangent is None:  # drawn on the generator's device (the last layers may sit elsewhere)
                    lg = logits if generator is None else logits.to(generator.device)
                    cotangent = (label_cotangent(lg, sample_labels(lg, generator)) if self.probe == "label"
                                 else gaussian_cotangent(lg, generator))
                logits.backward(cotangent.to(logits.device, logits.dtype))
                del logits
        finally:
            self._x_cache.clear()
            for acc in self.accs.values():
                acc.ids, acc.head_grad = None, None
        self.n_tokens += input_ids.numel()
        return cotangent
