"""Exceptions raised at the library's boundary.

Every error a user can cause (bad file, wrong units, empty mask...) is a ``QSMInputError`` with a
one-line message that names the bad value. The command line and the background worker turn it into a
clear message and a non-zero exit status instead of a traceback.
"""


class QSMInputError(ValueError):
    """The user's input cannot be reconstructed as given (the message says why and what to do)."""


class MissingDependencyError(RuntimeError):
    """A package the requested operation needs (e.g. torch, SimpleITK) is not installed."""


def is_out_of_memory(error: BaseException) -> bool:
    """True for GPU or host out-of-memory errors, whatever the framework calls them."""
    if isinstance(error, MemoryError):
        return True
    text = str(error).lower()
    return (type(error).__name__ == "OutOfMemoryError" or "out of memory" in text
            or "can't allocate memory" in text or "not enough memory" in text)
