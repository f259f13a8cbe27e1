"""User-facing errors.

`GanflowError` is raised for anything a user can fix (bad input, a missing file, a shape mismatch).
The CLI turns it into one line on stderr and exit code 2; every other exception is a bug.
"""

__all__ = ["GanflowError"]


class GanflowError(Exception):
    """An error caused by the user's input; its message is one self-contained line."""
