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
            # the advice torch's own CUDA_HOME notice hinted at (qgguf.torch_env drops that notice)
            why = ("this torch is a CPU-only build: install a CUDA build of torch" if torch.version.cuda is None
                   else "no CUDA device or driver is visible")
            raise QggufError(f"--device {device} but torch sees no CUDA device ({why}); or use --device cpu")
        return torch.device(device)
    if device != "cpu":
        raise QggufError(f"--device {device!r} is not {DEVICES}")
    return torch.device("cpu")
