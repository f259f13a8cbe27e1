"""User-facing errors.

`GanflowError` is raised for anything a user can fix (bad input, a missing file, a shape mismatch).
The CLI turns it into one line on stderr and exit code 2; every other exception is a bug.
"""

__all__ = ["GanflowError"]


class GanflowError(Exception):
    """An error caused by the user's input; its message is one self-contained line.

    Line breaks that arrive with user-supplied text (a spec string, a config key) are escaped, so the
    message stays one line whatever the input.
    """

    def __init__(self, message: str = ""):
        super().__init__(str(message).replace("\r", "\\r").replace("\n", "\\n"))
