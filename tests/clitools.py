"""Helpers shared by the command-line tests: run ``pyrozoo`` in process, and hold it to the one-line error."""

from pyrozoo.cli import main


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, out: str, err: str, *words: str) -> str:
    """Exit code 2, nothing on stdout, one line on stderr holding every word; returns the line."""
    assert code == 2, err
    assert "Traceback" not in err and out == ""
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("pyrozoo: error:"), err
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]
