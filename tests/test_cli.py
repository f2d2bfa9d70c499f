"""Tests for the ``pyrozoo`` command: one-line errors (exit code 2), a tiny training run, resume, ``info``."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from clitools import assert_one_line_error, cli

from pyrozoo import data
from pyrozoo.cli import SUMMARY_COLUMNS
from pyrozoo.guides import GUIDES
from pyrozoo.methods import METHODS
from pyrozoo.nets import NETS

TINY = [
    "--data",
    "fashion-mnist-mini",
    "--net",
    "mlp",
    "--steps-per-epoch",
    "3",
    "--batch-size",
    "32",
    "--samples",
    "2",
    "--no-progress",
]


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """Work in tmp_path (the default --out is relative), with no data, cache, Debian copy or network."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PYROZOO_DATA", str(tmp_path / "no-data"))
    monkeypatch.setenv("PYROZOO_CACHE", str(tmp_path / "no-cache"))
    (tmp_path / "no-data").mkdir()
    (tmp_path / "no-cache").mkdir()
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST", str(tmp_path / "no-debian"))

    def no_network(name, root):
        raise ConnectionError("network disabled\n  in tests")

    monkeypatch.setattr(data, "_download", no_network)


# --- user errors ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, words",  # the flag itself is always among the words
    [
        (["--net", "resnet-9000"], ["resnet-9000", "lenet", "mlp"]),
        (["--method", "magic"], ["magic", "flat-ff"]),
        (["--data", "imagenet"], ["imagenet", "fashion-mnist-mini"]),
        (["--guide", "flow"], ["flow", "meanfield"]),
        (["--epochs", "0"], ["positive"]),
        (["--epochs", "-2"], ["positive"]),
        (["--batch-size", "0"], ["positive"]),
        (["--steps-per-epoch", "0"], ["positive"]),
        (["--samples", "0"], ["positive"]),
        (["--eval-every", "0"], ["positive"]),
        (["--lr", "0"], ["positive"]),
        (["--lr", "-0.01"], ["positive"]),
        (["--lr", "nan"], ["positive"]),
        (["--epochs", "two"], ["'two'"]),
        (["--epochs", "1.5"], ["'1.5'"]),
        (["--lr", "fast"], ["'fast'"]),
        (["--seed", "x"], []),
        (["--bogus"], []),
    ],
)
def test_bad_arguments(capsys, tmp_path, args, words):
    code, out, err = cli(capsys, "train", *TINY, *args)
    assert_one_line_error(code, out, err, args[0], *words)
    assert not (tmp_path / "runs").exists()  # rejected before any run folder was made


@pytest.mark.parametrize(
    "args, words",
    [
        (["--seed", "-1"], ["seed"]),
        (["--seed", str(2**32)], ["seed"]),
        (["--device", "gpu0"], ["device", "gpu0"]),
        (["--init-from", "/nonexistent/net.pt"], ["--init-from", "no such file"]),
        (["--method", "ivon-bmr", "--prior", "flat"], ["ivon", "fixed prior"]),
        (["--method", "bmr-th", "--guide", "ivon"], ["ivon"]),
    ],
)
def test_bad_values_found_after_parsing(capsys, tmp_path, args, words):
    code, out, err = cli(capsys, "train", *TINY, "--out", str(tmp_path / "run"), *args)
    assert_one_line_error(code, out, err, *words)
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


@pytest.mark.parametrize("argv", [[], ["frobnicate"], ["info", "--extra"]])
def test_bad_command(capsys, argv):
    assert_one_line_error(*cli(capsys, *argv))


def test_missing_dataset(capsys, tmp_path):
    code, out, err = cli(capsys, "train", *TINY[2:], "--data", "mnist", "--out", str(tmp_path / "run"))
    line = assert_one_line_error(code, out, err, "'mnist' not found", "network disabled in tests")
    assert str(tmp_path / "no-data") in line and str(tmp_path / "no-cache") in line  # says where it looked
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


@pytest.mark.parametrize("where", ["under-a-file", "is-a-file"])
def test_unwritable_out(capsys, tmp_path, where):
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    out = blocker / "run" if where == "under-a-file" else blocker
    assert_one_line_error(*cli(capsys, "train", *TINY, "--out", str(out)), "cannot write", str(out))


# --- training ---------------------------------------------------------------------------------------------


def summary_table(stdout: str) -> pd.DataFrame:
    """The table after the summary's title line, parsed back from its fixed-width text."""
    lines = stdout.strip().splitlines()
    title = next(i for i, line in enumerate(lines) if "metrics per evaluated epoch" in line)
    table = lines[title + 1 :]
    table = table[: table.index("")] if "" in table else table  # the files written and next commands follow
    rows = [line.split() for line in table]
    return pd.DataFrame([[float(v) for v in row] for row in rows[1:]], columns=rows[0])


def test_tiny_training_run(capsys, tmp_path):
    out = tmp_path / "run"
    code, stdout, err = cli(capsys, "train", *TINY, "--epochs", "1", "--out", str(out))
    assert code == 0, err
    assert "Traceback" not in err and "\r" not in err  # --no-progress: no progress bar
    assert len(err.splitlines()) == 1 and err.startswith("training mlp with flat-ff")
    assert "fashion-mnist-mini" in err and str(out) in err

    table = summary_table(stdout)
    assert list(table.columns) == SUMMARY_COLUMNS and "accuracy" in table and "ece" in table
    assert list(table["epoch"]) == [1]
    metrics = pd.read_csv(out / "metrics.csv")
    assert len(metrics) == 1
    for column in ("accuracy", "ece", "nll"):
        assert table[column][0] == pytest.approx(metrics[column][0], abs=5e-5)
    assert {p.name for p in out.iterdir()} == {
        "config.json",
        "metrics.csv",
        "checkpoint.pt",
        "scales.csv",
        ".lock",
    }
    assert torch.load(out / "checkpoint.pt", weights_only=False)["step"] == 3


def test_existing_run_needs_resume(capsys, ff_run):
    out = ff_run  # trained as TINY for one epoch
    checkpoint = (out / "checkpoint.pt").read_bytes()

    assert_one_line_error(*cli(capsys, "train", *TINY, "--epochs", "1", "--out", str(out)), "--resume")
    assert (out / "checkpoint.pt").read_bytes() == checkpoint

    code, stdout, err = cli(capsys, "train", *TINY, "--epochs", "2", "--out", str(out), "--resume")
    assert code == 0, err
    assert list(summary_table(stdout)["epoch"]) == [1, 2]
    assert list(pd.read_csv(out / "metrics.csv")["step"]) == [3, 6]


@pytest.mark.parametrize("folder", ["missing", "empty"])
def test_resume_of_nothing(capsys, tmp_path, folder):
    out = tmp_path / folder
    if folder == "empty":
        out.mkdir()
    assert_one_line_error(*cli(capsys, "train", *TINY, "--out", str(out), "--resume"), str(out))
    assert not (out / "checkpoint.pt").exists()


def test_default_data_falls_back_to_the_bundled_subset(capsys, tmp_path):
    # No full Fashion-MNIST anywhere and no network: a warning, then the bundled subset in the default folder.
    code, stdout, err = cli(capsys, "train", *TINY[2:], "--epochs", "1", "--samples", "1")
    assert code == 0, err
    assert "using the bundled subset 'fashion-mnist-mini'" in err
    assert (tmp_path / "runs" / "mlp-flat-ff-default-s0" / "checkpoint.pt").exists()
    assert "on fashion-mnist-mini" in stdout


# --- info -------------------------------------------------------------------------------------------------


def test_info_lists_every_name(capsys):
    code, stdout, err = cli(capsys, "info")
    assert code == 0 and err == ""
    listed = {line.split()[0] for line in stdout.splitlines() if line.startswith("  ")}
    assert set(NETS) | set(METHODS) | set(GUIDES) | set(data.DATASETS) <= listed
    for section in ("nets:", "methods:", "guides:", "datasets:"):
        assert section in stdout.splitlines()
    mini = next(line for line in stdout.splitlines() if line.split()[0] == "fashion-mnist-mini")
    assert "bundled with pyrozoo" in " ".join(stdout.split("fashion-mnist-mini", 1)[1].split()[:20])
    assert "not here" in " ".join(stdout.split("\n  mnist", 1)[1].split()[:20])
    del mini


def test_info_fits_the_terminal_and_speaks_in_words(capsys, monkeypatch):
    """Every line within the terminal's width; each component described in words, not by another library's
    docstring or a code expression; the optional extras said installed or how to install them."""
    monkeypatch.setenv("COLUMNS", "80")
    code, stdout, _ = cli(capsys, "info")
    assert code == 0 and max(map(len, stdout.splitlines())) > 80  # piped: one line per entry, for grep
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)  # as on a terminal 80 columns wide
    code, stdout, _ = cli(capsys, "info")
    assert code == 0 and max(map(len, stdout.splitlines())) <= 80
    flat = " ".join(stdout.split())
    assert "Implements Adam" not in flat and "[severity - 1]" not in flat and "15/30/45/60/90 degrees" in flat
    assert "optional extras:" in stdout.splitlines()
    extras = stdout.split("optional extras:\n", 1)[1]
    rows = [" ".join(row.split()) for row in re.split(r"\n(?=  \S)", extras) if row.strip()]
    assert len(rows) >= 5 and all(row.endswith("installed") or "(pip install" in row for row in rows), rows


def test_installed_console_script(tmp_path):
    script = shutil.which("pyrozoo") or str(Path(sys.executable).with_name("pyrozoo"))
    if not os.path.exists(script):
        pytest.skip("the pyrozoo console script is not installed")
    env = {**os.environ, "PYROZOO_DATA": str(tmp_path), "PYROZOO_CACHE": str(tmp_path)}
    kwargs = dict(capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    done = subprocess.run([script, "info"], **kwargs)
    assert done.returncode == 0, done.stderr
    for name in [*NETS, *METHODS, *data.DATASETS]:
        assert f"  {name} " in done.stdout
    bad = subprocess.run([script, "train", "--epochs", "0"], **kwargs)
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.splitlines() == [bad.stderr.strip()] and bad.stderr.startswith("pyrozoo: error:")


def test_prune_and_export_a_finished_run(capsys, tmp_path, ff_run):
    """One-shot BMR of a tiny flat-ff run, then export of the rebuilt sparse net."""
    code, out, err = cli(capsys, "prune", "run", "--rule", "threshold", "--margin=-1e9")
    assert code == 0, err
    assert "pruned fraction 1.0000" in out  # margin -1e9: every prunable weight goes
    assert (tmp_path / "run" / "pruned.pt").exists()
    code, out, err = cli(capsys, "export", "run", "--repeats", "2")
    assert code == 0, err
    assert "pruned.pt" in out and "latency_ms_batch256" in out
    summary = pd.read_json(tmp_path / "run" / "export" / "summary.json", typ="series")
    assert summary["units_cut"]["parameters"] < summary["full_shapes"]["parameters"]
    # named as the command prints them, with the dense count
    assert summary["trained_parameters"] == summary["full_shapes"]["parameters"] and "dense" not in summary
    assert "pruned, full shapes" in out and "pruned, dead units cut" in out
    program = torch.export.load(tmp_path / "run" / "export" / "sparse.pt2")
    x = torch.zeros(3, 1, 28, 28)
    assert program.module()(x).shape == (3, 10)


def test_prune_removes_whole_units(capsys, tmp_path, ff_run):
    code, out, err = cli(capsys, "prune", "run", "--rule", "units", "--margin=-1e9")
    assert code == 0, err
    # every unit but those the live-path guard keeps (issue 32); asked for, the net is emptied
    assert "pruned fraction 0.99" in out and "live units removed" in out
    assert "next:" in out and "pyrozoo export run --pruned run" in out  # what to do with the pruned state
    code, out, err = cli(
        capsys, "prune", "run", "--rule", "units", "--margin=-1e9", "--rule-option", "allow_empty=true"
    )
    assert code == 0, err
    assert "pruned fraction 1.0000" in out


def test_prune_refuses_a_map_run(capsys, map_run):
    assert_one_line_error(*cli(capsys, "prune", "map"), "point mass")


def test_prune_needs_a_run(capsys):
    assert_one_line_error(*cli(capsys, "prune", "nowhere"), "nowhere")


@pytest.mark.parametrize(
    "argv",
    [
        ["--method", "flat-ff", "--tau0", "0.1"],
        ["--method", "bmr-ss", "--local-scales"],
        ["--method", "tiered-ff", "--hidden-scale", "1"],
    ],
)
def test_prior_options_belong_to_their_prior(capsys, argv):
    assert_one_line_error(*cli(capsys, "train", *TINY, *argv), argv[2])


def test_prior_options_reach_the_run(capsys, tmp_path):
    code, _, err = cli(
        capsys, "train", *TINY, "--method", "tiered-ff", "--tau0", "0.05", "--epochs", "1", "--out", "tiered"
    )
    assert code == 0, err
    config = pd.read_json(tmp_path / "tiered" / "config.json", typ="series")["config"]
    assert config["prior_options"] == {"tau0": 0.05}


def test_net_options_structured_pruning_and_optimizer_reach_the_run(capsys, tmp_path):
    argv = [
        *TINY,
        "--net",
        "vit",
        "--net-option",
        "preset=tiny",
        "--net-option",
        "depth=1",
        "--method",
        "bmr-ss",
    ]
    code, _, err = cli(
        capsys,
        "train",
        *argv,
        "--prune-units",
        "--optimizer",
        "adabelief",
        "--warmup-steps",
        "1",
        "--epochs",
        "2",
        "--out",
        "r",
    )
    assert code == 0, err
    assert "adabelief lr 0.01" in err
    config = json.loads((tmp_path / "r" / "config.json").read_text())["config"]
    assert config["net_options"] == {"preset": "tiny", "depth": 1}
    assert config["prune_units"] is True and config["rule_options"] == {}
    assert config["optimizer"] == "adabelief"
    assert_one_line_error(*cli(capsys, "train", *TINY, "--net-option", "depth"), "KEY=VALUE")
    assert_one_line_error(*cli(capsys, "train", *TINY, "--optimizer", "sgd"), "sgd", "adabelief")
    assert_one_line_error(
        *cli(capsys, "train", *TINY, "--method", "flat-ff", "--prune-units"), "--prune-units", "BMR methods"
    )


def test_a_rule_option_reaches_its_reduction_and_one_it_does_not_take_is_refused(capsys, tmp_path, ff_run):
    assert_one_line_error(
        *cli(capsys, "prune", "run", "--rule", "spike-and-slab", "--rule-option", "margin=1"),
        "reduction 'spike-and-slab' takes no option 'margin'; its options: count_pruned, max_cutoff, iterations",
    )
    assert not (tmp_path / "run" / "pruned.pt").exists()
    code, out, err = cli(capsys, "prune", "run", "--rule", "threshold", "--rule-option", "margin=-1e9")
    assert code == 0, err
    assert "threshold(margin=-1000000000.0)" in out and "pruned fraction 1.0000" in out
    assert_one_line_error(*cli(capsys, "prune", "run", "--rule", "threshold", "--margin", "nan"), "finite")


def test_autonormal_trains_prunes_and_exports(capsys, tmp_path):
    argv = ["train", *TINY, "--method", "bmr-th", "--guide", "autonormal", "--warmup-steps", "0"]
    code, _, err = cli(capsys, *argv, "--epochs", "2", "--out", "run")
    assert code == 0, err
    assert cli(capsys, "prune", "run", "--rule", "units")[0] == 0
    code, out, err = cli(capsys, "export", "run", "--repeats", "2")
    assert code == 0, err
    assert "exported" in out


def test_a_warm_up_as_long_as_the_run_is_announced(capsys, tmp_path):
    from pyrozoo.bind import bind
    from pyrozoo.config import TrainConfig

    # The case: 500 warm-up steps outlast the BMR passes after epochs 1-3 of 100 steps each.
    assert bind(TrainConfig(method="bmr-ss", epochs=4, steps_per_epoch=100)).bmr_passes() == 0
    assert bind(TrainConfig(method="bmr-ss", epochs=7, steps_per_epoch=100)).bmr_passes() == 2
    bmr = ["train", *TINY, "--method", "bmr-ss", "--epochs", "2", "--steps-per-epoch", "3"]
    code, _, err = cli(capsys, *bmr, "--warmup-steps", "6", "--out", "late")
    assert code == 0, err
    assert "warning: no BMR pass will run" in err and "--warmup-steps" in err
    code, _, err = cli(capsys, *bmr, "--warmup-steps", "3", "--out", "in-time")
    assert code == 0, err
    assert "warning" not in err


def test_resume_refuses_a_flag_that_changes_the_run(capsys, tmp_path, ff_run):
    assert_one_line_error(
        *cli(capsys, "train", "--out", "run", "--resume", "--lr", "1", "--no-progress"), "--lr", "--resume"
    )
    assert_one_line_error(
        *cli(capsys, "train", "--out", "run", "--resume", "--method", "bmr-th", "--no-progress"), "--method"
    )
    code, _, err = cli(
        capsys, "train", "--out", "run", "--resume", "--epochs", "2", "--no-progress", "--net", "mlp"
    )
    assert code == 0, err
    assert json.loads((tmp_path / "run" / "config.json").read_text())["config"]["epochs"] == 2


def test_a_flag_is_never_guessed_from_its_prefix(tmp_path, capsys):
    code, out, err = cli(capsys, "train", "--net", "mlp", "--epoch", "1", "--out", str(tmp_path / "run"))
    assert_one_line_error(code, out, err, "--epoch")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "argv, words",
    [
        (["train", "--epoch", "1"], ["train: unrecognized arguments: --epoch 1", "did you mean '--epochs'"]),
        (["train", "--net", "mlpp"], ["did you mean 'mlp'"]),
        (["train", "--method", "bmr-tt"], ["did you mean 'bmr-th'"]),
        (
            ["train", "--method", "bmr-th", "--rule-option", "marign=1"],
            ["takes no rule option 'marign' (did you mean 'margin'?)"],
        ),
        (
            ["train", "--net-option", "hidden=(100,100"],
            ["hidden=(100,100: not a valid value", "was never closed"],
        ),
        (["train", "--data", "fashon-mnist"], ["did you mean 'fashion-mnist'"]),
    ],
)
def test_a_mistake_gets_the_fix_suggested(capsys, tmp_path, argv, words):
    """Issue 30: misspelt flags, names and option keys get the closest known one, a malformed value a syntax
    hint, and the message has one 'pyrozoo:' prefix."""
    line = assert_one_line_error(*cli(capsys, *argv, "--out", str(tmp_path / "r")), *words)
    assert line.count("pyrozoo") == 1


def test_a_run_says_what_it_used_made_and_what_comes_next(capsys, tmp_path, monkeypatch):
    """Issue 30: the start line shows the effective prior, guide and rule with their options; the end lists the
    files written and the next commands; a resume names its epoch; Ctrl-C prints the exact resume command."""
    out = tmp_path / "my run"
    argv = ["train", "--net", "mlp", "--net-option", "hidden=(8,)", "--data", "fashion-mnist-mini", "--method",
            "bmr-th", "--rule-option", "margin=0.5", "--prior-option", "hidden_scale=0.2", "--epochs", "1",
            "--steps-per-epoch", "2", "--samples", "1", "--no-progress", "--out", str(out)]  # fmt: skip
    code, stdout, err = cli(capsys, *argv)
    assert code == 0, err
    assert "flat(hidden_scale=0.2) prior, guide meanfield, BMR threshold(margin=0.5)" in err
    assert "written to" in stdout and "checkpoint.pt, config.json, metrics.csv" in stdout
    assert (
        f"pyrozoo export '{out}'" in stdout and f"pyrozoo train --out '{out}' --resume --epochs 2" in stdout
    )

    def interrupted(self, progress=True):
        raise KeyboardInterrupt

    code, _, err = cli(capsys, "train", "--out", str(out), "--resume", "--no-progress")
    assert code == 0 and "has finished its 1 epoch: nothing to train (give --epochs N, more than 1" in err

    monkeypatch.setattr("pyrozoo.train.Run.train", interrupted)
    code, _, err = cli(capsys, "train", "--out", str(out), "--resume", "--epochs", "2", "--no-progress")
    assert code == 130
    assert f"resuming {out} after epoch 1 (step 2) of 2" in err
    assert f"continue from the last finished epoch with: pyrozoo train --out '{out}' --resume" in err
    # interrupted before any epoch was committed: the same command again, which then runs
    fresh = [*argv[:-1], str(tmp_path / "fresh")]
    code, _, err = cli(capsys, *fresh)
    assert code == 130 and "nothing to resume; start again with: pyrozoo train" in err
    monkeypatch.undo()
    assert cli(capsys, *fresh)[0] == 0


def test_pruning_that_leaves_a_useless_net_says_so(capsys):
    """A prune that takes the net from better than the class prior to no better writes what was asked, and one
    warning line says the net is now useless (found by a new user: sparsity=0.999 ended silently at chance).
    """
    from types import SimpleNamespace

    from pyrozoo.cli import _warn_if_collapsed

    y = torch.arange(10).repeat(10)
    run = SimpleNamespace(data=SimpleNamespace(task="classify", y_train=y, y_test=y, num_classes=10))
    _warn_if_collapsed(run, {"nll": 0.5, "accuracy": 0.9}, {"nll": 2.4, "accuracy": 0.1})
    assert "warning: the pruned net is no better than predicting the class prior" in capsys.readouterr().err
    _warn_if_collapsed(run, {"nll": 0.5, "accuracy": 0.9}, {"nll": 0.6, "accuracy": 0.85})
    assert capsys.readouterr().err == ""


def test_predict_reads_a_run_that_another_process_holds_and_uncertainty_waits(capsys, map_run, tmp_path):
    """predict writes nothing into the run folder, so it takes no lock: it reads a run that is training (here a
    second process holding the folder); uncertainty, which writes uncertainty.csv there, is refused."""
    from test_io import Holder

    holder = Holder(map_run)
    try:
        for out in ("one.csv", "two.csv"):  # one after another, as two predicts at once would
            code, _, err = cli(capsys, "predict", str(map_run), "--out", str(tmp_path / out), "--no-progress")
            assert code == 0, err
        assert (tmp_path / "one.csv").read_bytes() == (tmp_path / "two.csv").read_bytes()
        code, out, err = cli(capsys, "uncertainty", str(map_run), "--no-progress")
        assert_one_line_error(code, out, err, f"is in use by process {holder.pid}")
        assert not (map_run / "uncertainty.csv").exists()
    finally:
        holder.stop()


def test_the_before_after_table_prints_counts_as_whole_numbers():
    """prune's and export's table: a count stays a count beside the fractions (it read 61706.0000)."""
    from pyrozoo.cli import _table

    text = _table({"dense": {"parameters": 61706, "accuracy": 0.8}, "pruned": {"parameters": 6936, "accuracy": 0.79}})
    assert "61706 " in text and "6936 " in text and "61706.0" not in text and "0.7900" in text


def test_a_log_line_under_a_progress_bar_is_a_line_of_its_own(capsys):
    """The commands' log goes through tqdm, which clears a bar on stderr before the line and draws it again
    after; a plain print would land after the bar's text on the bar's line (the new-user trial's catch)."""
    import sys

    from tqdm.auto import tqdm

    from pyrozoo.cli import _to_stderr

    bar = tqdm(total=3, desc="compress", file=sys.stderr)
    bar.update()
    _to_stderr("latency=0.5: pyrozoo removed 69")
    bar.close()
    err = capsys.readouterr().err
    before, _, after = err.partition("latency=0.5: pyrozoo removed 69")
    assert before.endswith("\r") and "compress" in before and after.startswith("\n")
