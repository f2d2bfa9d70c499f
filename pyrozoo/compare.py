"""The experiment grid behind ``pyrozoo compare``: nets x methods x datasets x seeds, one run folder each.

A grid folder holds one run folder per cell, ``<net>-<method>-<data>-s<seed>`` (``pyrozoo train``'s naming). The
grid is resumable: a run whose committed checkpoint reaches the last epoch is skipped, an unfinished one
continues from its checkpoint, and a folder holding a different run is an error, never silently reused. Every
run's committed metrics rows (those of ``metrics.csv`` up to its checkpoint's epoch) are collected into one tidy
table, ``results.csv`` (one row per run and epoch), and summarised
at the final epoch in the shape of docs/method.md#reference-results.

Grids can be written as TOML files (see ``experiments/grid-*.toml``)::

    out = "runs/grid-fashion-mnist"
    nets = ["mlp", "lenet"]
    methods = ["flat-map", "flat-ff", "tiered-ff", "bmr-ss", "magnitude", "magnitude-ft", "magnitude-layer"]
    data = ["fashion-mnist"]
    seeds = [0]
    finetune_steps = 500       # magnitude-ft: steps of fine-tuning after pruning

    [train]                    # any run option of `pyrozoo train`, with underscores
    epochs = 50
    eval_every = 10
"""

from __future__ import annotations

import dataclasses
import json
import math
import multiprocessing
import os
import shutil
import sys
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch
from tqdm.auto import tqdm

from pyrozoo import data as datasets
from pyrozoo.baselines import BASELINES, SOURCE_METHOD, SPARSITY_METHOD, baseline_state, run_baseline
from pyrozoo.bind import bind, bmr_methods, make_config, option_takers, options_taken
from pyrozoo.errors import PyrozooError
from pyrozoo.config import (
    ALIASES,
    TABLES,
    TrainConfig,
    as_stored,
    check_run_options,
    fold_aliases,
    option_as_given,
    run_name,
    run_option_fields,
)
from pyrozoo.io import atomic_write, hold_folder, make_folder
from pyrozoo.methods import METHODS
from pyrozoo.nets import NETS, net_options
from pyrozoo.registry import Registry
from pyrozoo.runfolder import CHECKPOINT, CONFIG, METRICS, committed_epoch, committed_metrics
from pyrozoo.train import Run

RESULTS, TABLE = "results.csv", "table.md"

GRID_KEYS = ("out", "nets", "methods", "data", "seeds", "finetune_steps", "train")
ID_COLUMNS = ["data", "net", "method", "seed"]
FINAL_COLUMNS = ["accuracy", "nll", "ece", "ece15", "brier", "lpd", "pruned_fraction", "seconds"]
# Regression runs' columns, and those of `pyrozoo uncertainty` (RUN/uncertainty.csv): misclassification AUROCs
# on the clean test set, and accuracy/ECE/NLL averaged over the shifted sets' severities.
REGRESSION_COLUMNS = ["rmse", "coverage50", "coverage90", "coverage95"]
UNCERTAINTY_COLUMNS = ["entropy_auroc", "mi_auroc", "shift_accuracy", "shift_ece", "shift_nll"]
UNCERTAINTY = "uncertainty.csv"

# Where a stored run's config may differ from the requested one: these only say how often, in what batches
# and from which folder the test set is evaluated, never what the run learns (evaluation draws its posterior
# samples from a stream of its own), so a finished run stays valid whatever they are; nor does how its
# --init-from file was opened (trust_pickle).
EVALUATION_ONLY = ("eval_every", "eval_batch_size", "data_dir", "trust_pickle")


@dataclass(frozen=True)
class Cell:
    net: str
    method: str
    data: str
    seed: int

    @property
    def name(self) -> str:
        return run_name(self.net, self.method, self.data, self.seed)

    def with_method(self, method: str) -> "Cell":
        return dataclasses.replace(self, method=method)


@dataclass
class Grid:
    """A grid of runs: every net x method x dataset x seed, in folder ``out``."""

    nets: list[str]
    methods: list[str]  # training methods (METHODS) and baselines (BASELINES)
    data: list[str] = field(default_factory=lambda: ["fashion-mnist"])
    seeds: list[int] = field(default_factory=lambda: [0])
    out: Path = Path("runs/grid")
    options: dict = field(default_factory=dict)  # run options (TrainConfig's fields and ALIASES)
    finetune_steps: int = 500

    def __post_init__(self):
        self.out = Path(self.out)
        for key, known in (("nets", NETS), ("methods", [*METHODS, *BASELINES]), ("data", datasets.DATASETS)):
            values = getattr(self, key)
            if not values:
                raise PyrozooError(
                    f"the grid has no {key}: give --{key} (or {key} = [...] in the config file)"
                )
            for value in values:
                if value not in known and not (key == "data" and datasets.is_table(value)):  # FILE.csv
                    raise PyrozooError(f"unknown name {value!r} in {key}; choose from {', '.join(known)}")
            if len(set(values)) != len(values):
                raise PyrozooError(f"{key} lists a name twice: {values}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise PyrozooError(f"seeds must be distinct and at least one, got {self.seeds}")
        if self.finetune_steps < 0:
            raise PyrozooError(f"finetune-steps must not be negative, got {self.finetune_steps}")
        self.options = check_run_options(self.options, "the grid")
        baselines = [m for m in self.methods if m in BASELINES]
        missing = [m for m in (SOURCE_METHOD, SPARSITY_METHOD) if m not in self.methods]
        if baselines and missing:
            raise PyrozooError(
                f"{', '.join(baselines)} prune the {SOURCE_METHOD} net to the sparsity {SPARSITY_METHOD} reached: "
                f"add {' and '.join(missing)} to the methods"
            )
        self._check_options_belong()

    def _check_options_belong(self) -> None:
        """A net, prior, rule or guide option (or --prune-units) that no net or method of the grid takes is an
        error: in a grid a net or method that does not take it runs without it, but one that none takes is a
        mistake."""
        options = fold_aliases(self.options)
        for key in options.get("net_options", {}):
            if not any(key in net_options(net) for net in self.nets):
                known = sorted({k for net in self.nets for k in net_options(net)})
                raise PyrozooError(
                    f"net option {key!r} is taken by no net of the grid ({', '.join(self.nets)}; their options: "
                    f"{', '.join(known)})"
                )
        prior, rule, guide = options.get("prior"), options.get("rule"), options.get("guide")
        for table in ("prior_options", "rule_options", "guide_options"):
            for key in options.get(table, {}):
                takers = [
                    m
                    for m in self.training_methods
                    if key in (options_taken(table, m, prior, rule, guide) or [])
                ]
                if not takers:
                    raise PyrozooError(
                        f"{option_as_given(table, key)} belongs to {option_takers(table, key)}, "
                        "which no method of the grid uses"
                    )
        if options.get("prune_units") and not any(
            options_taken("rule_options", m, prior, rule) is not None for m in self.training_methods
        ):
            raise PyrozooError(
                f"--prune-units belongs to the BMR methods ({', '.join(bmr_methods())}), which no method of the "
                "grid uses"
            )

    @property
    def training_methods(self) -> list[str]:
        return [m for m in self.methods if m in METHODS]

    def cells(self, baselines: bool = False) -> list[Cell]:
        """Training cells (or, with ``baselines``, baseline cells), in the order they are run."""
        methods = [m for m in self.methods if (m in BASELINES) == baselines]
        return [
            Cell(net, method, data, seed)
            for data in self.data
            for net in self.nets
            for method in methods
            for seed in self.seeds
        ]

    def config(self, cell: Cell) -> TrainConfig:
        return bind(
            make_config(cell.net, cell.method, cell.data, cell.seed, self.options, strict=False)
        ).config

    def folder(self, cell: Cell) -> Path:
        return self.out / cell.name


def _check_type(where: str, key: str, value, kind: type):
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise PyrozooError(f"{where}: {key} must be {kind.__name__}, got {value!r}")
    return value


def read_config(path: str | os.PathLike) -> dict:
    """A grid config file (TOML) as a dict of ``Grid`` settings, checked for unknown keys and types."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        raise PyrozooError("grid config files need Python 3.11 or later (tomllib)") from None
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except OSError as e:
        raise PyrozooError(f"cannot read the config file {path}: {e.strerror or e}") from None
    except tomllib.TOMLDecodeError as e:
        raise PyrozooError(f"{path} is not valid TOML: {e}") from None
    unknown = set(raw) - set(GRID_KEYS)
    if unknown:
        raise PyrozooError(f"{path}: unknown keys {sorted(unknown)}; known: {', '.join(GRID_KEYS)}")
    settings = {}
    for key in ("nets", "methods", "data", "seeds"):
        if key in raw:
            kind = int if key == "seeds" else str
            value = raw[key]
            if not isinstance(value, list):
                raise PyrozooError(f"{path}: {key} must be a list, got {value!r}")
            settings[key] = [_check_type(str(path), key, v, kind) for v in value]
    if "out" in raw:
        settings["out"] = _check_type(str(path), "out", raw["out"], str)
    if "finetune_steps" in raw:
        settings["finetune_steps"] = _check_type(str(path), "finetune_steps", raw["finetune_steps"], int)
    train = raw.get("train", {})
    if not isinstance(train, dict):
        raise PyrozooError(f"{path}: train must be a table ([train])")
    settings["options"] = check_run_options(train, f"{path} [train]")
    return settings


def make_grid(config_file: str | os.PathLike | None = None, **overrides) -> Grid:
    """A grid from a config file (optional) with ``overrides`` on top: ``Grid`` fields, and run options
    (TrainConfig's fields, ALIASES) that replace the file's ``[train]`` values one by one (option tables such
    as ``net_options`` are merged key by key)."""
    settings = read_config(config_file) if config_file else {"options": {}}
    options = dict(settings.get("options", {}))
    run_options = {f.name for f in run_option_fields()} | set(ALIASES)
    for key, value in overrides.items():
        if key in TABLES:
            options[key] = {**options.get(key, {}), **value}
        elif key in run_options:
            options[key] = value
        elif key in ("nets", "methods", "data", "seeds", "out", "finetune_steps"):
            settings[key] = value
        else:
            raise PyrozooError(f"unknown grid setting {key!r}")
    settings["options"] = options
    settings.setdefault("nets", [])
    settings.setdefault("methods", [])
    return Grid(**settings)


# --- running ------------------------------------------------------------------------------------------------


def finished_epochs(folder: Path) -> int:
    """The last epoch the folder's checkpoint commits (0 when there is none): never metrics.csv, which may be
    one epoch ahead of a run killed between its two renames."""
    return committed_epoch(folder)


def config_differences(stored: dict, requested: TrainConfig) -> list[str]:
    """How a stored run's config differs from ``requested`` (resolved), leaving out ``EVALUATION_ONLY``.

    Keys absent from the stored config (written by an older pyrozoo, before the option existed) take their
    defaults, resolved for the stored method as then, so they count as different only if ``requested`` asks
    for something else.
    """
    try:
        old = as_stored(dataclasses.asdict(bind(TrainConfig.from_record(stored)).config))
    except PyrozooError as e:
        return [str(e)]
    new = as_stored(dataclasses.asdict(requested))
    return [
        f"{key} {old[key]!r} there, {new[key]!r} requested"
        for key in new
        if key not in EVALUATION_ONLY and old[key] != new[key]
    ]


def run_state(folder: Path, config: TrainConfig) -> str:
    """``"finished"``, ``"resume"`` (a checkpoint of an unfinished run) or ``"new"``; a folder holding a
    different run is an error."""
    path = folder / CONFIG
    if not path.exists():
        return "new"
    try:
        stored = json.loads(path.read_text())["config"]
        differences = config_differences(stored, config)
    except (ValueError, KeyError, TypeError) as e:
        raise PyrozooError(
            f"{path} is not a pyrozoo run config ({e}); remove the folder or use another --out"
        )
    except PyrozooError as e:
        raise PyrozooError(f"{folder} holds a run pyrozoo cannot read ({e})") from None
    if differences:
        raise PyrozooError(
            f"{folder} holds a different run ({'; '.join(differences)}); remove it or choose another --out"
        )
    if finished_epochs(folder) >= config.epochs:
        return "finished"
    return "resume" if (folder / CHECKPOINT).exists() else "new"


def train_run(config: TrainConfig, folder: Path, resume: bool, progress: bool) -> None:
    """Train one cell (the unit a grid runs; tests replace it to interrupt a grid)."""
    with Run(config, folder, resume=resume, log=_to_stderr) as run:
        run.train(progress=progress)


def run_cell(folder: Path, config: TrainConfig, progress: bool = False, threads: int | None = None) -> str:
    """Train one grid cell to its last epoch in this process (with ``threads`` torch threads), deciding what to
    do and doing it under the folder's lock, so that no two processes ever run a cell at once; returns what it
    found: ``"finished"``, ``"resume"`` or ``"new"``."""
    if threads is not None:
        torch.set_num_threads(threads)
    with hold_folder(folder):
        state = run_state(folder, config)
        if state != "finished":
            train_run(config, folder, resume=state == "resume", progress=progress)
    return state


def _cell_job(folder: Path, config: TrainConfig, threads: int | None = None) -> tuple[str | None, str | None]:
    """:func:`run_cell` in a worker process or a Slurm job: ``(state, None)``, or ``(None, message)`` for a
    user's error (which then comes back as its one line, not as a remote traceback)."""
    try:
        return run_cell(folder, config, threads=threads), None
    except PyrozooError as e:
        return None, str(e)


def _failed(errors: list[str]) -> PyrozooError:
    return PyrozooError(
        f"{len(errors)} grid cell(s) failed ({'; '.join(errors)}); the others are done: fix the cause and run the "
        "same command again"
    )


def _to_stderr(text: str) -> None:
    """Notes and warnings go where pyrozoo train puts them, beside the progress bars."""
    tqdm.write(text, file=sys.stderr)


# --- launchers: where the cells run ---------------------------------------------------------------------------

LAUNCHERS = Registry("launcher")


@LAUNCHERS.register("local")
@dataclass
class Local:
    """Cells as processes on this machine, ``jobs`` at once, the torch threads of this process split between
    them (with 1, one after another in this process).

    Built on :class:`concurrent.futures.ProcessPoolExecutor`: a fresh process per cell (spawned, so that no
    state of one run reaches another), whose user errors come back as one line. A cell that fails stops the grid
    once the cells running by then are done; a process that dies (killed, out of memory) stops it at once.
    """

    jobs: int = 1

    def __post_init__(self):
        if self.jobs < 1:
            raise PyrozooError(f"--jobs must be at least 1, got {self.jobs}")

    def prepare(self, grid: Grid) -> None:
        """Check what can be checked before anything runs (nothing to check here)."""

    def run(self, grid: Grid, todo: list, bar, progress: bool, log) -> bool:
        if self.jobs == 1 or len(todo) <= 1:
            for cell, config in todo:
                bar.set_postfix_str(cell.name)
                run_cell(grid.folder(cell), config, progress=progress)
                bar.update()
            return True
        threads = max(1, torch.get_num_threads() // self.jobs)
        log(f"{len(todo)} cells, {self.jobs} at a time with {threads} torch thread(s) each")
        errors = []
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(self.jobs, mp_context=context, max_tasks_per_child=1) as pool:
            futures = {
                pool.submit(_cell_job, grid.folder(cell), config, threads): cell for cell, config in todo
            }
            for future in as_completed(futures):
                cell = futures[future]
                if future.cancelled():  # not started, after another cell failed
                    continue
                try:
                    state, error = future.result()
                except BrokenProcessPool:
                    pool.shutdown(wait=False, cancel_futures=True)
                    raise PyrozooError(
                        f"the process of grid cell {cell.name} died (killed, or out of memory), which stops the "
                        "grid: run the same command again to continue from the cells' checkpoints"
                    ) from None
                if not _finished(cell, state, error, errors, bar):
                    for other in futures:
                        other.cancel()  # those not started; the running ones finish
        if errors:
            raise _failed(errors)
        return True


def _finished(cell, state, error, errors: list, bar) -> bool:
    """Record a cell a launcher saw end: its error, or its progress; True if it succeeded."""
    if error is not None:
        errors.append(f"{cell.name}: {error}")
        return False
    bar.set_postfix_str(f"{cell.name} ({state})")
    bar.update()
    return True


@LAUNCHERS.register("slurm")
@dataclass
class Slurm:
    """Each unfinished cell as one Slurm job, submitted through ``submitit``; waits for them (or, without
    ``wait``, returns once they are submitted), then the grid collects the results.

    ``options`` are submitit's: its shared ones (``timeout_min``, ``gpus_per_node``, ``cpus_per_task``,
    ``mem_gb``, ``nodes``, ``tasks_per_node``) and any of its Slurm executor's (``partition``, ``time``,
    ``account``, ``qos``, ``constraint``, ``gres``, ...; a ``slurm_`` prefix may be given or not). The option
    ``cluster`` chooses submitit's executor: ``slurm`` (the default), or ``local`` / ``debug`` to try the jobs
    on this machine. A cell whose folder another process holds (its job is running) is not submitted again;
    a job that starts while another runs its cell stops with that error, so no cell ever runs twice at once.
    """

    options: dict = field(default_factory=dict)
    wait: bool = True

    def _executor(self, folder: Path):
        try:
            import submitit
        except ImportError:
            raise PyrozooError(
                "--launcher slurm needs submitit: pip install submitit (or pip install 'pyrozoo[cluster]')"
            ) from None
        options = dict(self.options)
        cluster = str(options.pop("cluster", "slurm"))
        if cluster == "slurm" and shutil.which("sbatch") is None:
            raise PyrozooError(
                "--launcher slurm: no Slurm here (sbatch not found); run on the cluster's login node, or try the "
                "jobs on this machine with --slurm-option cluster=local"
            )
        try:
            executor = submitit.AutoExecutor(folder=folder / "%j", cluster=cluster)
        except ValueError as e:
            raise PyrozooError(f"--slurm-option cluster={cluster}: {e}") from None
        shared = submitit.AutoExecutor._valid_parameters()
        parameters = {}
        for key, value in options.items():
            key = key.removeprefix("slurm_")
            parameters[key if key in shared else f"slurm_{key}"] = value
        try:
            executor.update_parameters(**parameters)
        except (NameError, AssertionError, TypeError, ValueError) as e:
            raise PyrozooError(f"--slurm-option: {str(e).strip().splitlines()[0]}") from None
        return executor, cluster

    def prepare(self, grid: Grid) -> None:
        """Check submitit, Slurm and the options before anything is submitted."""
        self._submitter = self._executor(grid.out / ".slurm")

    def run(self, grid: Grid, todo: list, bar, progress: bool, log) -> bool:
        import submitit

        executor, cluster = self._submitter
        jobs = {}
        for cell, config in todo:
            try:
                with hold_folder(grid.folder(cell), "choose another --out"):  # free now: not running anywhere
                    pass
            except PyrozooError as e:
                log(f"{cell.name}: not submitted, {e}")
                continue
            executor.update_parameters(name=f"pyrozoo-{cell.name}")
            jobs[executor.submit(_cell_job, grid.folder(cell), config)] = cell
        if jobs:
            log(
                f"submitted {len(jobs)} job(s) to {cluster}: "
                + ", ".join(f"{cell.name} ({job.job_id})" for job, cell in jobs.items())
                + f"; logs in {grid.out / '.slurm'}"
            )
        if not self.wait:
            return False
        errors = []
        poll = 1 if cluster in ("local", "debug") else 30
        for job in submitit.helpers.as_completed(list(jobs), poll_frequency=poll):
            cell = jobs[job]
            try:
                state, error = job.result()
            except submitit.core.utils.UncompletedJobError as e:
                state, error = None, f"job {job.job_id} failed ({str(e).strip().splitlines()[0][:200]})"
            _finished(cell, state, error, errors, bar)
        if errors:
            raise _failed(errors)
        return True


def run_grid(
    grid: Grid, progress: bool = True, log=_to_stderr, launcher: Local | Slurm | None = None
) -> pd.DataFrame | None:
    """Train every unfinished cell where ``launcher`` runs them (by default one after another, here), then
    the baselines, and write and return ``results.csv``; None when the launcher only submitted the cells."""
    make_folder(grid.out)
    # Every config is checked before anything trains, so a clash shows at once, not hours into the grid.
    plan = [(cell, grid.config(cell)) for cell in grid.cells()]
    states = {cell: run_state(grid.folder(cell), config) for cell, config in plan}
    baselines = grid.cells(baselines=True)
    launcher = launcher or Local()
    launcher.prepare(grid)
    bar = tqdm(total=len(plan) + len(baselines), desc="grid", unit="run", disable=not progress, position=0)
    with bar:
        todo = [(cell, config) for cell, config in plan if states[cell] != "finished"]
        bar.update(len(plan) - len(todo))
        # A cell is decided and trained under its folder's lock (run_cell), so two grids never run it at once.
        if not launcher.run(grid, todo, bar, progress, log):
            return None
        for cell in baselines:
            bar.set_postfix_str(cell.name)
            source = grid.folder(cell.with_method(SOURCE_METHOD))
            sparsity = grid.folder(cell.with_method(SPARSITY_METHOD))
            steps = grid.finetune_steps if BASELINES[cell.method].finetuned else 0
            with hold_folder(grid.folder(cell), "choose another --out"):
                if baseline_state(grid.folder(cell), cell.method, source, sparsity, steps) != "finished":
                    run_baseline(grid.folder(cell), cell.method, source, sparsity, steps)
            bar.update()
    results = collect(grid)
    atomic_write(grid.out / RESULTS, lambda p: results.to_csv(p, index=False))
    return results


# --- results ------------------------------------------------------------------------------------------------


def collect(grid: Grid) -> pd.DataFrame:
    """Every cell's metrics.csv in one tidy table: one row per run and epoch, with data, net, method, seed."""
    frames = []
    for cell in grid.cells() + grid.cells(baselines=True):
        folder = grid.folder(cell)
        if not (folder / METRICS).exists() and not (folder / CHECKPOINT).exists():
            continue
        table = committed_metrics(folder)
        if table.empty:
            continue
        for i, column in enumerate(ID_COLUMNS):
            table.insert(i, column, getattr(cell, column))
        if cell.method in METHODS and METHODS[cell.method].reduction is None:
            # A method without BMR never prunes; runs from before the column existed leave it out.
            table["pruned_fraction"] = table.get("pruned_fraction", pd.Series(0.0, index=table.index)).fillna(
                0.0
            )
        if (folder / UNCERTAINTY).exists():  # its values belong to the final epoch's row
            for key, value in uncertainty_summary(folder / UNCERTAINTY).items():
                table.loc[table.index[-1], key] = value
        frames.append(table)
    if not frames:
        raise PyrozooError(f"no finished runs in {grid.out}")
    return pd.concat(frames, ignore_index=True)


def uncertainty_summary(path: Path) -> dict[str, float]:
    """The compare columns of a run's uncertainty.csv: clean-set AUROCs, and shifted-set means."""
    table = pd.read_csv(path)
    clean, shifted = table[table["shift"] == "none"], table[table["shift"] != "none"]
    out = {
        key: float(clean[key].iloc[0]) for key in ("entropy_auroc", "mi_auroc") if key in clean and len(clean)
    }
    for key in ("accuracy", "ece", "nll"):
        if len(shifted):
            out[f"shift_{key}"] = float(shifted[key].mean())
    return out


def final_table(results: pd.DataFrame) -> pd.DataFrame:
    """One row per dataset, net and method: the final epoch's metrics, mean (and std) over seeds."""
    final = results.sort_values("epoch", kind="stable").groupby(ID_COLUMNS, sort=False).tail(1)
    columns = [c for c in FINAL_COLUMNS + REGRESSION_COLUMNS + UNCERTAINTY_COLUMNS if c in final]
    grouped = final.groupby(["data", "net", "method"], sort=False)
    table = grouped[columns].mean()
    std = grouped[[c for c in ("accuracy", "nll", "ece", "rmse") if c in final]].std().add_suffix("_std")
    table = table.join(std)
    table["seeds"] = grouped["seed"].nunique()
    table["epoch"] = grouped["epoch"].max()
    # Whether a row prunes: a baseline or BMR method does, and so does any run that made BMR passes (a grid's
    # --rule can give one to a method that prunes nothing by itself).
    passes = results.assign(_passes=results["bmr_seconds"].notna() if "bmr_seconds" in results else False)
    table["prunes"] = passes.groupby(["data", "net", "method"], sort=False)["_passes"].any()
    methods = table.index.get_level_values("method")
    table["prunes"] |= pd.Series([_prunes_by_name(m) for m in methods], index=table.index)
    # Keep the order in which the grid lists things (groupby(sort=False) keeps first appearance per key).
    return table.reset_index()


def _short(value: float, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    text = f"{value:.{digits}f}"
    return text[1:] if text.startswith("0.") else text


def _prunes_by_name(method: str) -> bool:
    return method in BASELINES or (method in METHODS and METHODS[method].reduction is not None)


def markdown(rows: list[list[str]], header: list[str]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def paper_table(final: pd.DataFrame, data: str) -> str:
    """The shape of docs/method.md#reference-results: one row per net, each cell the methods' values joined
    by ' / '."""
    part = final[final["data"] == data]
    methods = list(dict.fromkeys(part["method"]))
    regression = "rmse" in part and bool(part["rmse"].notna().any())
    rows = []
    for net, group in part.groupby("net", sort=False):
        by_method = group.set_index("method")

        def cell(column, digits=3, only_pruning=False):
            return " / ".join(
                (
                    _short(by_method[column].get(m, math.nan), digits)
                    if not only_pruning or by_method["prunes"].get(m, False)
                    else "-"
                )
                for m in methods
            )

        if regression:
            rows.append(
                [
                    net,
                    cell("rmse"),
                    cell("nll", 2),
                    cell("coverage90"),
                    cell("pruned_fraction", only_pruning=True),
                ]
            )
        else:
            rows.append(
                [
                    net,
                    cell("accuracy"),
                    cell("ece"),
                    cell("nll", 2),
                    cell("pruned_fraction", only_pruning=True),
                ]
            )
    title = f"{data}, final epoch, order {' / '.join(methods)}:"
    header = ["RMSE", "NLL", "90% coverage"] if regression else ["accuracy", "ECE", "NLL"]
    return title + "\n\n" + markdown(rows, ["net", *header, "pruned fraction"])


def _seconds(value: float) -> str:
    """Whole seconds from 10 s up; two significant digits below, so a run of a fraction of a second does not
    read as 0 s."""
    if math.isnan(value):
        return "-"
    return f"{value:.0f}" if value >= 10 else f"{value:.2g}"


def long_table(final: pd.DataFrame) -> str:
    """Every dataset x net x method with all final metrics; ± the std over seeds where there are several."""
    rows = []
    for r in final.itertuples(index=False):

        def pm(name, digits=4):
            if math.isnan(getattr(r, name, math.nan)):
                return "-"
            value = f"{getattr(r, name):.{digits}f}"
            std = getattr(r, name + "_std", math.nan)
            return value + (f" ± {std:.{digits}f}" if r.seeds > 1 and not math.isnan(std) else "")

        pruned = r.pruned_fraction if r.prunes else math.nan
        rows.append(
            [
                r.data,
                r.net,
                r.method,
                pm("accuracy"),
                pm("nll", 3),
                pm("ece"),
                pm("ece15"),
                pm("brier"),
                pm("lpd", 3),
                pm("rmse"),
                pm("coverage90", 3),
                pm("entropy_auroc", 3),
                "-" if math.isnan(pruned) else f"{pruned:.3f}",
                _seconds(r.seconds),
                str(r.epoch),
                str(r.seeds),
            ]
        )
    header = [
        "data",
        "net",
        "method",
        "accuracy",
        "NLL",
        "ECE (20 eq.-mass)",
        "ECE (15 eq.-width)",
        "Brier",
        "LPD",
        "RMSE",
        "90% coverage",
        "entropy AUROC",
        "pruned",
        "training s",
        "epoch",
        "seeds",
    ]
    return markdown(rows, header)


def summary_markdown(results: pd.DataFrame) -> str:
    """The printed summary: per dataset a table shaped as docs/method.md#reference-results, then the long one."""
    final = final_table(results)
    parts = [paper_table(final, data) for data in dict.fromkeys(final["data"])]
    return "\n\n".join(parts + ["All final metrics (mean over seeds):\n\n" + long_table(final)]) + "\n"
