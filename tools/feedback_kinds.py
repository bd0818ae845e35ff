"""Plain against error-feedback rounding at one plan, per tensor kind: predicted error and measured KLD.

Takes the plan JSON of a convert (a type and a rounding per tensor) and writes that plan again, every file with the
same types and so the same bytes:

- plain: every tensor rounded plain;
- feedback: the plan's own roundings (a plain plan: feedback on every tensor that has an input covariance);
- KIND only (attn_q, attn_k, ..., ffn_down): feedback on the tensors of that kind, the rest plain;
- with `--variant`: the plan's roundings against a changed input covariance, to test the K-FAC model:
  `fisherH` is H̃ = S·H·S with S_j = sqrt(I_j / H_jj) (the measured channel Fisher I as its diagonal, H's
  correlations; per tensor), `ridge=A` is H + A·mean(diag H)·I (feedback rounding adds 0.01 × itself);
- with `--covariance NAME=DIR`: the same against another covariance folder (as `qgguf calibrate --covariance`
  writes it).

Each file's mean KLD is measured against the bench's F32 logits (llama-perplexity --kl-divergence). Per kind the
tool also gives the predicted ΔKL of both roundings from the whole tensors' errors, under the two metrics of
plan/measure.py: the K-FAC one feedback plans are made with (½·ΣF·Σ_r d_r·δ_r H δ_rᵀ / (Σ_r d_r·tr H)) and the
channel-Fisher one plain plans are made with (½·ΣF·Σ_j I_j·ē_j / Σ_j I_j, ē_j the mean square error of input
channel j), and with `--eval-covariance DIR` the K-FAC one under a covariance the rounding did not see. The
measured changes say which prediction to trust (docs/design.md, "Error-feedback rounding").

    python tools/feedback_kinds.py --plan PLAN.json [--variant fisherH] [--variant ridge=0.1] [--covariance NAME=DIR]
        [--eval-covariance DIR] -- <the bench's options>
        [--update-docs]

The bench's options name the model, text, calibration and folder (its reference logits and calibration are reused
or made); it need not have finished. Encodings are kept in the bench folder's encode cache, so a second run, or a
second covariance, encodes only what is new.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import re
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from qgguf import formats  # noqa: E402
from qgguf.bench.cli import add_parser  # noqa: E402
from qgguf.bench.config import config_from_args, machine_description  # noqa: E402
from qgguf.bench.reference import reference  # noqa: E402
from qgguf.bench.rows import ENCODE_CACHE, calibration_stats, convert_help, measure  # noqa: E402
from qgguf.calibrate.covariance import CovarianceStore  # noqa: E402
from qgguf.calibrate.stats import load_stats  # noqa: E402
from qgguf.convert import converter_gguf  # noqa: E402
from qgguf.docs import write_section  # noqa: E402
from qgguf.errors import QggufError, run_tool  # noqa: E402
from qgguf.export.encode_cache import EncodeCache  # noqa: E402
from qgguf.export.writer import export_gguf, open_gguf, tensor_f32  # noqa: E402
from qgguf.files import atomic_output  # noqa: E402
from qgguf.formats import engines  # noqa: E402
from qgguf.hashing import checkout_commit  # noqa: E402
from qgguf.llamacpp.runner import Tools  # noqa: E402
from qgguf.models import model_sha256  # noqa: E402

DOCS = ROOT / "docs" / "benchmarks.md"
HEADING = "## Error-feedback rounding: plain against feedback at one plan, per tensor kind"
KIND = re.compile(r"^blk\.\d+\.(\w+)\.weight$")


def kind_of(name: str) -> str:
    m = KIND.match(name)
    return m.group(1) if m else name.removesuffix(".weight")


def tensor_errors(w: torch.Tensor, y: torch.Tensor, fisher_sum: float, channel_fisher: torch.Tensor,
                  H: torch.Tensor, d: torch.Tensor) -> dict[str, float]:
    """Predicted ΔKL (nats per token) of decoded weights `y` for `w` under measure's two metrics, whole tensor."""
    D = (y - w).to(torch.float64)
    c = channel_fisher.to(torch.float64)
    e = (D * D).mean(0)  # ē_j
    channel = float((c * e).sum() / c.sum()) if float(c.sum()) > 0 else float(e.mean())
    Hd = H.to(torch.float64)
    per_row = ((D @ Hd) * D).sum(1)
    dd = d.to(torch.float64)
    den = float(dd.sum()) * float(Hd.diagonal().clamp(min=0).sum())
    kfac = float((dd * per_row).sum()) / den if den > 0 else float(per_row.mean()) / w.shape[1]
    return {"channel": 0.5 * fisher_sum * channel, "kfac": 0.5 * fisher_sum * kfac}


def changed_covariance(spec: str, store: CovarianceStore, stats) -> Callable[[str], np.ndarray | None]:
    """name → the changed H of that tensor (float32, from float64 arithmetic), for --variant SPEC."""
    def fisher_h(name: str) -> np.ndarray | None:
        H = store.get(name)
        if H is None:
            return None
        H = H.astype(np.float64)
        f = np.asarray(stats[name].importance, dtype=np.float64)
        d = np.diag(H).copy()
        S = np.where(d > 0, np.sqrt(np.maximum(f, 0) / np.where(d > 0, d, 1)), 0.0)
        return (S[:, None] * H * S[None, :]).astype(np.float32)

    def ridge(a: float) -> Callable[[str], np.ndarray | None]:
        def get(name: str) -> np.ndarray | None:
            H = store.get(name)
            if H is None:
                return None
            H = H.astype(np.float64)
            return (H + a * float(np.mean(np.diag(H))) * np.eye(H.shape[0])).astype(np.float32)
        return get

    if spec == "fisherH":
        return fisher_h
    m = re.fullmatch(r"ridge=([0-9.]+(?:e-?\d+)?)", spec)
    if m:
        return ridge(float(m.group(1)))
    raise QggufError(f"--variant {spec!r}: give fisherH or ridge=A (A a number, e.g. 0.1)")


def read_plan(path: Path) -> dict:
    """A plan JSON as convert writes it (a type and a rounding per tensor), or one clear error."""
    try:
        plan = json.loads(Path(path).read_text())
        if not all("name" in t and "type" in t for t in plan["tensors"]):
            raise KeyError("tensors")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise QggufError(f"--plan {path}: not a readable plan ({type(e).__name__}: {e}); give the .plan.json "
                         "that `qgguf convert` wrote beside its GGUF") from None
    return plan


def main() -> int:
    argv = sys.argv[1:]
    if "--" not in argv:
        print(__doc__)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    cut = argv.index("--")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--plan", type=Path, required=True, help="plan JSON of a `qgguf convert` (feedback or plain)")
    ap.add_argument("--variant", action="append", default=[], metavar="fisherH|ridge=A",
                    help="round the plan's feedback tensors against a changed H too (see above)")
    ap.add_argument("--covariance", action="append", default=[], metavar="NAME=DIR",
                    help="another input covariance folder to round the plan's feedback tensors against")
    ap.add_argument("--eval-covariance", type=Path, default=None, metavar="DIR",
                    help="also give the K-FAC errors under this input covariance (e.g. one calibrated on the "
                    "evaluation text: an H the rounding did not see)")
    ap.add_argument("--kinds", nargs="*", default=None, help="kinds to test one by one (default: every kind "
                    "the plan rounds with feedback)")
    own = ap.parse_args(argv[:cut])
    bench_argv = argv[cut + 1:]
    update = "--update-docs" in bench_argv
    bench_argv = [a for a in bench_argv if a != "--update-docs"]
    # the inputs first: a bad one fails before the reference and calibration run
    plan = read_plan(own.plan)
    for spec in own.variant:
        changed_covariance(spec, None, None)  # refuses an unknown spec
    extra_cov = {}
    for item in own.covariance:
        name, sep, folder = item.partition("=")
        if not sep or not re.fullmatch(r"[\w.-]+", name):
            raise QggufError(f"--covariance {item!r}: give NAME=DIR (NAME of letters, digits, '.', '-', '_')")
        extra_cov[name] = CovarianceStore(Path(folder))

    held_out = CovarianceStore(own.eval_covariance) if own.eval_covariance else None
    bp = argparse.ArgumentParser(prog="qgguf")
    add_parser(bp.add_subparsers(dest="cmd"))
    cfg = config_from_args(bp.parse_args(["bench", *bench_argv]))
    cfg.out.mkdir(parents=True, exist_ok=True)
    logs = cfg.out / "logs"
    logs.mkdir(exist_ok=True)
    tools = Tools(cuda=cfg.gpu, threads=cfg.threads)
    ref = reference(dataclasses.replace(cfg, presets=()), tools, logs)  # the logits; no imatrix needed
    help_text, _ = convert_help()
    stats_path, cov_dir = calibration_stats(cfg, tools, help_text, covariance=True)
    if cov_dir is None:
        raise QggufError("this qgguf's convert takes no --stats; the study needs the bench's calibration")
    types = {t["name"]: t["type"] for t in plan["tensors"]}
    fb_plan = {t["name"]: t.get("rounding", "plain") for t in plan["tensors"]}
    store = CovarianceStore(cov_dir)
    if not any(r == "feedback" for r in fb_plan.values()):
        # a plain plan: its types, with feedback on every tensor that has an input covariance and whose type
        # feedback rounding writes (what `--rounding feedback` would round, at the plain plan's types)
        fb_plan = {n: ("feedback" if n in store and store.leader(n) and formats.get(t).feedback else "plain")
                   for n, t in types.items()}
        print(f"feedback_kinds: {own.plan.name} is a plain plan: its types, feedback on the "
              f"{sum(r == 'feedback' for r in fb_plan.values())} tensors that have an input covariance",
              file=sys.stderr)
    fb_names = sorted(n for n, r in fb_plan.items() if r == "feedback")
    if not fb_names:
        raise QggufError(f"{own.plan}: no tensor of this plan can be rounded with feedback (none has an input "
                         "covariance in the bench's calibration)")
    by_kind: dict[str, list[str]] = defaultdict(list)
    for n in fb_names:
        by_kind[kind_of(n)].append(n)
    kinds = own.kinds if own.kinds is not None else sorted(by_kind)
    unknown = [k for k in kinds if k not in by_kind]
    if unknown:
        raise QggufError(f"--kinds {' '.join(unknown)}: the plan rounds no tensor of that kind with feedback "
                         f"(it does: {', '.join(sorted(by_kind))})")

    stats = load_stats(stats_path)
    model_hash = model_sha256(cfg.model.path)
    src = converter_gguf(cfg.model.path, model_hash)
    reader = open_gguf(src)
    importance = {n: torch.from_numpy(stats[n].importance) for n in types}
    device = "cuda" if cfg.gpu else "cpu"
    folder = cfg.out / "kinds" / own.plan.name.removesuffix(".plan.json").removesuffix(".json")  # one per plan
    folder.mkdir(parents=True, exist_ok=True)
    cache_dir = cfg.out / ENCODE_CACHE

    variants: list[tuple[str, dict[str, str], object]] = [
        ("plain", {n: "plain" for n in types}, store.get),
        ("feedback", dict(fb_plan), store.get)]
    variants += [(f"{k} only", {n: ("feedback" if n in by_kind[k] else "plain") for n in types}, store.get)
                 for k in kinds]
    variants += [(f"feedback, H={name}", dict(fb_plan), changed_covariance(name, store, stats))
                 for name in own.variant]
    variants += [(f"feedback, H={name}", dict(fb_plan), s.get) for name, s in extra_cov.items()]

    rows = []
    for label, roundings, cov in variants:
        slug = re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-")
        gguf = folder / f"{slug}.gguf"
        print(f"feedback_kinds: {label}: writing {gguf.name}", file=sys.stderr)
        t0 = time.monotonic()
        export_gguf(src, gguf, types, importance, device=device, reader=reader, encode_cache=cache_dir,
                    roundings=roundings, covariance=cov)
        export_s = time.monotonic() - t0
        digest = hashlib.sha256(gguf.read_bytes()).hexdigest()
        saved = folder / f"{slug}.json"
        # the KLD of these exact bytes against this reference: kept, so a rerun measures only what changed
        old = json.loads(saved.read_text()) if saved.is_file() else {}
        if old.get("sha256") == digest and old.get("logits") == ref.logits.name:
            m = old["measured"]
        else:
            m = measure(gguf, ref, cfg, tools, logs, f"kinds-{slug}")
            with atomic_output(saved) as tmp:
                tmp.write_text(json.dumps({"sha256": digest, "logits": ref.logits.name, "measured": m}) + "\n")
        gguf.unlink()  # the bytes are reproducible from the encode cache; the KLD is kept
        rows.append({"variant": label, "feedback_tensors": sum(v == "feedback" for v in roundings.values()),
                     "file_bytes": m["file_bytes"], "kld": m["kld"]["kld_mean"], "kld_err": m["kld"]["kld_mean_err"],
                     "ppl": m["kld"]["ppl"], "export_s": round(export_s, 1), "sha256": digest})

    # per kind: predicted ΔKL of plain and feedback rounding from the whole tensors' errors (the encode cache
    # holds both encodings now)
    cache, engine = EncodeCache(cache_dir), engines.choose(device)
    per_kind: dict[str, dict[str, float]] = {k: defaultdict(float) for k in by_kind}
    for n in fb_names:
        t = next(x for x in reader.tensors if x.name == n)
        fmt = formats.get(types[n])
        w = tensor_f32(t, device, reader)
        imp = importance[n]
        H = store.get(n)
        st = stats[n]
        d = torch.ones(w.shape[0]) if st.row_fisher is None else torch.from_numpy(np.asarray(st.row_fisher))
        Ht = torch.from_numpy(np.asarray(H))
        Hx = torch.from_numpy(np.asarray(held_out.get(n))) if held_out is not None else None
        for rounding, cov in (("plain", None), ("feedback", H)):
            raw = cache.encode(fmt, w, imp, n, device, engine, cov)
            y = fmt.decode(raw, tuple(w.shape)).to(torch.float32)
            for metric, v in tensor_errors(w, y, st.fisher_sum, imp, Ht, d).items():
                per_kind[kind_of(n)][f"{metric}_{rounding}"] += v
            if Hx is not None:
                per_kind[kind_of(n)][f"heldout_{rounding}"] += tensor_errors(w, y, st.fisher_sum, imp, Hx, d)["kfac"]
        per_kind[kind_of(n)]["tensors"] += 1
    kld = {r["variant"]: r for r in rows}
    base = kld["plain"]["kld"]
    table = []
    for k in sorted(by_kind):
        p = per_kind[k]
        entry = {"kind": k, "tensors": int(p["tensors"]), **{m: p[m] for m in
                 ("kfac_plain", "kfac_feedback", "channel_plain", "channel_feedback")}}
        if held_out is not None:
            entry.update(heldout_plain=p["heldout_plain"], heldout_feedback=p["heldout_feedback"])
        if f"{k} only" in kld:
            entry["kld"] = kld[f"{k} only"]["kld"]
            entry["kld_err"] = kld[f"{k} only"]["kld_err"]
            entry["kld_change"] = kld[f"{k} only"]["kld"] - base
        table.append(entry)

    res = {"model": cfg.model.name, "text": cfg.text.name, "backend": cfg.backend, "plan": str(own.plan),
           "plan_bytes": plan["totals"].get("bytes") if "totals" in plan else None,
           "plan_name": folder.name, "command": "python tools/feedback_kinds.py " + " ".join(argv),
           "commit": checkout_commit(),
           "date": time.strftime("%Y-%m-%d"), "machine": machine_description(cfg.gpu),
           "chunks": ref.base.get("chunks"), "ctx": cfg.ctx, "files": rows, "kinds": table,
           "eval_covariance": str(own.eval_covariance) if own.eval_covariance else None}
    md = markdown(res)
    with atomic_output(folder / "kinds.json") as tmp:
        tmp.write_text(json.dumps(res, indent=1) + "\n")
    print(md)
    if update:
        slug = re.sub(r"[^a-z0-9.]+", "-", f"{cfg.model.name}-{cfg.text.name}-{cfg.backend}-{folder.name}".lower()
                      ).strip("-")
        write_section(DOCS, "feedback-kinds", slug, md, heading=HEADING)
    return 0


def markdown(res: dict) -> str:
    lines = [f"### {res['model']} on {res['text']}, {res['chunks']} chunks of {res['ctx']} tokens, "
             f"{res['backend'].upper()}: the plan {res.get('plan_name', '')}", "",
             f"- command: `{res['command']}`",
             f"- commit {res['commit']}, {res['date']}, {res['machine']}; every file has the plan's types "
             "(the same size); only the rounding differs", "",
             "| file | tensors with feedback | bytes | mean KLD | PPL |", "|---|---|---|---|---|"]
    for r in res["files"]:
        lines.append(f"| {r['variant']} | {r['feedback_tensors']} | {r['file_bytes']:,} | {r['kld']:.5f} ± "
                     f"{r['kld_err']:.5f} | {r['ppl']:.4f} |")
    held = all("heldout_plain" in k for k in res["kinds"])
    lines += ["", "Per kind: the predicted ΔKL of the kind's tensors (summed, nats per token) with plain and with "
              "feedback rounding, under the K-FAC metric (what feedback plans are made with) and the channel-Fisher "
              "metric (what plain plans are made with), the change each predicts from plain to feedback"
              + (", the K-FAC change under the held-out covariance" if held else "")
              + ", and the measured change of the mean KLD when only this kind is rounded with feedback "
              "(against the all-plain file).", ""]
    head = ["kind", "tensors", "K-FAC plain", "K-FAC feedback", "K-FAC predicts", "channel plain",
            "channel feedback", "channel predicts"] + (["K-FAC, held-out H, predicts"] if held else []) + [
            "measured KLD, this kind only", "measured change"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for k in res["kinds"]:
        cells = [k["kind"], str(k["tensors"]), f"{k['kfac_plain']:.5f}", f"{k['kfac_feedback']:.5f}",
                 f"{k['kfac_feedback'] - k['kfac_plain']:+.5f}", f"{k['channel_plain']:.5f}",
                 f"{k['channel_feedback']:.5f}", f"{k['channel_feedback'] - k['channel_plain']:+.5f}"]
        if held:
            cells.append(f"{k['heldout_feedback'] - k['heldout_plain']:+.5f}")
        cells += ([f"{k['kld']:.5f} ± {k['kld_err']:.5f}", f"{k['kld_change']:+.5f}"] if "kld" in k
                  else ["–", "–"])
        lines.append("| " + " | ".join(cells) + " |")
    tot = {m: sum(k[m] for k in res["kinds"]) for m in ("kfac_plain", "kfac_feedback", "channel_plain",
                                                         "channel_feedback")}
    files = {r["variant"]: r for r in res["files"]}
    if "plain" in files and "feedback" in files:
        lines += ["", f"All kinds together: K-FAC predicts {tot['kfac_feedback'] - tot['kfac_plain']:+.5f}, the "
                  f"channel metric {tot['channel_feedback'] - tot['channel_plain']:+.5f}; measured "
                  f"{files['feedback']['kld'] - files['plain']['kld']:+.5f} (all tensors with feedback against "
                  "all plain)."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    run_tool(main, "feedback_kinds")
