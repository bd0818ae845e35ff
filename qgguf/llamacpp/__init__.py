"""The pinned llama.cpp and its fork: build (build.py), the HF converter (converter.py), running the built tools
(runner.py), parsing their output (toolout.py), and ggml's own quantisers through ctypes (ggml_ref.py)."""
