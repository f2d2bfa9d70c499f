"""One registry type for every named component: nets, priors, guides, reductions, methods, optimisers, datasets,
baselines and posterior sources.

A :class:`Registry` is an ordered ``dict`` from name to entry whose lookup of an unknown name raises the one
user error that lists the known names, so every "unknown X" message reads from the registry itself::

    PRIORS = Registry("prior")

    @PRIORS.register("flat")
    def flat(layer, hidden_scale=0.1): ...

    PRIORS["flat"]        # the function
    PRIORS["flta"]        # PyrozooError: unknown prior 'flta'; known priors: flat, tiered
"""

from __future__ import annotations

import inspect
import re
from typing import Callable, Iterator, TypeVar

from pyrozoo.errors import PyrozooError, did_you_mean

T = TypeVar("T")


class Registry(dict):
    """Named entries of one kind (``kind`` is the word used in messages, e.g. ``"net"``)."""

    def __init__(self, kind: str, plural: str | None = None):
        super().__init__()
        self.kind = kind
        self.plural = plural or f"{kind}s"
        self.descriptions: dict[str, str] = (
            {}
        )  # given at registration, for entries whose docstring is not ours

    def register(self, name: str, entry=None, *, description: str | None = None):
        """Add ``entry`` under ``name``; without ``entry``, a decorator that adds what it decorates.
        ``description`` is the one line ``pyrozoo info`` shows, where the entry's own docstring will not do
        (another library's class, or a docstring that names code rather than values)."""

        def add(value: T) -> T:
            if name in self:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            super(Registry, self).__setitem__(name, value)
            if description:
                self.descriptions[name] = description
            return value

        return add if entry is None else add(entry)

    def __missing__(self, name):
        raise PyrozooError(
            f"unknown {self.kind} {name!r}{did_you_mean(str(name), self)}; known {self.plural}: {', '.join(self)}"
        )

    def names(self) -> list[str]:
        return list(self)

    def described(self) -> Iterator[tuple[str, str]]:
        """``(name, one-line description)`` of every entry, for ``pyrozoo info``."""
        for name, entry in self.items():
            yield name, self.descriptions.get(name) or describe(entry)


_ROLE = re.compile(r":(?:class|func|meth|attr|mod|data|obj):`~?([^`]+)`")


def plain(text: str) -> str:
    """reST markup reduced to plain text: ``:class:`~a.B``` -> ``B``, double backquotes -> single quotes."""
    text = _ROLE.sub(lambda m: m.group(1).rsplit(".", 1)[-1], text)
    return text.replace("``", "'")


def describe(entry) -> str:
    """An entry's ``description`` attribute, else the first line of its docstring, as plain text."""
    text = getattr(entry, "description", None)
    if not isinstance(text, str) or not text:
        paragraph = " ".join((inspect.getdoc(entry) or "").strip().split("\n\n")[0].split())
        end = paragraph.find(". ")
        text = paragraph if end < 0 else paragraph[: end + 1]
    return plain(text)


def option_names(factory: Callable) -> list[str]:
    """The keyword options a factory takes (a dataclass's fields, or a function's keyword parameters after the
    first positional one)."""
    return list(option_defaults(factory))


def option_defaults(factory: Callable) -> dict:
    """``{option: default}`` of a factory (see :func:`option_names`)."""
    import dataclasses

    if dataclasses.is_dataclass(factory):
        fields = [f for f in dataclasses.fields(factory) if f.init]
        # keyword-only fields (a base class's, such as every reduction's allow_empty) after the class's own
        fields = [f for f in fields if not f.kw_only] + [f for f in fields if f.kw_only]
        return {f.name: (f.default if f.default is not dataclasses.MISSING else None) for f in fields}
    parameters = list(inspect.signature(factory).parameters.values())[1:]
    return {
        p.name: (None if p.default is inspect.Parameter.empty else p.default)
        for p in parameters
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    }
