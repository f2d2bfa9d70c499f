"""The experiment grid behind ``pyrozoo compare``: nets x methods x datasets x seeds, one run folder each.

A grid folder holds one run folder per cell, ``<net>-<method>-<data>-s<seed>`` (``pyrozoo train``'s naming). The
grid is resumable: a run whose ``metrics.csv`` reaches the last epoch is skipped, an unfinished one continues
from its checkpoint, and a folder holding a different run is an error, never silently reused. Every run's
``metrics.csv`` is collected into one tidy table, ``results.csv`` (one row per run and epoch), and summarised
at the final epoch in the shape of PAPER.md §7.

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
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pandas as pd
from tqdm.auto import tqdm

from pyrozoo import data as datasets
from pyrozoo.baselines import BASELINES, SOURCE_METHOD, SPARSITY_METHOD, baseline_state, run_baseline
from pyrozoo.errors import PyrozooError
from pyrozoo.methods import METHODS, get_method
from pyrozoo.nets import NETS
from pyrozoo.train import CHECKPOINT, CONFIG, METRICS, Run, TrainConfig

RESULTS, TABLE = "results.csv", "table.md"

# The options of one run that `pyrozoo train` and a grid share, with their defaults and types.
RUN_OPTIONS: dict[str, tuple[object, type]] = {
    "data_dir": (None, str),
    "guide": (None, str),
    "epochs": (50, int),
    "steps_per_epoch": (500, int),
    "batch_size": (120, int),
    "lr": (None, float),
    "optimizer": (None, str),
    "samples": (None, int),
    "eval_every": (1, int),
    "warmup_steps": (None, int),
    "device": ("cpu", str),
    "dropout": (None, float),
    "hidden_scale": (None, float),
    "tau0": (None, float),
    "local_scales": (False, bool),
    "count_pruned": (False, bool),
    "prune_units": (False, bool),
    "net_options": ({}, dict),
}
GRID_KEYS = ("out", "nets", "methods", "data", "seeds", "finetune_steps", "train")
ID_COLUMNS = ["data", "net", "method", "seed"]
FINAL_COLUMNS = ["accuracy", "nll", "ece", "ece15", "brier", "lpd", "pruned_fraction", "seconds"]

# Where a stored run's config may differ from the requested one: these only say how often, in what batches
# and from which folder the test set is evaluated, never what the run learns (evaluation draws its posterior
# samples from a stream of its own), so a finished run stays valid whatever they are.
EVALUATION_ONLY = ("eval_every", "eval_batch_size", "data_dir")


def _option_owners(option: str) -> tuple[str, Callable]:
    """What an option belongs to (for messages, naming the methods it applies to) and which methods those are."""
    if option in ("tau0", "local_scales"):
        owner, applies = "the tiered prior", lambda m: m.prior.__name__ == "tiered"
    elif option == "hidden_scale":
        owner, applies = "the flat prior", lambda m: m.prior.__name__ == "flat"
    elif option == "prune_units":
        owner, applies = "the BMR methods", lambda m: m.rule is not None
    else:
        owner, applies = "the spike-and-slab rule", lambda m: m.rule == "spike-and-slab"
    return f"{owner} ({', '.join(name for name, m in METHODS.items() if applies(m))})", applies


def _given(option: str, value) -> bool:
    return value is not None and value is not False


def train_config(
    net: str, method: str, data: str | None, seed: int, options: dict, strict=True
) -> TrainConfig:
    """The run of ``net`` x ``method`` on ``data`` with ``seed`` under the run ``options`` (``RUN_OPTIONS``).

    Prior and rule options (``tau0``, ``local_scales``, ``hidden_scale``, ``count_pruned``) reach the methods
    they belong to; with ``strict`` an option that does not belong to ``method`` is an error (as for
    ``pyrozoo train``), otherwise it is left out of this run (as in a grid of several methods).
    """
    o = {name: options.get(name, default) for name, (default, _) in RUN_OPTIONS.items()}
    m = get_method(method)
    for option in ("tau0", "local_scales", "hidden_scale", "count_pruned", "prune_units"):
        owner, applies = _option_owners(option)
        if strict and _given(option, o[option]) and not applies(m):
            if option in ("tau0", "local_scales"):
                raise PyrozooError(f"--tau0 and --local-scales belong to {owner}")
            raise PyrozooError(f"{_flag(option)} belongs to {owner}")
    prior_options = {}
    if m.prior.__name__ == "tiered":
        prior_options = {"tau0": o["tau0"]} if o["tau0"] is not None else {}
        if o["local_scales"]:
            prior_options["local"] = True
    elif m.prior.__name__ == "flat" and o["hidden_scale"] is not None:
        prior_options = {"hidden_scale": o["hidden_scale"]}
    return TrainConfig(
        net=net,
        data=data,
        data_dir=o["data_dir"],
        method=method,
        guide=o["guide"],
        epochs=o["epochs"],
        steps_per_epoch=o["steps_per_epoch"],
        batch_size=o["batch_size"],
        lr=o["lr"],
        optimizer=o["optimizer"],
        samples=o["samples"],
        warmup_steps=o["warmup_steps"],
        eval_every=o["eval_every"],
        device=o["device"],
        seed=seed,
        net_options={
            **(o["net_options"] or {}),
            **({} if o["dropout"] is None else {"dropout": o["dropout"]}),
        },
        prior_options=prior_options,
        rule_options={
            **({"count_pruned": True} if o["count_pruned"] and m.rule == "spike-and-slab" else {}),
            **({"units": True} if o["prune_units"] and m.rule is not None else {}),
        },
    )


def _flag(option: str) -> str:
    return "--" + option.replace("_", "-")


@dataclass(frozen=True)
class Cell:
    net: str
    method: str
    data: str
    seed: int

    @property
    def name(self) -> str:
        return f"{self.net}-{self.method}-{self.data}-s{self.seed}"

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
    options: dict = field(default_factory=dict)  # run options (RUN_OPTIONS)
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
                if value not in known:
                    raise PyrozooError(f"unknown name {value!r} in {key}; choose from {', '.join(known)}")
            if len(set(values)) != len(values):
                raise PyrozooError(f"{key} lists a name twice: {values}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise PyrozooError(f"seeds must be distinct and at least one, got {self.seeds}")
        if self.finetune_steps < 0:
            raise PyrozooError(f"finetune-steps must not be negative, got {self.finetune_steps}")
        unknown = set(self.options) - set(RUN_OPTIONS)
        if unknown:
            raise PyrozooError(f"unknown run options {sorted(unknown)}; known: {', '.join(RUN_OPTIONS)}")
        baselines = [m for m in self.methods if m in BASELINES]
        missing = [m for m in (SOURCE_METHOD, SPARSITY_METHOD) if m not in self.methods]
        if baselines and missing:
            raise PyrozooError(
                f"{', '.join(baselines)} prune the {SOURCE_METHOD} net to the sparsity {SPARSITY_METHOD} reached: "
                f"add {' and '.join(missing)} to the methods"
            )
        trained = [METHODS[m] for m in self.training_methods]
        for option in ("tau0", "local_scales", "hidden_scale", "count_pruned", "prune_units"):
            owner, applies = _option_owners(option)
            if _given(option, self.options.get(option)) and not any(applies(m) for m in trained):
                raise PyrozooError(f"{_flag(option)} belongs to {owner}, which no method of the grid uses")

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
        return train_config(
            cell.net, cell.method, cell.data, cell.seed, self.options, strict=False
        ).resolved()

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
    unknown = set(train) - set(RUN_OPTIONS)
    if unknown:
        raise PyrozooError(
            f"{path}: unknown keys {sorted(unknown)} in [train]; known: {', '.join(RUN_OPTIONS)}"
        )
    settings["options"] = {
        key: _check_type(f"{path} [train]", key, value, RUN_OPTIONS[key][1]) for key, value in train.items()
    }
    return settings


def make_grid(config_file: str | os.PathLike | None = None, **overrides) -> Grid:
    """A grid from a config file (optional) with ``overrides`` on top: ``Grid`` fields, and run options
    (``RUN_OPTIONS`` names) that replace the file's ``[train]`` values one by one."""
    settings = read_config(config_file) if config_file else {"options": {}}
    options = dict(settings.get("options", {}))
    for key, value in overrides.items():
        if key in RUN_OPTIONS:
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
    """The last epoch in the folder's metrics.csv (0 when there is none)."""
    path = folder / METRICS
    if not path.exists():
        return 0
    epochs = pd.read_csv(path)["epoch"]
    return int(epochs.max()) if len(epochs) else 0


def config_differences(stored: dict, requested: TrainConfig) -> list[str]:
    """How a stored run's config differs from ``requested`` (resolved), leaving out ``EVALUATION_ONLY``.

    Keys absent from the stored config (written by an older pyrozoo, before the option existed) take their
    defaults, resolved for the stored method as then, so they count as different only if ``requested`` asks
    for something else.
    """
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(stored) - known)
    if unknown:
        return [f"unknown config keys {unknown}"]
    old = json.loads(json.dumps(dataclasses.asdict(TrainConfig(**stored).resolved())))
    new = json.loads(json.dumps(dataclasses.asdict(requested)))
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
    Run(config, folder, resume=resume, log=tqdm.write).train(progress=progress)


def run_grid(grid: Grid, progress: bool = True, log=tqdm.write) -> pd.DataFrame:
    """Train every unfinished cell, then the baselines, and write and return ``results.csv``."""
    try:
        grid.out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PyrozooError(f"cannot make the grid folder {grid.out}: {e.strerror or e}") from None
    # Every config is checked before anything trains, so a clash shows at once, not hours into the grid.
    plan = [(cell, grid.config(cell)) for cell in grid.cells()]
    states = {cell: run_state(grid.folder(cell), config) for cell, config in plan}
    baselines = grid.cells(baselines=True)
    bar = tqdm(total=len(plan) + len(baselines), desc="grid", unit="run", disable=not progress, position=0)
    with bar:
        for cell, config in plan:
            state = states[cell]
            bar.set_postfix_str(f"{cell.name} ({state})")
            if state != "finished":
                train_run(config, grid.folder(cell), resume=state == "resume", progress=progress)
            bar.update()
        for cell in baselines:
            bar.set_postfix_str(cell.name)
            source = grid.folder(cell.with_method(SOURCE_METHOD))
            sparsity = grid.folder(cell.with_method(SPARSITY_METHOD))
            steps = grid.finetune_steps if BASELINES[cell.method].finetuned else 0
            if baseline_state(grid.folder(cell), cell.method, source, sparsity, steps) != "finished":
                run_baseline(grid.folder(cell), cell.method, source, sparsity, steps)
            bar.update()
    results = collect(grid)
    tmp = grid.out / (RESULTS + ".tmp")
    results.to_csv(tmp, index=False)
    os.replace(tmp, grid.out / RESULTS)
    return results


# --- results ------------------------------------------------------------------------------------------------


def collect(grid: Grid) -> pd.DataFrame:
    """Every cell's metrics.csv in one tidy table: one row per run and epoch, with data, net, method, seed."""
    frames = []
    for cell in grid.cells() + grid.cells(baselines=True):
        path = grid.folder(cell) / METRICS
        if not path.exists():
            continue
        table = pd.read_csv(path)
        for i, column in enumerate(ID_COLUMNS):
            table.insert(i, column, getattr(cell, column))
        if cell.method in METHODS and METHODS[cell.method].rule is None:
            # A method without BMR never prunes; runs from before the column existed leave it out.
            table["pruned_fraction"] = table.get("pruned_fraction", pd.Series(0.0, index=table.index)).fillna(
                0.0
            )
        frames.append(table)
    if not frames:
        raise PyrozooError(f"no finished runs in {grid.out}")
    return pd.concat(frames, ignore_index=True)


def final_table(results: pd.DataFrame) -> pd.DataFrame:
    """One row per dataset, net and method: the final epoch's metrics, mean (and std) over seeds."""
    final = results.sort_values("epoch", kind="stable").groupby(ID_COLUMNS, sort=False).tail(1)
    columns = [c for c in FINAL_COLUMNS if c in final]
    grouped = final.groupby(["data", "net", "method"], sort=False)
    table = grouped[columns].mean()
    std = grouped[["accuracy", "nll", "ece"]].std().add_suffix("_std")
    table = table.join(std)
    table["seeds"] = grouped["seed"].nunique()
    table["epoch"] = grouped["epoch"].max()
    # Keep the order in which the grid lists things (groupby(sort=False) keeps first appearance per key).
    return table.reset_index()


def _short(value: float, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    text = f"{value:.{digits}f}"
    return text[1:] if text.startswith("0.") else text


def _prunes(method: str) -> bool:
    return method in BASELINES or (method in METHODS and METHODS[method].rule is not None)


def markdown(rows: list[list[str]], header: list[str]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def paper_table(final: pd.DataFrame, data: str) -> str:
    """PAPER.md §7's shape: one row per net, each cell the methods' values joined by ' / '."""
    part = final[final["data"] == data]
    methods = list(dict.fromkeys(part["method"]))
    rows = []
    for net, group in part.groupby("net", sort=False):
        by_method = group.set_index("method")

        def cell(column, digits=3, only_pruning=False):
            return " / ".join(
                _short(by_method[column].get(m, math.nan), digits) if not only_pruning or _prunes(m) else "-"
                for m in methods
            )

        rows.append(
            [net, cell("accuracy"), cell("ece"), cell("nll", 2), cell("pruned_fraction", only_pruning=True)]
        )
    title = f"{data}, final epoch, order {' / '.join(methods)}:"
    return title + "\n\n" + markdown(rows, ["net", "accuracy", "ECE", "NLL", "pruned fraction"])


def long_table(final: pd.DataFrame) -> str:
    """Every dataset x net x method with all final metrics; ± the std over seeds where there are several."""
    rows = []
    for r in final.itertuples(index=False):

        def pm(name, digits=4):
            value = f"{getattr(r, name):.{digits}f}"
            std = getattr(r, name + "_std", math.nan)
            return value + (f" ± {std:.{digits}f}" if r.seeds > 1 and not math.isnan(std) else "")

        pruned = r.pruned_fraction if _prunes(r.method) else math.nan
        rows.append(
            [
                r.data,
                r.net,
                r.method,
                pm("accuracy"),
                pm("nll", 3),
                pm("ece"),
                f"{r.ece15:.4f}",
                f"{r.brier:.4f}",
                f"{r.lpd:.3f}",
                "-" if math.isnan(pruned) else f"{pruned:.3f}",
                f"{r.seconds:.0f}",
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
        "pruned",
        "training s",
        "epoch",
        "seeds",
    ]
    return markdown(rows, header)


def summary_markdown(results: pd.DataFrame) -> str:
    """The printed summary: PAPER.md §7-shaped tables per dataset, then the long table."""
    final = final_table(results)
    parts = [paper_table(final, data) for data in dict.fromkeys(final["data"])]
    return "\n\n".join(parts + ["All final metrics (mean over seeds):\n\n" + long_table(final)]) + "\n"
