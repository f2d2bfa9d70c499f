"""The one exception type for mistakes a user can make (the CLI turns it into one line and exit code 2)."""


class PyrozooError(Exception):
    """A problem the user can fix: an unknown name, missing data, a bad size, an unwritable folder."""

    exit_code = 2


class TrainingDiverged(PyrozooError):
    """The loss became NaN or infinite; the run folder keeps the state of the last finished epoch."""

    exit_code = 1
