"""The torch device every command runs on, checked before any work starts."""

from __future__ import annotations

import torch

from qgguf.errors import QggufError

DEVICES = "auto, cpu or cuda"


def resolve_device(device: str) -> torch.device:
    """`auto` (CUDA when torch sees a GPU, else the CPU), `cpu`, `cuda` or `cuda:N`."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" or device.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise QggufError(f"--device {device} but torch sees no CUDA device; use --device cpu")
        return torch.device(device)
    if device != "cpu":
        raise QggufError(f"--device {device!r} is not {DEVICES}")
    return torch.device("cpu")
