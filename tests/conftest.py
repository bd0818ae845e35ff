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
