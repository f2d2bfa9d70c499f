"""pyrozoo.options: ``KEY=VALUE`` parsing and the checking of option values against their annotations."""

import pytest

from pyrozoo.errors import PyrozooError
from pyrozoo.options import FLOAT32_MAX, bind_options, coerce, parse_option


@pytest.mark.parametrize(
    "text, want",
    [
        ("hidden=(8, 16)", ("hidden", (8, 16))),
        ("init-scale=0.5", ("init_scale", 0.5)),  # a dash in the key is the flag's spelling of an underscore
        ("local=TRUE", ("local", True)),
        ("local=false", ("local", False)),
        ("preset=tiny", ("preset", "tiny")),  # a bare word is a string
        ("path=./weights.pt", ("path", "./weights.pt")),  # a path is not a malformed number
        ("value=None", ("value", None)),
    ],
)
def test_parse_option_reads_literals_switches_and_bare_words(text, want):
    assert parse_option(text) == want


def test_parse_option_reads_infinity_as_a_number_so_that_its_check_names_it():
    key, value = parse_option("tau0=-inf")
    assert key == "tau0" and value == float("-inf")
    with pytest.raises(PyrozooError, match="tau0 must be a finite number"):
        coerce("tau0", float, value)


@pytest.mark.parametrize(
    "text, words",
    [("hidden", "expected KEY=VALUE"), ("2x=1", "expected KEY=VALUE"), ("h=(1,", "not a valid")],
)
def test_parse_option_refuses_what_is_not_an_option(text, words):
    with pytest.raises(PyrozooError, match=words):
        parse_option(text)


def test_coerce_turns_whole_numbers_into_floats_only_for_float_options():
    assert type(coerce("x", float, 3)) is float
    assert type(coerce("x", int | float, 3)) is int
    assert coerce("x", float | None, None) is None
    with pytest.raises(PyrozooError, match="x must be int, got True"):
        coerce("x", int, True)  # a bool is not a number here
    with pytest.raises(PyrozooError, match="x must be float, got 'a'"):
        coerce("x", float, "a")
    with pytest.raises(PyrozooError, match="at most .* float32"):
        coerce("x", float, FLOAT32_MAX * 2)


def test_bind_options_checks_names_and_types_against_the_factory():
    def factory(
        model, scale: float = 1.0, hidden: tuple = (8,)
    ):  # the first parameter is what it is built on
        return scale, hidden

    assert bind_options("thing", factory, {"scale": 2, "hidden": [4]}) == {"scale": 2.0, "hidden": [4]}
    with pytest.raises(PyrozooError, match="thing takes no option 'scal'.*scale.*its options: scale, hidden"):
        bind_options("thing", factory, {"scal": 2.0})
    with pytest.raises(PyrozooError, match="thing: option hidden must be tuple"):
        bind_options("thing", factory, {"hidden": 3})
