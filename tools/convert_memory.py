"""Peak memory of one `qgguf convert` run, split into what the process allocates and what it maps from files.

    python tools/convert_memory.py MODEL [--label L] [--cold-cache DIR] -- --target-bpw 5.5 [more convert arguments]

Runs `python -m qgguf convert MODEL -o <temp>.gguf ARGS` and samples /proc/<pid>/status of it (and of any child
it starts, such as llama.cpp's converter on a cold cache) every 50 ms: VmHWM (the kernel's peak RSS), and the peak
of RssAnon (heap, tensors, torch: memory the process owns) and of RssFile (pages of mapped files, chiefly the
memory-mapped F32 GGUF that gguf-py reads: page cache the kernel can drop at any time, shared with other readers).
The exact peak RSS from wait4's rusage is printed beside them. The model's F32 GGUF size and its largest tensor
come from the converter's F32 GGUF in the qgguf cache. Prints one Markdown table row and appends a JSON record to
--json; the written GGUF is deleted unless --keep names where it goes. With --cold-cache the record has the bytes
that folder holds at the end (the cache's disk use; shared links not followed). The convert runs from the current
directory's qgguf when that is a checkout (`cd OLD_CHECKOUT && python .../convert_memory.py ...` measures old code),
and the record names that checkout's commit.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from qgguf.files import disk_bytes  # noqa: E402
from qgguf.procmem import Sampler  # noqa: E402


def model_facts(model: str) -> dict:
    """The converter's GGUF bytes, weights, the largest tensor (name, bytes as stored there) of the model, from the
    convert cache (keys keep their names from when that GGUF was always F32)."""
    import gguf

    from qgguf.convert import converter_gguf
    from qgguf.models import model_sha256, resolve_model

    model_dir = resolve_model(model)
    f32 = converter_gguf(model_dir, model_sha256(model_dir))
    reader = gguf.GGUFReader(f32)
    largest = max(reader.tensors, key=lambda t: int(t.n_bytes))
    return {"f32_gguf": str(f32), "f32_bytes": f32.stat().st_size,
            "weights": sum(int(t.n_elements) for t in reader.tensors),
            "largest_tensor": largest.name, "largest_tensor_bytes": int(largest.n_bytes)}


def checkout_commit(path: Path) -> str | None:
    """The commit of the git checkout at `path` (+dirty with uncommitted changes), None outside one."""
    try:
        head = subprocess.run(["git", "-C", str(path), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(path), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+dirty" if dirty else "")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", help="HF model folder or model asset name")
    ap.add_argument("--label", default="", help="what this run is (e.g. 'warm caches')")
    ap.add_argument("--json", type=Path, default=None, help="append the record to this JSON-lines file")
    ap.add_argument("--cold-cache", type=Path, default=None, metavar="DIR",
                    help="run convert with QGGUF_CACHE=DIR (an empty folder: the F32 conversion and every "
                    "measurement are made in the run); the model facts still come from the usual cache")
    ap.add_argument("--keep", type=Path, default=None, metavar="OUT",
                    help="keep the written GGUF here (e.g. to compare the bytes of two checkouts)")
    argv = sys.argv[1:]
    cut = argv.index("--") if "--" in argv else len(argv)
    args = ap.parse_args(argv[:cut])
    if args.keep is not None and (not args.keep.parent.is_dir() or args.keep.suffix != ".gguf"):
        ap.error(f"--keep {args.keep}: give a .gguf path in an existing folder")
    extra = argv[cut + 1:]  # everything after "--" goes to qgguf convert
    facts = model_facts(args.model)
    if args.cold_cache:  # the built llama.cpp and the assets are shared; the convert, stats and measure caches not
        from qgguf.files import cache_dir

        args.cold_cache.mkdir(parents=True, exist_ok=True)
        for shared in ("llama", "assets"):
            link = args.cold_cache / shared
            if not link.exists():
                link.symlink_to(cache_dir(shared), target_is_directory=True)
    with tempfile.TemporaryDirectory(prefix="qgguf-mem-") as tmp:
        out = Path(tmp) / "out.gguf"
        cmd = [sys.executable, "-m", "qgguf", "convert", args.model, "-o", str(out), *extra]
        t0 = time.time()
        env = dict(os.environ, **({"QGGUF_CACHE": str(args.cold_cache)} if args.cold_cache else {}))
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        sampler = Sampler(proc.pid)
        sampler.start()
        log = proc.stdout.read()  # type: ignore[union-attr]
        _, status, usage = os.wait4(proc.pid, 0)
        sampler.stop.set()
        sampler.join()
        wall = time.time() - t0
        rc = os.waitstatus_to_exitcode(status)
        size = out.stat().st_size if out.is_file() else None
        digest = None
        if rc == 0 and args.keep:
            import hashlib

            digest = hashlib.sha256(out.read_bytes()).hexdigest()
            shutil.move(str(out), args.keep)
    if rc != 0:
        print(log[-3000:], file=sys.stderr)
        print(f"qgguf convert failed (exit {rc})", file=sys.stderr)
        return 1
    main_peak = sampler.peak.get("main", {})
    child_peak = sampler.peak.get("children", {})
    mib = 1024.0
    rec = {"label": args.label, "model": args.model, "cold_cache": bool(args.cold_cache), "command": shlex.join(["qgguf", "convert", args.model, "-o",
                                                                             "OUT.gguf", *extra]),
           **facts, "out_bytes": size, "wall_s": round(wall, 1),
           "cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
           "peak_rss_mib": round(usage.ru_maxrss / mib, 1),
           "vmhwm_mib": round(main_peak.get("VmHWM", 0) / mib, 1),
           "peak_anon_mib": round(main_peak.get("RssAnon", 0) / mib, 1),
           "peak_file_mib": round(main_peak.get("RssFile", 0) / mib, 1),
           "children_peak_rss_mib": round(child_peak.get("VmHWM", 0) / mib, 1) if child_peak else None,
           "cache_bytes": disk_bytes(args.cold_cache) if args.cold_cache else None, "out_sha256": digest,
           "commit": checkout_commit(Path.cwd()),
           "load_avg": [round(x, 2) for x in os.getloadavg()], "date": time.strftime("%Y-%m-%d %H:%M")}
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps(rec) + "\n")
    print("| model | run | F32 GGUF MiB | largest tensor (F32 MiB) | peak RSS MiB | peak anon MiB | peak file-backed "
          "MiB | children peak MiB | wall s | CPU s |")
    print(f"| {rec['model']} | {rec['label']} | {rec['f32_bytes'] / 2**20:.0f} | {rec['largest_tensor']} "
          f"({rec['largest_tensor_bytes'] / 2**20:.0f}) | {rec['peak_rss_mib']:.0f} | {rec['peak_anon_mib']:.0f} | "
          f"{rec['peak_file_mib']:.0f} | {rec['children_peak_rss_mib'] or '–'} | {rec['wall_s']:.0f} | "
          f"{rec['cpu_s']:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
