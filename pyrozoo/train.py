"""The SVI loop: epochs of minibatch steps, evaluation, and a run folder that a killed run resumes from."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from pathlib import Path

import pandas as pd
import pyro
import torch
from pyro import poutine
from tqdm.auto import tqdm

from pyrozoo import data as datasets
from pyrozoo.bmr.scores import posterior_scales, scale_table
from pyrozoo.bmr.units import pruned_fraction
from pyrozoo.config import RESUMABLE, TABLES, TrainConfig
from pyrozoo.elbo import negative_elbo
from pyrozoo.errors import PyrozooError, TrainingDiverged
from pyrozoo.guides import make_guide
from pyrozoo.io import FolderLock, atomic_write, hold_folder
from pyrozoo.methods import METHODS
from pyrozoo.metrics import evaluate_draws
from pyrozoo.models import BayesianModel
from pyrozoo.nets import NETS, create_net
from pyrozoo.optim import OPTIMIZERS

CONFIG, METRICS, CHECKPOINT, PRUNED, SCALES, BMR_LOG = (
    "config.json",
    "metrics.csv",
    "checkpoint.pt",
    "pruned.pt",
    "scales.csv",
    "bmr.csv",
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

    def draws():
        for _ in range(samples):
            weights = model.weights_from(guide())
            yield lambda xb: model.likelihood.log_probs(model.logits(xb, weights))

    training = model.training
    model.eval()  # no dropout at test time
    with poutine.block():
        metrics = evaluate_draws(draws(), x, y, num_classes, samples, batch_size)
    model.train(training)
    return metrics


def _open_run_folder(out: Path, resume: bool) -> None:
    if (out / CHECKPOINT).exists() and not resume:
        raise PyrozooError(
            f"{out} already holds a run; pass --resume to continue it, or choose another --out"
        )


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
        self.log = log
        if resume and not (self.out / CHECKPOINT).exists():  # checked before the lock, which makes the folder
            raise PyrozooError(f"nothing to resume in {out}: it has no {CHECKPOINT}")
        config = config.resolved()  # a mistake in the config leaves no folder behind
        # One writer per run folder, held while this object lives (released at exit, or by close()).
        self._lock = FolderLock(self.out).acquire()
        try:
            _open_run_folder(self.out, resume)
            self._build(config, resume)
        except BaseException:
            self._lock.release()
            raise

    def close(self) -> None:
        """Give up the run folder's lock (another process may then write to it)."""
        self._lock.release()

    def __enter__(self) -> "Run":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _build(self, config: TrainConfig, resume: bool) -> None:
        log = self.log
        self.config = config
        pyro.set_rng_seed(config.seed)

        if config.data is None:
            raw, warning = datasets.load_default(config.data_dir)
            if warning:
                log(warning)
            self.config = config = dataclasses.replace(config, data=raw.name)
        else:
            raw = datasets.load(config.data, config.data_dir)
        self.data = datasets.prepare(raw, pad_to=NETS[config.net].pad_to, device=config.device)
        d = self.data
        self.method = METHODS[config.method]
        self.reduction = config.reduction()
        net = create_net(
            config.net,
            in_channels=d.x_train.shape[1],
            image_size=d.x_train.shape[-1],
            num_classes=d.num_classes,
            **{**self.method.net_options, **config.net_options},
        )
        self.model = BayesianModel(net.to(config.device), prior=config.bound_prior())
        self.guide = make_guide(
            config.guide,
            self.model,
            *self._batch(torch.arange(min(2, len(d.x_train)))),
            options=config.guide_options,
        )
        self.guide.to(config.device)
        self.optimizer = OPTIMIZERS[config.optimizer](self.guide.parameters(), lr=config.lr)
        self.batches = Minibatches(len(d.x_train), config.batch_size, config.seed)
        self.epoch, self.step, self.seconds = 0, 0, 0.0
        self.history: list[dict] = []
        self.bmr_log: list[dict] = []  # one row per BMR pass and layer: the reason for every removal
        self._source = raw.source
        if resume:
            self._load_checkpoint()
        else:
            self._write_config()

    @classmethod
    def open(cls, out: str | os.PathLike, log=print, **changes) -> "Run":
        """Reopen the run in folder ``out`` at its last finished epoch, to resume it, evaluate or prune it.

        ``changes`` are run options (and net, method, data, seed) as a resumed run is asked for: those in
        ``RESUMABLE`` (more ``epochs``, the evaluation schedule, the device) change the run; any other that
        differs from the stored config is an error naming it, since the run could not be what it says.
        """
        from pyrozoo.config import fold_aliases

        path = Path(out) / CONFIG
        if not path.exists():
            raise PyrozooError(f"{out} holds no run: it has no {CONFIG}")
        with hold_folder(out):  # no other process rewrites the config while it is read
            config = TrainConfig.from_record(json.loads(path.read_text())["config"])
        stored = config.resolved()
        changes = fold_aliases(changes)
        for key, value in changes.items():
            if key in TABLES:
                value = {**getattr(config, key), **value}
            changes[key] = value
        differ = [
            f"--{key.replace('_', '-')} ({getattr(stored, key)!r} in the run, {value!r} asked for)"
            for key, value in changes.items()
            if key not in RESUMABLE and value != getattr(stored, key) and value != getattr(config, key)
        ]
        if differ:
            raise PyrozooError(
                f"{out} was trained with other settings; --resume cannot change {', '.join(differ)}: "
                "start a new run in another --out"
            )
        config = dataclasses.replace(config, **{k: v for k, v in changes.items() if k in RESUMABLE})
        return cls(config, out, resume=True, log=log)

    def _batch(self, indices: torch.Tensor):
        indices = indices.to(self.data.x_train.device)
        return self.data.x_train[indices], self.data.y_train[indices], len(self.data.x_train)

    def _write_config(self) -> None:
        record = {
            "config": dataclasses.asdict(self.config),
            "data_source": self._source,
            "versions": {"torch": torch.__version__, "pyro": pyro.__version__},
        }
        atomic_write(self.out / CONFIG, lambda p: p.write_text(json.dumps(record, indent=2)))

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
        atomic_write(self.out / CHECKPOINT, lambda p: torch.save(state, p))

    def _load_checkpoint(self) -> None:
        # on the CPU: the random states must stay there; load_state_dict moves the rest to the model's device
        state = torch.load(self.out / CHECKPOINT, map_location="cpu", weights_only=False)
        self.guide.load_state_dict(state["guide"])
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.batches.load_state_dict(state["batches"])
        _set_rng_state(state["rng"])
        self.epoch, self.step, self.seconds = state["epoch"], state["step"], state["seconds"]
        # rows past the checkpoint belong to an epoch that will be redone
        for name, rows in ((METRICS, self.history), (BMR_LOG, self.bmr_log)):
            if (self.out / name).exists():
                rows[:] = [
                    r for r in pd.read_csv(self.out / name).to_dict("records") if r["epoch"] <= self.epoch
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
        atomic_write(self.out / PRUNED, lambda p: torch.save(state, p))

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
        self._write_config()  # a resumed run may have been extended: the folder says what it now is
        if self.reduction is not None and self.epoch == 0 and c.bmr_passes() == 0:
            self.log(
                f"warning: no BMR pass will run: the first comes after {c.warmup_steps} warm-up steps and after an "
                f"epoch but the last, and this run has {c.epochs} x {c.steps_per_epoch} steps; lower --warmup-steps "
                "or train longer"
            )
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
            if self.history and math.isnan(self.history[-1]["bmr_seconds"]):
                # A run extended past what was its last epoch gets the pass that epoch skipped, as a run asked
                # for this many epochs from the start had it; passes use no random numbers, so the rest of the
                # run is the same.
                self._bmr_pass(self.history[-1])
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
                if not self._bmr_pass(row):
                    row["pruned_fraction"] = pruned_fraction(self.model)
                if self.epoch % c.eval_every == 0 or self.epoch == c.epochs:
                    start = time.perf_counter()
                    row.update(self.evaluate())
                    row["eval_seconds"] = round(time.perf_counter() - start, 3)
                    bar.set_postfix(loss=f"{losses[-1]:.4g}", acc=f"{row['accuracy']:.4f}")
                self.history.append(row)
                atomic_write(self.out / METRICS, lambda p: self.metrics().to_csv(p, index=False))
                self._save_checkpoint()
        if not self.guide.point_mass:  # the per-layer posterior scales (shrinkage, for a hierarchical prior)
            table = scale_table(posterior_scales(self.model, self.guide))
            atomic_write(self.out / SCALES, lambda p: table.to_csv(p, index=False))
        return self.metrics()

    def _bmr_pass(self, row: dict) -> bool:
        """The BMR pass after the epoch just finished, if the schedule has one there; records it in ``row``."""
        c = self.config
        if not (self.reduction and 0 < self.epoch < c.epochs and self.step >= c.warmup_steps):
            return False
        report = self.reduction(self.model, self.guide)
        for note in filter(None, (r.note for r in report.layers)):
            tqdm.write(f"epoch {self.epoch}: {note}")
        self.bmr_log += [
            {"epoch": self.epoch, "step": self.step, **r} for r in report.table().to_dict("records")
        ]
        atomic_write(self.out / BMR_LOG, lambda p: pd.DataFrame(self.bmr_log).to_csv(p, index=False))
        row["bmr_seconds"] = round(report.seconds, 4)
        row["pruned_fraction"] = report.pruned_fraction  # the report has just computed it
        return True

    def metrics(self) -> pd.DataFrame:
        return pd.DataFrame(self.history)
