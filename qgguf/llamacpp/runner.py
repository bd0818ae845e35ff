"""Running the built llama.cpp tools: progress from their output, logs, time and memory per run."""

from __future__ import annotations

import contextlib
import os
import re
import resource
import select
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from tqdm import tqdm

from qgguf.errors import QggufError
from qgguf.files import atomic_output
from qgguf.llamacpp.build import BuildSpec, tool_env, tool_path
from qgguf.llamacpp.toolout import kld_chunk_rows


def children_cpu() -> float:
    """CPU seconds of every finished child process so far."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


@dataclass
class ToolTimes:
    """Where one command's time went: totals over its tool runs, the last run, and named one-off steps.

    One object per command run (the bench passes it along), so nothing is kept in module state."""

    wall_s: float = 0.0
    cpu_s: float = 0.0
    last_run: dict[str, float] = field(default_factory=dict)  # wall and CPU seconds, peak resident MiB
    steps: dict[str, dict[str, float]] = field(default_factory=dict)

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[None]:
        """Record the wall and child-process CPU seconds of a one-off step."""
        t0, c0 = time.time(), children_cpu()
        yield
        self.steps[name] = {"wall_s": round(time.time() - t0, 1), "cpu_s": round(children_cpu() - c0, 1)}


def run_tool(cmd: list[str], log: Path, desc: str, *, total: int | None = None,
             progress: Callable[[str], int] | None = None, timeout: float | None = None,
             times: ToolTimes | None = None) -> str:
    """Run a built tool; return its stderr then stdout as text. The whole output goes to `log`.

    Progress comes from its stdout (`progress(text so far)` → units done). A failure raises QggufError with the
    last lines; Ctrl-C or a timeout stops the tool first. `times`, if given, adds this run's time to its totals.
    """
    t0 = time.monotonic()
    cpu0 = children_cpu()
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen([str(c) for c in cmd], stdout=subprocess.PIPE, stderr=err, env=tool_env())
        out = bytearray()
        try:
            with tqdm(total=total, desc=desc, unit="chunk", disable=None, leave=False, file=sys.stderr) as bar:
                assert proc.stdout is not None
                fd = proc.stdout.fileno()
                while True:
                    ready, _, _ = select.select([fd], [], [], 1.0)
                    if ready:
                        data = os.read(fd, 1 << 16)
                        if not data:
                            break
                        out += data
                        if progress is not None:
                            bar.n = min(progress(out.decode("utf-8", "replace")), total or 1 << 30)
                            bar.refresh()
                    if timeout is not None and time.monotonic() - t0 > timeout:
                        raise QggufError(f"{desc} ran longer than {timeout:.0f} s and was stopped; raise --timeout "
                                         "or lower --chunks")
            # wait4 rather than wait: the tool's own rusage gives its peak resident memory (KiB on Linux)
            _, status, usage = os.wait4(proc.pid, 0)
            rc = proc.returncode = os.waitstatus_to_exitcode(status)
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        err.seek(0)
        text = err.read().decode("utf-8", "replace") + "\n" + out.decode("utf-8", "replace")
    if times is not None:
        times.wall_s += time.monotonic() - t0
        times.cpu_s += children_cpu() - cpu0
        times.last_run = {"wall_s": round(time.monotonic() - t0, 1),
                          "cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
                          "peak_rss_mib": round(usage.ru_maxrss / 1024.0, 1)}
    with atomic_output(log) as tmp:
        tmp.write_text("$ " + shlex.join(str(c) for c in cmd) + "\n" + text)
    if rc != 0:
        tail = "\n".join(text.strip().splitlines()[-12:])
        raise QggufError(f"{desc} failed (exit {rc}); the last lines of {log}:\n{tail}")
    return text


def last_index(pattern: re.Pattern) -> Callable[[str], int]:
    def count(text: str) -> int:
        found = pattern.findall(text)
        return int(found[-1]) if found else 0
    return count


PPL_PROGRESS = last_index(re.compile(r"\[(\d+)\]-?\d"))


def kld_progress(text: str) -> int:
    rows = kld_chunk_rows(text)
    return rows[-1][0] if rows else 0


@dataclass
class Tools:
    """The built tools of one backend, and the flags every run of them shares."""

    cuda: bool
    threads: int
    times: ToolTimes = field(default_factory=ToolTimes)

    def __post_init__(self) -> None:
        # One build for the whole bench (a clear error now rather than at the first row), even if cpp_ext/
        # changes while it runs.
        self._paths = {name: tool_path(name, cuda=self.cuda)
                       for name in ("llama-perplexity", "llama-imatrix", "llama-quantize", "llama-bench")}

    def path(self, name: str) -> Path:
        return self._paths[name]

    @property
    def key(self) -> str:
        """The build behind these tools (its key covers the tree, our patches, the options and the CPU)."""
        return BuildSpec.from_env(cuda=self.cuda).key()

    def run(self, cmd: list, log: Path, desc: str, **kw) -> str:
        """run_tool, with this object's time totals."""
        return run_tool(cmd, log, desc, times=self.times, **kw)

    @property
    def common(self) -> list[str]:
        return ["-t", str(self.threads)] + (["-ngl", "999"] if self.cuda else [])
