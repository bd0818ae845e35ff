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

# E[x²] from llama.cpp's graph against transformers': float32 sums in another order, through two layers
RTOL_IMATRIX = 3e-3

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


# ---------------------------------------------------------------------------------------------------- calibrate

@pytest.mark.parametrize("arch", ["mixtral", "ernie4_5_moe"])
def test_expert_fisher_matches_brute_force(arch, moe_models, per_sequence_fisher):
    """Per expert and input channel, the Fisher of each GGUF expert tensor (gate and up rows of the fused
    gate_up_proj apart) equals brute-force per-sequence weight gradients of the 3-D parameters; the routed-token
    counts add up to tokens × experts per token."""
    import torch
    from transformers import AutoTokenizer

    from qgguf.assets.tiny import tiny_text
    from qgguf.calibrate.fisher import FisherCollector
    from qgguf.calibrate.names import TensorNameMap
    from qgguf.calibrate.runner import collect_experts, collect_weights, load_model
    from qgguf.calibrate.text import token_chunks

    model_dir = moe_models(arch)
    model = load_model(model_dir, torch.device("cpu"), "float32")
    name_map = TensorNameMap(model_dir)
    weights, _ = collect_weights(model, name_map)
    experts = collect_experts(model, name_map)
    ids = torch.stack(token_chunks(AutoTokenizer.from_pretrained(model_dir), tiny_text(3000, seed=2), 96, 32))
    col = FisherCollector(model, weights, estimator="sequence", experts=experts)
    cotangent = col.step(ids, generator=torch.Generator().manual_seed(1))
    col.close()
    ref = per_sequence_fisher(model, set(experts), ids, cotangent)
    k = model.config.num_experts_per_tok if hasattr(model.config, "num_experts_per_tok") else model.config.moe_k
    names = set()
    for hf_name, targets in experts.items():
        acc = col.expert_accs[hf_name]
        assert int(acc.counts.sum()) == ids.numel() * k
        for s, t in enumerate(targets):
            names.add(t.name.split(".", 2)[2])
            want = ref[hf_name][:, torch.as_tensor(t.rows)].sum(1)[torch.as_tensor(t.experts)]  # experts × in
            got = acc.importance[s][torch.as_tensor(t.experts)] / col.n_tokens
            torch.testing.assert_close(got, want, rtol=2e-4, atol=1e-6 * float(want.max()))
    assert names == {"ffn_gate_exps.weight", "ffn_up_exps.weight", "ffn_down_exps.weight"}


def never_route(model_dir: Path, expert: int) -> Path:
    """ERNIE's router picks experts by softmax probability plus a per-expert score correction (in both transformers
    and llama.cpp): a correction of −10 on `expert` means it is never picked, in calibration or in use."""
    from safetensors.torch import load_file, save_file

    f = model_dir / "model.safetensors"
    sd = load_file(f)
    keys = [k for k in sd if k.endswith("e_score_correction_bias")]
    assert keys
    for k in keys:
        sd[k][..., expert] = -10.0
    save_file(sd, f, metadata={"format": "pt"})
    return model_dir


def test_never_routed_expert_gets_the_prior_and_is_flagged(moe_models, tmp_path, capfd):
    """An expert that receives no token: its statistics are the other experts' mean Fisher per routed token (× 1
    token) and mean E[x²], never zero; the log names it; the statistics list it; the imatrix counts it as one token
    (llama-quantize would otherwise use all ones)."""
    import shutil

    import numpy as np

    from qgguf.assets.tiny import tiny_text
    from qgguf.calibrate.imatrix import read_imatrix
    from qgguf.calibrate.runner import calibrate
    from qgguf.calibrate.stats import load_stats

    model = never_route(Path(shutil.copytree(moe_models("ernie4_5_moe"), tmp_path / "m")), 3)
    text = tmp_path / "cal.txt"
    text.write_text(tiny_text(3000, seed=3))
    calibrate(model, tmp_path / "s.safetensors", text=text, tokens=256, seq_len=64, progress=False,
              imatrix_out=tmp_path / "im.gguf")
    err = capfd.readouterr().err
    stats = load_stats(tmp_path / "s.safetensors")
    im = read_imatrix(tmp_path / "im.gguf")
    exps = [n for n in stats.names() if "_exps" in n]
    assert len(exps) == 6  # two MoE layers × gate, up, down (layer 0 is dense)
    for name in exps:
        t = stats[name]
        assert t.expert_tokens[3] == 0 and t.expert_tokens.sum() == 256 * 2 and t.prior_experts == [3]
        per_token = (t.importance[:3] / t.expert_tokens[:3, None]).mean(0)
        np.testing.assert_allclose(t.importance[3], per_token * 1, rtol=1e-5)
        assert (t.importance[3] > 0).all() and (t.act_sq[3] > 0).all()
        np.testing.assert_allclose(t.act_sq[3], t.act_sq[:3].mean(0), rtol=1e-5)
        assert f"{name} experts 3 (0)" in err
        assert im.entries[name].counts.tolist() == [*t.expert_tokens[:3].tolist(), 1.0]
        np.testing.assert_allclose(im.entries[name].mean().reshape(4, -1), t.act_sq, rtol=1e-5)


IM_CTX, IM_CHUNKS = 128, 4
IM_TEXT_SEED = 7  # a text on which no token's routing is a near-tie in either model (the test checks it)


def least_routing_margin(model_dir: Path, ids) -> float:
    """The least gap, over tokens and MoE layers, between the k-th and (k+1)-th router probability: below
    rounding, the token's k-th expert is a coin toss between implementations."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    k = AutoConfig.from_pretrained(model_dir).num_experts_per_tok
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    gaps = []

    def hook(mod, inp, out):
        p = torch.softmax((out[0] if isinstance(out, tuple) else out).float(), -1).sort(-1, descending=True).values
        gaps.append(float((p[:, k - 1] - p[:, k]).min()))
    handles = [m.register_forward_hook(hook) for m in model.modules() if type(m).__name__.endswith("Router")]
    with torch.no_grad():
        model(input_ids=ids)
    for h in handles:
        h.remove()
    assert len(gaps) == model.config.num_hidden_layers
    return min(gaps)


def test_tiny_tokenizer_reads_alike_everywhere(moe_models):
    """The tiny models' SentencePiece tokenizer gives the same ids through every transformers path (Llama's
    tokenizer class, and the conversion of the .model that Mixtral's and ERNIE's configs get) and through
    sentencepiece itself (which llama.cpp's tokenizer follows): newlines and runs of spaces are kept, not
    normalised away, as in Llama's and Mistral's own tokenizer.model."""
    import sentencepiece as spm
    from transformers import AutoTokenizer

    from qgguf.assets.tiny import make_tiny_llama, tiny_text

    text = tiny_text(200, seed=5) + "  two  spaces\n\n\ttab é"
    mixtral = moe_models("mixtral")
    llama = make_tiny_llama(mixtral.parent / "llama")
    ref = [1] + spm.SentencePieceProcessor(model_file=str(mixtral / "tokenizer.model")).encode(text)
    assert 13 in ref  # <0x0A>: a newline is a byte token, as llama.cpp encodes it
    for d in (mixtral, llama, moe_models("ernie4_5_moe")):
        assert AutoTokenizer.from_pretrained(d)(text).input_ids == ref, d.name


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])
def test_llama_imatrix_agrees_with_our_expert_statistics(arch, moe_models, tmp_path, llama_build):
    """llama-imatrix on the converted model and our calibration on the same text: per expert (llama-imatrix's
    layout, one matrix and one count per expert) the same routed-token counts and E[x²] of every stacked expert
    tensor, and the same E[x²] of every dense tensor (attention, routers, shared expert)."""
    import numpy as np
    import torch
    from transformers import AutoTokenizer

    from qgguf.assets.tiny import tiny_text
    from qgguf.calibrate.imatrix import read_imatrix
    from qgguf.calibrate.runner import calibrate
    from qgguf.calibrate.stats import load_stats
    from qgguf.calibrate.text import token_chunks
    from qgguf.llamacpp.converter import convert_hf

    model = moe_models(arch)
    text = tmp_path / "cal.txt"
    text.write_text(tiny_text(6000, seed=IM_TEXT_SEED))
    ids = torch.stack(token_chunks(AutoTokenizer.from_pretrained(model), text.read_text(), IM_CTX * IM_CHUNKS,
                                   IM_CTX))
    assert least_routing_margin(model, ids) > 1e-4, "a near-tie in routing: choose another IM_TEXT_SEED"
    f32 = convert_hf(model, tmp_path / "f32.gguf")
    calibrate(model, tmp_path / "s.safetensors", text=text, tokens=IM_CTX * IM_CHUNKS, seq_len=IM_CTX,
              progress=False, imatrix_out=tmp_path / "ours.gguf")
    res = subprocess.run([str(tool_path("llama-imatrix")), "-m", str(f32), "-f", str(text), "-o",
                          str(tmp_path / "theirs.gguf"), "-c", str(IM_CTX), "--chunks", str(IM_CHUNKS), "-t", "1",
                          "--no-ppl", "--output-format", "gguf"], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    theirs, ours = read_imatrix(tmp_path / "theirs.gguf"), read_imatrix(tmp_path / "ours.gguf")
    stats = load_stats(tmp_path / "s.safetensors")
    n_tok, k = IM_CTX * IM_CHUNKS, 2
    blk = sorted(n for n in stats.names() if n.startswith("blk."))
    assert sorted(theirs.entries) == blk  # llama-imatrix collects every blk.* matmul weight, routers included
    n_exps = 0
    for name in blk:
        e, t = theirs.entries[name], stats[name]
        if "_exps" in name:
            n_exps += 1
            assert e.sums.shape == t.act_sq.shape == (MOE[arch][1], t.act_sq.shape[1])
            assert e.counts.tolist() == t.expert_tokens.tolist() == ours.entries[name].counts.tolist(), name
            assert e.counts.sum() == n_tok * k and (e.counts > 0).all()
            got = e.sums / e.counts[:, None]
        else:
            assert e.counts.tolist() == [n_tok], name
            got = theirs.mean(name)
        np.testing.assert_allclose(got, t.act_sq, rtol=RTOL_IMATRIX, atol=1e-6, err_msg=name)
    assert n_exps == 6  # two layers × gate, up, down


# ---------------------------------------------------------------------------------------------------- convert

def qgguf(*args) -> subprocess.CompletedProcess:
    import sys

    return subprocess.run([sys.executable, "-m", "qgguf", *map(str, args)], capture_output=True, text=True)


@pytest.fixture(scope="module")
def text(tmp_path_factory) -> Path:
    from qgguf.assets.tiny import tiny_text

    p = tmp_path_factory.mktemp("text") / "cal.txt"
    p.write_text(tiny_text(6000, seed=1))
    return p


def convert_args(model: Path, out: Path, text: Path, *budget) -> list:
    return ["convert", model, "-o", out, *(budget or ("--target-bpw", "5")), "--tokens", "256", "--seq-len", "64",
            "--text", text, "--max-rows", "64", "--min-type", "Q4_0"]


@pytest.mark.parametrize("arch", list(MOE))
def test_moe_converts_plans_stacked_experts_and_runs(arch, moe_models, text, tmp_path, llama_build):
    """calibrate → convert → llama-completion: one planned type per stacked expert tensor, written in it (read back
    by gguf-py), with its routed-token counts and its shares of bytes and predicted KL in the plan JSON."""
    import json

    import gguf

    out = tmp_path / "q.gguf"
    res = qgguf(*convert_args(moe_models(arch), out, text))
    assert res.returncode == 0, res.stderr[-3000:]
    plan = json.loads((tmp_path / "q.plan.json").read_text())
    tensors = {t["name"]: t for t in plan["tensors"]}
    exps = [n for n in tensors if "_exps" in n]
    assert exps and all(tensors[n]["experts"]["count"] == MOE[arch][1] for n in exps)
    assert all(sum(tensors[n]["experts"]["tokens"]) == 256 * 2 for n in exps)
    assert sum(t["share"]["bytes"] for t in tensors.values()) == pytest.approx(1.0)
    assert sum(t["share"]["dkl"] for t in tensors.values()) == pytest.approx(1.0)
    r = gguf.GGUFReader(out)
    seen = {t.name: t for t in r.tensors}
    for n in exps:
        assert seen[n].tensor_type.name == tensors[n]["type"] and len(seen[n].shape) == 3
        assert int(seen[n].n_bytes) == tensors[n]["bytes"]
    assert "bytes%" in res.stdout and "ΔKL%" in res.stdout
    gen = run_completion(out)
    assert gen.returncode == 0, gen.stderr[-2000:]
    assert gen.stdout.lstrip().startswith("The world") and len(gen.stdout.strip()) > len("The world")


# ---------------------------------------------------------------------------------------------------- split budgets

@pytest.mark.parametrize("arch,gpu,cpu", [("ernie4_5_moe", 1_000_000, 1_200_000), ("mixtral", 600_000, 1_300_000)])
def test_split_budgets_place_every_tensor_and_llama_cpp_options_realise_it(arch, gpu, cpu, moe_models, text,
                                                                             tmp_path, llama_build):
    """Both budgets hold for the tensor bytes gguf-py reads per device, where the device of each tensor is what
    the written llama.cpp options give it (-ngl, --n-cpu-moe / -ot applied with llama.cpp's rules and regex search);
    the expert tensors are on the CPU before anything else; llama-completion runs with those options."""
    import json

    import gguf

    from qgguf.plan.placement import apply_overrides, is_expert

    out = tmp_path / "s.gguf"
    res = qgguf(*convert_args(moe_models(arch), out, text, "--budget-gpu", gpu, "--budget-cpu", cpu))
    assert res.returncode == 0, res.stderr[-3000:]
    plan = json.loads((tmp_path / "s.plan.json").read_text())
    pl = plan["placement"]
    r = gguf.GGUFReader(out)
    n_layer = int(r.fields[f"{r.fields['general.architecture'].contents()}.block_count"].contents())
    names = [t.name for t in r.tensors]
    device = apply_overrides(pl["llama_args"], names, n_layer)
    assert device == pl["device"]
    used = {"GPU": 0, "CPU": 0}
    for t in r.tensors:
        used[device[t.name]] += int(t.n_bytes)
    assert used == pl["bytes"] and used["GPU"] <= gpu and used["CPU"] <= cpu
    assert device["token_embd.weight"] == "CPU"
    # experts leave the GPU first: no expert on the GPU while a non-expert tensor (but the embedding) is on the CPU
    cpu_dense = [n for n in names if device[n] == "CPU" and not is_expert(n) and n != "token_embd.weight"]
    assert not cpu_dense or all(device[n] == "CPU" for n in names if is_expert(n))
    assert f"GPU tensors       {used['GPU']:,} bytes" in res.stdout
    # the budgets as given (no whole-file budget was): the summary, the plan JSON and the GGUF's metadata
    given = f"--budget-gpu {gpu:,} --budget-cpu {cpu:,} bytes"
    assert f"budget            {given}\n" in res.stdout and plan["budget"] is None
    assert r.fields["qgguf.budget"].contents() == given
    gen = run_completion(out, *pl["llama_args"])
    assert gen.returncode == 0, gen.stderr[-2000:]
    assert gen.stdout.lstrip().startswith("The world")


def test_infeasible_split_budgets_give_the_achievable_range(moe_models, text, tmp_path):
    out = tmp_path / "x.gguf"
    res = qgguf(*convert_args(moe_models("ernie4_5_moe"), out, text, "--budget-gpu", "500000", "--budget-cpu",
                              "100000"))
    assert res.returncode != 0 and "Traceback" not in res.stderr
    errors = [l for l in res.stderr.splitlines() if "error" in l]
    assert len(errors) == 1 and "cannot be met" in errors[0], res.stderr[-2000:]
    assert "with --budget-cpu 100,000 the GPU needs at least" in errors[0] and "in all buys nothing" in errors[0]
    assert not out.exists() and list(tmp_path.glob("x.*")) == []
    res = qgguf(*convert_args(moe_models("ernie4_5_moe"), out, text, "--budget-gpu", "500000"))
    assert res.returncode != 0 and "give both --budget-gpu" in res.stderr
