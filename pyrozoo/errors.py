"""The one exception type for mistakes a user can make (the CLI turns it into one line and exit code 2), and the
wording its messages share."""

import difflib
from typing import Iterable


def reason(e: BaseException) -> str:
    """An exception in a few words for a one-line message: its type and the first line of its text."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200]}" if text else type(e).__name__


def did_you_mean(word: str, known: Iterable[str]) -> str:
    """``" (did you mean 'X'?)"`` for the known name closest to a misspelt ``word``; ``""`` when none is close."""
    close = difflib.get_close_matches(word, list(known), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


class PyrozooError(Exception):
    """A problem the user can fix: an unknown name, missing data, a bad size, an unwritable folder."""

    exit_code = 2


class TrainingDiverged(PyrozooError):
    """The loss became NaN or infinite; the run folder keeps the state of the last finished epoch."""

    exit_code = 1


class TargetNotReached(PyrozooError):
    """A compression target was out of reach: the report and the nets are written, the command says which
    target and exits with a code of its own, so that a script sees it."""

    exit_code = 4
