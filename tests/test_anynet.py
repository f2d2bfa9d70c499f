"""Any network in, a smaller network out (issue 15): torchvision, timm and hand-written nets with BatchNorm,
residual additions, depthwise convolutions, embeddings and LSTMs, tied weights, two inputs and dict outputs.

For each net: it builds, takes one SVI step, and passes a forced prune: the posterior of chosen units is set to
the prior (every other entry made confident), structured BMR removes exactly those units, the rebuilt net has
fewer parameters and its eval-mode outputs equal the masked posterior-mean forward; BatchNorm running
statistics are not touched by evaluation, BMR or the rebuild.
"""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from pyrozoo.bmr import Units
from pyrozoo.bmr.rebuild import parameter_count, rebuild
from pyrozoo.bmr.units import model_units
from pyrozoo.elbo import negative_elbo
from pyrozoo.guides import make_guide
from pyrozoo.models import BayesianModel
from pyrozoo.nets import create_net

os.environ.setdefault("HF_HUB_OFFLINE", "1")


class BatchNormCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 12, 3, padding=1), nn.BatchNorm2d(12), nn.Sigmoid(), nn.AdaptiveAvgPool2d(2),
        )  # fmt: skip
        self.hidden = nn.Linear(48, 16)
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        return self.head(torch.tanh(self.hidden(self.features(x).flatten(1))))


class TextClassifier(nn.Module):
    def __init__(self, vocabulary=50, classes=3):
        super().__init__()
        self.embedding = nn.Embedding(vocabulary, 8)
        self.rnn = nn.LSTM(8, 12, batch_first=True)
        self.hidden = nn.Linear(12, 10)
        self.head = nn.Linear(10, classes)

    def forward(self, tokens):
        states, _ = self.rnn(self.embedding(tokens))
        return self.head(torch.relu(self.hidden(states[:, -1])))


class Tied(nn.Module):
    """A language-model-like net whose decoder shares the embedding's matrix."""

    def __init__(self, vocabulary=20):
        super().__init__()
        self.embedding = nn.Embedding(vocabulary, 8)
        self.hidden = nn.Linear(8, 16)
        self.back = nn.Linear(16, 8)
        self.decoder = nn.Linear(8, vocabulary)
        self.decoder.weight = self.embedding.weight

    def forward(self, tokens):
        h = self.embedding(tokens).mean(1)
        return self.decoder(h + self.back(torch.relu(self.hidden(h))))


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.image = nn.Sequential(nn.Conv2d(1, 6, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.side = nn.Linear(4, 6)
        self.hidden = nn.Linear(6, 12)
        self.head = nn.Linear(12, 3)

    def forward(self, image, side):
        return self.head(torch.relu(self.hidden(self.image(image) + self.side(side))))


class DictOutput(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(16, 20), nn.GELU(), nn.Linear(20, 10), nn.SiLU())
        self.head = nn.Linear(10, 4)

    def forward(self, x):
        features = self.body(x)
        return {"logits": self.head(features), "norm": features.norm(dim=1)}


def _images(channels=3, side=32):
    return torch.randn(2, channels, side, side), torch.randint(0, 4, (2,))


def _tv(name):
    import torchvision

    return lambda: (getattr(torchvision.models, name)(num_classes=4), *_images(), {})


def _timm(name):
    def make():
        import timm

        return timm.create_model(name, pretrained=False, num_classes=4), *_images(), {}

    return make


NETS = {
    "tv-resnet18": pytest.param(_tv("resnet18"), marks=pytest.mark.slow),
    "tv-mobilenet_v3_small": _tv("mobilenet_v3_small"),
    "tv-shufflenet_v2_x0_5": pytest.param(_tv("shufflenet_v2_x0_5"), marks=pytest.mark.slow),
    "timm-resnet18": pytest.param(_timm("resnet18"), marks=pytest.mark.slow),
    "timm-efficientnet_b0": pytest.param(_timm("efficientnet_b0"), marks=pytest.mark.slow),
    "timm-convnext_atto": _timm("convnext_atto"),
    "resnet20": lambda: (create_net("resnet20", in_channels=3, image_size=32, num_classes=4), *_images(), {}),
    "batchnorm-cnn": lambda: (BatchNormCNN(), *_images(), {}),
    "embedding-lstm": lambda: (TextClassifier(), torch.randint(0, 50, (2, 7)), torch.randint(0, 3, (2,)), {}),
    "tied": lambda: (Tied(), torch.randint(0, 20, (2, 5)), torch.randint(0, 20, (2,)), {}),
    "two-inputs": lambda: (TwoInputs(), (torch.randn(2, 1, 8, 8), torch.randn(2, 4)), torch.randint(0, 3, (2,)), {}),
    "dict-output": lambda: (DictOutput(), torch.randn(2, 1, 4, 4), torch.randint(0, 4, (2,)), {"output_key": "logits"}),
}  # fmt: skip


def _statistics(net: nn.Module) -> dict[str, torch.Tensor]:
    return {name: b.clone() for name, b in net.named_buffers() if "running" in name or "num_batches" in name}


def _same_statistics(a, b):
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


@torch.no_grad()
def _force(model, guide, chosen):
    """Every entry confident (scale 0.01), the entries of the chosen units at the prior N(0, 1)."""
    for layer in model.layers:
        loc, _ = guide.site_posterior(layer.site)
        guide.write_posterior(layer.site, loc + loc.sign() * 0.5, torch.full_like(loc, 0.01))
    for units, which in chosen:
        for member in units.members:
            layer = next(layer for layer in model.layers if layer.name == member.layer)
            loc, scale = guide.site_posterior(layer.site)
            at_prior = torch.zeros(layer.shape, dtype=torch.bool)
            member.put(at_prior, which, True)
            guide.write_posterior(layer.site, torch.where(at_prior, 0.0, loc), torch.where(at_prior, 1.0, scale))


@pytest.mark.parametrize("make", list(NETS.values()), ids=list(NETS))
def test_any_net_builds_trains_prunes_and_rebuilds_smaller_with_the_same_outputs(make):
    torch.manual_seed(0)
    net, x, y, options = make()
    original = {name: p.clone() for name, p in net.state_dict().items()}
    model = BayesianModel(net, example_input=x, **options)
    guide = make_guide("meanfield", model)
    optimizer = torch.optim.Adam([*guide.parameters(), *model.deterministic_parameters()], lr=1e-3)
    stats = _statistics(model.net)
    loss = negative_elbo(model, guide, x, y, 100)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
    trained = _statistics(model.net)
    if stats:  # an SVI step in train mode moves BatchNorm's running statistics, as in torch
        assert any(not torch.equal(stats[k], trained[k]) for k in stats)
    for name, value in net.state_dict().items():  # the user's net is never changed
        assert torch.equal(value, original[name]), name

    prunable = {layer.name for layer in model.layers if layer.prunable}
    groups = [u for u in model_units(model) if all(m.layer in prunable for m in u.producers)]
    assert groups, "no removable group found"
    chosen = []
    for units in groups:
        which = torch.zeros(units.count, dtype=torch.bool)
        which[: max(1, units.count // 3)] = True
        chosen.append((units, which))
    _force(model, guide, chosen)
    model.eval()
    report = Units(margin=-1e-6)(model, guide)
    masks = {layer.name: model.mask(layer.name).bool() for layer in model.layers}
    for units, which in chosen:
        assert torch.equal(units.unused(masks), which), units.name
    assert any(not r.note.startswith("0 of") for r in report.layers)

    with torch.no_grad():
        expected = model.logits(x, model.weights_from(guide.mean()))
    _same_statistics(trained, _statistics(model.net))  # evaluation and BMR leave them alone
    dense = rebuild(model, guide, remove_dead=False)
    sparse = rebuild(model, guide)
    _same_statistics(trained, _statistics(model.net))
    assert type(sparse) is type(model.net)
    assert parameter_count(sparse) < parameter_count(dense)
    with torch.no_grad():
        got = sparse(*x) if isinstance(x, tuple) else sparse(x)
    if isinstance(got, dict):
        got = got[options["output_key"]]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))
