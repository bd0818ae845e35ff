"""qgguf.formats: one registry of GGUF types that every stage reads.

    from qgguf import formats
    formats.names()                      # ['F32', 'F16', 'Q4_0', ...]
    q4k = formats.get("Q4_K")
    raw = q4k.encode(w, importance=imp)  # uint8, rows × bytes-per-row, as stored in GGUF
    w_hat = q4k.decode(raw, w.shape)     # float32, bit-exact with ggml's to_float
"""

from .base import Format, all_formats, by_id, encoder_hash, get, names, register  # noqa: F401

# Importing the type modules registers their formats.
from . import floats  # noqa: F401,E402
from . import iq4, legacy  # noqa: F401,E402
from . import kquants  # noqa: F401,E402
from . import nl  # noqa: F401,E402  (the non-linear types: need the fork, cpp_ext/)
