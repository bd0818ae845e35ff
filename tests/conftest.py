from __future__ import annotations

from pathlib import Path

import pytest

from qgguf.assets.tiny import make_tiny_llama


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    """A random 2-layer Llama (hidden 256, FFN 512, vocab 320) as an HF folder."""
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def llama_build() -> Path:
    """The built llama.cpp fork (CPU). Built by `qgguf llama build` (the CI does it before the tests)."""
    from qgguf.llamacpp.build import BuildSpec, build

    return build(BuildSpec.from_env(cuda=False))


@pytest.fixture(scope="session")
def per_sequence_fisher():
    """The brute-force reference of calibration's Fisher: F = Σ_seq (∂ℓ_seq/∂W)² / N from autograd weight
    gradients, one sequence at a time, through the modules' own forward (Conv1D's in × out layout, Gemma's row
    scale, fused 3-D experts). Shapes as HF stores the weights."""
    import torch

    def fisher(model, names: set[str], ids: torch.Tensor, cotangent: torch.Tensor) -> dict:
        params = {n: p for n, p in model.named_parameters() if n in names}
        F = {n: torch.zeros_like(p) for n, p in params.items()}
        for p in params.values():
            p.requires_grad_(True)
        try:
            for b in range(ids.shape[0]):
                for p in params.values():
                    p.grad = None
                with torch.enable_grad():
                    logits = model(input_ids=ids[b:b + 1], use_cache=False).logits
                    (logits * cotangent[b:b + 1]).sum().backward()
                for n, p in params.items():
                    F[n] += p.grad.square()
        finally:
            for p in params.values():
                p.requires_grad_(False)
        return {n: f / ids.numel() for n, f in F.items()}

    return fisher
