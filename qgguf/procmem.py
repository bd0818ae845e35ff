"""Memory of a running process tree, sampled from /proc/<pid>/status: the kernel's peak RSS (VmHWM) and the peaks
of RssAnon (memory the process owns: heap, tensors) and RssFile (pages of mapped files: page cache the kernel can
drop), for the process and for its children (such as llama.cpp's converter). Linux only."""

from __future__ import annotations

import threading
import time
from pathlib import Path

FIELDS = ("VmHWM", "VmRSS", "RssAnon", "RssFile", "RssShmem")


def status_kib(pid: int) -> dict[str, int]:
    """The memory fields of /proc/<pid>/status in KiB (empty when the process is gone)."""
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, val = line.partition(":")
            if key in FIELDS:
                out[key] = int(val.split()[0])
    except (OSError, ValueError, IndexError):
        pass
    return out


def children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


class Sampler(threading.Thread):
    """Peaks of the /proc status fields of a process and its children, polled every `every` seconds until `stop`
    is set; `timeline` keeps (seconds since start, RssAnon KiB, RssFile KiB) of the process itself."""

    def __init__(self, pid: int, every: float = 0.05):
        super().__init__(daemon=True)
        self.pid, self.every = pid, every
        self.peak: dict[str, dict[str, int]] = {}  # "main" / "children" -> field -> KiB
        self.timeline: list[tuple[float, int, int]] = []
        self.stop = threading.Event()
        self.t0 = time.monotonic()

    def run(self) -> None:
        while not self.stop.is_set():
            for who, pids in (("main", [self.pid]), ("children", children(self.pid))):
                for p in pids:
                    st = status_kib(p)
                    peak = self.peak.setdefault(who, {})
                    for k, v in st.items():
                        peak[k] = max(peak.get(k, 0), v)
                    if who == "main" and st:
                        self.timeline.append((time.monotonic() - self.t0, st.get("RssAnon", 0), st.get("RssFile", 0)))
            time.sleep(self.every)

    def peak_between(self, t_from: float, t_to: float) -> tuple[int, int]:
        """Peak RssAnon and peak RssAnon + RssFile (KiB) of the process between two times since the start."""
        pts = [(a, a + f) for t, a, f in self.timeline if t_from <= t <= t_to]
        return (max(p[0] for p in pts), max(p[1] for p in pts)) if pts else (0, 0)
