"""Stage 1, calibrate: run the HF model on calibration text and estimate, per tensor and per input channel, the
Fisher information and E[x²] (llama.cpp's imatrix).

text.py (the text as token sequences), fisher.py (the estimators), runner.py (a whole run), stats.py (the
statistics file), names.py (HF → GGUF tensor names), imatrix.py (llama.cpp imatrix files), klcheck.py (checks the
KL model against weight noise), covariance.py (the input covariance for error-feedback rounding), cli.py
(`qgguf calibrate`)."""


def code_digest() -> str:
    """The digest of the code behind a calibration's files (this package, the model loader and device choice,
    with the library versions): every cache of calibration results keys on it."""
    from qgguf.hashing import code_sha256

    return code_sha256("calibrate", "models.py", "devices.py")
