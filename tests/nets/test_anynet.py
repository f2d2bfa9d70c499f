"""Any network in, a smaller network out (issue 15): torchvision, timm and hand-written nets with BatchNorm,
residual additions, depthwise convolutions, embeddings and LSTMs, tied weights, two inputs and dict outputs.

For each net: it builds, takes one SVI step, and passes a forced prune: the posterior of chosen units is set to
the prior (every other entry made confident), structured BMR removes exactly those units, the rebuilt net has
fewer parameters and its eval-mode outputs equal the masked posterior-mean forward; BatchNorm running
statistics are not touched by evaluation, BMR or the rebuild.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
from torch import nn

from pyrozoo.bmr import UnitReduction
from pyrozoo.bmr.rebuild import parameter_count, rebuild
from pyrozoo.bmr.units import model_units
from pyrozoo.elbo import negative_elbo
from pyrozoo.errors import PyrozooError
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
            at_prior = torch.zeros(layer.shape, dtype=torch.bool, device=loc.device)
            member.put(at_prior, which, True)
            guide.write_posterior(
                layer.site, torch.where(at_prior, 0.0, loc), torch.where(at_prior, 1.0, scale)
            )


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
    report = UnitReduction(margin=-1e-6)(model, guide)
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


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_any_net_end_to_end_on_cuda():
    """Build, SVI step, forced prune and rebuild with the model on the GPU: index tensors follow the model."""
    torch.manual_seed(0)
    net = create_net(
        "resnet20", in_channels=3, image_size=32, num_classes=4, widths=(8, 16, 16), blocks=(1, 1, 1)
    )
    x, y = (t.cuda() for t in _images())
    model = BayesianModel(net.cuda(), example_input=x)
    guide = make_guide("meanfield", model).cuda()
    optimizer = torch.optim.Adam([*guide.parameters(), *model.deterministic_parameters()], lr=1e-3)
    loss = negative_elbo(model, guide, x, y, 100)
    loss.backward()
    optimizer.step()
    groups = model_units(model)
    chosen = [(units, torch.arange(units.count) < max(1, units.count // 3)) for units in groups]
    _force(model, guide, chosen)
    model.eval()
    UnitReduction(margin=-1e-6)(model, guide)
    with torch.no_grad():
        expected = model.logits(x, model.weights_from(guide.mean()))
    sparse = rebuild(model, guide)
    assert parameter_count(sparse) < parameter_count(rebuild(model, guide, remove_dead=False))
    assert next(sparse.parameters()).is_cuda
    with torch.no_grad():
        torch.testing.assert_close(sparse(x), expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))


@pytest.mark.parametrize("name", ["tv:mobilenet_v3_small", "timm:resnet10t"])
def test_torchvision_and_timm_models_by_name_offline(name):
    from pyrozoo.nets import NETS

    assert name in NETS and "tv:no_such_model" not in NETS
    net = create_net(name, in_channels=1, image_size=28, num_classes=10)
    assert net(torch.randn(2, 1, 28, 28)).shape == (2, 10)  # the first conv takes the data's channels


def test_unknown_library_model_and_bad_weights_file_are_one_line_errors(tmp_path):
    from pyrozoo.errors import PyrozooError

    with pytest.raises(PyrozooError, match="torchvision has no model 'nope'"):
        create_net("tv:nope", in_channels=3, image_size=32, num_classes=10)
    with pytest.raises(PyrozooError, match="cannot load weights"):
        create_net(
            "tv:resnet18", in_channels=3, image_size=32, num_classes=10, weights=str(tmp_path / "x.pt")
        )


def test_local_weights_are_loaded(tmp_path):
    net = create_net("timm:resnet10t", in_channels=3, image_size=32, num_classes=5)
    torch.save(net.state_dict(), tmp_path / "w.pt")
    again = create_net(
        "timm:resnet10t", in_channels=3, image_size=32, num_classes=5, weights=str(tmp_path / "w.pt")
    )
    for a, b in zip(net.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)


def test_selectors_as_net_options_reach_the_model_and_deterministic_parameters_are_trained_and_saved(
    tmp_path,
):
    from pyrozoo.config import TrainConfig
    from pyrozoo.train import Run

    config = TrainConfig(
        net="resnet20", data="fashion-mnist-mini", method="bmr-th", epochs=1, steps_per_epoch=2, batch_size=8,
        samples=1, eval_batch_size=500, warmup_steps=1,
        net_options={"widths": (4, 8, 8), "blocks": (1, 1, 1), "deterministic": "stem.0"},
    )  # fmt: skip
    run = Run(config, tmp_path / "run", log=lambda text: None)
    names = {layer.name for layer in run.model.layers}
    assert "stem.0" not in names and "stem.1" not in names and "head" in names
    bn = run.model.net.get_submodule("stem.1")
    weight, stats = bn.weight.detach().clone(), bn.running_mean.clone()
    run.train(progress=False)
    assert not torch.equal(bn.weight.detach(), weight)  # trained with the guide
    assert not torch.equal(bn.running_mean, stats)  # updated by SVI steps in train mode
    state = run.model.state_dict()
    assert torch.equal(state["net.stem.1.weight"], bn.weight.detach())  # checkpointed with the model


def test_default_batch_norm_statistics_follow_train_and_eval_mode():
    net = BatchNormCNN()
    x = torch.randn(4, 3, 16, 16)
    model = BayesianModel(net, example_input=x)
    guide = make_guide("meanfield", model)
    before = _statistics(model.net)
    model.eval()
    with torch.no_grad():
        model.logits(x, model.weights_from(guide()))
    _same_statistics(before, _statistics(model.net))
    model.train()
    with torch.no_grad():
        model.logits(x, model.weights_from(guide()))
    assert not torch.equal(before["features.1.running_mean"], model.net.features[1].running_mean)


def test_a_unit_with_a_constant_output_goes_with_its_constant_folded_into_the_next_bias():
    """Sigmoid(0) = 0.5: a unit whose inputs are all pruned still feeds its consumers a constant, which the
    rebuild moves into the next Linear's bias before cutting the unit; tanh(0) = 0 needs no fold."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.Sigmoid(), nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    x = torch.randn(3, 4)
    model = BayesianModel(net, example_input=x)
    guide = make_guide("meanfield", model)
    keep = torch.ones(model.layers[0].shape, dtype=torch.bool)
    keep[:2] = False  # units 0 and 1 of the sigmoid layer: dead, but they output 0.5
    model.set_mask("0", keep)
    keep = torch.ones(model.layers[1].shape, dtype=torch.bool)
    keep[:3] = False  # units 0-2 of the tanh layer: dead, and tanh(0) = 0
    model.set_mask("2", keep)
    with torch.no_grad():
        expected = model.logits(x, model.weights_from(guide.mean()))
    sparse = rebuild(model, guide)
    assert sparse[0].out_features == 4 and sparse[2].out_features == 2
    with torch.no_grad():
        torch.testing.assert_close(sparse(x), expected)
        dense = rebuild(model, guide, remove_dead=False)
        assert not torch.equal(sparse[2].bias, dense[2].bias)  # the 0.5s moved into it


def test_slicing_latents_by_a_group_matches_the_rebuilt_shapes():
    from pyrozoo.bmr.units import slice_latents

    model = BayesianModel(
        create_net("resnet20", in_channels=3, image_size=32, num_classes=4), example_input=_images()[0]
    )
    units = model_units(model)[0]
    keep = torch.arange(units.count) % 2 == 0
    masks = {layer.name: model.mask(layer.name) for layer in model.layers}
    sliced = slice_latents(units, keep, masks)
    for member in units.members:
        assert sliced[member.layer].shape[member.axis] == masks[member.layer].shape[member.axis] - (
            int((~keep).sum()) * member.index.shape[1]
        )


def test_a_net_the_tracer_cannot_follow_still_trains_and_prunes_weight_by_weight():
    from pyrozoo.bmr import prune
    from pyrozoo.bmr.units import structure

    class Opaque(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.head = nn.Linear(4, 6), nn.Linear(6, 2)

        def forward(self, x):
            if x.requires_grad or torch.is_grad_enabled():
                raise RuntimeError("no tracing here")
            return self.head(self.a(x).relu())

    model = BayesianModel(Opaque(), example_input=torch.randn(2, 4))
    guide = make_guide("meanfield", model)
    assert structure(model).units == [] and "cannot trace Opaque" in structure(model).fixed[""]
    assert 0 <= prune(model, guide, "threshold").pruned_fraction <= 1
    assert parameter_count(rebuild(model, guide)) == parameter_count(model.net)


def test_a_methods_default_net_option_reaches_only_the_nets_that_take_it(tmp_path):
    """flat-map's dropout is a default for the nets that take it; a torchvision net takes none, and the run goes
    on without it (saying so), where it used to be refused over an option the user never gave."""
    from pyrozoo.config import TrainConfig
    from pyrozoo.train import Run

    said = []
    config = TrainConfig(
        net="tv:mobilenet_v3_small", method="flat-map", data="fashion-mnist-mini", epochs=1, steps_per_epoch=1,
        samples=1, eval_every=1,
    )  # fmt: skip
    Run(config, tmp_path, log=said.append)
    assert any("takes no dropout" in line for line in said), said
    with pytest.raises(
        Exception, match="dropout"
    ):  # a user's own option still reaches the net, and fails there
        Run(
            TrainConfig(**{**config.__dict__, "net_options": {"dropout": 0.2}}),
            tmp_path / "b",
            log=said.append,
        )


def _start_terms(net, x, y, size, start):
    """The plain net's ``size x`` cross-entropy on ``(x, y)`` in train mode, and the Bayesian model's data
    term (one posterior draw), its mean's logits and its KL per weight, with the posterior started at
    ``start``."""
    import pyro
    import torch.nn.functional as F

    from pyrozoo.init_from import start_from_net

    pyro.set_rng_seed(0)
    with torch.no_grad():
        plain = copy.deepcopy(net).train()(x)
    model = BayesianModel(net, example_input=x)
    guide = make_guide("meanfield", model)
    if start == "net":
        start_from_net(model, guide)
    with torch.no_grad():
        data = size * F.cross_entropy(model.logits(x, model.weights_from(guide())), y)
        mean = model.logits(x, model.weights_from(guide.mean()))
        kl = negative_elbo(model, guide, x, y, size) - data
    weights = sum(layer.shape.numel() for layer in model.layers)
    return size * F.cross_entropy(plain, y), data, plain, mean, kl / weights


def test_a_net_starts_at_its_own_initialisation_with_torchs_activation_scale():
    """The default start of any net: the posterior mean is the net as torch initialised it (same logits), a
    posterior draw's data term is the plain net's N x cross-entropy, and the KL stays that of a posterior
    scale of 0.1 per weight (the guide's own start costs as much). From the guide's uniform start (lenet's, the
    paper's) the head's weights are forty times torch's: the data term is many times the plain net's."""
    torch.manual_seed(0)
    net = create_net("resnet20", in_channels=1, image_size=28, num_classes=10, blocks=(1, 1, 1))
    x, y = torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,))
    plain, data, logits, mean, kl = _start_terms(net, x, y, 60000, "net")
    torch.testing.assert_close(mean, logits, rtol=1e-4, atol=1e-4)
    assert 0.7 < float(data / plain) < 1.5
    assert float(kl) < 2.5  # nats per weight: -ln 0.1 = 2.3 from the posterior scale, little from the means
    plain, data, _, _, _ = _start_terms(net, x, y, 60000, "guide")
    assert float(data / plain) > 3


@pytest.mark.slow
def test_resnet18_starts_at_torchs_activation_scale():
    torch.manual_seed(0)
    net = create_net("resnet18", in_channels=1, image_size=28, num_classes=10)
    x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
    plain, data, logits, mean, kl = _start_terms(net, x, y, 60000, "net")
    torch.testing.assert_close(mean, logits, rtol=1e-4, atol=1e-4)
    assert 0.7 < float(data / plain) < 1.5 and float(kl) < 2.5


def test_where_training_starts_by_net_and_by_choice(tmp_path):
    """lenet, mlp, vit and mixer start where the paper's runs (experiments/RESULTS.md) started, at the guide's
    own draw; every other net at its own initialisation; --start chooses."""
    from pyrozoo.bind import bind
    from pyrozoo.config import TrainConfig
    from pyrozoo.train import Run

    for name in ("lenet", "mlp", "vit", "mixer"):
        assert bind(TrainConfig(net=name)).config.start == "guide"
    for name in ("resnet18", "resnet20", "tv:resnet18"):
        assert bind(TrainConfig(net=name)).config.start == "net"
    # a guide option placing the locs (another run's initial draw) keeps the guide's own start, which --start
    # net would silently undo
    drawn = {"guide_options": {"init_locs": {"conv1.precision": 1.5}}}
    assert bind(TrainConfig(net="resnet20", **drawn)).config.start == "guide"
    with pytest.raises(PyrozooError, match="--start guide"):
        bind(TrainConfig(net="lenet", start="net", **drawn))
    locs = {}
    for start in (None, "guide", "net"):
        config = TrainConfig(
            net="lenet", data="fashion-mnist-mini", epochs=1, steps_per_epoch=1, batch_size=8, start=start,
            net_options={"channels": (2, 4, 8), "hidden": 8},
        )  # fmt: skip
        with Run(config, tmp_path / str(start), log=lambda text: None) as run:
            locs[start] = {k: v.detach().clone() for k, v in run.guide.locs.items()}
    assert all(torch.equal(locs[None][k], locs["guide"][k]) for k in locs[None])
    assert not torch.equal(locs["net"]["head-weight_base"], locs["guide"]["head-weight_base"])
    with pytest.raises(PyrozooError, match="--start"):
        bind(TrainConfig(net="lenet", start="zero"))
