"""Tests for pyrozoo.bind: a run's options are bound once, into the Bound the builder and the callbacks use, and a
bad option is one PyrozooError before anything else happens."""

from __future__ import annotations

import functools

import pytest
from configs import tiny_config

from pyrozoo.bind import Bound, bind
from pyrozoo.errors import PyrozooError
from pyrozoo.methods import METHODS
from pyrozoo.train import Run


def test_the_bound_holds_the_options_bound_and_converted():
    bound = bind(
        tiny_config(
            method="bmr-th",
            prior_options={"hidden_scale": 2},
            rule_options={"margin": 1},
            guide_options={"init_scale": 0.01},
        )
    )
    assert isinstance(bound, Bound) and bound.method is METHODS["bmr-th"]
    assert isinstance(bound.prior, functools.partial) and bound.prior.func is METHODS["bmr-th"].prior
    assert bound.prior.keywords == {"hidden_scale": 2.0} and isinstance(
        bound.prior.keywords["hidden_scale"], float
    )
    assert bound.reduction.margin == 1.0 and isinstance(bound.reduction.margin, float)
    assert bound.guide_options == {"init_scale": 0.01}
    method = METHODS["bmr-th"]  # the method's defaults filled in
    assert (bound.config.guide, bound.config.optimizer) == (method.guide, method.optimizer)
    assert bound.config.warmup_steps is None  # the method's warm-up, then a wait: left to the schedule


def test_without_options_the_prior_is_the_methods_own_and_a_method_that_does_not_prune_has_no_reduction():
    bound = bind(tiny_config(method="flat-ff"))
    assert bound.prior is METHODS["flat-ff"].prior
    assert bound.reduction is None and bound.bmr_passes() == 0


@pytest.mark.parametrize(
    "table, option, words",
    [
        ("prior_options", {"hidden_scal": 1.0}, "did you mean"),
        ("rule_options", {"margin": 1.0}, "belongs to"),  # flat-ff prunes nothing
        ("guide_options", {"init_scale": "small"}, "must be float"),
        ("net_options", {"in_channels": 3}, "the data decides it"),
    ],
)
def test_a_bad_option_is_one_error_before_any_folder_is_made(tmp_path, table, option, words):
    config = tiny_config(**{table: option})
    with pytest.raises(PyrozooError, match=words) as bound_error:
        bind(config)
    assert "\n" not in str(bound_error.value)
    with pytest.raises(PyrozooError, match=words):
        Run(config, tmp_path / "out", log=print)
    assert not (tmp_path / "out").exists()
