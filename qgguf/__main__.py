import sys

from qgguf.cli import main

sys.exit(main())
