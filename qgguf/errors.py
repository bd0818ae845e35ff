"""The one error type users see: a message that names the thing and the fix."""


class QggufError(Exception):
    """A user-facing failure. The CLI prints its message (no traceback) and exits non-zero."""

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code
