"""Which tensors make the measured KL of two qgguf plans of one `qgguf bench` run differ, and by how much.

    python tools/kl_attribution.py BENCH_DIR BASE_ROW OTHER_ROW [--groups token_embd attn_q ...] [--update-docs]

BASE_ROW and OTHER_ROW are row ids of BENCH_DIR (e.g. qgguf-stock-size-Q3_K_M and qgguf-extended-size-Q3_K_M). For
each tensor group (a substring of the tensor names; by default each kind of tensor), the tool writes BASE's plan with
that group's types taken from OTHER (`qgguf convert` with a --tensor-type-file naming every tensor, so nothing is
re-planned; the bench's encode cache makes it quick), runs llama-perplexity --kl-divergence on the bench's F32
logits, and prints, per group, the predicted change of KL (the plans' ½·ΣF·err) beside the measured change of mean
KLD. A group whose measured change is far from its predicted one is where the planner's KL model fails. Both plans
are also remade whole, as references. `qgguf convert` runs in a child process, so PYTHONPATH can point it at
another checkout of qgguf (e.g. an older encoder); llama-perplexity is this checkout's build. Writes BENCH_DIR/kl_attribution.md; --update-docs puts the table into
docs/benchmarks.md between this tool's own markers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from qgguf.docs import write_section  # noqa: E402
from qgguf.files import atomic_output  # noqa: E402
from qgguf.llamacpp.build import tool_path  # noqa: E402
from qgguf.llamacpp.toolout import parse_kl_divergence  # noqa: E402

KINDS = ("token_embd", "output.weight", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
HEAD = "## Which tensors the KL model misjudges"


def logged_command(log: Path) -> list[str]:
    """The command a bench log starts with (its first line is `$ command`)."""
    first = log.read_text(errors="replace").splitlines()[0] if log.is_file() else ""
    if not first.startswith("$ "):
        raise SystemExit(f"{log}: no command line; give the folder of a `qgguf bench` run that made this row")
    return shlex.split(first[2:])


def replace_arg(cmd: list[str], flag: str, value: str) -> list[str]:
    out = list(cmd)
    out[out.index(flag) + 1] = value
    return out


def plan_types(bench: Path, row: str) -> dict[str, str]:
    path = bench / "plans" / f"{row}.plan.json"
    if not path.is_file():
        raise SystemExit(f"{path}: missing; give a row id of BENCH_DIR whose plan was kept (see {bench / 'plans'})")
    return {t["name"]: t["type"] for t in json.loads(path.read_text())["tensors"]}


def run_variant(name: str, types: dict[str, str], convert: list[str], kld: list[str], work: Path) -> dict:
    """Convert with every tensor's type given, measure its KLD, return predicted KL and measured KLD."""
    tt = work / f"{name}.tensor-types.txt"
    tt.write_text("".join(f"^{re.escape(k)}$={v}\n" for k, v in types.items()))
    out = work / f"{name}.gguf"
    cmd = replace_arg(convert, "-o", str(out))
    # every tensor is forced: the budget only has to be large enough not to refuse the plan
    for flag in ("--target-size", "--target-bpw"):
        if flag in cmd:
            i = cmd.index(flag)
            cmd = cmd[:i] + cmd[i + 2:]
    cmd += ["--target-bpw", "32", "--tensor-type-file", str(tt)]
    log = work / f"{name}.log"
    with log.open("w") as f:
        subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, check=True)
        res = subprocess.run(replace_arg(kld, "-m", str(out)), capture_output=True, text=True)
        f.write(res.stdout + res.stderr)
    out.unlink(missing_ok=True)
    if res.returncode != 0:
        raise SystemExit(f"llama-perplexity failed on {name}; see {log}")
    plan = json.loads(work.joinpath(f"{name}.plan.json").read_text())
    k = parse_kl_divergence(res.stdout + res.stderr)
    return {"group": name, "predicted": plan["totals"]["predicted_kl"], "bpw": plan["totals"]["bpw"],
            "kld": k.kld_mean, "kld_err": k.kld_mean_err}


def markdown(res: dict) -> str:
    base, other = res["base"], res["other"]
    lines = [f"- command: `{res['command']}`",
             f"- machine: {res['machine']}; {res['minutes']:.0f} min",
             f"- base plan {res['base_row']}: predicted {base['predicted']:.5f}, measured mean KLD "
             f"{base['kld']:.5f} ± {base['kld_err']:.5f}; other plan {res['other_row']}: predicted "
             f"{other['predicted']:.5f}, measured {other['kld']:.5f} ± {other['kld_err']:.5f}",
             "- each row: the base plan with one group of tensors typed as in the other plan; Δ against the base plan",
             "", "| group | tensors changed | bpw | Δ predicted KL | Δ measured KLD | measured / predicted |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in res["groups"]:
        dp, dm = r["predicted"] - base["predicted"], r["kld"] - base["kld"]
        ratio = f"{dm / dp:.2f}" if abs(dp) > 1e-6 else "–"
        lines.append(f"| {r['group']} | {r['changed']} | {r['bpw']:.3f} | {dp:+.5f} | {dm:+.5f} | {ratio} |")
    return "\n".join(lines)


def update_docs(docs: Path, slug: str, body: str, title: str) -> None:
    write_section(docs, "attribution", slug, body, heading=HEAD, title=title)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bench", type=Path)
    ap.add_argument("base_row")
    ap.add_argument("other_row")
    ap.add_argument("--groups", nargs="+", default=list(KINDS), help="substrings of tensor names, one group each")
    ap.add_argument("--update-docs", action="store_true")
    args = ap.parse_args()
    bench = args.bench.resolve()
    base, other = plan_types(bench, args.base_row), plan_types(bench, args.other_row)
    convert = logged_command(bench / "logs" / f"{args.other_row}.convert.log")
    kld = logged_command(bench / "logs" / f"{args.other_row}.kld.log")
    kld[0] = str(tool_path("llama-perplexity"))  # this checkout's build (the bench's may have been replaced)
    convert[0] = sys.executable
    work = bench / "attribution"
    work.mkdir(exist_ok=True)
    t0 = time.time()
    variants = [("base", base), ("other", other)]
    for g in args.groups:
        mixed = {k: (other.get(k, v) if g in k else v) for k, v in base.items()}
        if mixed != base:
            variants.append((g, mixed))
    results = {}
    for name, types in tqdm(variants, desc="plans", unit="plan"):
        r = run_variant(name, types, convert, kld, work)
        r["changed"] = sum(types[k] != base[k] for k in base)
        results[name] = r
    res = {"command": "python tools/kl_attribution.py " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
           "machine": f"{platform.machine()} CPU, {len(os.sched_getaffinity(0))} cores",
           "minutes": (time.time() - t0) / 60, "base_row": args.base_row, "other_row": args.other_row,
           "base": results.pop("base"), "other": results.pop("other"), "groups": list(results.values())}
    md = markdown(res)
    print(md)
    with atomic_output(bench / "kl_attribution.md") as tmp:
        tmp.write_text(md + "\n")
    (bench / "kl_attribution.json").write_text(json.dumps(res, indent=1))
    if args.update_docs:
        update_docs(ROOT / "docs" / "benchmarks.md", f"{args.base_row}..{args.other_row}", md,
                    f"{args.other_row} against {args.base_row}")


if __name__ == "__main__":
    main()
