"""Fault injection for the reliability tests: stop this process at a named point, as a crash would.

``PYROZOO_FAULT=POINT[@N][:stop]`` makes the N-th time (default the first) that the process reaches ``POINT``
send itself SIGKILL (with ``:stop``, SIGSTOP, to hold it there). Unset, :func:`reached` returns at once. The
points are ``step`` (mid-step: gradients computed, not applied), ``bmr`` (mid-pass: masks changed, nothing
written), ``eval`` (mid-evaluation), ``write`` (a file fully written under its temporary name, not renamed),
``metrics`` (an epoch's metrics.csv renamed, its checkpoint not) and ``commit`` (an epoch committed).
A kill leaves the files as a power-on machine would see them after ``kill -9``; the tests resume from there.
"""

from __future__ import annotations

import os
import signal

ENV = "PYROZOO_FAULT"
POINTS = ("step", "bmr", "eval", "write", "metrics", "commit")
_hits: dict[str, int] = {}


def reached(point: str) -> None:
    """Kill (or stop) this process here if ``$PYROZOO_FAULT`` asks for it at this hit of ``point``."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    where, _, action = spec.partition(":")
    name, _, nth = where.partition("@")
    if name != point:
        return
    _hits[point] = _hits.get(point, 0) + 1
    if _hits[point] == int(nth or 1):
        os.kill(os.getpid(), signal.SIGSTOP if action == "stop" else signal.SIGKILL)
