"""qgguf.formats: one registry of GGUF types that every stage reads.

    from qgguf import formats
    formats.names()                      # ['F32', 'F16', 'Q4_0', ...]
    q4k = formats.get("Q4_K")
    raw = q4k.encode(w, importance=imp)  # uint8, rows × bytes-per-row, as stored in GGUF
    w_hat = q4k.decode(raw, w.shape)     # float32, bit-exact with ggml's to_float
"""

# Importing the type modules registers their formats.
from . import (  # noqa: F401,E402
    floats,  # noqa: F401,E402
    iq4,
    kquants,  # noqa: F401,E402
    legacy,
    nl,  # noqa: F401,E402  (the non-linear types: need the fork, cpp_ext/)
)
from .base import Format, all_formats, by_id, encoder_hash, get, names, register  # noqa: F401
