"""The one exception type for mistakes a user can make (the CLI turns it into one line and exit code 2)."""


def reason(e: BaseException) -> str:
    """An exception in a few words for a one-line message: its type and the first line of its text."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200]}" if text else type(e).__name__


class PyrozooError(Exception):
    """A problem the user can fix: an unknown name, missing data, a bad size, an unwritable folder."""

    exit_code = 2


class TrainingDiverged(PyrozooError):
    """The loss became NaN or infinite; the run folder keeps the state of the last finished epoch."""

    exit_code = 1
