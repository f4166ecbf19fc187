"""The errors a user can fix: one base class, shown by the CLI as one `error: ...` line with exit code 2."""

from __future__ import annotations

import difflib


class HFTransferError(Exception):
    """A problem with the user's input, data, model, output folder or environment; the message says what to do."""


class DatasetError(HFTransferError, ValueError):
    """A dataset that cannot be used as it is; the message says how to fix it."""


class DoctorError(HFTransferError, ValueError):
    """A dataset or option the data doctor cannot check; the message says what to change."""


class RecipeError(HFTransferError, ValueError):
    """A recipe or command-line option that cannot be used; the message says what to write instead."""


class PredictError(HFTransferError):
    """Images, an output file or a resume that predict cannot use; the message says what to give instead."""


class SelectionError(HFTransferError, ValueError):
    """`hf-transfer select` cannot rank these candidates on this data, or a recipe's `selection` does not describe it."""


def did_you_mean(word, choices) -> str:
    """" Did you mean `<choice>`?" for the choice closest to a misspelt `word`; "" when none is close."""
    match = difflib.get_close_matches(str(word), list(choices), n=1)
    return f" Did you mean `{match[0]}`?" if match else ""
