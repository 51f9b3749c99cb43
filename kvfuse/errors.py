"""The one exception type kvfuse raises for problems a user can fix.

Every `KvfuseError` carries a one-line message that says what is wrong and what to do; the CLI
prints it without a traceback and exits non-zero. Anything else escaping is a bug in kvfuse.
"""

from __future__ import annotations


class KvfuseError(Exception):
    """A user-facing error: bad input, missing file, unsupported model, failed write."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.split()))  # always one line
