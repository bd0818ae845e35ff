"""The torch device every command runs on, checked before any work starts."""

from __future__ import annotations

import torch

from qgguf.errors import QggufError


def resolve_device(device: str) -> torch.device:
    if device == "cuda" or device.startswith("cuda:"):
        if not torch.cuda.is_available():
            # the advice torch's own CUDA_HOME notice hinted at (qgguf.torch_env drops that notice)
            why = ("this torch is a CPU-only build: install a CUDA build of torch" if torch.version.cuda is None
                   else "no CUDA device or driver is visible")
            raise QggufError(f"--device {device} but torch sees no CUDA device ({why}); or use --device cpu")
        return torch.device(device)
    if device != "cpu":
        raise QggufError(f"--device {device!r} is not cpu or cuda")
    return torch.device("cpu")
