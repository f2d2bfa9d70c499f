"""The SVI loop: epochs of minibatch steps, evaluation, and a run folder that a killed run resumes from.

A run folder is consistent or it is not finished. An epoch is committed by one atomic step, the rename of
``checkpoint.pt``, which holds the state after the epoch *and* the metrics rows up to it; ``metrics.csv`` is
written just before it, so it is never behind the checkpoint, and rows past the checkpoint's epoch (a run killed
between the two renames) belong to an epoch that will be redone: every reader takes "finished" and "resume from"
from the checkpoint only (:func:`committed_epoch`, :func:`committed_metrics`). A folder written before
checkpoints held the metrics (no ``history`` in ``checkpoint.pt``) is read the same way, its metrics rows from
``metrics.csv`` up to the checkpoint's epoch.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
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
from pyrozoo import distributed, faults
from pyrozoo.bmr.compact import CannotCompact, compact, compact_to
from pyrozoo.bmr.scores import posterior_scales, scale_table
from pyrozoo.bmr.units import original_entries, pruned_fraction
from pyrozoo.config import OVERRIDABLE, RESUMABLE, TABLES, TrainConfig
from pyrozoo.elbo import negative_elbo
from pyrozoo.errors import PyrozooError, TrainingDiverged, reason
from pyrozoo.guides import make_guide
from pyrozoo.io import FolderLock, atomic_write, hold_folder, save_torch
from pyrozoo.methods import METHODS
from pyrozoo.metrics import beats, evaluate_draws, input_free_scores
from pyrozoo.models import BayesianModel
from pyrozoo.models.likelihoods import Categorical, Gaussian
from pyrozoo.nets import NETS, create_net, model_options
from pyrozoo.nets import net_options as net_options_of
from pyrozoo.steps import STEPS
from pyrozoo.torchfile import load_tensors

CONFIG, METRICS, CHECKPOINT, PRUNED, SCALES, BMR_LOG = (
    "config.json",
    "metrics.csv",
    "checkpoint.pt",
    "pruned.pt",
    "scales.csv",
    "bmr.csv",
)


# BMR's first pass waits until the posterior has moved from its start on more than this fraction of the live
# weights (Posterior.moved), unless --warmup-steps is given.
INFORMATIVE = 0.5
# Posterior draws of the evaluation that tells a collapsed net after a BMR pass (its NLL is at the
# class prior's, far from a working net's: a few draws tell them apart).
COLLAPSE_DRAWS = 10
COLLAPSE_POINTS = 1000  # training points it judges on (a fixed random subset; never the test set)

# Set to 1 to keep Pyro's and torch's checks of distribution arguments and sample values on while training
# (for debugging a model or prior): they cost 7-11% of a step (experiments/RESULTS.md), so training turns them
# off otherwise.
VALIDATE_ENV = "PYROZOO_VALIDATE"


def _validate() -> bool:
    return os.environ.get(VALIDATE_ENV) == "1"


def svi_step(
    model,
    guide,
    optimizer: torch.optim.Optimizer,
    x,
    y,
    dataset_size: int,
    validate: bool | None = None,
    share=None,
) -> float:
    """One stochastic-gradient step on ``-ELBO``; returns the loss. ``validate`` (default: whether
    ``$PYROZOO_VALIDATE`` is 1) turns Pyro's and torch's argument checks on or off for the step only, whatever
    Pyro's own setting (on by default, and slow). ``share`` (a data-parallel run's, see
    :meth:`pyrozoo.distributed.World.share_hook`) turns this process's gradients and loss into the run's."""
    with pyro.validation_enabled(_validate() if validate is None else validate):
        loss = negative_elbo(model, guide, x, y, dataset_size)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if share is not None:
        loss = share(loss, optimizer)
    faults.reached("step")
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
    samples_at_once: int = 1,
    world: distributed.World = distributed.World(),
) -> dict[str, float]:
    """Predictive metrics of ``samples`` posterior draws from ``guide`` on ``(x, y)``.

    ``samples_at_once`` > 1 runs that many draws through the net together (``torch.func.vmap`` over their
    weights), on ``batch_size // samples_at_once`` points at a time, so that memory stays that of ``batch_size``
    points. The draws are the same, in the same order, so the metrics are the same up to float rounding. On a
    CPU it is slower (the net's matrix products are as large either way, and a convolution over stacked weights
    becomes a grouped one): experiments/RESULTS.md, issue 17. In a data-parallel ``world``, each rank computes
    its part of every batch and all get the metrics of the whole.
    """
    at_once = max(1, min(samples_at_once, samples, batch_size))
    batched_logits = torch.func.vmap(model.logits, in_dims=(None, 0))

    def draws():
        for first in range(0, samples, at_once):
            # one draw after another, as the one-at-a-time loop draws them: the same random numbers
            group = [model.weights_from(guide()) for _ in range(min(at_once, samples - first))]
            if at_once == 1:
                weights = group[0]
                yield world.sharded(lambda xb: model.likelihood.log_probs(model.logits(xb, weights)))
            else:
                stacked = {name: torch.stack([w[name] for w in group]) for name in group[0]}
                yield world.sharded(
                    lambda xb: model.likelihood.log_probs(batched_logits(xb, stacked)), points_dim=1
                )

    training = model.training
    model.eval()  # no dropout at test time
    with poutine.block():
        metrics = evaluate_draws(draws(), x, y, num_classes, samples, max(1, batch_size // at_once))
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


# What an evaluation writes into a metrics row: classification's, then regression's own columns.
_EVALUATED = (
    "accuracy",
    "nll",
    "ece",
    "ece15",
    "brier",
    "lpd",
    "rmse",
    "coverage50",
    "coverage90",
    "coverage95",
)
_CHECKPOINT_KEYS = ("epoch", "step", "seconds", "guide", "model", "optimizer", "batches", "rng")


def read_checkpoint(folder: str | os.PathLike, mmap: bool = False) -> dict:
    """The state in ``folder/checkpoint.pt``; a corrupt or truncated file is a PyrozooError saying what to do.
    ``mmap`` maps the tensors instead of reading them (to read the epoch of a large checkpoint)."""
    path = Path(folder) / CHECKPOINT
    try:
        # on the CPU: the random states must stay there; load_state_dict moves the rest to the model's device
        state = load_tensors(path, mmap=mmap)
    except FileNotFoundError:
        raise PyrozooError(f"{folder} has no {CHECKPOINT}: nothing was trained there yet") from None
    except PyrozooError:
        raise
    except Exception as e:  # a truncated zip, a bad pickle, random bytes: torch raises many kinds
        state = e
    if isinstance(state, BaseException) or not isinstance(state, dict) or set(_CHECKPOINT_KEYS) - set(state):
        why = reason(state) if isinstance(state, BaseException) else "not a pyrozoo checkpoint"
        raise PyrozooError(
            f"{path} is corrupt or truncated ({why}); it holds the run's only trained state: restore it from a "
            f"backup, or delete {folder} and train again"
        )
    return state


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The rows of a metrics.csv; a corrupt file is a PyrozooError naming it."""
    path = Path(path)
    try:
        table = pd.read_csv(path)
        if "epoch" not in table or not pd.api.types.is_integer_dtype(table["epoch"]):
            raise ValueError("no whole-number epoch column")
    except FileNotFoundError:
        return []
    except (ValueError, pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise PyrozooError(
            f"{path} is corrupt ({reason(e)}): delete it, or restore it from a backup"
        ) from None
    return table.to_dict("records")


def _committed_history(folder: Path, state: dict) -> list[dict]:
    """The metrics rows of the epochs ``state`` (a checkpoint) commits."""
    if "history" in state:
        return [dict(row) for row in state["history"]]
    # A folder from before checkpoints held the metrics: its metrics.csv up to the checkpoint's epoch (rows
    # past it belong to an epoch that will be redone).
    rows = [r for r in read_metrics(folder / METRICS) if r["epoch"] <= state["epoch"]]
    if [r["epoch"] for r in rows] != list(range(1, state["epoch"] + 1)):
        raise PyrozooError(
            f"{folder / METRICS} does not hold one row for each of the {state['epoch']} epochs that "
            f"{CHECKPOINT} has trained: restore it from a backup, or delete {folder} and train again"
        )
    return rows


def _committed_bmr_log(folder: Path, state: dict) -> list[dict]:
    """The BMR log rows (one per pass and layer) of the epochs ``state`` (a checkpoint) commits."""
    if "bmr_log" in state:
        return [dict(row) for row in state["bmr_log"]]
    return [r for r in read_metrics(folder / BMR_LOG) if r["epoch"] <= state["epoch"]]  # an older folder


def committed_epoch(folder: str | os.PathLike) -> int:
    """The last epoch committed in ``folder`` (0 when it has no checkpoint)."""
    if not (Path(folder) / CHECKPOINT).exists():
        return 0
    return int(read_checkpoint(folder, mmap=True)["epoch"])


def committed_metrics(folder: str | os.PathLike) -> pd.DataFrame:
    """The metrics rows of the committed epochs of a run folder (a folder without a checkpoint, such as a
    baseline's, has only its metrics.csv)."""
    folder = Path(folder)
    if not (folder / CHECKPOINT).exists():
        return pd.DataFrame(read_metrics(folder / METRICS))
    return pd.DataFrame(_committed_history(folder, read_checkpoint(folder, mmap=True)))


def read_config_record(folder: str | os.PathLike) -> dict:
    """The record in ``folder/config.json`` (``config``, ``data_source``, ...); a corrupt one is a PyrozooError."""
    path = Path(folder) / CONFIG
    try:
        record = json.loads(path.read_text())
        if not isinstance(record, dict) or not isinstance(record.get("config"), dict):
            raise ValueError("no config table")
        TrainConfig.from_record(record["config"])
    except FileNotFoundError:
        raise PyrozooError(f"{folder} holds no run: it has no {CONFIG}") from None
    except (ValueError, UnicodeDecodeError, PyrozooError) as e:
        raise PyrozooError(
            f"{path} is corrupt ({reason(e)}): restore it from a backup, or delete {folder} and train again"
        ) from None
    return record


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class Run:
    """A training run living in folder ``out``: built from a config, or reloaded from the folder's files."""

    def __init__(self, config: TrainConfig, out: str | os.PathLike, *, resume: bool = False, log=print):
        self.out = Path(out)
        self.world = distributed.setup()  # a run started by torchrun has several processes; rank 0 writes
        self.log = log if self.world.main else lambda text: None
        if resume and not (self.out / CHECKPOINT).exists():  # checked before the lock, which makes the folder
            raise PyrozooError(f"nothing to resume in {out}: it has no {CHECKPOINT}")
        # Everything a user's setting can break (the config, the data, the net options, the batch size) is
        # built before the lock, which makes the folder: a mistake leaves no folder behind.
        self._build(config.resolved(), resume)
        self.overrides: list[dict] = []  # the changes --override made to the run, as config.json records them
        # One writer per run folder, held while this object lives (released at exit, or by close()); in a
        # data-parallel run rank 0 holds it, and the others stop too if it cannot.
        self._lock = FolderLock(self.out, instead=None if resume else "choose another --out")
        self.world.agree(self._lock.acquire)
        try:
            _open_run_folder(self.out, resume)
            if resume:
                self._load_checkpoint()
                self.world.sync_rng()
            else:
                self._write_config()
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
            raw = datasets.load(config.data, config.data_dir, target=config.target, task=config.task)
        device = self.world.device(config.device)  # with several GPU processes, one GPU each
        self.data = datasets.prepare(raw, pad_to=NETS[config.net].pad_to, device=device)  # moved there once
        d = self.data
        if not resume and config.batch_size > len(d.x_train):  # a resumed run keeps what it was started with
            raise PyrozooError(
                f"--batch-size {config.batch_size} is larger than the training set of {config.data} "
                f"({len(d.x_train)} images): use at most {len(d.x_train)}"
            )
        self.world.check_batch(config.batch_size)
        self.method = METHODS[config.method]
        self.reduction = config.reduction()
        # a method's default net options (flat-map's dropout) reach the nets that take them; a user's reach any
        taken = set(net_options_of(config.net))
        skipped = sorted(set(self.method.net_options) - taken - set(config.net_options))
        if skipped:
            log(f"{config.net} takes no {', '.join(skipped)}: {config.method} runs without it")
        own = {k: v for k, v in self.method.net_options.items() if k in taken}
        net_options = {**own, **config.net_options}
        net = create_net(
            config.net,
            in_channels=d.x_train.shape[1],
            image_size=d.x_train.shape[-1],
            num_classes=d.num_classes,
            **net_options,
        )
        self.model = BayesianModel(
            net.to(device),
            prior=config.bound_prior(),
            example_input=d.x_train[:2],
            likelihood=(
                Gaussian(config.noise, config.noise_precision) if d.task == "regress" else Categorical()
            ),
            **model_options(net_options)[1],  # deterministic / random selectors
        )
        self.guide = make_guide(
            config.guide,
            self.model,
            *self._batch(torch.arange(min(2, len(d.x_train)))),
            options=config.guide_options,
        )
        self.guide.to(device)
        self.model.to(device)
        if config.init_from is not None and not resume:  # a resumed run's checkpoint holds where it started
            from pyrozoo.init_from import load_state, start_from_weights

            start_from_weights(
                self.model,
                self.guide,
                load_state(config.init_from, trust_pickle=config.trust_pickle),
                init_scale=STEPS[self.method.step].init_scale,
                what=f"--init-from {config.init_from}",
            )
        elif config.start == "net" and not resume:
            from pyrozoo.init_from import start_from_net

            start_from_net(self.model, self.guide)
        self.training_step = STEPS[self.method.step]  # SVI, or IVON: the method says how it trains
        if self.world.parallel and self.method.step != "svi":
            raise PyrozooError(
                f"{config.method} trains by {self.method.step}, which runs in one process only: "
                "start it without torchrun"
            )
        self.optimizer = self.training_step.optimizer(
            self.model, self.guide, config.lr, config.optimizer, len(d.x_train)
        )
        self.batches = Minibatches(len(d.x_train), config.batch_size, config.seed)
        self.epoch, self.step, self.seconds = 0, 0, 0.0
        self.history: list[dict] = []
        self.bmr_log: list[dict] = []  # one row per BMR pass and layer: the reason for every removal
        self._compact_note = ""
        self._said_wait = self._said_first = False  # BMR's wait, and its first pass, are said once
        self._source = raw.source

    @classmethod
    def open(cls, out: str | os.PathLike, log=print, override=(), **changes) -> "Run":
        """Reopen the run in folder ``out`` at its last committed epoch, to resume it, evaluate or prune it.

        ``changes`` are run options (and net, method, data, seed) as a resumed run is asked for: those in
        ``RESUMABLE`` (more ``epochs``, the evaluation schedule, the device) change the run; any other that
        differs from the stored config is an error naming it, since the run could not be what it says. The
        options named in ``override`` (only those in ``OVERRIDABLE``: the learning rate, which a diverged run
        needs lowered) change the run from its last epoch on; config.json records the new value and, under
        ``overrides``, when it changed.
        """
        from pyrozoo.config import as_stored, fold_aliases

        override = list(dict.fromkeys(k.replace("-", "_") for k in override))
        for key in override:
            if key not in OVERRIDABLE:
                raise PyrozooError(
                    f"--override {key}: only {', '.join(OVERRIDABLE)} may be overridden on a resumed run"
                )
            if key not in changes:
                raise PyrozooError(
                    f"--override {key} needs the new value: give --{key.replace('_', '-')} too"
                )
        distributed.setup()  # before the lock: in a data-parallel run only rank 0 takes it
        path = Path(out) / CONFIG
        if not path.exists():
            raise PyrozooError(f"{out} holds no run: it has no {CONFIG}")
        with hold_folder(out):  # no other process rewrites the config while it is read
            record = read_config_record(out)
        config = TrainConfig.from_record(record["config"])
        stored = config.resolved()
        changes = fold_aliases(changes)
        for key, value in changes.items():
            if key in TABLES:
                value = {**getattr(config, key), **value}
            changes[key] = value
        differ = [
            f"--{key.replace('_', '-')} ({getattr(stored, key)!r} in the run, {value!r} asked for)"
            for key, value in changes.items()
            if key not in RESUMABLE
            and key not in override
            and as_stored(value) not in (as_stored(getattr(stored, key)), as_stored(getattr(config, key)))
        ]
        if differ:
            allowed = " (the learning rate may be lowered with --override lr)" if "lr" in changes else ""
            raise PyrozooError(
                f"{out} was trained with other settings; --resume cannot change {', '.join(differ)}: "
                f"start a new run in another --out{allowed}"
            )
        allowed = (*RESUMABLE, *override)
        config = dataclasses.replace(config, **{k: v for k, v in changes.items() if k in allowed})
        run = cls(config, out, resume=True, log=log)
        if run.epoch > run.config.epochs:
            run.close()
            raise PyrozooError(
                f"{out} has finished {run.epoch} epochs; --epochs {run.config.epochs} would shorten it, and a "
                "run is only ever extended"
            )
        if override and run.epoch >= run.config.epochs:
            run.close()
            raise PyrozooError(
                f"{out} has finished its {run.epoch} epochs, so --override {', '.join(override)} would change "
                f"nothing it trained: extend it with --epochs N (more than {run.epoch}) to train on with the new "
                "value, or start a new run in another --out"
            )
        run.overrides = list(record.get("overrides", []))
        for key in override:
            before, after = getattr(stored, key), getattr(run.config, key)
            if before != after:
                run.overrides.append(
                    {"option": key, "from": before, "to": after, "epoch": run.epoch, "step": run.step}
                )
                log(f"--override: {key} {before} -> {after} after epoch {run.epoch} (step {run.step})")
        return run

    def _batch(self, indices: torch.Tensor):
        indices = indices.to(self.data.x_train.device)
        return self.data.x_train[indices], self.data.y_train[indices], len(self.data.x_train)

    def _write_config(self) -> None:
        record = {
            "config": dataclasses.asdict(self.config),
            "data_source": self._source,
            "versions": {"torch": torch.__version__, "pyro": pyro.__version__},
        }
        if self.overrides:
            record["overrides"] = self.overrides
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
            "history": self.history,  # the metrics rows this checkpoint commits (metrics.csv is their copy)
            "bmr_log": self.bmr_log,  # and the BMR log's rows (bmr.csv)
            "kept": self.model.kept,  # a compacted run: the original indices its layers still hold
        }
        atomic_write(self.out / CHECKPOINT, lambda p: save_torch(state, p))

    def _load_checkpoint(self) -> None:
        state = read_checkpoint(self.out)
        try:
            if state.get("kept"):  # a compacted run: its shapes first, from the original indices it kept
                compact_to(self.model, self.guide, self.optimizer, state["kept"])
            self.guide.load_state_dict(state["guide"])
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.batches.load_state_dict(state["batches"])
            _set_rng_state(state["rng"])
        except (RuntimeError, KeyError, ValueError, TypeError, CannotCompact) as e:
            raise PyrozooError(
                f"{self.out / CHECKPOINT} does not fit the run its {CONFIG} describes ({reason(e)}): restore "
                f"the two files from one run, or delete {self.out} and train again"
            ) from None
        for (
            group
        ) in self.optimizer.param_groups:  # the run's learning rate, which --override may have changed
            if "lr" in group:
                group["lr"] = self.config.lr
        self.epoch, self.step, self.seconds = state["epoch"], state["step"], state["seconds"]
        self.history = _committed_history(self.out, state)
        self.bmr_log = _committed_bmr_log(self.out, state)

    def source(self) -> dict:
        """Which committed state this run holds: its epoch, step and the checksum of its checkpoint.pt."""
        return {"epoch": self.epoch, "step": self.step, "checkpoint_sha256": _sha256(self.out / CHECKPOINT)}

    def save_pruned(self, report, metrics: dict) -> None:
        """Keep a post-hoc pruned state beside the run's own checkpoint (which stays as trained), with the
        checkpoint it came from (epoch, step, checksum), so that a later use can tell when it is stale."""
        state = {
            "epoch": self.epoch,
            "source": self.source(),
            "guide": self.guide.state_dict(),
            "model": self.model.state_dict(),
            "report": report.table().to_dict("records"),
            "metrics": metrics,
        }
        atomic_write(self.out / PRUNED, lambda p: save_torch(state, p))

    def load_pruned(self) -> dict:
        """Load the post-hoc pruned state written by :meth:`save_pruned`; returns its metrics. A pruned.pt
        made from another checkpoint than the run's current one (trained further since) is refused."""
        path = self.out / PRUNED
        redo = f"prune again (pyrozoo prune {self.out}), or delete {path}"
        try:
            state = load_tensors(path, fix=redo)
            if not isinstance(state, dict) or not {"guide", "model", "metrics"} <= set(state):
                raise ValueError("not a pyrozoo pruned state")
        except FileNotFoundError:
            raise PyrozooError(f"{self.out} has no {PRUNED}: run pyrozoo prune {self.out} first") from None
        except PyrozooError:
            raise
        except Exception as e:
            raise PyrozooError(f"{path} is corrupt or truncated ({reason(e)}): {redo}") from None
        current = self.source()
        made = state.get("source", {"epoch": state.get("epoch")})  # before sources: the epoch alone
        stale = [k for k in ("epoch", "step", "checkpoint_sha256") if k in made and made[k] != current[k]]
        if stale:
            was = f"epoch {made.get('epoch')}" + (f", step {made['step']}" if "step" in made else "")
            why = (
                f"the run is now at epoch {current['epoch']}, step {current['step']}"
                if {"epoch", "step"} & set(stale)
                else "checkpoint.pt has been written again since"
            )
            raise PyrozooError(f"{path} was pruned from the checkpoint of {was}, but {why}: {redo}")
        try:
            self.guide.load_state_dict(state["guide"])
            self.model.load_state_dict(state["model"])
        except (RuntimeError, KeyError, ValueError, TypeError) as e:
            raise PyrozooError(f"{path} does not fit this run ({reason(e)}): {redo}") from None
        return state["metrics"]

    def evaluate(
        self, samples: int | None = None, fault: str | None = "eval", on: tuple | None = None
    ) -> dict[str, float]:
        """Test metrics now (or on ``on``, inputs and targets), from ``samples`` posterior draws (default: the
        run's). The draws come from a random stream of their own (seeded by the run's seed and epoch), so how
        often a run evaluates never changes how it trains. ``fault`` is the fault point reached mid-evaluation
        (None for a check that is not one of the run's evaluations, so that the reliability tests count those).
        """
        d = self.data
        x, y = on or (d.x_test, d.y_test)
        samples = samples or self.config.samples
        devices = [d.x_test.device] if d.x_test.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            seed = self.config.seed * 100_003 + self.epoch
            torch.manual_seed(seed)
            if d.task == "regress":
                metrics = self._evaluate_regression(seed, samples, x, y)
            else:
                metrics = evaluate(
                    self.model,
                    self.guide,
                    x,
                    y,
                    d.num_classes,
                    samples,
                    self.config.eval_batch_size,
                    world=self.world,
                )
            if fault:
                faults.reached(fault)
            return metrics

    def point_likelihood(self):
        """The run's likelihood for a deterministic net made from it (rebuilt, pruned, Laplace): a regression's
        noise held at its posterior mean (``Likelihood.at_point``)."""
        return self.model.likelihood.at_point(self.guide)

    def net_metrics(self, net: torch.nn.Module) -> dict[str, float]:
        """The test metrics of a deterministic net made from this run, for its task (see metrics.net_metrics)."""
        from pyrozoo.metrics import net_metrics

        return net_metrics(net, self.data, self.point_likelihood(), self.config.eval_batch_size)

    def _evaluate_regression(self, seed: int, samples: int, x_all, y_all) -> dict[str, float]:
        """RMSE, NLL, LPD and interval coverage in the targets' original units (see metrics.regression_metrics).
        The test points go in chunks that hold a bounded number of (draw, point) pairs, each chunk drawing the
        same ``samples`` draws again from ``seed``: more samples take longer, not more memory."""
        from pyrozoo.metrics import points_per_chunk, regression_metrics_in_chunks
        from pyrozoo.predict import regression_draws

        d, c = self.data, self.config
        chunk = points_per_chunk(samples, len(x_all))

        def chunks():
            for start in range(0, len(x_all), chunk):
                torch.manual_seed(seed)
                x = x_all[start : start + chunk]
                locs, noise_var = regression_draws(self.model, self.guide, x, samples, c.eval_batch_size)
                yield locs, noise_var, y_all[start : start + chunk]

        return regression_metrics_in_chunks(chunks(), d.y_mean, d.y_std)

    def train(self, progress: bool = True) -> pd.DataFrame:
        """Train the remaining epochs, committing each (metrics, then the checkpoint that holds them); returns
        the metrics table. After the last epoch, ``scales.csv`` is written before the commit, so a run that
        cannot write it is not finished."""
        c = self.config
        self._write_config()  # a resumed run may have been extended: the folder says what it now is
        if self.history or (self.out / METRICS).exists():  # drop rows past the checkpoint, mend a bad file
            atomic_write(self.out / METRICS, lambda p: self.metrics().to_csv(p, index=False))
        if self.bmr_log or (self.out / BMR_LOG).exists():
            atomic_write(self.out / BMR_LOG, lambda p: pd.DataFrame(self.bmr_log).to_csv(p, index=False))
        if self.reduction is not None and self.epoch == 0 and c.bmr_passes() == 0:
            self.log(
                f"warning: no BMR pass will run: the first comes after {c.first_pass_step()} warm-up steps and after "
                f"an epoch but the last, and this run has {c.epochs} x {c.steps_per_epoch} steps; lower "
                "--warmup-steps or train longer"
            )
        beta2 = getattr(self.guide, "options", {}).get("beta2")  # IVON's Hessian: a running average
        forced = c.warmup_steps is not None  # the user's schedule: BMR does not wait for the posterior
        if self.reduction is not None and self.epoch == 0 and beta2 is not None and forced and c.bmr_passes():
            initial = beta2**c.warmup_steps  # the weight hess_init still has at the first pass
            if initial > 0.75:
                self.log(
                    f"warning: after {c.warmup_steps} warm-up steps IVON's Hessian is still {initial:.0%} its initial "
                    f"value (beta2 {beta2}): the first BMR pass reads a posterior near its start and may prune most "
                    "weights (a pass that collapses the net is undone); raise --warmup-steps, or leave it out and BMR "
                    "waits for the Hessian to move"
                )
        bar = tqdm(
            total=c.epochs * c.steps_per_epoch,
            initial=self.epoch * c.steps_per_epoch,
            unit="step",
            desc=f"{c.net} {c.method}",
            disable=not progress or not self.world.main,
            dynamic_ncols=True,
            mininterval=0.5,
        )
        with bar, pyro.validation_enabled(_validate()):
            if self.history and math.isnan(self.history[-1]["bmr_seconds"]):
                # A run extended past what was its last epoch gets the pass that epoch skipped, as a run asked
                # for this many epochs from the start had it; passes use no random numbers, so the rest of the
                # run is the same. That epoch's row is then what the longer run would have written: evaluated
                # after the pass, or not at all if the evaluation schedule skips it.
                row = self.history[-1]
                if self._bmr_pass(row):
                    for key in (*_EVALUATED, "eval_seconds"):
                        row.pop(key, None)
                    if self.epoch % c.eval_every == 0:
                        start = time.perf_counter()
                        row.update(self.evaluate())
                        row["eval_seconds"] = round(time.perf_counter() - start, 3)
            while self.epoch < c.epochs:
                start, losses = time.perf_counter(), []
                for _ in range(c.steps_per_epoch):
                    part, weight = self.world.split(self.batches.next())  # this process's part of the batch
                    share = self.world.share_hook(weight)  # None in one process
                    shared = {} if share is None else {"share": share}
                    loss = self.training_step.step(
                        self.model, self.guide, self.optimizer, *self._batch(part), **shared
                    )
                    if not math.isfinite(loss):
                        raise TrainingDiverged(self._diverged(loss))
                    losses.append(loss)
                    self.step += 1
                    bar.update()
                    if self.step % 50 == 0:
                        bar.set_postfix(loss=f"{loss:.4g}", refresh=False)
                self.seconds += time.perf_counter() - start
                self.world.sync_rng()  # keep the ranks' random streams one (what rank 0 checkpoints)
                self._check_posterior_is_finite()
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
                    shown = "accuracy" if "accuracy" in row else "rmse"
                    bar.set_postfix(loss=f"{losses[-1]:.4g}", **{shown[:4]: f"{row[shown]:.4f}"})
                self.history.append(row)
                if self.epoch == c.epochs:
                    self._write_scales()
                atomic_write(self.out / METRICS, lambda p: self.metrics().to_csv(p, index=False))
                faults.reached("metrics")
                self._save_checkpoint()  # the commit: the epoch is done once this rename is
                faults.reached("commit")
        return self.metrics()

    def _write_scales(self) -> None:
        """The per-layer posterior scales (shrinkage, for a hierarchical prior), from a random stream of their
        own, so that the checkpoint's random state is what a longer run would continue from."""
        if self.guide.point_mass or not self.world.main:
            return
        devices = [self.data.x_test.device] if self.data.x_test.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            table = scale_table(posterior_scales(self.model, self.guide))
        atomic_write(self.out / SCALES, lambda p: table.to_csv(p, index=False))

    def _check_posterior_is_finite(self) -> None:
        """A posterior whose locs or scales left the numbers (or whose scales collapsed to 0) is a diverged
        run too, even while the loss still looks finite."""
        for site, (loc, scale) in self.guide.posterior().items():
            collapsed = not self.guide.point_mass and not bool((scale > 0).all())
            if collapsed or not bool(torch.isfinite(loc).all() and torch.isfinite(scale).all()):
                raise TrainingDiverged(
                    self._diverged(float("nan"), f"the posterior of {site} became degenerate")
                )

    def _diverged(self, loss: float, what: str | None = None) -> str:
        lower = f"{self.config.lr / 10:g}"
        if self.epoch == 0:
            advice = (
                f"no epoch was finished, so there is nothing to resume: run the same command again with a "
                f"smaller --lr (e.g. --lr {lower})"
            )
        else:
            advice = (
                f"{self.out} keeps the state after epoch {self.epoch}; resume it with a smaller learning rate: "
                f"pyrozoo train --out {self.out} --resume --lr {lower} --override lr"
            )
        # a loss is that of the step being taken; a degenerate posterior is found after the epoch's last step
        step = self.step if what else self.step + 1
        what = what or f"the loss became {loss}"
        return f"{what} at epoch {self.epoch + 1}, step {step}; {advice}"

    def _bmr_pass(self, row: dict) -> bool:
        """The BMR pass after the epoch just finished, if the schedule has one there and the posterior is ready
        for it; records it in ``row``. A pass that collapses the net is undone (:meth:`_collapsed`)."""
        c = self.config
        if not (self.reduction and 0 < self.epoch < c.epochs and self.step >= c.first_pass_step()):
            return False
        if not self.bmr_log and not self._posterior_ready():
            return False
        before = None if getattr(self.reduction, "allows_empty", False) else self._state()
        report = self.reduction(self.model, self.guide)
        self.world.broadcast(self.model, self.guide)  # rank 0's masks and posterior, on every rank
        faults.reached("bmr")
        if before is not None and self._collapsed(before, report.seconds, row):
            return True
        for layer in report.layers:
            if layer.note:
                self.log(f"epoch {self.epoch}, {layer.layer}: {layer.note}")
        self.bmr_log += [
            {"epoch": self.epoch, "step": self.step, **r} for r in report.table().to_dict("records")
        ]
        atomic_write(self.out / BMR_LOG, lambda p: pd.DataFrame(self.bmr_log).to_csv(p, index=False))
        row["bmr_seconds"] = round(report.seconds + self._compact(), 4)
        row["pruned_fraction"] = report.pruned_fraction  # just computed, of the original net
        return True

    def _posterior_ready(self) -> bool:
        """Whether the first BMR pass may come now. With ``--warmup-steps`` given, at once (the user's
        schedule); else only once the posterior has moved from its start on more than
        ``INFORMATIVE`` of the live weights (a posterior still at its start, such as IVON's Hessian at
        ``hess_init``, makes every removal look good and would prune the net to death), saying when it waits and
        when, and why, the pass then comes."""
        c, when = self.config, f"epoch {self.epoch} (step {self.step})"
        moved = None if c.warmup_steps is not None else self.guide.moved(self.model)
        if moved is None:  # the schedule alone: the given --warmup-steps, or a posterior with no fixed start
            return True
        fraction, what = moved
        if fraction > INFORMATIVE:
            self._say_once(
                f"{when}: first BMR pass, the posterior now informative: {what} on {fraction:.0%} of the live "
                f"weights (BMR waits for more than {INFORMATIVE:.0%}; --warmup-steps forces a schedule)"
            )
            return True
        if not self._said_wait:
            self.log(
                f"{when}: BMR waits for an informative posterior: {what} on only {fraction:.0%} of the live "
                f"weights, and the first pass needs more than {INFORMATIVE:.0%} (--warmup-steps forces a schedule)"
            )
            self._said_wait = True
        return False

    def _say_once(self, line: str) -> None:
        """Say when the first pass came (not again when a collapse undid it and a later one comes)."""
        if not self._said_first:
            self.log(line)
            self._said_first = True

    def _state(self) -> tuple[dict, dict, dict]:
        """Copies of the guide's, model's and optimiser's state, to undo a pass with."""
        return tuple(copy.deepcopy(part.state_dict()) for part in (self.guide, self.model, self.optimizer))

    def _load_state(self, state: tuple[dict, dict, dict]) -> None:
        """Restore a :meth:`_state` (in the order a checkpoint is loaded)."""
        for part, value in zip((self.guide, self.model, self.optimizer), state):
            part.load_state_dict(value)

    @functools.cached_property
    def _check_points(self) -> tuple[torch.Tensor, torch.Tensor]:
        """A fixed random subset of the training set that the collapse check evaluates on: never the test set,
        which must not shape the trained model. A collapsed net is no better than an input-free prediction on
        any data, the data it trained on included. Drawn once per run (from its seed)."""
        d = self.data
        order = torch.randperm(len(d.x_train), generator=torch.Generator().manual_seed(self.config.seed))
        chosen = order[:COLLAPSE_POINTS].to(d.x_train.device)
        return d.x_train[chosen], d.y_train[chosen]

    def _held_out(self) -> dict[str, float]:
        """Metrics on the check points from a few posterior draws: enough to tell a collapsed net from a working
        one."""
        samples = min(self.config.samples, COLLAPSE_DRAWS)
        return self.evaluate(samples=samples, fault=None, on=self._check_points)

    @functools.cached_property
    def _input_free(self) -> dict[str, float]:
        """The check points' scores of the best prediction that ignores the inputs (computed once per run)."""
        return input_free_scores(self.data, self._check_points[1])

    def _collapsed(self, before: tuple[dict, dict, dict], seconds: float, row: dict) -> bool:
        """Whether the pass just made collapsed the net: took a score on the check points (NLL; accuracy, or for
        regression RMSE) that beat every prediction ignoring the inputs (the class prior, the target mean) to no better
        than those. If so the state ``before`` the pass is restored, one line says so, and ``row`` records the
        pass's time and the pruned fraction as they now are. A score no better before the pass (an overconfident
        net's NLL, a barely trained net's) is not the pass's doing and does not count."""
        start = time.perf_counter()
        reference = self._input_free
        after = self._held_out()
        if beats(after, reference) == set(reference):
            return False
        kept = self._state()
        self._load_state(before)
        lost = beats(self._held_out(), reference) - beats(after, reference)
        if not lost:
            self._load_state(kept)
            return False
        what = "the target mean" if self.data.task == "regress" else "the class prior"
        scores = ", ".join(f"{key} {after[key]:.4g} against {reference[key]:.4g}" for key in sorted(lost))
        self.log(
            f"epoch {self.epoch}: BMR pass undone: it collapsed the net (on training points, {scores}: no better than "
            f"predicting {what}); BMR tries again after the next epoch. The posterior was read too early, or the "
            "rule prunes too much of it at once: raise --warmup-steps (left out, BMR waits for an informative "
            "posterior) or the rule's cut-off (--rule-option margin=... for threshold); allow_empty=true keeps "
            "such a pass"
        )
        row["bmr_seconds"] = round(seconds + time.perf_counter() - start, 4)
        row["pruned_fraction"] = pruned_fraction(self.model)
        return True

    def _compact(self) -> float:
        """Cut the units the pass killed out of the model, guide and optimiser (``--no-compact``: not); returns
        the seconds it took."""
        if not self.config.compact:
            return 0.0
        start = time.perf_counter()
        removed, note = compact(self.model, self.guide, self.optimizer)
        if note and note != self._compact_note:  # said once, not after every pass
            self.log(f"epoch {self.epoch}, compaction: {note}")
            self._compact_note = note
        if removed:
            sizes = sum(layer.shape.numel() for layer in self.model.layers)
            total = original_entries(self.model, self.model.layers)
            self.log(
                f"epoch {self.epoch}: compacted {removed} units (gone with the weights pruned so far, or by a units "
                f"rule); the latents now hold {sizes:,d} of the original {total:,d} entries"
            )
        return time.perf_counter() - start

    def metrics(self) -> pd.DataFrame:
        return pd.DataFrame(self.history)
