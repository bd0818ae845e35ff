"""The torch device every command runs on, checked before any work starts."""

from __future__ import annotations

import torch

from qgguf.errors import QggufError


def resolve_device(device: str) -> torch.device:
    if device == "cuda" or device.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise QggufError(f"--device {device} but torch sees no CUDA device; use --device cpu")
        return torch.device(device)
    if device != "cpu":
        raise QggufError(f"--device {device!r} is not cpu or cuda")
    return torch.device("cpu")
