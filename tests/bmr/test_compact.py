"""Compaction during training (issue 17): cutting gone units out of the model, guide and optimiser changes
nothing that remains.

For an MLP, a LeNet, a tiny ViT (MLP hidden units and attention heads) and a tiny Mixer, some units of every
group are pruned whole (masked and reset to the prior, as the structured pass does) and, in the MLP, a unit is
only killed (its rows pruned: it outputs 0, its consumers' columns stay live). Against an uncompacted twin (a
deep copy taken just before), at the same random draws: the log-likelihood, the predictions at posterior samples
and the posterior mean, the ELBO (less the removed entries' KL, computed independently from the twin), and the
next Adam / AdaBelief step's parameters and moments on the surviving entries.
"""

from __future__ import annotations

import copy
import math
import shutil

import pyro.distributions as dist
import pytest
import torch
import torch.nn.functional as F
from configs import tiny_config

from pyrozoo.bmr.compact import compact, expand
from pyrozoo.bmr.units import model_units, pruned_fraction
from pyrozoo.elbo import negative_elbo
from pyrozoo.guides import make_guide
from pyrozoo.guides.meanfield import MeanFieldNormal
from pyrozoo.models import BayesianModel
from pyrozoo.nets import create_net
from pyrozoo.optim import OPTIMIZERS

NETS = {
    "mlp": dict(name="mlp", in_channels=1, image_size=8, num_classes=4, hidden=(16, 12)),
    "lenet": dict(name="lenet", in_channels=1, image_size=32, num_classes=4),
    "vit": dict(name="vit", in_channels=1, image_size=16, num_classes=4, preset="tiny"),
    "mixer": dict(name="mixer", in_channels=1, image_size=16, num_classes=4, preset="tiny"),
}


@pytest.fixture(autouse=True)
def float64():
    """In double precision, so that 1e-6 separates a wrong cut from float rounding (sums of other lengths)."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(before)


class FixedNormal(dist.Normal):
    """A Normal whose reparameterised draw uses given standard-normal noise: the same draws for two guides."""

    def __init__(self, loc, scale, eps):
        super().__init__(loc, scale)
        self.eps = eps

    def rsample(self, sample_shape=torch.Size()):
        return self.loc + self.eps * self.scale


class fixed_noise:
    """While active, a MeanFieldNormal guide draws with ``noise[site]`` (full shapes), sliced to the model's
    kept entries (``model.kept``) for a compacted model."""

    def __init__(self, model, noise):
        self.model, self.noise = model, noise

    def _eps(self, site):
        eps = self.noise[site]
        for layer in self.model.layers:
            if site == layer.site and layer.name in self.model.kept:
                rows, cols = self.model.kept[layer.name]
                eps = eps[rows][:, cols]
        return eps

    def __enter__(self):
        self.original = MeanFieldNormal._distribution
        context = self

        def distribution(guide, name):
            key, _, event_dim, transform = guide._sites[name]
            loc, scale = guide.locs[key], F.softplus(guide.raw_scales[key])
            base = FixedNormal(loc, scale, context._eps(name)).to_event(event_dim)
            return base if transform is None else dist.TransformedDistribution(base, transform)

        MeanFieldNormal._distribution = distribution

    def __exit__(self, *exc):
        MeanFieldNormal._distribution = self.original


def _setup(net: str, optimizer: str = "adam"):
    torch.manual_seed(0)
    options = dict(NETS[net])
    name = options.pop("name")
    module = create_net(name, **options)
    x = torch.randn(6, options["in_channels"], options["image_size"], options["image_size"])
    y = torch.randint(0, options["num_classes"], (6,))
    model = BayesianModel(module, example_input=x[:2])
    guide = make_guide("meanfield", model)
    opt = OPTIMIZERS[optimizer](guide.parameters(), lr=1e-2)
    for _ in range(2):  # moments that are not zero
        loss = negative_elbo(model, guide, x, y, 100)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model, guide, opt, x, y


@torch.no_grad()
def _kill(model, guide, net: str):
    """Prune about a third of every prunable group's units whole; in the MLP, also kill one unit by its rows."""
    prunable = {layer.name for layer in model.layers if layer.prunable}
    groups = [u for u in model_units(model) if all(m.layer in prunable for m in u.producers)]
    assert groups
    masks = {layer.name: model.mask(layer.name).bool().clone() for layer in model.layers}
    for units in groups:
        which = torch.zeros(units.count, dtype=torch.bool)
        which[1 : 1 + max(1, units.count // 3)] = True
        units.remove(masks, which)
    if net == "mlp":
        masks["body.1"][0] = False  # dead: outputs SiLU(0) = 0; body.3's column 0 stays live
    sites = {layer.name: layer.site for layer in model.layers}
    for name, keep in masks.items():
        guide.reset_to_prior(sites[name], model.mask(name).bool() & ~keep)
        model.set_mask(name, keep)


def _twin(model, guide, opt, optimizer):
    model2, guide2 = copy.deepcopy(model), copy.deepcopy(guide)
    opt2 = OPTIMIZERS[optimizer](guide2.parameters(), lr=1e-2)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))  # Adam keeps the loaded step tensors themselves
    return model2, guide2, opt2


def _removed_kl(model, twin, twin_guide) -> float:
    """KL to N(0, 1) of the twin's entries that the compacted model no longer holds (closed form)."""
    total = 0.0
    for layer in twin.layers:
        if layer.name not in model.kept:
            continue
        loc, scale = twin_guide.site_posterior(layer.site)
        rows, cols = model.kept[layer.name]
        held = torch.zeros(layer.shape, dtype=torch.bool)
        held[rows[:, None], cols[None, :]] = True
        kl = 0.5 * (scale.square() + loc.square() - 1) - scale.log()
        total += float(kl[~held].double().sum())
    return total


def _sliced(model, layer_name, tensor):
    rows, cols = model.kept.get(layer_name, (None, None))
    return tensor if rows is None else tensor[rows][:, cols]


@pytest.mark.parametrize("optimizer", ["adam", "adabelief"])
@pytest.mark.parametrize("net", list(NETS))
def test_compaction_changes_nothing_that_remains(net, optimizer):
    if optimizer == "adabelief" and net != "mlp":
        pytest.skip("one net is enough for the second optimiser")
    model, guide, opt, x, y = _setup(net, optimizer)
    _kill(model, guide, net)
    twin, twin_guide, twin_opt = _twin(model, guide, opt, optimizer)
    fraction = pruned_fraction(model)
    sizes = sum(layer.shape.numel() for layer in model.layers)

    removed, note = compact(model, guide, opt)
    assert removed > 0, note
    assert sum(layer.shape.numel() for layer in model.layers) < sizes
    assert pruned_fraction(model) == pytest.approx(fraction, abs=1e-12)  # of the original net
    if net == "vit":  # attention heads went too
        assert any(m.num_heads < 2 for n, m in model.net.named_modules() if n.endswith("attn"))

    noise = {}
    with torch.no_grad():  # the same draws for both: full-shape noise, sliced for the compacted guide
        for site in twin_guide.sites():
            noise[site] = torch.randn(twin_guide.site_posterior(site)[0].shape)
    model.eval(), twin.eval()
    with torch.no_grad():
        for a, b in ((model.weights_from(guide.mean()), twin.weights_from(twin_guide.mean())),):
            torch.testing.assert_close(model.logits(x, a), twin.logits(x, b), rtol=1e-6, atol=1e-6)
        for _ in range(3):  # predictions and log-likelihood at posterior samples
            sample = {s: torch.randn(v.shape) for s, v in noise.items()}
            with fixed_noise(model, sample):
                got = model.logits(x, model.weights_from(guide()))
            with fixed_noise(twin, sample):
                want = twin.logits(x, twin.weights_from(twin_guide()))
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(
                torch.distributions.Categorical(logits=got).log_prob(y).sum(),
                torch.distributions.Categorical(logits=want).log_prob(y).sum(),
                rtol=1e-6,
                atol=1e-5,
            )
    model.train(), twin.train()

    with fixed_noise(model, noise):
        loss = negative_elbo(model, guide, x, y, 100)
    with fixed_noise(twin, noise):
        twin_loss = negative_elbo(twin, twin_guide, x, y, 100)
    kl = _removed_kl(model, twin, twin_guide)
    if net != "mlp":  # every removed entry was at the prior: the ELBO itself is unchanged
        assert kl == pytest.approx(0.0, abs=1e-9)
    assert loss.item() == pytest.approx(twin_loss.item() - kl, rel=1e-9, abs=1e-6)

    opt.zero_grad(), twin_opt.zero_grad()
    loss.backward()
    twin_loss.backward()
    opt.step()
    twin_opt.step()
    for layer in twin.layers:  # the next step: every surviving entry's value and moments as the twin's
        for table in ("locs", "raw_scales"):
            key = layer.site.replace(".", "-")
            mine, theirs = getattr(guide, table)[key], getattr(twin_guide, table)[key]
            torch.testing.assert_close(
                mine.detach(), _sliced(model, layer.name, theirs.detach()), rtol=1e-6, atol=1e-6
            )
            for k, v in opt.state[mine].items():
                w = twin_opt.state[theirs][k]
                if isinstance(v, torch.Tensor) and v.dim() > 0:
                    w = _sliced(
                        model, layer.name, w
                    )  # to float rounding of the gradients (sums in other orders)
                    torch.testing.assert_close(v, w, rtol=1e-6, atol=1e-9 * float(w.abs().max()))
                else:
                    assert float(v) == float(w)
    assert math.isfinite(loss.item())


def test_compacting_ivon_moves_its_weights_hessian_and_momentum(monkeypatch):
    """IVON's posterior and optimiser state (a flat Hessian and momentum per layer group) follow compaction: the
    function at the mean, every surviving entry's weight, Hessian and momentum, and the next step's result (at
    the mean, no noise, so both draw alike) are the uncompacted twin's."""
    from pyrozoo.guides.ivon import ivon_step
    from pyrozoo.models.priors import gaussian

    torch.manual_seed(0)
    net = create_net("mlp", in_channels=1, image_size=6, num_classes=3, hidden=(7, 5))
    model = BayesianModel(net, prior=gaussian)
    guide = make_guide("ivon", model)
    optimizer = guide.make_optimizer(lr=0.1, dataset_size=100)
    x, y = torch.randn(16, 1, 6, 6), torch.randint(0, 3, (16,))
    for _ in range(2):  # a Hessian and momentum that are not their initial values
        ivon_step(model, guide, optimizer, x, y, 100)
    _kill(model, guide, "mlp")
    twin, twin_guide = copy.deepcopy(model), copy.deepcopy(guide)
    twin_optimizer = twin_guide.make_optimizer(lr=0.1, dataset_size=100)  # (a deep copy loses its settings)
    twin_optimizer.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    twin_guide.pull_state()
    sizes = sum(layer.shape.numel() for layer in model.layers)
    removed, note = compact(model, guide, optimizer)
    assert removed > 0, note
    assert sum(g["numel"] for g in optimizer.param_groups) == sum(
        layer.shape.numel() for layer in model.layers
    )
    assert sum(layer.shape.numel() for layer in model.layers) < sizes

    def same_state():
        model.eval(), twin.eval()
        with torch.no_grad():
            got = model.logits(x, guide.masked_weights(model))
            want = twin.logits(x, twin_guide.masked_weights(twin))
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
        model.train(), twin.train()
        for (group, (key, layer)), (twin_group, _) in zip(guide._groups(), twin_guide._groups()):
            shape = twin_guide.weights[key].shape
            for mine, theirs in (
                (guide.weights[key].detach(), twin_guide.weights[key].detach()),
                (guide.hess.get_buffer(key), twin_guide.hess.get_buffer(key)),
                (group["momentum"].view(guide.weights[key].shape), twin_group["momentum"].view(shape)),
            ):
                torch.testing.assert_close(mine, _sliced(model, layer.name, theirs), rtol=1e-6, atol=1e-7)

    same_state()
    monkeypatch.setattr(torch, "randn", lambda *size, **kw: torch.zeros(*size, dtype=kw.get("dtype")))
    ivon_step(model, guide, optimizer, x, y, 100)
    ivon_step(twin, twin_guide, twin_optimizer, x, y, 100)
    same_state()


def test_expanding_a_compacted_model_gives_the_twin_back_where_it_matters():
    model, guide, opt, x, y = _setup("mlp")
    _kill(model, guide, "mlp")
    twin, twin_guide, _ = _twin(model, guide, opt, "adam")
    compact(model, guide, opt)
    full, full_guide = expand(model, guide)
    assert [layer.shape for layer in full.layers] == [layer.shape for layer in twin.layers]
    assert full.net.body[1].out_features == 16 and full.net.head.in_features == 12
    with torch.no_grad():
        torch.testing.assert_close(
            full.logits(x, full.weights_from(full_guide.mean())),
            twin.logits(x, twin.weights_from(twin_guide.mean())),
            rtol=1e-6,
            atol=1e-6,
        )
    assert pruned_fraction(full) == pytest.approx(pruned_fraction(twin))
    assert model.kept and not full.kept  # the compacted model itself is left as it is


def test_nothing_to_cut_changes_nothing_and_autoguides_are_refused_with_a_reason():
    model, guide, opt, x, y = _setup("mlp")
    state = copy.deepcopy(guide.state_dict())
    assert compact(model, guide, opt) == (0, "")
    assert all(torch.equal(v, guide.state_dict()[k]) for k, v in state.items())
    auto = make_guide("autonormal", model)
    removed, why = compact(model, auto, None)
    assert removed == 0 and "cannot be compacted" in why


# --- in a training run: resume and export -------------------------------------------------------------------

from pyrozoo.bmr.reduction import PruneReport, Reduction  # noqa: E402
from pyrozoo.checkpoint import snapshot  # noqa: E402
from pyrozoo.config import TrainConfig  # noqa: E402
from pyrozoo.runfolder import read_checkpoint  # noqa: E402
from pyrozoo.train import Run  # noqa: E402


class KillUnits(Reduction):
    """Prunes units 1-3 of every prunable group whole, once (a model already compacted is left alone): units
    that die at a known pass, so a short run compacts."""

    name = "kill-units"
    allows_empty = True  # a deliberate kill, never undone as a collapse

    def __call__(self, model, posterior):
        if not model.kept:
            _kill(model, posterior, "")
        return PruneReport([], 0.0, pruned_fraction(model))


RUN = dict(
    method="bmr-th",
    steps_per_epoch=4,
    batch_size=32,
    eval_every=10,
    warmup_steps=0,
    net_options={"hidden": (16, 12)},
)


def _train(folder, epochs, resume=False, **options):
    config = tiny_config(epochs=epochs, **{**RUN, **options})
    run = Run.open(folder, log=lambda text: None, epochs=epochs) if resume else Run(config, folder, log=print)
    run.reduction = KillUnits()
    with run:
        run.train(progress=False)
    return run


def _equal_states(a: dict, b: dict, path=""):
    assert type(a) is type(b), path
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for key in a:
            _equal_states(a[key], b[key], f"{path}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _equal_states(x, y, f"{path}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), path
    elif not (isinstance(a, float) and math.isnan(a) and math.isnan(b)):
        assert a == b, path


@pytest.fixture
def float32():
    torch.set_default_dtype(torch.float32)  # runs are in float32, as they are trained


@pytest.mark.parametrize("method", ["bmr-th", "ivon-bmr"])
def test_a_compacted_run_resumes_bit_exactly(tmp_path, float32, method):
    straight = _train(tmp_path / "straight", 3, method=method)
    assert straight.model.kept, "the run did not compact"
    _train(tmp_path / "split", 2, method=method)
    resumed = _train(tmp_path / "split", 3, resume=True, method=method)
    assert resumed.model.kept
    a, b = read_checkpoint(tmp_path / "straight"), read_checkpoint(tmp_path / "split")
    for key in ("guide", "model", "optimizer", "kept", "batches", "rng"):
        _equal_states(a[key], b[key], key)
    for row in a["history"] + b["history"]:  # everything but the timings
        for key in ("seconds", "bmr_seconds", "eval_seconds"):
            row.pop(key, None)
    _equal_states(a["history"], b["history"])


@pytest.mark.parametrize("method", ["bmr-th", "ivon-bmr"])
def test_export_of_a_compacted_run_equals_that_of_its_uncompacted_twin(tmp_path, float32, method):
    from pyrozoo.bmr.rebuild import rebuild
    from pyrozoo.export import export

    twin = _train(tmp_path / "twin", 2, compact=False, method=method)
    assert not twin.model.kept
    # the same state, compacted and committed: as a compacting run would have it
    shutil.copytree(tmp_path / "twin", tmp_path / "compacted")
    with Run.open(tmp_path / "compacted", log=lambda text: None) as run:
        removed, _ = compact(run.model, run.guide, run.optimizer)
        assert removed > 0
        run.folder.commit(snapshot(run.setup, run.progress))
    assert read_checkpoint(tmp_path / "compacted")["kept"]
    summaries = {}
    for name in ("twin", "compacted"):
        with Run.open(tmp_path / name, log=lambda text: None) as run:
            assert bool(run.model.kept) == (name == "compacted")
            sparse = rebuild(run.model, run.guide)
            summaries[name] = (sparse.state_dict(), export(run, tmp_path / name / "export", repeats=2), run)
    (twin_net, twin_summary, twin_run), (net, summary, run) = summaries["twin"], summaries["compacted"]
    _equal_states(dict(twin_net), dict(net))
    assert twin_summary["units_cut"]["parameters"] == summary["units_cut"]["parameters"]
    assert twin_summary["units_cut"]["accuracy"] == summary["units_cut"]["accuracy"]
    assert twin_summary["full_shapes"]["parameters"] == summary["full_shapes"]["parameters"]
    exported = torch.load(tmp_path / "compacted" / "export" / "sparse_state_dict.pt")
    _equal_states(exported, torch.load(tmp_path / "twin" / "export" / "sparse_state_dict.pt"))
    assert pruned_fraction(run.model) == pruned_fraction(twin_run.model)


def test_no_compact_is_a_flag_and_compaction_is_on_by_default():
    from pyrozoo.cli import build_parser

    assert TrainConfig().compact is True
    assert TrainConfig.from_record({"net": "mlp"}).compact is True  # an older record: a grid sees no change
    parser = build_parser()
    args = parser.parse_args(["train", "--no-compact"])
    assert args.compact is False
