"""The builder: a run's config made into the objects that train, :func:`build` ``(config) -> Setup``.

:func:`pyrozoo.bind.bind` binds every option once; the builder loads the data and makes the model, the guide
and the optimiser from what it bound, so that nothing reads an option a second time.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import pyro
import torch

from pyrozoo import data as datasets
from pyrozoo import distributed
from pyrozoo.bind import Bound, bind
from pyrozoo.config import TrainConfig
from pyrozoo.errors import PyrozooError
from pyrozoo.guides import make_guide
from pyrozoo.init_from import load_state, start_from_net, start_from_weights
from pyrozoo.models import BayesianModel
from pyrozoo.models.likelihoods import Categorical, Gaussian
from pyrozoo.nets import NETS, create_net, model_options, net_options
from pyrozoo.posteriors.laplace import start_curvature
from pyrozoo.steps import TrainingStep


@dataclass
class Setup:
    """What a run trains and with what: the bound components, the data, the model, its guide (the posterior),
    the optimiser, the training step and the minibatch order, in a (possibly data-parallel) ``world``."""

    bound: Bound
    data: datasets.Prepared
    model: BayesianModel
    guide: object
    optimizer: torch.optim.Optimizer
    step: TrainingStep
    batches: datasets.Minibatches
    world: distributed.World

    @property
    def config(self) -> TrainConfig:
        return self.bound.config

    def batch(self, indices: torch.Tensor):
        """The training points at ``indices``, with the training set's size (the step's arguments)."""
        d = self.data
        indices = indices.to(d.x_train.device)
        return d.x_train[indices], d.y_train[indices], len(d.x_train)


def build(
    config: TrainConfig | Bound, world: distributed.World | None = None, log=print, fresh: bool = True
) -> Setup:
    """The run ``config`` describes, ready to train. ``fresh``: a new run, whose start (``--init-from``,
    ``--start``) is set here; a resumed one (False) takes its state from its checkpoint instead."""
    bound = config if isinstance(config, Bound) else bind(config)
    world = world or distributed.World()
    config = bound.config
    pyro.set_rng_seed(config.seed)
    data, config = _data(config, world, log)
    if fresh and config.batch_size > len(data.x_train):  # a resumed run keeps what it was started with
        raise PyrozooError(
            f"--batch-size {config.batch_size} is larger than the training set of {config.data} "
            f"({len(data.x_train)} images): use at most {len(data.x_train)}"
        )
    world.check_batch(config.batch_size)
    bound = dataclasses.replace(bound, config=config)
    model = _model(bound, data, log)
    x, y, size = data.x_train[:2], data.y_train[:2], len(data.x_train)
    guide = make_guide(config.guide, model, x, y, size, options=bound.guide_options)
    guide.to(data.x_train.device)
    model.to(data.x_train.device)
    if fresh:
        _start(bound, model, guide, data)
    if world.parallel and not bound.step.parallel:
        raise PyrozooError(
            f"{config.method} trains by {bound.method.step}, which runs in one process only: "
            "start it without torchrun"
        )
    optimizer = bound.step.optimizer(model, guide, config.lr, config.optimizer, size, config.lr_units)
    batches = datasets.Minibatches(size, config.batch_size, config.seed)
    return Setup(bound, data, model, guide, optimizer, bound.step, batches, world)


def _data(config: TrainConfig, world: distributed.World, log) -> tuple[datasets.Prepared, TrainConfig]:
    """The run's data, prepared on its device; and the config, naming the data set the default chose."""
    if config.data is None:
        raw, warning = datasets.load_default(config.data_dir)
        if warning:
            log(warning)
        config = dataclasses.replace(config, data=raw.name)
    else:
        raw = datasets.load(config.data, config.data_dir, target=config.target, task=config.task)
    device = world.device(config.device)  # with several GPU processes, one GPU each
    return datasets.prepare(raw, pad_to=NETS[config.net].pad_to, device=device), config  # moved there once


def _model(bound: Bound, d: datasets.Prepared, log) -> BayesianModel:
    """The Bayesian model of the run's net on data ``d``."""
    config, method = bound.config, bound.method
    # a method's default net options (flat-map's dropout) reach the nets that take them; a user's reach any
    taken = set(net_options(config.net))
    skipped = sorted(set(method.net_options) - taken - set(config.net_options))
    if skipped:
        log(f"{config.net} takes no {', '.join(skipped)}: {config.method} runs without it")
    options = {**{k: v for k, v in method.net_options.items() if k in taken}, **config.net_options}
    shape = dict(in_channels=d.x_train.shape[1], image_size=d.x_train.shape[-1], num_classes=d.num_classes)
    net = create_net(config.net, **shape, **options)
    likelihood = Gaussian(config.noise, config.noise_precision) if d.task == "regress" else Categorical()
    return BayesianModel(
        net.to(d.x_train.device),
        prior=bound.prior,
        example_input=d.x_train[:2],
        likelihood=likelihood,
        **model_options(options)[1],  # deterministic / random selectors
    )


def _start(bound: Bound, model: BayesianModel, guide, data: datasets.Prepared) -> None:
    """Where a new run's posterior starts: a trained net's weights (``--init-from``), the net's own
    initialisation (``--start net``), or the guide's own random start."""
    config = bound.config
    if config.init_from is not None:
        start_from_weights(
            model,
            guide,
            load_state(config.init_from, trust_pickle=config.trust_pickle),
            # the user's --guide-option init_scale=S, else the step's start ("laplace": from the data)
            init_scale=bound.guide_options.get("init_scale", bound.step.init_scale),
            what=f"--init-from {config.init_from}",
            curvature=lambda net: start_curvature(model, guide, net, data.x_train),
        )
    elif config.start == "net":
        start_from_net(model, guide)
