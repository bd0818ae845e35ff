"""The calibration run: load the HF model, feed it the text, turn the accumulators into a statistics file."""

from __future__ import annotations

import fnmatch
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from qgguf import __version__
from qgguf.calibrate.fisher import (DEFAULT_ESTIMATOR, ESTIMATORS, PROBES, FisherCollector, layer_kind,
                                    weight_shape)
from qgguf.calibrate.stats import Stats, TensorStats, save_stats
from qgguf.calibrate.text import adds_bos, default_text_path, read_text, token_chunks
from qgguf.devices import resolve_device
from qgguf.errors import QggufError
from qgguf.files import check_output_path, writable_folder
from qgguf.hashing import sha256_file
from qgguf.models import model_sha256

DEFAULT_TOKENS = 16384


DEFAULT_SEQ_LEN = 512


DEFAULT_SEED = 0


# An expert routed fewer tokens than this during calibration gets the prior instead of its own statistics
# (expert_prior): below it the per-channel estimate is mostly noise, and at zero tokens it would be zero.
MIN_EXPERT_TOKENS = 16


DTYPES = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_model(model_dir: Path, device: torch.device, dtype: str = "auto", grad_checkpoint: bool = False
               ) -> nn.Module:
    """The model, frozen, in eval mode. On the CPU in its stored dtype (`auto`). On CUDA, `auto` means bf16 weights
    (the statistics still accumulate in fp32), and `cuda` (no index) lets accelerate place the layers
    (`device_map="auto"`): a model larger than one GPU is spread over the GPUs, then the CPU.
    `grad_checkpoint`: recompute each layer's activations in the backward pass instead of keeping them."""
    from transformers import AutoModelForCausalLM

    if dtype not in DTYPES:
        raise QggufError(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    kw = {"dtype": DTYPES[dtype]}
    if device.type == "cuda":
        kw["device_map"] = "auto" if device.index is None else {"": device}
        if dtype == "auto":
            kw["dtype"] = torch.bfloat16
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, **kw)
    except (OSError, ValueError, KeyError) as e:
        raise QggufError(f"transformers cannot load a causal LM from {str(model_dir)!r} ({e}); give a Hugging "
                         "Face causal-LM folder") from None
    model.eval()  # no dropout: the Fisher of the model as it is used
    model.requires_grad_(False)
    if grad_checkpoint:
        if not getattr(model, "supports_gradient_checkpointing", False):
            raise QggufError(f"{model.__class__.__name__} does not support gradient checkpointing in transformers; "
                             "calibrate without --grad-checkpoint")
        kw = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # the name in recent transformers
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kw)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw)
        for mod in model.modules():  # transformers checkpoints only layers in training mode: set that flag on the
            if getattr(mod, "gradient_checkpointing", False):  # layers alone, so dropout modules stay in eval
                mod.training = True
    return model if "device_map" in kw else model.to(device)


def collect_weights(model: nn.Module, name_map) -> tuple[dict[int, str], dict[str, object]]:
    """Which weights to collect: every nn.Linear / Conv1D / nn.Embedding weight the converter writes to the GGUF.

    Returns {id(parameter): HF name} and {HF name: GgufTensor}. A weight shared by several modules (a tied
    embedding) appears once, under its first name, as in model.named_parameters(). A weight the converter writes
    for llama.cpp to quantise that no hooked layer holds (MoE experts stacked in a 3-D tensor) stops the run here,
    before any work, naming its layer: statistics without it could not plan the model.
    """
    param_names = {id(p): n for n, p in model.named_parameters()}
    weights: dict[int, str] = {}
    targets: dict[str, object] = {}
    for mod in model.modules():
        kind = layer_kind(mod)
        if kind is None:
            continue
        pid = id(mod.weight)
        hf_name = param_names.get(pid)
        if hf_name is None or pid in weights:
            continue
        target = name_map.gguf_tensor(hf_name, weight_shape(mod)[0], transposed=kind == "conv1d")
        if target is None:
            continue
        weights[pid] = hf_name
        targets[hf_name] = target
    experts = collect_experts(model, name_map)
    params = dict(model.named_parameters())
    check_all_seen(model, name_map, set(weights) | {id(params[n]) for n in experts})
    return weights, targets


EXPERT_PARAMS = ("gate_up_proj", "up_proj", "down_proj")


def collect_experts(model: nn.Module, name_map) -> dict[str, list]:
    """The 3-D expert parameters of every experts module (transformers' stacked experts: `num_experts` and
    gate_up_proj/up_proj/down_proj of experts × out × in) → the GGUF tensors each lands in (names.ExpertTensor)."""
    out: dict[str, list] = {}
    for mod_name, mod in model.named_modules():
        params = {f"{mod_name}.{a}": getattr(mod, a) for a in EXPERT_PARAMS
                  if isinstance(getattr(mod, a, None), nn.Parameter) and getattr(mod, a).ndim == 3}
        if not params or not hasattr(mod, "num_experts"):
            continue
        for t in name_map.expert_tensors(model, params):
            out.setdefault(t.hf_name, []).append(t)
    return out


def check_all_seen(model: nn.Module, name_map, seen: set[int]) -> None:
    """Refuse a model with a quantised weight that no hooked layer holds (see collect_weights)."""
    from qgguf.plan.rules import llama_quantizes

    for hf_name, p in model.named_parameters():
        if id(p) in seen or p.ndim < 2 or not name_map.writes(hf_name):
            continue
        if p.ndim == 2:
            if not hf_name.endswith("weight"):  # a 2-D bias (ERNIE's expert score correction) is kept in F32
                continue
            try:  # a 2-D weight llama.cpp keeps as it is (a norm, a position table) needs no statistics
                target = name_map.gguf_tensor(hf_name, p.shape[0])
            except (QggufError, ValueError, KeyError, RuntimeError):
                target = None
            if target is not None and not llama_quantizes(target.name, 2):
                continue
        owner = model.get_submodule(hf_name.rpartition(".")[0]) if "." in hf_name else model
        expert = p.ndim == 3 and "expert" in f"{hf_name} {type(owner).__name__}".lower()
        what = "mixture-of-experts weights stacked in one 3-D tensor" if expert else f"a {p.ndim}-D weight"
        raise QggufError(f"qgguf calibrate cannot collect statistics for {hf_name}: {what} of a "
                         f"{type(owner).__name__} layer, which has no calibration hook (only Linear, Conv1D and "
                         f"Embedding layers have); {name_map.hf_arch} is not supported yet — quantise it with "
                         "llama.cpp's llama-quantize instead")


def expert_prior(importance: np.ndarray, act_sum: np.ndarray, counts: np.ndarray, min_tokens: int
                 ) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Per-expert statistics with a prior for experts routed fewer than `min_tokens` tokens.

    importance: float64[experts, in], Σ over samples (not yet per calibration token); act_sum: Σ x² over the routed
    tokens; counts: tokens routed. Returns (importance, E[x²], rare experts). For a rare expert the Fisher is the
    mean over the well-routed experts of their Fisher per routed token, times the rare expert's own routed tokens
    (at least one: an expert never routed in calibration can still be routed in use, and a zero would let the plan
    spend nothing on it); its E[x²] is the well-routed experts' mean. With no well-routed expert the pooled
    statistics of all experts stand in."""
    counts = counts.astype(np.float64)
    rare = counts < min_tokens
    safe = np.maximum(counts, 1.0)[:, None]
    act = np.where(counts[:, None] > 0, act_sum / safe, 0.0)
    if rare.any():
        good = ~rare
        if good.any():
            per_token = (importance[good] / counts[good, None]).mean(0)
            act_prior = act[good].mean(0)
        else:
            per_token = importance.sum(0) / max(counts.sum(), 1.0)
            act_prior = act_sum.sum(0) / max(counts.sum(), 1.0)
        importance = importance.copy()
        importance[rare] = per_token * safe[rare]
        act[rare] = act_prior
    return importance, act, [int(e) for e in np.flatnonzero(rare)]


def build_stats(collector: FisherCollector, targets: dict, meta: dict,
                min_expert_tokens: int = MIN_EXPERT_TOKENS) -> Stats:
    """Normalise the accumulators per token and key them by GGUF tensor name (per-element Fisher in GGUF rows)."""
    n = collector.n_tokens
    tensors: dict[str, TensorStats] = {}
    rare_report = []
    for hf_name, acc in collector.expert_accs.items():
        counts = acc.counts.cpu().numpy()
        for s, (gname, rows) in enumerate(acc.segments):
            tgt = next(t for t in targets[hf_name] if t.name == gname)
            imp, act, rare = expert_prior(acc.importance[s].double().cpu().numpy()[tgt.experts],
                                          acc.act_sq.double().cpu().numpy()[tgt.experts], counts[tgt.experts],
                                          min_expert_tokens)
            if rare:
                rare_report.append(f"{gname} experts {', '.join(f'{e} ({int(counts[tgt.experts][e])})' for e in rare)}")
            tensors[gname] = TensorStats(
                name=gname, hf_name=hf_name, shape=(len(tgt.experts), len(tgt.rows), imp.shape[1]), kind="experts",
                importance=(imp / n).astype(np.float32), act_sq=act.astype(np.float32),
                expert_tokens=counts[tgt.experts].astype(np.float32), prior_experts=rare)
    if rare_report:
        print(f"qgguf: calibrate: routed fewer than {min_expert_tokens} tokens (tokens in brackets), so their "
              f"statistics are a prior (the other experts' Fisher per routed token × their own tokens, at least 1; "
              f"the other experts' E[x²]): " + "; ".join(rare_report), file=sys.stderr)
    for hf_name, acc in collector.accs.items():
        target = targets[hf_name]
        kind = "tied" if acc.linear and acc.embedding else ("linear" if acc.linear else "embedding")
        fisher = None
        if acc.fisher is not None:
            fisher = target.to_gguf_rows((acc.fisher / n).cpu()).numpy()
        act_sq = (acc.act_sq / max(acc.act_count, 1)).cpu().numpy() if acc.act_sq is not None else None
        rows = acc.out_features if target.rows is None else len(target.rows)
        row_fisher = None
        if acc.row_sq is not None and kind in ("linear", "tied"):
            row_fisher = np.asarray(target.to_gguf_rows((acc.row_sq / n).float().cpu().numpy()), dtype=np.float32)
        tensors[target.name] = TensorStats(
            name=target.name, hf_name=hf_name, shape=(rows, acc.in_features), kind=kind,
            importance=(acc.importance / n).cpu().numpy(), act_sq=act_sq, fisher=fisher, row_fisher=row_fisher)
    return Stats(meta=meta, tensors=dict(sorted(tensors.items())))


def calibrate(model_dir: Path, out: Path, text: Path | None = None, tokens: int = DEFAULT_TOKENS,
              seq_len: int = DEFAULT_SEQ_LEN, device: str = "cpu", seed: int = DEFAULT_SEED,
              per_element: Sequence[str] = (), dtype: str = "auto", batch_size: int = 1,
              imatrix_out: Path | None = None, imatrix_from: str = "act", estimator: str = DEFAULT_ESTIMATOR,
              probe: str = "label", progress: bool = True, grad_checkpoint: bool = False,
              covariance: Path | None = None, covariance_budget: int | None = None,
              covariance_split: bool = False, min_expert_tokens: int = MIN_EXPERT_TOKENS,
              covariance_weight: str | None = None) -> Stats:
    """Run the calibration and write the statistics file (and optionally an llama.cpp imatrix GGUF).

    `covariance`: a folder for the input covariance of every Linear weight (calibrate/covariance.py); the
    statistics then also hold each Linear weight's per-row Fisher factor `row_fisher`. `covariance_split`: also keep
    the held-out split (the even sequences' H), for measure's held-out error of feedback rounding.
    `covariance_weight`: "gradient" (each token weighted by its output gradient's ‖g‖², one H per tensor) or
    "uniform" (E[x xᵀ], one H per input); None: the default (covariance.DEFAULT_WEIGHTING)."""
    from qgguf.calibrate.names import TensorNameMap
    from qgguf.models import check_model_dir

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
    from qgguf.calibrate.covariance import DEFAULT_WEIGHTING, WEIGHTINGS

    covariance_weight = covariance_weight or DEFAULT_WEIGHTING
    if covariance_weight not in WEIGHTINGS:
        raise QggufError(f"--covariance-weight {covariance_weight!r} is not one of {', '.join(WEIGHTINGS)}")
    cfg = check_model_dir(model_dir)
    check_output_path(out, [model_dir])
    if covariance is not None:  # before any work: a bad folder fails at once, not after the calibration
        if Path(covariance).resolve() == model_dir.resolve():
            raise QggufError(f"--covariance {covariance} is the model folder; give a folder of its own")
        writable_folder(Path(covariance), "--covariance")
    if imatrix_out is not None:
        from qgguf.calibrate.imatrix import SOURCES

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
    if covariance is not None and covariance_split and len(chunks) < 2:  # before the Fisher pass, not after it
        raise QggufError(f"--covariance-split needs at least two calibration sequences; {tokens:,} tokens of "
                         f"≤ {seq_len} make {len(chunks)}: give more --tokens or a shorter --seq-len")

    t_start = time.perf_counter()
    model = load_model(model_dir, dev, dtype, grad_checkpoint)
    in_dev = model.get_input_embeddings().weight.device  # where the first layer sits (accelerate may spread them)
    name_map = TensorNameMap(model_dir)
    weights, targets = collect_weights(model, name_map)
    experts = collect_experts(model, name_map)
    if not weights:
        raise QggufError(f"found no Linear/Conv1D/Embedding weights the converter writes in {str(model_dir)!r}")
    wanted = tuple(per_element)
    collector = FisherCollector(
        model, weights, per_element=lambda n: any(fnmatch.fnmatchcase(targets[n].name, p) for p in wanted),
        estimator=estimator, probe=probe, row_fisher=covariance is not None, experts=experts,
        token_weights=covariance is not None and covariance_weight == "gradient")

    gen = torch.Generator(device=dev)
    gen.manual_seed(seed)
    n_tok = sum(c.numel() for c in chunks)
    n_par = sum(p.numel() for p in model.parameters())
    placed = sorted({str(p.device) for p in model.parameters()})
    if progress:
        print(f"qgguf: calibrate: {n_tok:,} tokens in {len(chunks)} sequences of ≤ {seq_len} on "
              f"{', '.join(placed)} ({next(model.parameters()).dtype}, {n_par / 1e9:.3g} G parameters: "
              f"≈ {6 * n_par * n_tok / 1e12:.3g} TFLOP forward and backward)", file=sys.stderr)
    try:
        t_loop = time.perf_counter()
        with tqdm(total=n_tok, unit="tok", unit_scale=True, desc="calibrate", disable=not progress,
                  file=sys.stderr, bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}, "
                                              "{rate_fmt}{postfix}]") as bar:
            i = 0
            while i < len(chunks):
                # batch sequences of equal length (only the last may be shorter)
                j = i + 1
                while j < len(chunks) and j - i < batch_size and chunks[j].numel() == chunks[i].numel():
                    j += 1
                batch = torch.stack(chunks[i:j]).to(in_dev)
                collector.step(batch, generator=gen)
                bar.update(batch.numel())
                if i == 0 and progress:
                    took = time.perf_counter() - t_loop
                    bar.write(f"qgguf: calibrate: the first {batch.numel():,} tokens took {took:.1f} s: about "
                              f"{took * n_tok / batch.numel() / 60:.1f} min for all {n_tok:,}", file=sys.stderr)
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
    if experts:
        meta["min_expert_tokens"] = min_expert_tokens
    stats = build_stats(collector, {**targets, **experts}, meta, min_expert_tokens)
    stats.timing = {"load_s": t_loop - t_start, "loop_s": t_done - t_loop}
    if covariance is not None:
        from qgguf.calibrate.covariance import DEFAULT_BUDGET_BYTES, collect_covariance

        modules = {mod: targets[weights[id(mod.weight)]].name for mod in model.modules()
                   if layer_kind(mod) in ("linear", "conv1d") and id(mod.weight) in weights
                   and stats.tensors[targets[weights[id(mod.weight)]].name].kind in ("linear", "tied")}
        # ‖g_t‖² per token from the Fisher pass above, by GGUF name: the covariance's token weights
        tw = ({targets[hf].name: w for hf, w in collector.token_weights().items() if hf in targets}
              if covariance_weight == "gradient" else None)
        t_cov = time.perf_counter()
        collect_covariance(model, modules, chunks, Path(covariance), in_dev,
                           budget_bytes=covariance_budget or DEFAULT_BUDGET_BYTES, progress=progress,
                           meta={"model_sha256": meta["model_sha256"], "text_sha256": meta["text_sha256"],
                                 "seq_len": seq_len}, split=covariance_split,
                           token_weights=tw)
        stats.timing["covariance_s"] = time.perf_counter() - t_cov
    save_stats(stats, out, inputs=[model_dir])
    if imatrix_out is not None:
        from qgguf.calibrate.imatrix import imatrix_from_stats, write_imatrix

        write_imatrix(imatrix_from_stats(stats, imatrix_from), imatrix_out, inputs=[model_dir, Path(out)])
    return stats
