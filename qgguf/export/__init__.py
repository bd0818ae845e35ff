"""Stage 4, export: the converter's GGUF streamed tensor by tensor into the planned types (writer.py), with encoded
tensors reused across budgets (encode_cache.py)."""
