"""Calibration text: reading it and cutting it into token sequences for the model."""

from __future__ import annotations

from pathlib import Path

import torch

from qgguf.errors import QggufError
from qgguf.files import require_file


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
        from qgguf.assets.fetch import asset_path
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
