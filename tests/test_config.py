"""pyrozoo.config: a run's settings as stored and as given (run names, old config.json layouts, short-flag aliases
and the checks of run options from a grid file)."""

import pytest

from pyrozoo.config import TrainConfig, as_stored, check_run_options, fold_aliases, run_name
from pyrozoo.errors import PyrozooError


def test_run_name_names_a_table_by_its_file_and_no_data_set_as_default(tmp_path):
    table = tmp_path / "houses.csv"
    table.write_text("a,target\n1,2\n")
    assert run_name("mlp", "bmr-th", str(table), 3) == "mlp-bmr-th-houses-s3"
    assert run_name("lenet", "flat-ff", None, 0) == "lenet-flat-ff-default-s0"


def test_from_record_reads_an_old_layout_and_refuses_unknown_keys():
    stored = dict(method="bmr-th", epochs=3, lr=1, rule_options={"units": True, "margin": 2.0})
    config = TrainConfig.from_record(stored)
    # before reductions were objects, the structured pass was the rule option units
    assert config.prune_units and config.rule_options == {"margin": 2.0}
    assert config.epochs == 3 and type(config.lr) is float  # a whole number stored for a float option
    assert stored["rule_options"] == {"units": True, "margin": 2.0}  # the record itself is left as it was
    with pytest.raises(PyrozooError, match=r"unknown config keys \['colour'\]"):
        TrainConfig.from_record({**stored, "colour": "red"})


def test_fold_aliases_moves_short_flags_into_their_tables():
    given = {"tau0": 0.5, "local_scales": False, "prior_options": {"hidden_scale": 2.0}, "epochs": 2}
    folded = fold_aliases(given)
    # a switch that is off sets nothing; the caller's table is not changed
    assert folded == {"prior_options": {"hidden_scale": 2.0, "tau0": 0.5}, "epochs": 2}
    assert given["prior_options"] == {"hidden_scale": 2.0}
    assert fold_aliases({"local_scales": True})["prior_options"] == {"local": True}
    assert fold_aliases({"tau0": 0.5, "prior_options": {"tau0": 0.5}}) == {"prior_options": {"tau0": 0.5}}
    with pytest.raises(PyrozooError, match="--tau0 and prior option tau0 disagree"):
        fold_aliases({"tau0": 0.5, "prior_options": {"tau0": 0.1}})


def test_check_run_options_checks_names_types_and_signs():
    checked = check_run_options({"lr": 1, "tau0": 2, "epochs": 3}, "grid.toml")
    assert checked == {"lr": 1.0, "tau0": 2.0, "epochs": 3} and type(checked["lr"]) is float
    with pytest.raises(PyrozooError, match="grid.toml: unknown run option 'net'; known: .*epochs.*tau0"):
        check_run_options({"net": "mlp"}, "grid.toml")  # a grid's axis, not a run option
    with pytest.raises(PyrozooError, match="grid.toml: epochs must be int"):
        check_run_options({"epochs": 2.5}, "grid.toml")
    with pytest.raises(PyrozooError, match="--epochs must be positive"):
        check_run_options({"epochs": 0}, "grid.toml")
    with pytest.raises(PyrozooError, match="grid.toml: lr must be a finite number"):
        check_run_options({"lr": float("nan")}, "grid.toml")


def test_as_stored_is_the_json_spelling_so_a_tuple_is_no_change():
    assert as_stored({"hidden": (32, 32)}) == as_stored({"hidden": [32, 32]}) == {"hidden": [32, 32]}


def test_every_run_option_has_a_section_and_a_part_reads_its_own():
    """The run options are grouped by concern: each in one section of SECTIONS, every section used, and
    ``section()`` gives one concern's options; ``pyrozoo train --help`` lists them under those headings."""
    import dataclasses

    from pyrozoo.cli import build_parser
    from pyrozoo.config import SECTIONS, run_option_fields

    sections = [f.metadata["section"] for f in run_option_fields()]
    assert set(sections) == set(SECTIONS)
    config = TrainConfig(epochs=3, lr=0.01)
    assert config.section("optimisation") == dict(
        epochs=3, steps_per_epoch=500, batch_size=120, lr=0.01, optimizer=None, lr_units=None
    )
    assert sum(len(config.section(name)) for name in SECTIONS) == len(run_option_fields())
    assert set(config.section("evaluation")) | set(config.section("data")) <= {
        f.name for f in dataclasses.fields(TrainConfig)
    }
    train = next(a for a in build_parser()._subparsers._group_actions[0].choices.items() if a[0] == "train")[
        1
    ]
    text = train.format_help()
    for name, heading in SECTIONS.items():
        assert f"run options, {heading}:" in text
    optimisation = text.split("run options, " + SECTIONS["optimisation"])[1].split("run options, ")[0]
    assert "--epochs" in optimisation and "--lr" in optimisation and "--rule" not in optimisation
    with pytest.raises(PyrozooError, match="unknown section"):
        config.section("optimization")


def test_train_help_shows_every_default():
    """Every run option with a value for a default (a number or a word) says it in ``pyrozoo train --help``, 1
    included (which equals True, and once hid --eval-every's)."""
    from pyrozoo.cli import build_parser
    from pyrozoo.config import run_option_fields

    train = build_parser()._subparsers._group_actions[0].choices["train"]
    helps = {a.dest: a.help for a in train._actions}
    for f in run_option_fields():
        if isinstance(f.default, (int, float, str)) and not isinstance(f.default, bool):
            assert "default" in helps[f.name], f.name
    assert "(default 1)" in helps["eval_every"]
