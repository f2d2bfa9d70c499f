"""IVON as a posterior source (pyrozoo.guides.ivon): its dF is the exact evidence difference of a conjugate linear
regression, whose posterior IVON's state holds (and IVON's own training reaches); pruned entries stay pruned in
the net and in the optimiser's state; sampling is IVON's; a run resumes bit for bit; misuse is one-line errors.
"""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from configs import tiny_config
from torch import nn

from pyrozoo.bind import bind
from pyrozoo.bmr import Threshold
from pyrozoo.bmr.rebuild import rebuild
from pyrozoo.bmr.scores import delta_f
from pyrozoo.config import TrainConfig
from pyrozoo.errors import PyrozooError
from pyrozoo.guides import make_guide
from pyrozoo.guides.ivon import IVONPosterior
from pyrozoo.models import BayesianModel
from pyrozoo.models.priors import gaussian
from pyrozoo.train import Run

N, D, NOISE_VAR, PRIOR_SCALE = 40, 6, 0.5, 0.7


class _Regression(nn.Module):
    """``y = x w`` with one hidden "layer" that BMR may prune (a linear map to 1 output, no bias)."""

    def __init__(self):
        super().__init__()
        self.body = nn.Linear(D, 1, bias=False)
        self.head = nn.Linear(1, 1, bias=False)  # the output layer (never pruned), fixed at 1

    def forward(self, x):
        return self.head(self.body(x))


def _problem():
    """An orthogonal design (``X'X`` diagonal), so the exact posterior is the diagonal one IVON holds."""
    generator = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(N, D, generator=generator, dtype=torch.float64))
    x = q * torch.linspace(1.0, 6.0, D, dtype=torch.float64)  # columns of different strengths
    w = torch.tensor([2.0, 0.0, -1.0, 0.05, 0.0, 0.8], dtype=torch.float64)
    y = x @ w + math.sqrt(NOISE_VAR) * torch.randn(N, generator=generator, dtype=torch.float64)
    return x, y


def _log_evidence(x, y, columns) -> float:
    """``ln N(y; 0, s2 I + sigma^2 X_c X_c')``: the exact marginal likelihood keeping ``columns``."""
    xc = x[:, columns]
    cov = NOISE_VAR * torch.eye(N, dtype=x.dtype) + PRIOR_SCALE**2 * xc @ xc.T
    return float(torch.distributions.MultivariateNormal(torch.zeros(N, dtype=x.dtype), cov).log_prob(y))


def _model():
    net = _Regression().double()
    prior = lambda layer: gaussian(layer, hidden_scale=PRIOR_SCALE)  # noqa: E731
    return BayesianModel(net, prior=prior, output="head")


def _exact_dF(x, y):
    full = _log_evidence(x, y, list(range(D)))
    return torch.tensor(
        [_log_evidence(x, y, [k for k in range(D) if k != j]) - full for j in range(D)], dtype=torch.float64
    )


def test_dF_from_ivons_state_is_the_exact_evidence_difference():
    """IVON's state at the exact posterior: mean, ``h`` = the Hessian of the mean loss, ``ess = N`` and weight
    decay ``1 / (N sigma^2)`` (the prior). dF of removing each weight equals ln Z(without it) - ln Z(full)."""
    x, y = _problem()
    model = _model()
    guide = IVONPosterior(model, ess=N)
    guide.make_optimizer(lr=0.1, dataset_size=N)
    curvature = (x * x).sum(0) / NOISE_VAR  # X'X / s2, diagonal
    precision = curvature + 1 / PRIOR_SCALE**2
    mean = (x.T @ y / NOISE_VAR) / precision
    with torch.no_grad():
        guide.weights["body"].copy_(mean[None, :])
        guide.hess.body.copy_((curvature / N)[None, :])  # IVON's h: the Hessian of the *mean* loss
        guide.weights["head"].fill_(1.0)
    guide._push_state()
    group = guide.optimizer.param_groups[0]
    assert group["weight_decay"] == pytest.approx(1 / (N * PRIOR_SCALE**2))
    ivon_precision = group["ess"] * (group["hess"] + group["weight_decay"])  # what IVON samples with
    torch.testing.assert_close(ivon_precision, precision)
    scores = delta_f(model, guide)["body"][0]
    torch.testing.assert_close(scores, _exact_dF(x, y), rtol=1e-9, atol=1e-9)
    assert (scores > 0).any() and (scores < 0).any()  # some weights worth removing, some not: it can fail


def test_ivon_trained_on_the_regression_reaches_its_posterior_and_dF():
    """IVON's own steps on the regression's mean loss: its mean and Hessian reach the exact posterior's, and dF
    from its state approaches the exact evidence differences, with the same decision for every weight."""
    torch.manual_seed(0)
    x, y = _problem()
    model = _model()
    guide = IVONPosterior(model, ess=N, hess_init=0.1, beta2=0.999)
    optimizer = guide.make_optimizer(lr=0.05, dataset_size=N)
    for _ in range(2000):
        with optimizer.sampled_params(train=True):
            optimizer.zero_grad()
            guide.weights["head"].data.fill_(1.0)  # fixed: only the body is learnt
            loss = ((y - x @ guide.weights["body"][0]) ** 2).mean() / (2 * NOISE_VAR)
            loss.backward()
            guide.weights["head"].grad = torch.zeros_like(guide.weights["head"])
        optimizer.step()
    guide.pull_state()
    curvature = (x * x).sum(0) / NOISE_VAR
    precision = curvature + 1 / PRIOR_SCALE**2
    mean = (x.T @ y / NOISE_VAR) / precision
    error_in_sds = (guide.weights["body"][0].detach() - mean) * precision.sqrt()
    assert float(error_in_sds.abs().max()) < 0.2
    torch.testing.assert_close(guide.hess.body[0] * N, curvature, rtol=0.25, atol=0)
    scores, exact = delta_f(model, guide)["body"][0], _exact_dF(x, y)
    torch.testing.assert_close(scores, exact, rtol=0.2, atol=0.1)
    assert torch.equal(scores > 0, exact > 0)


def _tiny(**overrides) -> TrainConfig:
    changes = dict(
        method="ivon-bmr", epochs=3, steps_per_epoch=8, samples=3, eval_batch_size=500, warmup_steps=0
    )
    return tiny_config(**{**changes, "net_options": {"hidden": (24,)}, **overrides})


def test_pruned_entries_stay_pruned_in_the_net_and_in_the_optimiser(tmp_path):
    run = Run(_tiny(epochs=2), tmp_path / "run", log=print)
    run.train(progress=False)  # one BMR pass after epoch 1
    guide, optimizer = run.guide, run.optimizer
    layer = run.model.layers[0]
    pruned = ~run.model.mask(layer.name).bool()
    assert pruned.any() and (~pruned).any()
    group = optimizer.param_groups[0]
    for _ in range(5):  # more steps: nothing comes back
        run.setup.step.step(run.model, guide, optimizer, *run.setup.batch(run.setup.batches.next()))
    assert bool((guide.weights[layer.name.replace(".", "-")][pruned] == 0).all())
    assert bool((guide.hess.get_buffer(layer.name.replace(".", "-"))[pruned] == 0).all())
    assert bool((group["hess"].view(layer.shape)[pruned] == 0).all())
    assert bool((group["momentum"].view(layer.shape)[pruned] == 0).all())
    loc, scale = guide.posterior()[layer.site]
    assert bool((loc[pruned] == 0).all()) and bool((scale[pruned] == 1).all())  # the prior, exactly


def test_sampling_is_ivons_posterior(tmp_path):
    run = Run(_tiny(epochs=1), tmp_path / "run", log=print)
    run.train(progress=False)
    guide, optimizer = run.guide, run.optimizer
    for group, layer in zip(optimizer.param_groups, run.model.layers):
        key = layer.name.replace(".", "-")
        ivon_sd = (group["ess"] * (group["hess"] + group["weight_decay"])).rsqrt().view(layer.shape)
        _, scale = guide.posterior()[layer.site]
        prior_scale = float(getattr(guide, f"prior_scale_{key}").flatten()[0])
        torch.testing.assert_close(scale * prior_scale, ivon_sd)
    # a draw through the model (as evaluation makes them) has the spread of IVON's sampled_params
    torch.manual_seed(1)
    with torch.no_grad():
        draws = torch.stack([run.model.weights_from(guide())[run.model.layers[0].name] for _ in range(400)])
    group = optimizer.param_groups[0]
    expected = (
        (group["ess"] * (group["hess"] + group["weight_decay"])).rsqrt().view(run.model.layers[0].shape)
    )
    ratio = (draws.std(0) / expected).mean()
    assert float(ratio) == pytest.approx(1.0, abs=0.05)


@pytest.mark.parametrize("kernel", ["eager", "compiled"])  # compiled: the noise's seeds are torch's generator's
def test_a_resumed_run_continues_bit_for_bit(tmp_path, kernel):
    options = {"guide_options": {"kernel": kernel}}
    straight = Run(_tiny(**options), tmp_path / "straight", log=print)
    straight.train(progress=False)
    assert straight.optimizer.kernel == kernel
    first = Run(_tiny(epochs=2, **options), tmp_path / "split", log=print)
    first.train(progress=False)
    first.close()
    resumed = Run.open(tmp_path / "split", log=print, epochs=3)
    resumed.train(progress=False)
    assert resumed.optimizer.current_step == straight.optimizer.current_step == 24
    for a, b in zip(straight.guide.state_dict().values(), resumed.guide.state_dict().values()):
        assert torch.equal(a, b)
    for a, b in zip(straight.optimizer.param_groups, resumed.optimizer.param_groups):
        assert torch.equal(a["hess"], b["hess"]) and torch.equal(a["momentum"], b["momentum"])
    cols = ["elbo", "accuracy", "pruned_fraction"]
    assert straight.metrics()[cols].equals(resumed.metrics()[cols])


def test_init_from_starts_ivon_at_the_weights(tmp_path):
    source = Run(_tiny(method="flat-map", epochs=1), tmp_path / "map", log=print)
    source.train(progress=False)
    net = rebuild(source.model, source.guide, remove_dead=False)
    torch.save(net.state_dict(), tmp_path / "net.pt")
    run = Run(_tiny(init_from=str(tmp_path / "net.pt")), tmp_path / "ivon", log=print)
    x = run.data.x_test[:50]
    torch.testing.assert_close(rebuild(run.model, run.guide, remove_dead=False)(x), net(x))
    key = run.model.layers[0].name.replace(".", "-")
    assert float(run.guide.hess.get_buffer(key)[0, 0]) == pytest.approx(0.1, rel=1e-3)  # IVON's own hess_init


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(method="bmr-th", guide="ivon"), "trained only by ivon"),
        (dict(guide="meanfield"), "needs the guide 'ivon'"),
        (dict(optimizer="adam"), "needs the optimizer 'ivon'"),
        (dict(method="flat-ff", optimizer="ivon"), "trained only by ivon"),
    ],
)
def test_misuse_is_a_one_line_error(changes, message, tmp_path):
    with pytest.raises(PyrozooError, match=message):
        bind(_tiny(**changes))


def test_ivon_needs_a_fixed_prior(tiny_mlp_model):
    with pytest.raises(PyrozooError, match="fixed prior"):
        make_guide("ivon", tiny_mlp_model)
    with pytest.raises(PyrozooError, match="fixed prior"):
        Run(_tiny(prior="flat"), "/nonexistent/never-made", log=print)


def test_threshold_pass_on_ivon_prunes_by_dF(tmp_path):
    run = Run(_tiny(epochs=1), tmp_path / "run", log=print)
    run.train(progress=False)
    scores = delta_f(run.model, run.guide)
    report = Threshold()(run.model, run.guide)
    for layer in run.model.layers:
        if layer.prunable:
            assert torch.equal(run.model.mask(layer.name).bool(), scores[layer.name] <= 0)
    assert 0 < report.pruned_fraction < 1


IVON_CASES = [
    {},  # pyrozoo's use: one parameter per group, one draw per step
    {"mc_samples": 3, "clip_radius": 0.05},
    {"joined": True, "rescale_lr": False, "beta2": 0.9},  # a group of several parameters
    {"rescale_lr": False, "beta2": 0.9, "debias": False},  # the Hessian's second-order term counts
    {"resized": True},  # compaction cuts a unit after 3 steps: the kept scratch buffers follow the new size
]


@pytest.mark.parametrize(
    "options, kernel",
    [(case, "eager") for case in IVON_CASES]
    + [(case, "compiled") for case in IVON_CASES if "joined" not in case],  # compiled: one parameter a group
)
def test_the_in_place_ivon_step_is_ivon_opts(options, kernel, monkeypatch):
    """pyrozoo's IVON (its three per-step methods rewritten in place, or compiled) against ivon-opt's own, from
    the same random draws: the same weights, Hessian and momentum after every step, to float rounding. Compiled,
    the noise is another generator's: ivon-opt's ``randn`` hands it the noise of pyrozoo's draws, in order."""
    from ivon import IVON

    from pyrozoo.optim import IVONOptimizer

    options = dict(options)
    joined, resized = options.pop("joined", False), options.pop("resized", False)
    torch.manual_seed(0)
    nets = [nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))]
    nets.append(copy.deepcopy(nets[0]))
    x, y = torch.randn(32, 5), torch.randint(0, 3, (32,))

    def groups(net):
        if joined:
            return [{"params": list(net.parameters()), "weight_decay": 1e-3}]
        return [{"params": [p], "weight_decay": 1e-3 * (i + 1)} for i, p in enumerate(net.parameters())]

    settings = dict(lr=0.1, ess=100.0, hess_init=0.3, **options)
    optimizers = [IVON(groups(nets[0]), **settings), IVONOptimizer(groups(nets[1]), kernel=kernel, **settings)]
    assert optimizers[1].kernel == kernel
    if kernel == "compiled":
        noise = _recorded_draws(optimizers[1])
        monkeypatch.setattr(torch, "randn", lambda *args, **kwargs: noise.pop(0))
    for step in range(6):
        if resized and step == 3:  # the first layer's last unit cut, as IVONPosterior.resize cuts it
            cuts = [(slice(0, 6),), (slice(0, 6),), (slice(None), slice(0, 6)), (slice(None),)]
            for optimizer in optimizers:
                for group, cut in zip(optimizer.param_groups, cuts):
                    p = group["params"][0]
                    for key in ("hess", "momentum"):
                        group[key] = group[key].view(p.shape)[cut].flatten().clone()
                    p.data = p.data[cut].clone()
                    group["numel"] = p.numel()
                optimizer._numel = sum(g["numel"] for g in optimizer.param_groups)
        for net, optimizer in reversed(list(zip(nets, optimizers))):  # ours first: ivon-opt's noise is its
            torch.manual_seed(step)
            for _ in range(optimizer.mc_samples):
                with optimizer.sampled_params(train=True):
                    optimizer.zero_grad()
                    nn.functional.cross_entropy(net(x), y).backward()
            optimizer.step()
        for theirs, ours in zip(nets[0].parameters(), nets[1].parameters()):
            torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
        for theirs, ours in zip(optimizers[0].param_groups, optimizers[1].param_groups):
            for key in ("hess", "momentum"):
                torch.testing.assert_close(ours[key], theirs[key], rtol=1e-5, atol=1e-6)
        assert optimizers[1].current_step == optimizers[0].current_step
    if kernel == "compiled":
        assert not noise  # ivon-opt drew exactly the noise pyrozoo's draws made


def _recorded_draws(optimizer) -> list:
    """The list that collects a copy of each standard normal noise ``optimizer`` draws (in draw order, group by
    group), which ivon-opt's noise, ``randn(numel) / sqrt(ess (hess + wd))``, is when handed it."""
    noise, sample = [], optimizer._sample_params

    def recording():
        means, draws = sample()
        noise.extend(z.clone() for z in draws)
        return means, draws

    optimizer._sample_params = recording
    return noise


def test_a_draw_leaves_the_means_in_their_own_storage_bit_for_bit():
    """The draw writes the sampled weights into a buffer of its own and swaps it in: the means come back as the
    same tensors with the same bits (no in-place perturbation undone by a subtraction, which would round)."""
    from pyrozoo.optim import IVONOptimizer

    torch.manual_seed(0)
    net = nn.Linear(5, 3)
    optimizer = IVONOptimizer([{"params": [p]} for p in net.parameters()], lr=0.1, ess=10.0, hess_init=0.01)
    before = [(p.data_ptr(), p.data.clone()) for p in net.parameters()]
    for _ in range(2):
        with optimizer.sampled_params(train=False):
            assert all(not torch.equal(p.data, mean) for p, (_, mean) in zip(net.parameters(), before))
    for p, (storage, mean) in zip(net.parameters(), before):
        assert p.data_ptr() == storage and torch.equal(p.data, mean)


def test_a_draw_reads_the_hessian_as_it_is_now():
    """The noise's scale the update leaves for the next draw is not used once the Hessian was written in place
    since (as a BMR pass or a load writes it): the draw is ``mean + randn / sqrt(ess (hess + wd))`` of the
    Hessian of the moment."""
    from pyrozoo.optim import IVONOptimizer

    torch.manual_seed(0)
    net = nn.Linear(5, 3)
    x, y = torch.randn(8, 5), torch.randint(0, 3, (8,))
    optimizer = IVONOptimizer([{"params": [net.weight]}], lr=0.1, ess=10.0, hess_init=0.01, weight_decay=0.1)
    with optimizer.sampled_params(train=True):
        optimizer.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
    optimizer.step()
    group = optimizer.param_groups[0]
    for change in (lambda hess: None, lambda hess: hess.mul_(4.0)):
        change(group["hess"])
        torch.manual_seed(1)
        with optimizer.sampled_params(train=False):
            drawn = net.weight.detach().clone()
        torch.manual_seed(1)
        noise = torch.randn(group["numel"]) / (10.0 * (group["hess"] + 0.1)).sqrt()
        torch.testing.assert_close(drawn, net.weight.detach() + noise.view(3, 5))


@pytest.mark.parametrize("beta2, warns", [(0.999, True), (0.5, False)])
def test_a_bmr_pass_on_a_hessian_still_near_its_start_is_warned_of(tmp_path, beta2, warns):
    """After 8 warm-up steps IVON's Hessian is 99% hess_init with beta2 0.999 (a posterior near the prior, which
    BMR would prune almost whole), 0.4% with beta2 0.5."""
    logs = []
    run = Run(_tiny(epochs=2, warmup_steps=8, guide_options={"beta2": beta2}), tmp_path, log=logs.append)
    run.train(progress=False)
    said = [line for line in logs if "IVON's Hessian is still" in line]
    assert bool(said) == warns, logs
    if warns:
        assert "99%" in said[0] and "--warmup-steps" in said[0]


def _ivon_twins():
    """A tiny MLP (biases, a pruned entry in its first layer) with pyrozoo's IVON compiled, and its twin with
    ivon-opt's own optimiser over the same groups and settings."""
    from ivon import IVON

    from pyrozoo.nets import create_net

    torch.manual_seed(0)
    net = create_net("mlp", in_channels=1, image_size=4, num_classes=3, hidden=(5, 4))
    models = [BayesianModel(net, prior=gaussian), BayesianModel(copy.deepcopy(net), prior=gaussian)]
    for model in models:
        keep = torch.ones(model.layers[0].shape)
        keep[1, 2] = keep[3, -1] = 0  # a weight and a bias
        model.set_mask(model.layers[0].name, keep)
    guides = [make_guide("ivon", model, options={"kernel": kernel}) for model, kernel in zip(models, KERNELS)]
    ours = guides[0].make_optimizer(lr=0.1, dataset_size=50)
    mine = guides[1].make_optimizer(lr=0.1, dataset_size=50)
    settings = {key: mine.param_groups[0][key] for key in ("lr", "ess", "hess_init", "beta1", "beta2")}
    groups = [{"params": g["params"], "weight_decay": g["weight_decay"]} for g in mine.param_groups]
    theirs = guides[1].optimizer = IVON(groups, **settings)
    return models, guides, (ours, theirs)


KERNELS = ("compiled", "eager")


def test_the_compiled_ivon_step_is_ivon_opts(monkeypatch):
    """pyrozoo's IVON step with ``kernel="compiled"`` (each layer's weight and bias drawn apart, the update on
    strided views of the state, the masks applied to the parts) against ivon-opt's through the eager path,
    which is handed the same noise: the same losses, weights, Hessian and momentum after every step."""
    from pyrozoo.guides.ivon import ivon_step

    models, guides, (ours, theirs) = _ivon_twins()
    assert ours.kernel == "compiled"
    noise, draw_apart = [], ours.draw_apart

    def recording(columns):  # each group's noise in its latent's order, as ivon-opt draws it
        parts = draw_apart(columns)
        for _, drawn in ours._apart:
            whole = torch.cat([drawn[0], drawn[1][:, None]], dim=1) if len(drawn) == 2 else drawn[0]
            noise.append(whole.flatten().clone())
        return parts

    ours.draw_apart = recording
    monkeypatch.setattr(torch, "randn", lambda *args, **kwargs: noise.pop(0))
    x, y = torch.rand(16, 1, 4, 4), torch.randint(0, 3, (16,))
    for _ in range(4):
        losses = [ivon_step(model, guide, opt, x, y, 50) for model, guide, opt in zip(models, guides, (ours, theirs))]
        assert not noise and losses[0] == pytest.approx(losses[1], rel=1e-5)
        for key in guides[0].weights:
            torch.testing.assert_close(guides[0].weights[key], guides[1].weights[key], rtol=1e-5, atol=1e-6)
        for group, their in zip(ours.param_groups, theirs.param_groups):
            for key in ("hess", "momentum"):
                torch.testing.assert_close(group[key], their[key], rtol=1e-5, atol=1e-6)


def test_the_compiled_noise_is_standard_normal_and_follows_torchs_seed():
    """The counter-based noise: standard normal (moments, Kolmogorov-Smirnov distance), uncorrelated between
    neighbours and between seeds; the seeds come from torch's generator, so ``manual_seed`` repeats a draw."""
    from pyrozoo.ivon_kernels import draw_seed, standard_normal

    n = 200_000
    torch.manual_seed(0)
    seeds = [draw_seed() for _ in range(2)]
    z, other = (standard_normal(seed, n).double() for seed in seeds)
    tolerance = 5 / math.sqrt(n)  # five standard errors
    assert abs(float(z.mean())) < tolerance and abs(float(z.var()) - 1) < tolerance * math.sqrt(2)
    assert abs(float((z[1:] * z[:-1]).mean())) < tolerance and abs(float((z * other).mean())) < tolerance
    cdf = 0.5 * (1 + torch.erf(z.sort().values / math.sqrt(2)))
    grid = torch.arange(1, n + 1, dtype=torch.float64) / n
    assert float((cdf - grid).abs().max()) < 1.95 / math.sqrt(n)  # KS at the 0.1% level
    torch.manual_seed(0)
    assert torch.equal(draw_seed(), seeds[0])


def test_without_a_compiler_the_compiled_kernel_falls_back_to_the_eager_step(monkeypatch):
    """Where ``torch.compile`` fails, ``kernel="compiled"`` warns once and takes the eager step: ivon-opt's
    noise, the same numbers bit for bit as ``kernel="eager"``."""
    from pyrozoo import ivon_kernels
    from pyrozoo.optim import IVONOptimizer

    def no_compiler(*args, **kwargs):
        raise RuntimeError("no C++ compiler found")

    monkeypatch.setattr(ivon_kernels, "_KERNELS", {})
    monkeypatch.setattr(ivon_kernels.torch, "compile", no_compiler)
    nets = [nn.Linear(5, 3), nn.Linear(5, 3)]
    nets[1].load_state_dict(nets[0].state_dict())
    x, y = torch.randn(8, 5), torch.randint(0, 3, (8,))
    optimizers = []
    for net, kernel in zip(nets, KERNELS):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            groups = [{"params": [p]} for p in net.parameters()]
            optimizers.append(IVONOptimizer(groups, lr=0.1, ess=10.0, hess_init=0.1, kernel=kernel))
        said = ["RuntimeError: no C++ compiler found" in str(w.message) for w in caught]
        assert said == ([True] if kernel == "compiled" else [])
    assert [o.kernel for o in optimizers] == ["eager", "eager"]
    for net, optimizer in zip(nets, optimizers):
        torch.manual_seed(3)
        with optimizer.sampled_params(train=True):
            optimizer.zero_grad()
            nn.functional.cross_entropy(net(x), y).backward()
        optimizer.step()
    assert all(torch.equal(a, b) for a, b in zip(nets[0].parameters(), nets[1].parameters()))


def test_an_unknown_kernel_is_a_one_line_error(tiny_mlp_model):
    with pytest.raises(PyrozooError, match="kernel must be one of eager, compiled, got 'fast'"):
        make_guide("ivon", BayesianModel(tiny_mlp_model.net, prior=gaussian), options={"kernel": "fast"})


def test_train_says_it_compiles_ivons_kernels_before_the_first_step(capsys, tmp_path, monkeypatch):
    """The first compiled step waits on ``torch.compile`` (tens of seconds): the command says so before it starts
    (here the compiler is mocked away, so the run falls back to the eager step and stays fast)."""
    from clitools import cli

    from pyrozoo import ivon_kernels

    def no_compiler(*args, **kwargs):
        raise RuntimeError("no C++ compiler found")

    monkeypatch.setattr(ivon_kernels, "_KERNELS", {})
    monkeypatch.setattr(ivon_kernels.torch, "compile", no_compiler)
    tiny = ["train", "--data", "fashion-mnist-mini", "--net", "mlp", "--net-option", "hidden=(8,)", "--method", "ivon",
            "--epochs", "1", "--steps-per-epoch", "2", "--batch-size", "16", "--samples", "1", "--no-progress"]  # fmt: skip
    for kernel, said in (("compiled", True), ("eager", False)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            code, _, err = cli(capsys, *tiny, "--guide-option", f"kernel={kernel}", "--out", str(tmp_path / kernel))
        assert code == 0, err
        assert ("compiling IVON's kernels on the first step" in err) == said
