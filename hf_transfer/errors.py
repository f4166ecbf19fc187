"""The one base class of the errors a user can fix: the CLI shows them as one `error: ...` line, exit code 2."""

from __future__ import annotations


class HFTransferError(Exception):
    """A problem with the user's input, data, model, output folder or environment; the message says what to do."""
