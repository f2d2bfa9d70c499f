"""The documentation site: it builds in strict mode offline, every reference to docs/method.md lands on a section
of it, and every shell and Python snippet of its pages runs as written, each on its own, on the shortest
schedule (issue 30: "every snippet in the docs is run by a test as written")."""

import argparse
import importlib.util
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
# A budget small enough for a test, given after the documented flags (argparse keeps the last value): two epochs
# of two steps, so that a BMR method's one pass (after the first epoch) runs.
SHORT = {
    "train": ["--epochs", "2", "--steps-per-epoch", "2", "--warmup-steps", "1", "--batch-size", "8",
              "--samples", "1", "--eval-every", "1", "--no-progress"],
    "compare": ["--epochs", "1", "--steps-per-epoch", "2", "--batch-size", "8", "--samples", "1",
                "--finetune-steps", "1", "--no-progress"],
    "export": ["--repeats", "2"],
    "prune": ["--fit-size", "64", "--no-progress"],
    "predict": ["--no-progress"],
    "uncertainty": ["--no-progress"],
    "compress": ["--finetune-steps", "2", "--fit-size", "64", "--repeats", "1", "--baselines", "tp-l1",
                 "--no-progress"],
}  # fmt: skip


def _blocks() -> list[tuple[str, str, str]]:
    """``(page:n, language, code)`` of every fenced block of the site's Markdown sources."""
    found = []
    for page in sorted(DOCS.rglob("*.md")):
        for n, match in enumerate(FENCE.finditer(page.read_text())):
            found.append((f"{page.relative_to(DOCS)}:{n}", match.group(1), match.group(2)))
    return found


def _commands(code: str) -> list[str]:
    """A shell block's commands: continuation lines joined, then each line split at ``&&``."""
    lines = code.replace("\\\n", " ").splitlines()
    return [c.strip() for line in lines for c in line.split("&&") if c.strip()]


# Snippets kept out of the default suite (~30 s for this file), and why; the others run in it.
SLOW = {
    "howto/grids-clusters.md:0": "a grid of 12 cells, its baselines and figures: ~25 s",
    "howto/grids-clusters.md:1": "torchrun starts two processes",
    "howto/grids-clusters.md:3": "submitit's local executor starts a process per job",
    "howto/compress.md:0": "a run, an export and compress with a baseline: ~15 s",
    "howto/compress.md:1": "compress from Python: ~10 s",
    "howto/compress.md:2": "a Laplace fit, a KFAC pruning pass and an export: ~6 s",
    "howto/compress.md:3": "two runs and two exports: ~9 s",
}
SNIPPETS = [
    pytest.param(language, code, id=name, marks=[pytest.mark.slow] if name in SLOW else [])
    for name, language, code in _blocks()
    if language in ("bash", "python")
]


def test_every_block_is_run_or_says_it_is_not():
    """A block is shell or Python (run below), or a template whose page says it is not run by the tests."""
    assert set(SLOW) <= {name for name, _, _ in _blocks()}, "a slow snippet's id names no block"
    for page in DOCS.rglob("*.md"):
        text = page.read_text()
        for match in FENCE.finditer(text):
            assert match.group(1) in ("bash", "python", "text"), f"{page}: a ```{match.group(1)} block"
            if match.group(1) == "text":
                before = text[: match.start()].rstrip().rsplit("\n\n", 1)[-1]
                assert "not run by the tests" in before, f"{page}: a text block not said to be a template"


def test_every_reference_to_the_method_lands_on_one_of_its_sections():
    anchors = set(re.findall(r"\{#([\w-]+)\}", (DOCS / "method.md").read_text()))
    sources = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", ROOT / "experiments" / "RESULTS.md"]
    sources += [*ROOT.glob("*/**/*.py"), *DOCS.rglob("*.md")]
    cited = {}
    for path in sources:
        for anchor in re.findall(r"method\.md#([\w-]+)", path.read_text(errors="replace")):
            cited.setdefault(anchor, path)
    assert cited, "nothing cites docs/method.md"
    missing = {a: str(p.relative_to(ROOT)) for a, p in cited.items() if a not in anchors}
    assert not missing, f"anchors cited but not in docs/method.md: {missing}"


def _run_shell(command: str, tmp_path: Path) -> None:
    from pyrozoo.cli import main

    env_words, words = [], shlex.split(command)
    while words and re.match(r"^\w+=", words[0]):
        env_words.append(words.pop(0))
    if words[:2] == ["pip", "install"]:
        # Installing is what CI does first (.ci/run), as the README's set-up commands say.
        setup = (ROOT / "README.md").read_text() + (ROOT / ".ci" / "run").read_text()
        assert command in setup, f"{command!r} is not one of the set-up commands that CI runs"
        return
    if words[0] == "torchrun":
        words += SHORT["train"] + ["--data", "fashion-mnist-mini"]
        env = {**os.environ, **dict(w.split("=", 1) for w in env_words), "PYTHONPATH": str(ROOT)}
        done = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", *words[1:]],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        return
    assert words[0] == "pyrozoo", f"a docs snippet runs {words[0]!r}, which no test knows how to run"
    argv = words[1:] + SHORT.get(words[1], [])
    if words[1] in ("train", "compare", "compress"):
        data = argv.index("--data") + 1 if "--data" in argv else None
        if data is None:
            argv += ["--data", "fashion-mnist-mini"]
        elif argv[data] == "fashion-mnist":  # the full data set is not here; its bundled subset is
            argv[data] = "fashion-mnist-mini"
    assert main(argv) == 0, command


@pytest.mark.parametrize("language, code", SNIPPETS)
def test_snippet_runs_as_written(language, code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    if language == "python":
        exec(compile(code, "docs", "exec"), {})
        return
    if "--launcher slurm" in code:
        pytest.importorskip("submitit")
    for command in _commands(code):
        _run_shell(command, tmp_path)


def test_site_builds_strictly_and_offline(tmp_path):
    """``mkdocs build --strict`` (broken links, references and docstrings fail it) with every network request
    sent to a closed port, so a build that fetched anything would fail."""
    for module in ("mkdocs", "material", "mkdocstrings_handlers.python"):
        if importlib.util.find_spec(module.split(".")[0]) is None:
            pytest.skip(f"{module} is not installed (pip install -e '.[docs]')")
    dead = "http://127.0.0.1:9"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HTTP_PROXY": dead, "HTTPS_PROXY": dead, "NO_PROXY": ""}
    env.update(http_proxy=dead, https_proxy=dead, no_proxy="", NO_MKDOCS_2_WARNING="1")
    start = time.perf_counter()
    command = [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-5000:]
    print(f"mkdocs build --strict: {time.perf_counter() - start:.1f} s")
    cli = (tmp_path / "site" / "cli" / "index.html").read_text()
    from pyrozoo.cli import build_parser

    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for name in commands.choices:  # every subcommand, generated from the parser
        assert f'id="{name}"' in cli, name
    assert "bmr-th" in (tmp_path / "site" / "results" / "index.html").read_text()
