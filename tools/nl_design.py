#!/usr/bin/env python3
"""Design study for the non-linear (NL) block types: codebooks, layouts, and MSE against the stock types.

    python tools/nl_design.py --out /tmp/nl-study              # synthetic data + both assets if fetched
    python tools/nl_design.py --out DIR --rows 16 --bits 3 5   # more rows, fewer bit-widths

Steps (docs/design.md, "Formats: the new non-linear types" has the reasoning):
 1. Fit Normal, Laplace and Student-t to each asset's weights (each tensor divided by its RMS, then pooled).
 2. For each fit, the density of block-absmax-normalised values (block 32): the block's signed maximum goes to -1
    (a point mass of 1/32), the other 31 values have density p(y) on (-1, 1) (derived in the notes).
 3. Codebooks: -1 kept as a level, the other 2^b - 1 levels at the quantiles of p^(1/3) (high-resolution optimal
    companding); Lloyd-Max on real absmax-normalised weights; and Lloyd-Max with the encoder's scale search in
    the loop. All rounded to int8 (-127 ... 127).
 4. Every candidate type (codebook × layout) and every stock type (ggml's own encoder, through qgguf.llamacpp.ggml_ref) on
    Gaussian and Student-t data and on every 2-D tensor of the assets (a seeded sample of rows of each): relative
    MSE (MSE / mean square), the rate gap to the Gaussian D(R) bound, and the bits the stock frontier needs to
    reach the same error.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from qgguf.formats import nl  # noqa: E402
from qgguf.llamacpp import ggml_ref  # noqa: E402

BLOCK = 32

# Stock types compared against: ggml type id, name. "palette" = the types qgguf's stock planner chooses from.
STOCK = {
    "Q2_K": 10, "Q3_K": 11, "Q4_0": 2, "Q4_1": 3, "Q4_K": 12, "IQ4_NL": 20, "IQ4_XS": 23, "Q5_0": 6, "Q5_1": 7,
    "Q5_K": 13, "Q6_K": 14, "Q8_0": 8,
    # stock llama.cpp types outside qgguf's palette (lattice/grid codebooks, imatrix-oriented), for context
    "IQ2_XXS": 16, "IQ2_XS": 17, "IQ2_S": 22, "IQ3_XXS": 18, "IQ3_S": 21,
}
PALETTE = ("Q2_K", "Q3_K", "Q4_0", "Q4_1", "Q4_K", "IQ4_NL", "IQ4_XS", "Q5_0", "Q5_1", "Q5_K", "Q6_K", "Q8_0")


# ================================================================================================ densities
def std_pdf(dist: str, x: torch.Tensor, nu: float = 5.0) -> torch.Tensor:
    """Unit-variance Normal / Laplace / Student-t density (float64)."""
    if dist == "normal":
        return torch.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)
    if dist == "laplace":
        b = 1 / math.sqrt(2)
        return torch.exp(-x.abs() / b) / (2 * b)
    if dist == "t":
        s = math.sqrt((nu - 2) / nu)  # scale giving unit variance
        c = math.lgamma((nu + 1) / 2) - math.lgamma(nu / 2) - 0.5 * math.log(nu * math.pi)
        z = x / s
        return torch.exp(c - (nu + 1) / 2 * torch.log1p(z * z / nu)) / s
    raise ValueError(dist)


def normalised_density(dist: str, nu: float = 5.0, block: int = BLOCK, ny: int = 2001
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Density p(y) on [-1, 1] of a non-maximal value of a block divided by the block's largest |x|.

    With M the block's largest |x| (density B·g(m)·G(m)^(B-1), g = 2f, G(m) = P(|x| < m)) and the other B-1 values
    iid f restricted to |x| < M:  p(y) = ∫ f(y·m) · m · B · 2f(m) · G(m)^(B-2) dm.
    """
    mmax = {"normal": 9.0, "laplace": 30.0}.get(dist, 30.0 * (1 + 10 / max(nu - 2, 0.1)))
    m = torch.linspace(0, mmax, 40_001, dtype=torch.float64)
    f_m = std_pdf(dist, m, nu)
    dm = m[1] - m[0]
    G = torch.cumsum(torch.cat((torch.zeros(1, dtype=torch.float64), (f_m[1:] + f_m[:-1]) * dm)), 0)  # 2∫f
    G = G.clamp(max=1.0)
    kern = m * block * 2 * f_m * G.pow(block - 2)  # [nm]
    keep = kern > kern.max() * 1e-14
    m, kern = m[keep], kern[keep]
    y = torch.linspace(-1, 1, ny, dtype=torch.float64)
    p = torch.zeros_like(y)
    for i in range(0, ny, 256):  # chunks of y: the [ny, nm] product would not fit
        ys = y[i:i + 256]
        p[i:i + 256] = (std_pdf(dist, ys[:, None] * m[None, :], nu) * kern[None, :]).sum(1) * dm
    p /= torch.trapezoid(p, y)
    return y, p


def cube_root_levels(y: torch.Tensor, p: torch.Tensor, n: int) -> torch.Tensor:
    """n levels at the mid-quantiles of p^(1/3): level density ∝ p^(1/3) (Panter-Dite / Bennett)."""
    lam = p.clamp(min=0).pow(1 / 3)
    cdf = torch.cumsum(torch.cat((torch.zeros(1, dtype=lam.dtype), (lam[1:] + lam[:-1]) / 2 * (y[1:] - y[:-1]))), 0)
    cdf /= cdf[-1].clone()
    u = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    return torch.from_numpy(np.interp(u.numpy(), cdf.numpy(), y.numpy()))


def codebook_cube_root(y, p, bits: int, symmetric: bool = False) -> torch.Tensor:
    """Signed: -1 kept for the block's signed max (it is mapped there), 2^b - 1 levels by p^(1/3) on (-1, 1).
    Symmetric: ±1 kept, 2^b - 2 levels between."""
    n = 1 << bits
    if symmetric:
        inner = cube_root_levels(y, p, n - 2)
        return torch.cat((torch.tensor([-1.0], dtype=torch.float64), inner, torch.tensor([1.0], dtype=torch.float64)))
    return torch.cat((torch.tensor([-1.0], dtype=torch.float64), cube_root_levels(y, p, n - 1)))


def to_int8(c: torch.Tensor) -> tuple[int, ...]:
    """A [-1, 1] codebook (lowest level -1) as sorted distinct int8 values with -127 as the lowest."""
    c = (c / -c[0]).numpy()
    v = np.clip(np.rint(c * 127), -127, 127).astype(int)
    for i in range(1, len(v)):  # keep levels distinct after rounding (only matters at 6 bits)
        v[i] = max(v[i], v[i - 1] + 1)
    for i in range(len(v) - 2, -1, -1):
        v[i] = min(v[i], v[i + 1] - 1)
    if v[0] < -128 or v[-1] > 127:
        raise ValueError("codebook does not fit int8")
    return tuple(int(a) for a in v)


# ================================================================================================ fitting
def fit_t(z: torch.Tensor) -> tuple[float, float]:
    """Student-t MLE on standardised data z (location 0): (nu, mean log-likelihood), nu on a log grid, the scale by
    EM (the Gaussian scale-mixture form) for each nu."""
    z = z.double()
    best = (float("nan"), -float("inf"))
    for nu in np.exp(np.linspace(np.log(2.2), np.log(200), 60)):
        s2 = z.pow(2).mean()
        for _ in range(30):
            wgt = (nu + 1) / (nu + z * z / s2)
            s2 = (wgt * z * z).mean()
        s = s2.sqrt().item()
        c = math.lgamma((nu + 1) / 2) - math.lgamma(nu / 2) - 0.5 * math.log(nu * math.pi) - math.log(s)
        ll = (c - (nu + 1) / 2 * torch.log1p(z * z / (s * s * nu))).mean().item()
        if ll > best[1]:
            best = (float(nu), ll)
    return best


def fit_all(z: torch.Tensor) -> dict:
    """Normal, Laplace and Student-t fits of z (each tensor already divided by its RMS)."""
    z = z.double()
    sd = z.std().item()
    ll_n = (-0.5 * (z / sd) ** 2 - math.log(sd * math.sqrt(2 * math.pi))).mean().item()
    b = z.abs().mean().item()
    ll_l = (-z.abs() / b - math.log(2 * b)).mean().item()
    nu, ll_t = fit_t(z)
    kurt = (z ** 4).mean().item() / (z ** 2).mean().item() ** 2
    return {"normal_ll": ll_n, "laplace_ll": ll_l, "t_nu": nu, "t_ll": ll_t, "kurtosis": kurt}


# ================================================================================================ Lloyd-Max
def absmax_normalised(x: torch.Tensor) -> torch.Tensor:
    """The non-maximal values of each 32-block divided by minus the block's signed max (the max itself → -1)."""
    xb = x.reshape(-1, BLOCK)
    idx = xb.abs().argmax(1, keepdim=True)
    mx = xb.gather(1, idx)
    ok = mx.squeeze(1).abs() > 0
    y = -xb[ok] / mx[ok]
    mask = torch.ones_like(y, dtype=torch.bool)
    mask.scatter_(1, idx[ok], False)
    return y[mask]


def lloyd_absmax(y: torch.Tensor, init: torch.Tensor, iters: int = 60) -> torch.Tensor:
    """1-D Lloyd-Max on absmax-normalised values, level 0 pinned at -1 (where every block's max sits)."""
    c = init.double().clone()
    y = y.double()
    for _ in range(iters):
        idx = torch.bucketize(y, (c[1:] + c[:-1]) / 2)
        s = torch.zeros_like(c).scatter_add_(0, idx, y)
        k = torch.zeros_like(c).scatter_add_(0, idx, torch.ones_like(y))
        new = torch.where(k > 0, s / k.clamp(min=1), c)
        new[0] = -1.0
        c = torch.sort(new).values
    return c


def lloyd_encoder(x: torch.Tensor, fmt: nl.NLFormat, init: torch.Tensor, iters: int = 8) -> torch.Tensor:
    """Lloyd-Max with the encoder in the loop: the scale search picks each block's scale for the current codebook,
    each level moves to the mean of x/scale over the weights it codes, the codebook is renormalised to start at -1."""
    c = init.double().clone()
    xt = x.reshape(-1, BLOCK).t().contiguous()
    ones = torch.ones_like(xt)
    for _ in range(iters):
        vals = (c * 127).float()
        d = fmt.block_scales(xt, ones, vals, unbiased=False)  # Lloyd-Max wants the LS scale
        ok = d != 0
        y = (xt[:, ok] / d[ok]).reshape(-1).double() / 127
        idx = torch.bucketize(y, (c[1:] + c[:-1]) / 2)
        s = torch.zeros_like(c).scatter_add_(0, idx, y)
        k = torch.zeros_like(c).scatter_add_(0, idx, torch.ones_like(y))
        new = torch.sort(torch.where(k > 0, s / k.clamp(min=1), c)).values
        c = new / -new[0]
    return c


# ================================================================================================ candidates
# The encoder's candidate inverse scales are qgguf.formats.nl's (chosen here: wide and coarse at 2 bits, where clipping
# the block's largest weights pays, narrow and fine at 5-6 bits).
CANDIDATES = {b: nl.candidates(b) for b in nl.CANDIDATES}


def make(name: str, bits: int, layout: str, values, candidates=None) -> nl.NLFormat:
    return nl.nl_class(name, bits, layout, values, candidates or CANDIDATES[bits])()


# ================================================================================================ data
@dataclass
class Tensor:
    asset: str
    name: str
    x: torch.Tensor  # [rows, row_len] float32 (sampled rows)
    numel: int       # of the whole tensor


def synthetic(rows: int = 256, cols: int = 2048, seed: int = 0) -> list[Tensor]:
    g = torch.Generator().manual_seed(seed)
    gauss = torch.randn(rows, cols, generator=g)
    # Student-t nu=5 as a Gaussian scale mixture: z / sqrt(chi2_5 / 5), then unit variance
    gam = torch._standard_gamma(torch.full((rows, cols), 2.5), generator=g) * 2  # chi2_5
    t5 = torch.randn(rows, cols, generator=g) / torch.sqrt(gam / 5) / math.sqrt(5 / 3)
    return [Tensor("synthetic", "gauss", gauss, gauss.numel()), Tensor("synthetic", "student-t5", t5, t5.numel())]


def load_asset(name_or_dir: str, rows: int, seed: int = 0, max_len: int = 1 << 16) -> list[Tensor]:
    """Every 2-D tensor of an HF folder (safetensors), `rows` seeded rows of each (HF layout: row = input channels,
    as in GGUF)."""
    from safetensors import safe_open

    p = Path(name_or_dir)
    if not p.is_dir():
        from qgguf.assets.fetch import asset_path

        p = asset_path(name_or_dir)
    label = name_or_dir if not Path(name_or_dir).is_dir() else p.name
    files = sorted(p.glob("*.safetensors"))
    out = []
    g = torch.Generator().manual_seed(seed)
    for f in files:
        with safe_open(f, framework="pt") as sf:
            for key in sorted(sf.keys()):
                sl = sf.get_slice(key)
                shape = sl.get_shape()
                if len(shape) != 2 or shape[1] % BLOCK or shape[1] > max_len:
                    continue
                r = torch.randperm(shape[0], generator=g)[:rows].sort().values
                x = torch.stack([sl[int(i)] for i in r]).float()
                out.append(Tensor(label, key, x, shape[0] * shape[1]))
    if not out:
        raise SystemExit(f"{p}: no 2-D safetensors tensors found")
    return out


def kind(name: str) -> str:
    m = re.search(r"(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj|embed_tokens|lm_head)", name)
    return m.group(1) if m else name


# ================================================================================================ measuring
class Pool:
    """The sampled tensors whose rows a block size divides, as one [n, block] batch (every encoder here works block
    by block), so each type runs once over everything; per-tensor MSE comes from segment sums."""

    def __init__(self, tensors: list[Tensor], block: int):
        tensors = [t for t in tensors if t.x.shape[1] % block == 0]
        self.block = block
        self.keys = [f"{t.asset}/{t.name}" for t in tensors]
        parts = [t.x.reshape(-1, block) for t in tensors]
        self.seg = torch.cat([torch.full((p.shape[0],), i) for i, p in enumerate(parts)])
        self.x = torch.cat(parts)
        self.count = torch.zeros(len(parts), dtype=torch.float64).index_add_(
            0, self.seg, torch.full((self.x.shape[0],), float(block), dtype=torch.float64))

    def per_tensor(self, y: torch.Tensor) -> torch.Tensor:
        err = (y.double() - self.x.double()).pow(2).sum(1)
        return torch.zeros(len(self.keys), dtype=torch.float64).index_add_(0, self.seg, err) / self.count

    def mse_nl(self, fmt: nl.NLFormat) -> dict[str, float]:
        return dict(zip(self.keys, self.per_tensor(fmt.roundtrip(self.x)).tolist()))

    def mse_stock(self, type_id: int) -> dict[str, float]:
        """ggml's encoder; per tensor the better of no importance and flat importance (IQ2_XXS/XS need one)."""
        xn = self.x.numpy()
        best = None
        for imp in (None, np.ones(self.block, dtype=np.float32)):
            if imp is None and ggml_ref.lib().ggml_quantize_requires_imatrix(type_id):
                continue
            y = ggml_ref.dequantize(type_id, ggml_ref.quantize(type_id, xn, imp), xn.shape)
            m = self.per_tensor(torch.from_numpy(y))
            best = m if best is None else torch.minimum(best, m)
        return dict(zip(self.keys, best.tolist()))


def stock_bpw(type_id: int) -> float:
    t = ggml_ref.traits(type_id)
    return 8.0 * t.type_size / t.blck_size


def frontier_bits(points: list[tuple[float, float]], rel: float) -> float:
    """Bits the stock frontier needs for relative MSE `rel`: the Pareto points of (bpw, rel-MSE), linear in log MSE
    between neighbours; nan outside their range."""
    env = []  # increasing bpw, decreasing error
    for b, e in sorted(points):
        if not env or e < env[-1][1]:
            env.append((b, e))
    for (b0, e0), (b1, e1) in zip(env, env[1:]):
        if e1 <= rel <= e0:
            t = (math.log(e0) - math.log(rel)) / (math.log(e0) - math.log(e1))
            return b0 + t * (b1 - b0)
    return float("nan")


def gap_bits(bpw: float, rel: float) -> float:
    """Rate gap to the Gaussian D(R) bound: bpw - ½·log2(σ²/MSE)."""
    return bpw - 0.5 * math.log2(1 / rel)


# ================================================================================================ the study
def study(args) -> dict:
    torch.manual_seed(0)
    sets: dict[str, list[Tensor]] = {"synthetic": synthetic()}
    for a in args.assets:
        try:
            sets[a] = load_asset(a, args.rows)
        except Exception as e:  # noqa: BLE001 - an asset not fetched yet is reported, not fatal
            print(f"nl_design: skipping asset {a}: {e}", file=sys.stderr)
    real = [a for a in sets if a != "synthetic"]
    res: dict = {"rows": args.rows, "assets": real, "fits": {}, "codebooks": {}, "types": {}, "stock": {}}

    # 1. fits ---------------------------------------------------------------------------------------------
    for a in real:
        z = torch.cat([(t.x / t.x.pow(2).mean().sqrt()).reshape(-1) for t in sets[a]])
        z = z[torch.randperm(z.numel(), generator=torch.Generator().manual_seed(1))[:2_000_000]]
        res["fits"][a] = fit_all(z)
    if not real:
        res["fits"]["student-t5 (stand-in)"] = {"t_nu": 5.0}
    nus = {a: f["t_nu"] for a, f in res["fits"].items()}
    print("fits:", json.dumps(res["fits"], indent=1), file=sys.stderr)

    # training data for Lloyd: the first real asset (the other is held out), else Student-t ν=5 data
    train_name = real[0] if real else "synthetic"
    train = sets[train_name] if real else [t for t in sets["synthetic"] if t.name == "student-t5"]
    xtrain = torch.cat([t.x.reshape(-1) / t.x.pow(2).mean().sqrt() for t in train])
    xtrain = xtrain[: (min(xtrain.numel(), args.train) // 256) * 256]
    res["train"] = f"{train_name} ({xtrain.numel()} weights)"

    # 2-3. codebooks ----------------------------------------------------------------------------------------
    dens = {"normal": normalised_density("normal"), "laplace": normalised_density("laplace")}
    for a, nu in nus.items():
        dens[f"t(nu={nu:.1f})"] = normalised_density("t", nu)
    ytrain = absmax_normalised(xtrain)
    books: dict[int, dict[str, tuple[int, ...]]] = {}
    for bits in args.bits:
        books[bits] = {}
        for dname, (y, p) in dens.items():
            books[bits][f"cuberoot-{dname}"] = to_int8(codebook_cube_root(y, p, bits))
        y, p = dens["normal"] if not real else dens[f"t(nu={nus[real[0]]:.1f})"]
        books[bits]["cuberoot-symmetric"] = to_int8(codebook_cube_root(y, p, bits, symmetric=True))
        init = codebook_cube_root(y, p, bits)
        lm = lloyd_absmax(ytrain, init)
        books[bits]["lloyd-absmax"] = to_int8(lm)
        fmt = make("tmp", bits, "XS", books[bits]["lloyd-absmax"])
        books[bits]["lloyd-encoder"] = to_int8(lloyd_encoder(xtrain, fmt, lm))
        if bits == 4:
            books[bits]["iq4nl"] = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)
    res["codebooks"] = {str(b): v for b, v in books.items()}
    print("codebooks:", json.dumps(res["codebooks"]), file=sys.stderr, flush=True)

    # 4. measure --------------------------------------------------------------------------------------------
    tensors = [t for ts in sets.values() for t in ts]
    pools = {256: Pool(tensors, 256), 32: Pool(tensors, 32)}
    candidates = []
    for bits in args.bits:
        for cb in books[bits]:
            candidates.append((f"NL{bits}_XS/{cb}", bits, "XS", books[bits][cb]))
        best = args.codebook
        candidates.append((f"NL{bits}_32/{best}", bits, "32", books[bits][best]))
    for label, bits, layout, values in tqdm(candidates, desc="NL candidates", file=sys.stderr):
        fmt = make(label, bits, layout, values)
        res["types"][label] = {"bits": bits, "layout": layout, "bpw": fmt.bpw, "block": fmt.block_size, "values": list(values),
                               "mse": pools[fmt.block_size].mse_nl(fmt)}
    for name, tid in tqdm(STOCK.items(), desc="stock types", file=sys.stderr):
        blk = ggml_ref.traits(tid).blck_size
        res["stock"][name] = {"bpw": stock_bpw(tid), "palette": name in PALETTE, "block": blk,
                              "mse": pools[blk].mse_stock(tid)}
    res["tensors"] = {f"{t.asset}/{t.name}": {"asset": t.asset, "kind": kind(t.name), "numel": t.numel,
                                              "ms": t.x.double().pow(2).mean().item(), "rows": t.x.shape[0],
                                              "row_len": t.x.shape[1]}
                      for t in tensors}
    return res


# ================================================================================================ reporting
def pooled(res: dict, mse: dict, asset: str, keys: list[str]) -> float:
    """Relative MSE over an asset's tensors in `keys`: Σ numel·MSE/mean-square / Σ numel."""
    num = den = 0.0
    for k in keys:
        t = res["tensors"][k]
        if t["asset"] == asset:
            num += t["numel"] * mse[k] / t["ms"]
            den += t["numel"]
    return num / den if den else float("nan")


def table(res: dict, block: int, title: str) -> list[str]:
    """Rate/distortion table and keep/drop evidence over the tensors a block size fits (block 256: the _XS and K
    types, every type compared; block 32: only the block-32 types, on every tensor)."""
    kinds = [(n, s, False) for n, s in res["stock"].items() if block == 256 or s["block"] == 32]
    kinds += [(n, t, True) for n, t in res["types"].items() if block == 256 or t["block"] == 32]
    keys = sorted(set.intersection(*[set(v["mse"]) for _, v, _ in kinds]))
    groups = [g for g in ("synthetic/gauss", "synthetic/student-t5") if g in keys]
    groups += [a for a in res["assets"] if any(res["tensors"][k]["asset"] == a for k in keys)]

    def rel(mse: dict, g: str) -> float:
        return mse[g] / res["tensors"][g]["ms"] if g.startswith("synthetic/") else pooled(res, mse, g, keys)

    real = [k for k in keys if not k.startswith("synthetic/")]
    out = [f"**{title}** ({len(real)} tensors)", ""]
    out.append("| type | bpw | " + " | ".join(f"{g.split('/')[-1]} rel-MSE" for g in groups)
               + " | gap to Gaussian D(R) (bits) |")
    out.append("|" + "---|" * (3 + len(groups)))
    rows = []
    for n, v, ours in kinds:
        r = [rel(v["mse"], g) for g in groups]
        label = f"**{n}**" if ours else (n if v["palette"] else f"{n} (not in palette)")
        rows.append((v["bpw"], f"| {label} | {v['bpw']:.4g} | " + " | ".join(f"{x:.4g}" for x in r)
                     + f" | {gap_bits(v['bpw'], r[0]):.3f} |"))
    out += [r for _, r in sorted(rows, key=lambda z: z[0])]
    out.append("")
    stock = [v for _, v, ours in kinds if not ours]
    out.append("| NL type | bpw | " + " | ".join(f"{g.split('/')[-1]}: bits saved vs palette / all stock"
                                                 for g in groups) + " | tensors won vs palette |")
    out.append("|" + "---|" * (3 + len(groups)))
    for n, t, ours in kinds:
        if not ours:
            continue
        cells = []
        for g in groups:
            r = rel(t["mse"], g)
            pal = [(s["bpw"], rel(s["mse"], g)) for s in stock if s["palette"]]
            alls = [(s["bpw"], rel(s["mse"], g)) for s in stock]
            cells.append(f"{saved(pal, t['bpw'], r)} / {saved(alls, t['bpw'], r)}")
        won = 0
        for k in real:
            ms = res["tensors"][k]["ms"]
            pal = [(s["bpw"], s["mse"][k] / ms) for s in stock if s["palette"]]
            won += beats(pal, t["bpw"], t["mse"][k] / ms)
        cells.append(f"{won}/{len(real)}")
        out.append(f"| {n} | {t['bpw']:.4g} | " + " | ".join(cells) + " |")
    return out


def saved(points, bpw: float, rel: float) -> str:
    """Bits the stock frontier needs for this error minus the type's bpw; 'extends' when the error is above the
    smallest stock type's and the type is smaller than it (no stock type that small to compare with)."""
    fb = frontier_bits(points, rel)
    if not math.isnan(fb):
        return f"{fb - bpw:+.3f}"
    b0, e0 = min(points)
    if rel > e0:
        return "extends" if bpw < b0 else "dominated"
    return "n/a"


def beats(points, bpw: float, rel: float) -> bool:
    """Below the stock frontier at this bpw, or smaller than every stock type (the planner had no choice there)."""
    fb = frontier_bits(points, rel)
    if math.isnan(fb):
        return bpw < min(points)[0]
    return fb > bpw


def report(res: dict) -> str:
    out = [f"Rows sampled per tensor: {res['rows']} (seeded); Lloyd codebooks trained on {res['train']}.", ""]
    out += ["Fits (each tensor divided by its RMS, pooled): mean log-likelihood per weight", "",
            "| asset | Normal | Laplace | Student-t | fitted ν | kurtosis |", "|---|---|---|---|---|---|"]
    for a, f in res["fits"].items():
        if "normal_ll" in f:
            out.append(f"| {a} | {f['normal_ll']:.4f} | {f['laplace_ll']:.4f} | {f['t_ll']:.4f} | {f['t_nu']:.1f} "
                       f"| {f['kurtosis']:.2f} |")
    out += ["", "Codebooks (int8):", ""]
    for b, books in res["codebooks"].items():
        for n, v in books.items():
            out.append(f"- {b}-bit {n}: `{' '.join(str(x) for x in v)}`")
    out.append("")
    out += table(res, 256, "Tensors whose rows are multiples of 256 (all types)")
    out.append("")
    out += table(res, 32, "All tensors, block-32 types only")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--assets", nargs="*", default=["smollm2-135m", "qwen2.5-coder-1.5b"],
                    help="asset names (qgguf fetch) or HF folders")
    ap.add_argument("--rows", type=int, default=8, help="seeded rows sampled from each tensor")
    ap.add_argument("--train", type=int, default=2_000_000, help="weights used to train the Lloyd codebooks")
    ap.add_argument("--bits", type=int, nargs="*", default=[2, 3, 4, 5, 6])
    ap.add_argument("--codebook", default="lloyd-encoder", help="codebook variant used for the _32 layouts")
    ap.add_argument("--out", type=Path, required=True, help="folder for results.json and table.md")
    args = ap.parse_args(argv)
    t0 = time.time()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    res = study(args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(res, indent=1))
    md = report(res)
    (args.out / "table.md").write_text(md + "\n")
    print(md)
    print(f"\n{time.time() - t0:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
