"""Tiny random Hugging Face models for tests: built from a transformers config, with a real SentencePiece
tokenizer trained here on generated text, so the whole pipeline (convert, calibrate, quantise, run) is real."""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

WORDS = ("the of and to in a is that for it as was with be by on not he I this are or his from at which but "
         "have an they you were her she there one all we their been has when who will more no if out so said "
         "what up its about into than them can only other new some could time these two may then do first any "
         "my now such like our over man me even most made after also did many before must through back years "
         "where much your way well down should because each just those people how too little state good very "
         "make world still own see men work long get here between both life being under never day same another "
         "know while last might us great old year off come since against go came right used take three").split()


def tiny_text(n_words: int = 20000, seed: int = 0) -> str:
    rng = random.Random(seed)
    lines = []
    for _ in range(n_words // 12):
        lines.append(" ".join(rng.choice(WORDS) for _ in range(12)).capitalize() + ".")
    return "\n".join(lines) + "\n"


def make_tokenizer(out: Path, vocab_size: int = 320, control: tuple[str, ...] = ()) -> None:
    """A SentencePiece BPE tokenizer (Llama's kind); `control` adds control tokens (Phi-3's <|endoftext|>)."""
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(tiny_text().splitlines()), model_writer=model, vocab_size=vocab_size,
        model_type="bpe", byte_fallback=True, character_coverage=1.0, bos_id=1, eos_id=2, unk_id=0, pad_id=-1,
        control_symbols=list(control),
        num_threads=1, minloglevel=2)
    (out / "tokenizer.model").write_bytes(model.getvalue())
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "add_bos_token": True, "add_eos_token": False, "legacy": False}))
    (out / "special_tokens_map.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>",
                                                             "unk_token": "<unk>"}))


def make_bpe_tokenizer(out: Path, vocab_size: int = 320) -> None:
    """A byte-level BPE tokenizer (GPT-2's kind) trained on the generated text, saved as tokenizer.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(tiny_text().splitlines(), trainer)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "GPT2Tokenizer", "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>", "add_bos_token": False}))


# Per architecture: the transformers config class, the tokenizer kind and the config fields beyond the common
# ones. Head sizes stay at 64 (hidden / heads) so every attention kernel of llama.cpp's CPU backend applies.
ARCHS: dict[str, tuple[str, str, dict]] = {
    "llama": ("LlamaConfig", "spm", {}),
    "qwen2": ("Qwen2Config", "spm", {"use_sliding_window": False}),
    "qwen3": ("Qwen3Config", "spm", {"head_dim": 64, "use_sliding_window": False}),
    "gemma2": ("Gemma2Config", "spm", {"head_dim": 64, "query_pre_attn_scalar": 64, "sliding_window": 32,
                                       "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0}),
    "gemma3": ("Gemma3TextConfig", "spm", {"head_dim": 64, "query_pre_attn_scalar": 64, "sliding_window": 32,
                                           "architectures": ["Gemma3ForCausalLM"]}),
    "phi3": ("Phi3Config", "spm", {"original_max_position_embeddings": 1024, "pad_token_id": 0}),
    "gpt2": ("GPT2Config", "bpe", {}),
    # Mixture-of-experts: 4 experts, 2 per token; expert rows of 256 so K-quants apply to every expert tensor.
    # Qwen2-MoE adds a shared expert (with its sigmoid gate) beside the routed ones; Mixtral's experts use `ffn`.
    "qwen2_moe": ("Qwen2MoeConfig", "spm", {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 256,
                                            "shared_expert_intermediate_size": 256, "use_sliding_window": False}),
    "qwen3_moe": ("Qwen3MoeConfig", "spm", {"head_dim": 64, "num_experts": 4, "num_experts_per_tok": 2,
                                            "moe_intermediate_size": 256, "norm_topk_prob": True,
                                            "use_sliding_window": False}),
    "mixtral": ("MixtralConfig", "spm", {"num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": None}),
    # ERNIE 4.5 MoE: a dense first layer, then MoE layers with one shared expert; converts with a SentencePiece
    # tokenizer (llama.cpp's converter reads Qwen2/3-MoE vocabularies as byte-level BPE, known only by hash)
    "ernie4_5_moe": ("Ernie4_5_MoeConfig", "spm", {"moe_num_experts": 4, "moe_k": 2, "moe_intermediate_size": 256,
                                                   "moe_num_shared_experts": 1, "moe_layer_start_index": 1,
                                                   "moe_layer_end_index": -1, "head_dim": 64}),
}

# The mixture-of-experts architectures among ARCHS. Qwen2/3-MoE need a tokenizer llama.cpp's converter knows
# (make_tiny's `tokenizer_from`, e.g. the smollm2-135m asset); Mixtral and ERNIE take the trained SentencePiece one.
MOE_ARCHS = ("qwen2_moe", "qwen3_moe", "mixtral", "ernie4_5_moe")


def make_tiny(arch: str, out: Path, hidden: int = 256, ffn: int = 512, layers: int = 2, heads: int = 4,
              kv_heads: int = 2, vocab_size: int = 320, tie: bool | None = None, seed: int = 0,
              dtype: str = "float32", tokenizer_from: Path | None = None, max_shard_size: str | None = None) -> Path:
    """A random model of architecture `arch` (a key of ARCHS) in `out`: config.json, model.safetensors and a
    tokenizer trained here. `tie` None keeps the architecture's default (Gemma ties, the others do not).

    `tokenizer_from`: an HF folder whose tokenizer.json/tokenizer_config.json to use instead (vocab_size follows
    it). llama.cpp's converter accepts a byte-level BPE tokenizer only if it knows it (by a hash of its output on a
    fixed text), so a GPT-2 converts only with a real model's tokenizer."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    if arch not in ARCHS:
        raise ValueError(f"unknown tiny architecture {arch!r}; one of {', '.join(ARCHS)}")
    cfg_name, tok_kind, extra = ARCHS[arch]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if tokenizer_from is not None:
        from transformers import AutoTokenizer

        for f in ("tokenizer.json", "tokenizer_config.json"):
            (out / f).write_bytes((Path(tokenizer_from) / f).read_bytes())
        tok = AutoTokenizer.from_pretrained(out)
        vocab_size = len(tok)
        bos = tok.bos_token_id if tok.bos_token_id is not None else 0
        eos = tok.eos_token_id if tok.eos_token_id is not None else bos
    elif tok_kind == "spm":
        # llama.cpp looks up <|endoftext|> in any vocabulary of a model named Phi-3, as real Phi-3 has it
        make_tokenizer(out, vocab_size, control=("<|endoftext|>",) if arch == "phi3" else ())
        bos, eos = 1, 2
    else:
        make_bpe_tokenizer(out, vocab_size)
        bos = eos = 0
    if arch == "gpt2":  # GPT-2's own field names; n_ctx is read by llama.cpp's converter
        common = dict(vocab_size=vocab_size, n_embd=hidden, n_layer=layers, n_head=heads, n_positions=1024,
                      n_ctx=1024, bos_token_id=bos, eos_token_id=eos)
    else:
        common = dict(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=1024,
                      bos_token_id=bos, eos_token_id=eos, rms_norm_eps=1e-5)
    if tie is not None:
        common["tie_word_embeddings"] = tie
    cfg = getattr(transformers, cfg_name)(**common, **extra, torch_dtype=dtype)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        for p in model.parameters():  # larger than the default init, so outputs depend clearly on the weights
            if p.ndim >= 2:
                p.normal_(0.0, 0.08)
    kw = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.to(getattr(torch, dtype)).save_pretrained(out, safe_serialization=True, **kw)
    return out


def make_tiny_llama(out: Path, hidden: int = 256, ffn: int = 512, layers: int = 2, heads: int = 4,
                    kv_heads: int = 2, vocab_size: int = 320, tie: bool = False, seed: int = 0,
                    dtype: str = "float32", max_shard_size: str | None = None) -> Path:
    """A random Llama in `out` (config.json, model.safetensors, tokenizer). Rows are multiples of 256 by default.
    `max_shard_size` (e.g. "1MB"): sharded weights, model-0000X-of-0000N.safetensors with their index."""
    return make_tiny("llama", out, hidden=hidden, ffn=ffn, layers=layers, heads=heads, kv_heads=kv_heads,
                     vocab_size=vocab_size, tie=tie, seed=seed, dtype=dtype, max_shard_size=max_shard_size)
