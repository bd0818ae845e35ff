"""Stage 5, bench: qgguf's files against llama-quantize presets — config.py (what is measured), reference.py (F32
logits and imatrix), rows.py (one file each), run.py (the driver), report.py (tables, plot, docs), pareto.py
(fronts, savings, rate gap), cli.py (`qgguf bench`)."""
