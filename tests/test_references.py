"""Nothing in the repository cites a file that is not in it.

What is read: every tracked Markdown file, the docstrings and comments of every tracked Python file, and the
comments of every tracked shell script. What counts as a citation there:

- a relative Markdown link or image target, ``[text](path#anchor)``, resolved against the citing file's folder;
  its anchor must be a heading (or ``{#id}``) of the target where the target is a Markdown file outside
  ``docs/`` (mkdocs checks the site's own anchors);
- a path that starts with one of the repository's top folders (``experiments/``, ``benchmarks/``, ``scripts/``,
  ``docs/``, ``pyrozoo/``, ``tests/``, ``.ci/``), resolved against the repository root; a trailing ``#anchor`` or
  ``:line`` is dropped, and a pattern (``*``, ``{a,b}``) must match at least one tracked path;
- a document's bare name in capitals (``NAME.md``, no folder): some tracked file must have that name. Lower-case
  names (``report.md``, ``table.md``) are files that commands write, not citations.

What does not count, so that examples and outputs are not taken for citations: anything inside a fenced or
indented code block (``runs/lenet``, a command's own output folder), a path written right after ``--out`` or
``>`` (what a command writes), a path under ``/`` (``/tmp/...``), URLs, and this file.
"""

from __future__ import annotations

import ast
import fnmatch
import io
import re
import subprocess
import tokenize
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOP = ("experiments", "benchmarks", "scripts", "docs", "pyrozoo", "tests", ".ci")
PATH = re.compile(r"(?<![\w/.~$-])((?:%s)/[\w.*{},/#:-]*[\w*}/])" % "|".join(re.escape(t) for t in TOP))
BARE_MD = re.compile(r"(?<![\w/.~$-])([A-Z][A-Z0-9_-]*\.md)\b")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
OUTPUT = re.compile(r"(--out[= ]|> ?)$")


def _tracked() -> list[str]:
    try:
        out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    return [p for p in out.splitlines() if (ROOT / p).exists()]  # a file deleted but not yet staged is gone


TRACKED = _tracked()
FILES = set(TRACKED)
FOLDERS = {str(parent) for p in TRACKED for parent in Path(p).parents if str(parent) != "."}
NAMES = {Path(p).name for p in TRACKED}


def _prose_lines(text: str) -> list[str]:
    """The lines of a Markdown text outside fenced and indented code blocks (others become blank)."""
    out, fenced, indented, blank = [], False, False, True
    for line in text.splitlines():
        if line.lstrip().startswith(("```", "~~~")):
            fenced = not fenced
            out.append("")
            continue
        indented = (
            (blank or indented) and line.startswith("    ") and not line.lstrip().startswith(("-", "*"))
        )
        out.append("" if fenced or indented else line)
        blank = not line.strip()
    return out


def _python_prose(text: str) -> list[str]:
    """The docstrings and comments of a Python source, one string each."""
    found = [
        token.string
        for token in tokenize.generate_tokens(io.StringIO(text).readline)
        if token.type == tokenize.COMMENT
    ]
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            found.append(ast.get_docstring(node, clean=False) or "")
    return found


def _expand(pattern: str) -> list[str]:
    """``a{b,c}d`` -> ``abd``, ``acd`` (one level at a time)."""
    match = re.search(r"\{([^{}]*)\}", pattern)
    if not match:
        return [pattern]
    return [
        x
        for part in match.group(1).split(",")
        for x in _expand(pattern[: match.start()] + part + pattern[match.end() :])
    ]


def _exists(path: str) -> bool:
    path = path.rstrip("/")
    if any(c in path for c in "*?["):
        return any(fnmatch.fnmatch(p, path) for p in FILES | FOLDERS)
    return path in FILES or path in FOLDERS


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    heading = re.sub(r"\s*\{#[\w-]+\}\s*$", "", heading).strip().lower()
    return re.sub(r"[^\w\- ]", "", heading.replace("`", "")).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    text = "\n".join(_prose_lines(path.read_text()))
    headings = re.findall(r"^#{1,6}\s+(.*)$", text, re.M)
    return {_slug(h) for h in headings} | set(re.findall(r"\{#([\w-]+)\}", text))


def _cited(text: str) -> list[str]:
    """The repository paths and bare Markdown names a piece of prose cites (links are handled apart)."""
    found = []
    for match in PATH.finditer(text):
        if OUTPUT.search(text[max(0, match.start() - 6) : match.start()]):
            continue
        path = re.sub(r"(:\d+)+$", "", match.group(1).split("#")[0]).rstrip(".,:;")
        found += _expand(path)
    found += [m.group(1) for m in BARE_MD.finditer(text)]
    return found


def _missing_in(source: str) -> list[str]:
    path = ROOT / source
    text = path.read_text(errors="replace")
    if source.endswith(".py"):
        prose = _python_prose(text)
    elif source.endswith(".md"):
        prose = ["\n".join(_prose_lines(text))]
    else:
        prose = [line for line in text.splitlines() if line.lstrip().startswith("#")]
    missing = []
    for chunk in prose:
        for cited in _cited(chunk):
            ok = cited in NAMES if "/" not in cited else _exists(cited)
            if not ok:
                missing.append(cited)
        if not source.endswith(".md"):
            continue
        for match in LINK.finditer(chunk):
            target = match.group(1)
            if re.match(r"[a-z][\w+.-]*:", target) or target.startswith("/"):
                continue
            file, _, anchor = target.partition("#")
            resolved = (path.parent / file).resolve() if file else path
            relative = resolved.relative_to(ROOT).as_posix() if resolved.is_relative_to(ROOT) else None
            if relative is None or not (_exists(relative) or relative == "."):
                missing.append(target)
            elif anchor and relative.endswith(".md") and not relative.startswith("docs/"):
                if anchor not in _anchors(resolved):
                    missing.append(target)
    return missing


SOURCES = [p for p in TRACKED if p.endswith((".md", ".py", ".sh")) and p != "tests/test_references.py"]


def test_nothing_cites_a_file_that_is_not_in_the_repository():
    missing = {source: cited for source in SOURCES if (cited := _missing_in(source))}
    assert not missing, f"cited but not in the repository: {missing}"


def test_the_rule_finds_what_it_should(tmp_path):
    """The rule on a made-up page: a missing path, a missing bare name and a dead anchor are found; an example in
    a code block, a command's output folder, a URL and a /tmp path are not."""
    text = (
        "See experiments/nothing-here.csv and PAPER.md, [this](#no-such-heading), README.md and\n"
        "[the repo](https://github.com/x/y/blob/main/gone.md); `pyrozoo sweep RUN --out experiments/new-folder`,\n"
        "/tmp/experiments/x, and pyrozoo/cli.py:12.\n\n# A heading\n\n```bash\npyrozoo train --out runs/lenet\n"
        "cat experiments/also-not-here.csv\n```\n\n    indented experiments/not-either.csv\n"
    )
    cited = [c for chunk in ["\n".join(_prose_lines(text))] for c in _cited(chunk)]
    assert [c for c in cited if ("/" in c and not _exists(c)) or ("/" not in c and c not in NAMES)] == [
        "experiments/nothing-here.csv",
        "PAPER.md",
    ]
    assert "pyrozoo/cli.py" in cited and "README.md" in cited
    assert _slug("The paper's grid with `pyrozoo compare`: MLP") == "the-papers-grid-with-pyrozoo-compare-mlp"
