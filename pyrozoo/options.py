"""Options of components (a reduction's fields, a prior's keyword arguments, a net's sizes): parsed from
``KEY=VALUE`` text one way, and checked one way against what the component declares.

An option the component does not take is an error that names the options it does take; a value of the wrong
type, or a float that is not finite, is an error too. Nothing is silently ignored.
"""

from __future__ import annotations

import ast
import math
import re
import types
import typing
from typing import Callable

from pyrozoo.errors import PyrozooError, did_you_mean
from pyrozoo.registry import option_defaults


# How a value meant as a Python literal starts: a bracket, a quote, a digit, a sign or a decimal point before
# a digit (not a path such as ./weights.pt, which stays a string).
_LITERAL_START = re.compile(r"[\[\](){}'\"0-9+\-]|\.\d")


def parse_option(text: str) -> tuple[str, object]:
    """``"KEY=VALUE"`` -> ``(key, value)``; the value is a Python literal (``0.5``, ``True``, ``(8, 16)``,
    ``None``), ``true``/``false`` in any case, else the bare word as a string (``preset=tiny``)."""
    key, sep, value = text.partition("=")
    key = key.strip().replace("-", "_")
    if not sep or not key.isidentifier():
        raise PyrozooError(f"expected KEY=VALUE, got {text!r}")
    word = value.strip().lower()
    if word in ("true", "false"):
        return key, word == "true"
    if word.lstrip("+-") in ("inf", "infinity", "nan"):  # a number, so that the finiteness check names it
        return key, float(word)
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError) as e:
        if _LITERAL_START.match(value.strip()):  # meant as a number, tuple, list or string, but malformed
            why = e.msg if isinstance(e, SyntaxError) else "not a literal"
            raise PyrozooError(
                f"{key}={value}: not a valid value ({why}); write numbers, tuples and lists as in Python, e.g. "
                f'hidden=(100,100), and quote the whole option in the shell: "{key}=..."'
            ) from None
        return key, value  # a bare word: a name such as preset=tiny


def _hints(factory: Callable) -> dict:
    try:
        return typing.get_type_hints(factory)
    except Exception:  # an annotation that cannot be resolved: check by the default's type instead
        return {}


def accepts(kind, value) -> bool:
    """Whether ``value`` fits the annotation ``kind`` (None, bool, int, float, str, tuples, unions)."""
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        return any(accepts(k, value) for k in typing.get_args(kind))
    if kind is type(None):
        return value is None
    if kind is bool:
        return isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is str:
        return isinstance(value, str)
    if kind is dict or origin is dict:
        return isinstance(value, dict)
    if origin is tuple or kind is tuple:
        return isinstance(value, (tuple, list))
    return True  # an annotation we do not check (a callable, a module type)


def _members(kind) -> tuple:
    """The types of a union annotation (``float | None`` -> ``(float, NoneType)``), or the annotation itself."""
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        return typing.get_args(kind)
    return (kind,)


def kind_name(kind) -> str:
    return getattr(kind, "__name__", str(kind)).replace("NoneType", "None")


def bind_options(what: str, factory: Callable, options: dict) -> dict:
    """``options`` checked against the keyword options ``factory`` declares (dataclass fields or keyword
    parameters, see :func:`pyrozoo.registry.option_defaults`); floats converted and required to be finite."""
    defaults = option_defaults(factory)
    hints = _hints(factory)
    bound = {}
    for key, value in options.items():
        if key not in defaults:
            takes = ", ".join(defaults) if defaults else "none"
            raise PyrozooError(
                f"{what} takes no option {key!r}{did_you_mean(key, defaults)}; its options: {takes}"
            )
        kind = hints.get(key, type(defaults[key]) if defaults[key] is not None else None)
        bound[key] = coerce(f"{what}: option {key}", kind, value)
    return bound


def build_with_options(what: str, factory: Callable, options: dict, *args):
    """``factory(*args, **options)`` with ``options`` bound (:func:`bind_options`); a value the factory cannot
    take (its arithmetic overflows, or it raises ValueError) is a PyrozooError naming the options, not a crash.
    """
    bound = bind_options(what, factory, options)
    try:
        return factory(*args, **bound)
    except (OverflowError, ValueError) as e:
        given = ", ".join(f"{k}={v!r}" for k, v in bound.items())
        raise PyrozooError(f"{what}: cannot use the options {given} ({e}); choose values in range") from None


# The largest float32: the nets, guides and optimisers compute in float32, so a larger number overflows there.
FLOAT32_MAX = 3.4028234663852886e38


def finite_problem(value: float) -> str | None:
    """Why a number cannot be an option's value (not finite, or beyond float32), or None when it can."""
    if not math.isfinite(value):
        return f"must be a finite number, got {value}"
    if abs(value) > FLOAT32_MAX:
        return f"must be at most {FLOAT32_MAX:.3g} in size (the float32 the nets compute in), got {value:g}"
    return None


def coerce(label: str, kind, value):
    """``value`` checked against the annotation ``kind`` (None: anything): a whole number given for a float
    becomes a float, and a float must be finite. ``label`` starts the message, e.g. ``"grid: epochs"``."""
    if kind is not None and not accepts(kind, value):
        raise PyrozooError(f"{label} must be {kind_name(kind)}, got {value!r}")
    float_option = kind is not None and float in _members(kind) and int not in _members(kind)
    if isinstance(value, float) or (float_option and isinstance(value, int) and not isinstance(value, bool)):
        value = float(value)
        if finite_problem(value):
            raise PyrozooError(f"{label} {finite_problem(value)}")
    return value
