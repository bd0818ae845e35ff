"""Stage 1, calibrate: run the HF model on calibration text and estimate, per tensor and per input channel, the
Fisher information and E[x²] (llama.cpp's imatrix).

text.py (the text as token sequences), fisher.py (the estimators), runner.py (a whole run), stats.py (the
statistics file), names.py (HF → GGUF tensor names), imatrix.py (llama.cpp imatrix files), klcheck.py (checks the
KL model against weight noise), cli.py (`qgguf calibrate`)."""
