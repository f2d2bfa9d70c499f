"""The README's Python tour runs as written (with fewer steps and samples, to stay fast)."""

import re
import shlex
from pathlib import Path

import pytest
import torch


def test_python_api_tour_runs():
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    block = re.search(r"## The Python API\s+```python\n(.*?)```", readme, re.S).group(1)
    block = block.replace("range(200)", "range(3)").replace("samples=20", "samples=2")
    namespace = {}
    exec(compile(block, "README.md", "exec"), namespace)
    assert isinstance(namespace["net"], torch.nn.Module)
    assert 0 <= namespace["report"].pruned_fraction <= 1
    # the transformer example runs on its own
    block = re.search(r"### Transformers, and any `nn.Module`.*?```python\n(.*?)```", readme, re.S).group(1)
    alone: dict = {}
    exec(compile(block, "README.md", "exec"), alone)
    assert type(alone["small"]) is type(alone["vit"])
    # bring your own network: a torchvision model through build, train, prune, rebuild and export
    block = re.search(r"### Bring your own network.*?```python\n(.*?)```", readme, re.S).group(1)
    exec(compile(block.replace("range(200)", "range(2)"), "README.md", "exec"), namespace)
    assert type(namespace["small"]) is type(namespace["net"])
    assert "classifier.0" not in {layer.name for layer in namespace["model"].layers}


@pytest.mark.slow
def test_the_tour_as_written_prunes_and_prints_no_tensor(capsys):
    """The tour's first block, its 200 steps as written: a pruned fraction above zero, and no raw tensor printed."""
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    block = re.search(r"## The Python API\s+```python\n(.*?)```", readme, re.S).group(1)
    namespace: dict = {}
    exec(compile(block, "README.md", "exec"), namespace)
    assert namespace["report"].pruned_fraction > 0
    assert "tensor(" not in capsys.readouterr().out


def _documented_train_commands() -> list[str]:
    """Every ``pyrozoo train`` line of the README's shell blocks that starts a run on data a test has (not the
    resume lines themselves, nor a user's own file)."""
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", readme, re.S):
        for line in block.splitlines():
            command = line.split("#")[0].split("&&")
            command = next((c.strip() for c in command if c.strip().startswith("pyrozoo train")), None)
            if command and not any(w in command for w in ("--resume", "--init-from", "my.csv", "diabetes")):
                lines.append(command)
    return lines


@pytest.mark.parametrize("command", _documented_train_commands())
def test_a_documented_run_resumes_from_its_own_command_line(command, tmp_path, capsys):
    """The exact command line, with ``--resume --epochs N+1``, continues the run (issue 33: a tuple given on
    the command line and the list config.json holds were once taken for a changed option)."""
    from pyrozoo.cli import main

    words = shlex.split(command)[2:]
    if "--out" in words:
        del words[words.index("--out") : words.index("--out") + 2]
    # a budget small enough for a test, given after the documented flags (argparse keeps the last)
    small = ["--epochs", "1", "--steps-per-epoch", "1", "--batch-size", "8", "--samples", "1", "--no-progress",
             "--out", str(tmp_path / "run")]  # fmt: skip
    if "--data" not in words or words[words.index("--data") + 1] == "fashion-mnist":
        small += ["--data", "fashion-mnist-mini"]
    assert main(["train", *words, *small]) == 0, capsys.readouterr().err
    code = main(["train", *words, *small, "--resume", "--epochs", "2"])
    assert code == 0, capsys.readouterr().err
    assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["epoch"] == 2
