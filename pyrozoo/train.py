"""The SVI loop: epochs of minibatch steps, evaluation, and a run folder that a killed run resumes from."""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import pyro
import torch
from pyro import poutine
from tqdm.auto import tqdm

from pyrozoo import data as datasets
from pyrozoo.bmr import reduce
from pyrozoo.bmr.prune import posterior_scales, pruned_fraction, scale_table
from pyrozoo.elbo import negative_elbo
from pyrozoo.errors import PyrozooError, TrainingDiverged
from pyrozoo.guides import make_guide
from pyrozoo.methods import get_method
from pyrozoo.metrics import PredictionAccumulator
from pyrozoo.models import BayesianModel
from pyrozoo.nets import create_net, get_net_entry
from pyrozoo.optim import get_optimizer

CONFIG, METRICS, CHECKPOINT, PRUNED, SCALES = (
    "config.json",
    "metrics.csv",
    "checkpoint.pt",
    "pruned.pt",
    "scales.csv",
)


@dataclass
class TrainConfig:
    """Everything that defines a run; ``None`` means the method's or dataset's default."""

    net: str = "lenet"
    data: str | None = None  # None: full Fashion-MNIST if it can be had, else the bundled subset
    data_dir: str | None = None
    method: str = "flat-ff"
    guide: str | None = None
    epochs: int = 50
    steps_per_epoch: int = 500
    batch_size: int = 120
    lr: float | None = None
    optimizer: str | None = None  # a key of pyrozoo.optim.OPTIMIZERS
    samples: int | None = None
    eval_every: int = 1
    eval_batch_size: int = 2000
    warmup_steps: int | None = None  # SVI steps before the first BMR pass (BMR methods)
    device: str = "cpu"
    seed: int = 0
    net_options: dict = field(default_factory=dict)
    prior_options: dict = field(default_factory=dict)  # keyword arguments of the method's prior, e.g. tau0
    rule_options: dict = field(default_factory=dict)  # keyword arguments of the BMR rule, e.g. count_pruned

    def resolved(self) -> "TrainConfig":
        """A copy with the method's defaults filled in, after checking names and sizes."""
        method = get_method(self.method)
        get_net_entry(self.net)
        if self.data is not None and self.data not in datasets.DATASETS:
            raise PyrozooError(
                f"unknown dataset {self.data!r}; known datasets: {', '.join(datasets.DATASETS)}"
            )
        for name in ("epochs", "steps_per_epoch", "batch_size", "eval_every", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise PyrozooError(f"{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.samples is not None and self.samples < 1:
            raise PyrozooError(f"samples must be positive, got {self.samples}")
        if self.optimizer is not None:
            get_optimizer(self.optimizer)
        if self.lr is not None and not self.lr > 0:
            raise PyrozooError(f"lr must be positive, got {self.lr}")
        if not 0 <= self.seed < 2**32:  # pyro.set_rng_seed seeds numpy too, which takes only this range
            raise PyrozooError(f"seed must be in 0..{2**32 - 1}, got {self.seed}")
        try:
            torch.device(self.device)
        except RuntimeError:
            raise PyrozooError(f"unknown device {self.device!r}; use cpu, cuda or cuda:N") from None
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise PyrozooError("--device cuda was asked for, but torch sees no CUDA device")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise PyrozooError(f"warmup-steps must not be negative, got {self.warmup_steps}")
        return dataclasses.replace(
            self,
            guide=self.guide or method.guide,
            lr=self.lr or method.lr,
            optimizer=self.optimizer or method.optimizer,
            samples=self.samples or method.samples,
            warmup_steps=method.warmup_steps if self.warmup_steps is None else self.warmup_steps,
        )


def svi_step(model, guide, optimizer: torch.optim.Optimizer, x, y, dataset_size: int) -> float:
    """One stochastic-gradient step on ``-ELBO``; returns the loss."""
    loss = negative_elbo(model, guide, x, y, dataset_size)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.item()


class Minibatches:
    """Random minibatches: the data are shuffled, consumed in order, and shuffled again when used up."""

    def __init__(self, size: int, batch_size: int, seed: int):
        self.size, self.batch_size = size, min(batch_size, size)
        self.generator = torch.Generator().manual_seed(seed)
        self.order, self.position = torch.randperm(size, generator=self.generator), 0

    def next(self) -> torch.Tensor:
        if self.position + self.batch_size > self.size:
            self.order, self.position = torch.randperm(self.size, generator=self.generator), 0
        indices = self.order[self.position : self.position + self.batch_size]
        self.position += self.batch_size
        return indices

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "order": self.order, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.order, self.position = state["order"], state["position"]


@torch.no_grad()
def evaluate(
    model: BayesianModel,
    guide,
    x: torch.Tensor,
    y: torch.Tensor,
    num_classes: int,
    samples: int,
    batch_size: int = 2000,
) -> dict[str, float]:
    """Predictive metrics of ``samples`` posterior draws from ``guide`` on ``(x, y)``."""
    accumulator = PredictionAccumulator(y, samples, num_classes)
    training = model.training
    model.eval()  # no dropout at test time
    with poutine.block():
        for s in range(samples):
            weights = model.weights_from(guide())
            for start in range(0, len(x), batch_size):
                logits = model.logits(x[start : start + batch_size], weights)
                accumulator.add(s, start, model.likelihood.log_probs(logits))
    model.train(training)
    return accumulator.result()


def _atomic(path: Path, write) -> None:
    """Write via a temporary file and a rename, so a kill never leaves a half-written file."""
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def _open_run_folder(out: Path, resume: bool) -> None:
    if (out / CHECKPOINT).exists() and not resume:
        raise PyrozooError(
            f"{out} already holds a run; pass --resume to continue it, or choose another --out"
        )
    if resume and not (out / CHECKPOINT).exists():
        raise PyrozooError(f"nothing to resume in {out}: it has no {CHECKPOINT}")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise PyrozooError(f"cannot write to the run folder {out}: {e.strerror or e}") from None


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Run:
    """A training run living in folder ``out``: built from a config, or reloaded from the folder's files."""

    def __init__(self, config: TrainConfig, out: str | os.PathLike, *, resume: bool = False, log=print):
        self.out = Path(out)
        _open_run_folder(self.out, resume)
        self.config = config = config.resolved()
        pyro.set_rng_seed(config.seed)

        if config.data is None:
            raw, warning = datasets.load_default(config.data_dir)
            if warning:
                log(warning)
            self.config = config = dataclasses.replace(config, data=raw.name)
        else:
            raw = datasets.load(config.data, config.data_dir)
        self.data = datasets.prepare(raw, pad_to=get_net_entry(config.net).pad_to, device=config.device)
        d = self.data
        self.method = get_method(config.method)
        net = create_net(
            config.net,
            in_channels=d.x_train.shape[1],
            image_size=d.x_train.shape[-1],
            num_classes=d.num_classes,
            **{**self.method.net_options, **config.net_options},
        )
        prior = (
            functools.partial(self.method.prior, **config.prior_options)
            if config.prior_options
            else self.method.prior
        )
        self.model = BayesianModel(net.to(config.device), prior=prior)
        self.guide = make_guide(config.guide, self.model, *self._batch(torch.arange(min(2, len(d.x_train)))))
        self.guide.to(config.device)
        self.optimizer = get_optimizer(config.optimizer)(self.guide.parameters(), lr=config.lr)
        self.batches = Minibatches(len(d.x_train), config.batch_size, config.seed)
        self.epoch, self.step, self.seconds = 0, 0, 0.0
        self.history: list[dict] = []
        if resume:
            self._load_checkpoint()
        else:
            _atomic(self.out / CONFIG, lambda p: p.write_text(json.dumps(self._config_record(raw), indent=2)))

    @classmethod
    def open(cls, out: str | os.PathLike, epochs: int | None = None, log=print) -> "Run":
        """Reopen the run in folder ``out`` at its last finished epoch (to resume it, with more ``epochs``)."""
        path = Path(out) / CONFIG
        if not path.exists():
            raise PyrozooError(f"{out} holds no run: it has no {CONFIG}")
        config = TrainConfig(**json.loads(path.read_text())["config"])
        if epochs is not None:
            config = dataclasses.replace(config, epochs=epochs)
        return cls(config, out, resume=True, log=log)

    def _batch(self, indices: torch.Tensor):
        indices = indices.to(self.data.x_train.device)
        return self.data.x_train[indices], self.data.y_train[indices], len(self.data.x_train)

    def _config_record(self, raw) -> dict:
        return {
            "config": dataclasses.asdict(self.config),
            "data_source": raw.source,
            "versions": {"torch": torch.__version__, "pyro": pyro.__version__},
        }

    def _save_checkpoint(self) -> None:
        state = {
            "epoch": self.epoch,
            "step": self.step,
            "seconds": self.seconds,
            "guide": self.guide.state_dict(),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "batches": self.batches.state_dict(),
            "rng": _rng_state(),
        }
        _atomic(self.out / CHECKPOINT, lambda p: torch.save(state, p))

    def _load_checkpoint(self) -> None:
        # on the CPU: the random states must stay there; load_state_dict moves the rest to the model's device
        state = torch.load(self.out / CHECKPOINT, map_location="cpu", weights_only=False)
        self.guide.load_state_dict(state["guide"])
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.batches.load_state_dict(state["batches"])
        _set_rng_state(state["rng"])
        self.epoch, self.step, self.seconds = state["epoch"], state["step"], state["seconds"]
        if (self.out / METRICS).exists():  # rows past the checkpoint belong to an epoch that will be redone
            self.history = [
                r for r in pd.read_csv(self.out / METRICS).to_dict("records") if r["epoch"] <= self.epoch
            ]

    def save_pruned(self, report, metrics: dict) -> None:
        """Keep a post-hoc pruned state beside the run's own checkpoint (which stays as trained)."""
        state = {
            "epoch": self.epoch,
            "guide": self.guide.state_dict(),
            "model": self.model.state_dict(),
            "report": report.table().to_dict("records"),
            "metrics": metrics,
        }
        _atomic(self.out / PRUNED, lambda p: torch.save(state, p))

    def load_pruned(self) -> dict:
        """Load the post-hoc pruned state written by :meth:`save_pruned`; returns its metrics."""
        state = torch.load(self.out / PRUNED, map_location="cpu", weights_only=False)
        self.guide.load_state_dict(state["guide"])
        self.model.load_state_dict(state["model"])
        return state["metrics"]

    def evaluate(self) -> dict[str, float]:
        """Test metrics now. Posterior draws come from a random stream of their own (seeded by the run's seed
        and epoch), so how often a run evaluates never changes how it trains."""
        d = self.data
        devices = [d.x_test.device] if d.x_test.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.config.seed * 100_003 + self.epoch)
            return evaluate(
                self.model,
                self.guide,
                d.x_test,
                d.y_test,
                d.num_classes,
                self.config.samples,
                self.config.eval_batch_size,
            )

    def train(self, progress: bool = True) -> pd.DataFrame:
        """Train the remaining epochs, writing metrics and a checkpoint after each; returns the metrics table."""
        c = self.config
        bar = tqdm(
            total=c.epochs * c.steps_per_epoch,
            initial=self.epoch * c.steps_per_epoch,
            unit="step",
            desc=f"{c.net} {c.method}",
            disable=not progress,
            dynamic_ncols=True,
            mininterval=0.5,
        )
        with bar, pyro.validation_enabled(False):
            while self.epoch < c.epochs:
                start, losses = time.perf_counter(), []
                for _ in range(c.steps_per_epoch):
                    loss = svi_step(self.model, self.guide, self.optimizer, *self._batch(self.batches.next()))
                    if not math.isfinite(loss):
                        raise TrainingDiverged(
                            f"the loss became {loss} at epoch {self.epoch + 1}, step {self.step + 1}; {self.out} "
                            f"keeps the state after epoch {self.epoch} (try a smaller --lr)"
                        )
                    losses.append(loss)
                    self.step += 1
                    bar.update()
                    if self.step % 50 == 0:
                        bar.set_postfix(loss=f"{loss:.4g}", refresh=False)
                self.seconds += time.perf_counter() - start
                self.epoch += 1
                row = {
                    "epoch": self.epoch,
                    "step": self.step,
                    "seconds": round(self.seconds, 3),
                    "elbo": -sum(losses) / len(losses),
                    "bmr_seconds": float("nan"),
                    "pruned_fraction": float("nan"),
                }
                if self.method.rule and self.epoch < c.epochs and self.step >= c.warmup_steps:
                    report = reduce(self.model, self.guide, self.method.rule, **c.rule_options)
                    for note in filter(None, (r.note for r in report.layers)):
                        tqdm.write(f"epoch {self.epoch}: {note}")
                    row["bmr_seconds"] = round(report.seconds, 4)
                    row["pruned_fraction"] = report.pruned_fraction  # the report has just computed it
                else:
                    row["pruned_fraction"] = pruned_fraction(self.model)
                if self.epoch % c.eval_every == 0 or self.epoch == c.epochs:
                    start = time.perf_counter()
                    row.update(self.evaluate())
                    row["eval_seconds"] = round(time.perf_counter() - start, 3)
                    bar.set_postfix(loss=f"{losses[-1]:.4g}", acc=f"{row['accuracy']:.4f}")
                self.history.append(row)
                _atomic(self.out / METRICS, lambda p: self.metrics().to_csv(p, index=False))
                self._save_checkpoint()
        if c.guide != "autodelta":  # the per-layer posterior scales (shrinkage, for a hierarchical prior)
            table = scale_table(posterior_scales(self.model, self.guide))
            _atomic(self.out / SCALES, lambda p: table.to_csv(p, index=False))
        return self.metrics()

    def metrics(self) -> pd.DataFrame:
        return pd.DataFrame(self.history)
