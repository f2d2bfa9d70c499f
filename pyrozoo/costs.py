"""What a network costs to run: parameters, FLOPs and latency (on the CPU, and on a GPU), measured on the
network itself.

FLOPs are counted by torch's own ``torch.utils.flop_counter.FlopCounterMode`` (the operators a forward pass
dispatches, so a rebuilt net with fewer channels counts fewer), not by a formula per layer type. Latency is a
ratio to a reference net timed in the same process, the two called in turns (round-robin) and the median taken,
so that load from other jobs on a shared machine falls on both alike: absolute milliseconds on a loaded machine
mean little, the ratio is what a target such as ``latency=0.5`` asks for. :func:`round_robin` and
:func:`paired_ratios` are that timing for any set of calls (the benchmarks' too).

With one torch thread (pyrozoo compress's default) the time read is that thread's CPU time
(:func:`timing_clock`): the time other jobs hold the core is left out, so on issue 28's BatchNorm CNN at load
3 the quartiles of one ratio read 0.49-0.51 where the wall clock read 0.30-0.59. Every timing runs under
:func:`steady_allocator`: glibc serves a block above its mmap threshold (128 KiB to 32 MiB, moved by what the
process freed before) from fresh pages that the kernel zero-fills on every call, so a forward pass whose
activations cross the threshold pays page faults each time and one under it does not. The same two nets read
0.28 to 0.52 of each other with the allocator's defaults, depending on the process's history (issue 28's
BatchNorm CNN at batch 256, experiments/RESULTS.md); with large blocks kept on the heap and on the thread's
clock, 0.49 to 0.51 in two processes: the latency is the compute's.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import math
import platform
import random
import statistics
import time
from typing import Callable

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

KINDS = ("params", "flops", "latency")
# glibc's mallopt parameters, and its defaults for them that steady_allocator puts back (the trim threshold at
# twice the mmap threshold's dynamic ceiling, where a long-running process's usually ends)
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
MMAP_MAX_DEFAULT, TRIM_AFTER = 65536, 64 * 2**20


def _glibc():
    """The C library when it is glibc (whose ``mallopt`` steady_allocator sets), else None."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL(None)
    except OSError:
        return None


def timing_clock() -> Callable[[], float]:
    """What a latency is read on: the calling thread's CPU time where torch computes on that thread alone (one
    intra-op thread; its waits for other jobs left out), else the wall clock (several threads' work overlaps,
    and the calling thread's CPU time would miss the others')."""
    return time.thread_time if torch.get_num_threads() == 1 else time.perf_counter


@contextlib.contextmanager
def torch_threads(count: int):
    """While inside, torch computes on ``count`` intra-op threads; afterwards on as many as before."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def steady_allocator():
    """While inside, glibc keeps every block on the heap (no mmap) and does not hand freed memory back, so a
    timed pass reuses warm pages whatever the process did before; afterwards mmap is allowed again (glibc's
    default count), the trim threshold set to 64 MiB, and the heap trimmed. Setting them turns glibc's moving
    thresholds off for the rest of the process, the mmap threshold left where the process had moved it.
    Elsewhere than glibc it does nothing."""
    libc = _glibc()
    if libc is None:
        yield
        return
    libc.mallopt(M_MMAP_MAX, 0)
    libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1)
    try:
        yield
    finally:
        libc.mallopt(M_MMAP_MAX, MMAP_MAX_DEFAULT)
        libc.mallopt(M_TRIM_THRESHOLD, TRIM_AFTER)
        libc.malloc_trim(0)


def parameters(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


@torch.no_grad()
def flops(net: nn.Module, example: torch.Tensor) -> int:
    """FLOPs of one forward pass on ``example`` (a multiply-add counts 2), in eval mode."""
    training = net.training
    net.eval()
    counter = FlopCounterMode(display=False)
    with counter:
        net(example)
    net.train(training)
    return int(counter.get_total_flops())


def _calls_per_turn(call: Callable[[], object], clock: Callable[[], float], seconds: float = 0.005) -> int:
    """How many calls of ``call`` (a forward pass) make a turn of at least ``seconds`` on ``clock`` (a pass of
    a small net at batch 1 takes microseconds, below what one reading of the clock resolves under load)."""
    start = clock()
    call()
    once = max(clock() - start, 1e-6)
    return max(1, min(1000, math.ceil(seconds / once)))


def round_robin(
    calls: dict[str, Callable[[], object]],
    rounds: int,
    warmup: int = 1,
    seed: int = 0,
    passes: int = 1,
    clock: Callable[[], float] | None = None,
) -> dict[str, list[float]]:
    """Seconds of each call in each of ``rounds`` rounds, after ``warmup`` untimed rounds. Every round calls
    each once, in an order shuffled afresh (by its own generator, seeded ``seed``), so that a shared machine's
    load, which drifts within a round as well as between rounds, falls on every call alike. With ``passes``
    above 1 a round is that many such shuffled passes and a call's time in it is its fastest: a call that
    another job preempted once counts its undisturbed time, each call still between the others (not repeated
    back to back, which would find its own data in cache). ``clock`` reads the time: wall-clock (None, the
    default); ``time.thread_time``, the calling thread's CPU time, leaves out the time other jobs take the core
    (valid where the calls run on this thread alone: one torch thread)."""
    clock = clock or time.perf_counter
    order, times = list(calls), {name: [] for name in calls}
    shuffle = random.Random(seed).shuffle
    for timed in [False] * warmup + [True] * rounds:
        fastest = dict.fromkeys(calls, math.inf)
        for _ in range(passes):
            shuffle(order)
            for name in order:
                start = clock()
                calls[name]()
                fastest[name] = min(fastest[name], clock() - start)
        if timed:
            for name, seconds in fastest.items():
                times[name].append(seconds)
    return times


def quartiles(values: list[float]) -> tuple[float, float, float]:
    """(first quartile, median, third quartile) of ``values``."""
    if len(values) == 1:
        return values[0], values[0], values[0]
    q1, median, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, median, q3


def paired_ratios(times: dict[str, list[float]], base: str) -> dict[str, tuple[float, float, float]]:
    """Each call's time over ``base``'s in the same round (:func:`round_robin`), as ``(q1, median, q3)`` over
    the rounds: a round's load is shared by its calls, so the ratio of one round is steadier than a ratio of
    medians taken over different moments."""
    return {name: quartiles([t / b for t, b in zip(seconds, times[base])]) for name, seconds in times.items()}


def _repeated(call: Callable[[], object], count: int) -> Callable[[], None]:
    def repeated():
        for _ in range(count):
            call()

    return repeated


def latency_ratio(net: nn.Module, reference: nn.Module, example: torch.Tensor, repeats: int = 7) -> float:
    """Median over ``repeats`` rounds of (``net``'s time / ``reference``'s) for a forward pass on ``example``,
    the two called in turns (:func:`latency_ratios`)."""
    return latency_ratios([net], reference, example, repeats)[0]


def latency_ratios(
    nets: list[nn.Module], reference: nn.Module, example: torch.Tensor, repeats: int = 7
) -> list[float]:
    """Per net of ``nets``, the median over ``repeats`` rounds of (its time / ``reference``'s) for a forward pass
    on ``example`` (:func:`latency_readings`). ``reference`` in ``nets`` is 1.0, and nothing is timed where it
    is all there is."""
    if all(net is reference for net in nets):
        return [1.0] * len(nets)
    return latency_readings(nets, reference, example, repeats)[0]


@torch.inference_mode()
def latency_readings(
    nets: list[nn.Module], reference: nn.Module, example: torch.Tensor, repeats: int = 7
) -> tuple[list[float], float]:
    """Per net of ``nets``, the median over ``repeats`` rounds of (its time / ``reference``'s) for a forward pass
    on ``example``, all of them and the reference called in turns in each round (:func:`round_robin`; each turn
    the same number of passes, enough to last a few milliseconds) after a warm-up, in eval mode; and the
    reference's median seconds per pass, on the clock of :func:`timing_clock`. Read in one round-robin, the
    ratios of several nets compare among themselves: read in separate ones, a loaded machine moves each by up to
    a tenth (a copy of the reference read 0.74 once). ``reference`` in ``nets`` is 1.0."""
    distinct = {id(net): net.eval() for net in nets if net is not reference}
    with steady_allocator():  # the passes that count the calls per turn warm the heap up too
        clock = timing_clock()
        calls = max(
            _calls_per_turn(lambda c=candidate: c(example), clock)
            for candidate in [*distinct.values(), reference.eval()]
        )
        turns = {key: _repeated(lambda c=net: c(example), calls) for key, net in distinct.items()}
        turns["reference"] = _repeated(lambda: reference(example), calls)
        times = round_robin(turns, repeats, warmup=0, clock=clock)
    ratios = paired_ratios(times, "reference")
    seconds = statistics.median(times["reference"]) / calls
    return [1.0 if net is reference else ratios[id(net)][1] for net in nets], seconds


@torch.inference_mode()
def device_latency_ratios(
    nets: list[nn.Module], reference: nn.Module, example: torch.Tensor, device, repeats: int = 7
) -> list[float]:
    """:func:`latency_ratios` on ``device`` (a GPU): copies of the nets and of ``example`` moved there, each
    turn waiting until the device has finished its work, read on the wall clock (the host thread's CPU time
    would leave the device's out), after a warm-up round (kernel selection, the caching allocator's first
    blocks). ``nets`` stay where they are."""
    device = torch.device(device)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    on_device = {id(net): copy.deepcopy(net).to(device).eval() for net in [*nets, reference]}
    x = example.to(device)

    def passes(net: nn.Module, count: int) -> Callable[[], None]:
        def run():
            for _ in range(count):
                net(x)
            sync()

        return run

    for net in on_device.values():  # a first pass selects kernels and allocates: not timed
        passes(net, 1)()
    calls = max(_calls_per_turn(passes(net, 1), time.perf_counter) for net in on_device.values())
    turns = {key: passes(net, calls) for key, net in on_device.items()}
    ratios = paired_ratios(round_robin(turns, repeats, warmup=1), id(reference))
    del on_device, turns
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return [ratios[id(net)][1] for net in nets]


def cost(kind: str, net: nn.Module, dense: nn.Module, example: torch.Tensor, repeats: int = 7) -> float:
    """``net``'s cost as a fraction of ``dense``'s: parameters, FLOPs on ``example``, or latency on ``example``."""
    if kind == "params":
        return parameters(net) / parameters(dense)
    if kind == "flops":
        return flops(net, example) / flops(dense, example)
    if kind == "latency":
        return latency_ratio(net, dense, example, repeats)
    raise ValueError(f"unknown cost {kind!r}; known: {', '.join(KINDS)}")


@torch.inference_mode()
def module_times(net: nn.Module, example: torch.Tensor, repeats: int = 7) -> list[tuple[str, float, int]]:
    """Per leaf module of ``net``, in the order a forward pass on ``example`` runs them: ``(name, seconds, size
    of its output's dimension 1)``, the seconds the median over ``repeats`` passes (after a warm-up), in eval
    mode. One pass times every module under the same load, so their ratios hold on a busy machine where a
    difference of two whole-net timings does not."""
    leaves = [(name, m) for name, m in net.named_modules() if name and not any(True for _ in m.children())]
    seen: dict[str, list[float]] = {}
    order: dict[str, int] = {}  # name -> output width, in the order the pass first runs them
    started: dict[str, float] = {}
    clock = timing_clock()

    def before(name):
        return lambda m, i: started.__setitem__(name, clock())

    def after(name):
        def hook(m, i, out):
            seen.setdefault(name, []).append(clock() - started[name])
            if name not in order:
                order[name] = int(out.shape[1]) if isinstance(out, torch.Tensor) and out.dim() > 1 else 0

        return hook

    hooks = [
        h
        for name, m in leaves
        for h in (m.register_forward_pre_hook(before(name)), m.register_forward_hook(after(name)))
    ]
    training = net.training
    try:
        net.eval()
        with steady_allocator():
            net(example)  # warm-up
            seen.clear()
            for _ in range(repeats):
                net(example)
    finally:
        for hook in hooks:
            hook.remove()
        net.train(training)
    return [(name, statistics.median(seen[name]), width) for name, width in order.items()]
