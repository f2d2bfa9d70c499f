"""The README's Python tour runs as written (with fewer steps and samples, to stay fast)."""

import re
from pathlib import Path

import torch


def test_python_api_tour_runs():
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    block = re.search(r"## The Python API\s+```python\n(.*?)```", readme, re.S).group(1)
    block = block.replace("range(200)", "range(3)").replace("samples=20", "samples=2")
    namespace = {}
    exec(compile(block, "README.md", "exec"), namespace)
    assert isinstance(namespace["net"], torch.nn.Module)
    assert 0 <= namespace["report"].pruned_fraction <= 1
    # the transformer example continues in the same namespace
    block = re.search(r"### Transformers, and any `nn.Module`.*?```python\n(.*?)```", readme, re.S).group(1)
    exec(compile(block, "README.md", "exec"), namespace)
    assert type(namespace["small"]) is type(namespace["vit"])
    # bring your own network: a torchvision model through build, train, prune, rebuild and export
    block = re.search(r"### Bring your own network.*?```python\n(.*?)```", readme, re.S).group(1)
    exec(compile(block.replace("range(200)", "range(2)"), "README.md", "exec"), namespace)
    assert type(namespace["small"]) is type(namespace["net"])
    assert "classifier.0" not in {layer.name for layer in namespace["model"].layers}
