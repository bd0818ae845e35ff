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


def make_tokenizer(out: Path, vocab_size: int = 320) -> None:
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(tiny_text().splitlines()), model_writer=model, vocab_size=vocab_size,
        model_type="bpe", byte_fallback=True, character_coverage=1.0, bos_id=1, eos_id=2, unk_id=0, pad_id=-1,
        num_threads=1, minloglevel=2)
    (out / "tokenizer.model").write_bytes(model.getvalue())
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "add_bos_token": True, "add_eos_token": False, "legacy": False}))
    (out / "special_tokens_map.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>",
                                                             "unk_token": "<unk>"}))


def make_tiny_llama(out: Path, hidden: int = 256, ffn: int = 512, layers: int = 2, heads: int = 4,
                    kv_heads: int = 2, vocab_size: int = 320, tie: bool = False, seed: int = 0,
                    dtype: str = "float32", max_shard_size: str | None = None) -> Path:
    """A random Llama in `out` (config.json, model.safetensors, tokenizer). Rows are multiples of 256 by default.
    `max_shard_size` (e.g. "1MB"): sharded weights, model-0000X-of-0000N.safetensors with their index."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    make_tokenizer(out, vocab_size)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=1024,
                      tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2, rms_norm_eps=1e-5,
                      torch_dtype=dtype)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():  # larger than the default init, so outputs depend clearly on the weights
            if p.ndim == 2:
                p.normal_(0.0, 0.08)
    kw = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.to(getattr(torch, dtype)).save_pretrained(out, safe_serialization=True, **kw)
    return out
