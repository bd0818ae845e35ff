"""Mixture-of-experts models end to end, on tiny random models (qgguf.assets.tiny.MOE_ARCHS): llama.cpp's converter
stacks their experts in 3-D tensors that the built llama.cpp runs; calibrate collects per-expert statistics for
them; convert plans one type per 3-D tensor; split GPU/CPU budgets place every tensor and the written llama.cpp
command line realises the placement."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from qgguf.assets.tiny import make_tiny
from qgguf.llamacpp.build import tool_path

# tiny model -> (llama.cpp architecture, experts, whether it has a shared expert, make_tiny arguments)
MOE = {
    "mixtral": ("llama", 4, False, {"ffn": 256}),
    "ernie4_5_moe": ("ernie4_5-moe", 4, True, {"layers": 3}),  # a dense first layer; ffn 512 = shared expert × kv
    "qwen2_moe": ("qwen2moe", 4, True, {"ffn": 256}),
    "qwen3_moe": ("qwen3moe", 4, False, {"ffn": 256}),
}


def tokenizer_for(arch: str) -> Path | None:
    """Qwen2/3-MoE need a byte-level BPE tokenizer llama.cpp's converter knows: the smollm2-135m asset's."""
    if arch not in ("qwen2_moe", "qwen3_moe"):
        return None
    from qgguf.assets.fetch import asset_path
    from qgguf.errors import QggufError

    try:
        return asset_path("smollm2-135m")
    except QggufError as e:
        pytest.skip(f"{arch} needs a tokenizer llama.cpp's converter knows: {e}")


@pytest.fixture(scope="module")
def moe_models(tmp_path_factory):
    made: dict[str, Path] = {}

    def get(arch: str) -> Path:
        if arch not in made:
            kw = dict(MOE[arch][3])
            made[arch] = make_tiny(arch, tmp_path_factory.mktemp(arch) / arch, tokenizer_from=tokenizer_for(arch),
                                   **kw)
        return made[arch]
    return get


def run_completion(gguf_path: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(tool_path("llama-completion")), "-m", str(gguf_path), "-p", "The world", "-n", "4",
                           "--temp", "0", "-t", "1", "-no-cnv", *extra], capture_output=True, text=True,
                          errors="replace", timeout=180)


@pytest.mark.parametrize("arch", list(MOE))
def test_tiny_moe_converts_with_stacked_experts_and_runs(arch, moe_models, tmp_path, llama_build):
    """llama.cpp's converter stacks each layer's experts as ffn_{gate,up,down}_exps, ne = [n_in, n_out, n_expert]
    (ggml order), and the built llama-completion loads and runs the file."""
    import gguf

    from qgguf.llamacpp.converter import convert_hf

    llama_arch, n_expert, shared, _ = MOE[arch]
    out = convert_hf(moe_models(arch), tmp_path / "f32.gguf")
    r = gguf.GGUFReader(out)
    assert r.fields["general.architecture"].contents() == llama_arch
    shapes = {t.name: [int(s) for s in t.shape] for t in r.tensors}
    last = max(int(n.split(".")[1]) for n in shapes if n.startswith("blk."))
    hidden = shapes["token_embd.weight"][0]
    gate = shapes[f"blk.{last}.ffn_gate_exps.weight"]
    assert gate[0] == hidden and gate[2] == n_expert
    assert shapes[f"blk.{last}.ffn_up_exps.weight"] == gate
    assert shapes[f"blk.{last}.ffn_down_exps.weight"] == [gate[1], hidden, n_expert]
    assert shapes[f"blk.{last}.ffn_gate_inp.weight"] == [hidden, n_expert]
    assert (f"blk.{last}.ffn_up_shexp.weight" in shapes) == shared
    gen = run_completion(out)
    assert gen.returncode == 0, gen.stderr[-2000:]
    assert gen.stdout.lstrip().startswith("The world") and len(gen.stdout.strip()) > len("The world")
