"""qgguf: turn a Hugging Face language model into the best GGUF file that fits a given size."""

__version__ = "0.1.0"
