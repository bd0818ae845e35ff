"""Failures nobody planned for still end in one line: the step, the cause, where the traceback went."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from qgguf import cli
from qgguf.errors import step


def _fail_with(exc: BaseException):
    def run(args) -> int:
        with step("measure"):
            raise exc
    return run


@pytest.mark.parametrize("exc, words", [
    (MemoryError(), "out of memory"),
    (OSError(errno.ENOSPC, "No space left on device", "/out/x.gguf"), "no space left on the device writing /out/x"),
    (PermissionError(errno.EACCES, "Permission denied", "/root/x"), "permission denied on /root/x"),
    (RuntimeError("CUDA error: device-side assert\nand a second line"), "RuntimeError: CUDA error: device-side"),
])
def test_unexpected_failure_is_one_line(monkeypatch, tmp_path, capsys, exc, words):
    monkeypatch.setenv("QGGUF_CACHE", str(tmp_path))
    monkeypatch.setattr("qgguf.doctor._cmd", _fail_with(exc))
    assert cli.main(["doctor"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("qgguf: error: measure failed: ") and words in err and "--debug shows it" in err
    log = Path(err.split("traceback in ")[1].split(";")[0])
    assert log.is_file() and "Traceback (most recent call last)" in log.read_text()
    assert "qgguf doctor" in log.read_text()


def test_debug_shows_the_traceback(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("QGGUF_CACHE", str(tmp_path))
    monkeypatch.setattr("qgguf.doctor._cmd", _fail_with(ValueError("bad value")))
    assert cli.main(["--debug", "doctor"]) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "ValueError: bad value" in err



def test_bad_covariance_folder_and_encoder_fail_before_any_work(tiny_llama, tmp_path, capsys, monkeypatch):
    """`--covariance` naming a file, and an unknown QGGUF_ENCODER, are refused before calibration starts: one
    line, exit 2, nothing written."""
    text = tmp_path / "t.txt"
    text.write_text("a few words of text " * 50)
    a_file = tmp_path / "afile"
    a_file.write_text("")
    stats = tmp_path / "s.safetensors"
    assert cli.main(["calibrate", str(tiny_llama), "-o", str(stats), "--text", str(text), "--tokens", "64",
                     "--seq-len", "32", "--covariance", str(a_file)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("qgguf: error: --covariance") and "not a writable folder" in err[-1]
    assert not any("calibrate:" in line for line in err) and not stats.exists()
    monkeypatch.setenv("QGGUF_ENCODER", "fast")
    out = tmp_path / "o.gguf"
    assert cli.main(["convert", str(tiny_llama), "-o", str(out), "--target-bpw", "4.5", "--text", str(text)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["qgguf: error: QGGUF_ENCODER='fast' is not an encoder; use torch, ggml or auto"]
    assert not list(tmp_path.glob("o.*"))


# llama.cpp's converter runs as a child process: its stderr is all qgguf sees of why it failed
_TRACEBACK = "Traceback (most recent call last):\n  File \"convert_hf_to_gguf.py\", line 1, in <module>\n"


@pytest.mark.parametrize("stderr, words", [
    # a full disk: the converter's progress bar is the last thing it prints (seen on an 8B-shaped model)
    (_TRACEBACK + "OSError: [Errno 28] No space left on device\n"
     "Writing:  65%|██████▍   | 1.92G/2.97G [00:20<00:11]\r",
     "is full"),
    # the exception line, not the progress redraws after it
    (_TRACEBACK + "NotImplementedError: BPE pre-tokenizer was not recognized\rWriting:  10%|█ | 1/9 [00:01<00:08]",
     "NotImplementedError: BPE pre-tokenizer was not recognized"),
    # no exception line: the last line that is not a redraw
    ("INFO:hf-to-gguf:Loading model\nkilled by the out-of-memory killer\nWriting:  5%|▌ | 1/20 [00:01<00:19]\r",
     "killed by the out-of-memory killer"),
])
def test_converter_failure_names_the_reason(tmp_path, stderr, words):
    from qgguf.llamacpp.converter import failure_reason

    reason = failure_reason(stderr, tmp_path / "x.gguf")
    assert words in reason and "\n" not in reason and "%|" not in reason
