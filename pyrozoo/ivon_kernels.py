"""IVON's per-step arithmetic as two fused loops compiled by ``torch.compile``, with a counter-based normal draw.

On the CPU an IVON step is memory-bound elementwise work plus the draw of one normal number per weight, and
torch's draw (its Mersenne twister, one number after another) alone costs about 0.3x a plain Adam step on the
MLP (experiments/RESULTS.md, the IVON step against a plain Adam step). Here the draw is a function of a seed and
each weight's index (:func:`standard_normal`: SplitMix64's output for that counter, Box-Muller's cosine
branch), which inductor compiles into the same vectorised C++ loop as the perturbation of the weights; and the
update (momentum, Hessian, means, with ``z * g`` formed inside) is one more loop. Two passes over the weights
per step where eager code makes a dozen and a serial draw. A layer's ``[W | b]`` latent can be drawn apart
(:func:`draw_apart`) into the contiguous weight and bias a linear layer takes, which saves the forward pass its
copy of the weight out of the latent and the backward pass its gradient written back into the latent's layout;
the update then reads the parts through strided views (:func:`columns_and_bias`). Every group goes in one call
(:func:`draw_each`, :func:`update_each`): a compiled call costs ~30 us of guards.

The numbers are IVON's update exactly, given the same noise; the noise is another generator's than ivon-opt's
``torch.randn`` (tests/guides/test_ivon.py hands ivon-opt this module's noise and compares). Used by
:class:`pyrozoo.optim.IVONOptimizer` with ``kernel="compiled"``; where ``torch.compile`` cannot build (no C++
compiler, an unsupported platform) :func:`kernels` returns None and the optimiser keeps its eager step.
"""

from __future__ import annotations

import math
import warnings

import torch

# SplitMix64 (Steele, Lea and Flood, OOPSLA 2014; the seeding generator of xoshiro): the state advances by the
# golden gamma and each output is the state through Stafford's "Mix13" finaliser; as int64 (torch has no uint64
# arithmetic), whose products wrap as the unsigned ones do
GAMMA = 0x9E3779B97F4A7C15 - (1 << 64)
MIX1 = 0xBF58476D1CE4E5B9 - (1 << 64)
MIX2 = 0x94D049BB133111EB - (1 << 64)
SEED_BOUND = 1 << 62  # seeds are drawn in [0, SEED_BOUND) from torch's generator


def _shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    """``x >> bits`` as unsigned 64-bit (torch's ``>>`` on int64 is arithmetic: the sign bits are masked off)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def standard_normal(seed: torch.Tensor, n: int, device=None) -> torch.Tensor:
    """``n`` standard normal numbers (float32) of the stream ``seed`` (a 0-d int64 tensor): number ``i`` is
    SplitMix64's ``i``-th output from state ``seed``, split into two 24-bit uniforms, by Box-Muller's cosine
    branch ``sqrt(-2 ln u1) cos(2 pi u2)`` (``u1`` in (0, 1], ``u2`` in [0, 1)). Every number depends on its
    index only, so a compiled loop draws them in any order, vectorised, with the same values eagerly."""
    return normal_at(seed, torch.arange(n, dtype=torch.int64, device=device))


def normal_at(seed: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """The numbers of :func:`standard_normal` at the (int64) indices ``index``, of any shape."""
    # state (seed + i + 1) gamma: SplitMix64 from state seed gamma, the index added to the seed before the
    # product so that inductor does not fold the product into its loop's index arithmetic (signed overflow there
    # miscompiled)
    x = (seed + (index + 1)) * GAMMA
    x = (x ^ _shift_right(x, 30)) * MIX1
    x = (x ^ _shift_right(x, 27)) * MIX2
    x = x ^ _shift_right(x, 31)
    u1 = (_shift_right(x, 40) + 1).to(torch.float32) * 2.0**-24
    u2 = (x & 0xFFFFFF).to(torch.float32) * 2.0**-24
    return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos((2 * math.pi) * u2)


def draw_seed() -> torch.Tensor:
    """A fresh stream's seed from torch's global generator (so ``torch.manual_seed`` and a saved RNG state make
    the draws reproducible, as with ``torch.randn``)."""
    return torch.randint(SEED_BOUND, (), dtype=torch.int64)


def draw(mean, hess, seed, weight_decay: float, noise_scale: float, drawn, z) -> None:
    """IVON's draw of one group: ``z`` the seed's standard normals, ``drawn = mean + z noise_scale / sqrt(hess +
    weight_decay)`` (``noise_scale`` is ``ess^-1/2``), both written into the given buffers."""
    noise = standard_normal(seed, mean.numel(), mean.device).to(mean.dtype)
    z.copy_(noise)
    drawn.copy_(mean + noise * (noise_scale * torch.rsqrt(hess + weight_decay)))


def draw_apart(
    mean, hess, seed, weight_decay: float, noise_scale: float, weight, bias, z_weight, z_bias
) -> None:
    """:func:`draw` of a group whose parameter is a ``(rows, columns + 1)`` latent, its last column a bias (a
    layer's ``[W | b]``), written apart: the drawn ``weight`` (``rows, columns``) and ``bias`` (``rows``), each
    contiguous, as a linear layer takes them (no copy out of the latent in the forward pass, no gradient written
    back into its layout), and their noise ``z_weight``, ``z_bias``; every number is the one :func:`draw` gives
    at the same entry of the latent."""
    rows, columns = weight.shape
    width = columns + 1
    mean, hess = mean.view(rows, width), hess.view(rows, width)
    row = torch.arange(rows, dtype=torch.int64, device=mean.device)[:, None] * width
    # the bias column as index -1, not ``columns``: a symbolic index would specialise the compiled loop to it
    for out, z, index, cut in (
        (weight, z_weight, row + torch.arange(columns, dtype=torch.int64, device=mean.device), slice(0, -1)),
        (bias, z_bias, row[:, 0] + columns, -1),
    ):
        noise = normal_at(seed, index).to(mean.dtype)
        z.copy_(noise)
        out.copy_(mean[:, cut] + noise * (noise_scale * torch.rsqrt(hess[:, cut] + weight_decay)))


def columns_and_bias(tensors, rows: int, width: int) -> tuple[list, list]:
    """Flat latent-shaped tensors (a ``(rows, width)`` latent whose last column is a bias) as strided views of
    their weight columns and of their bias column, which :func:`update` writes in place: the state of a group
    drawn by :func:`draw_apart`, whose gradient and noise come in those two parts (a concatenation of the
    parts would be copied first)."""
    state = [t.view(rows, width) for t in tensors]
    return [t[:, :-1] for t in state], [t[:, -1] for t in state]


def draw_each(calls: list) -> None:
    """:func:`draw_apart` for each group's arguments: compiled, one call for every group (a call of a compiled
    function costs ~30 us of guards, and the groups' loops come out faster in one module)."""
    for arguments in calls:
        draw_apart(*arguments)


def update_each(calls: list) -> None:
    """:func:`update` for each group's (or group part's) arguments, compiled as one call (see
    :func:`draw_each`); the numbers, here a list's elements, are still arguments, not constants."""
    for arguments in calls:
        update(*arguments)


def update(
    mean,
    hess,
    momentum,
    grad,
    noise,
    times_grad: bool,
    clipped: bool,
    b1,
    b2,
    wd,
    lr,
    debias,
    sqrt_ess,
    radius,
) -> None:
    """IVON's update of one group in place (ivon-opt's ``_update`` with ``hess_approx="price"``): ``noise`` is
    the draw's ``z`` (``times_grad``: one draw, ``z * grad`` formed here) or the mean of ``z * g`` over the
    draws; ``lr`` is rescaled as ivon-opt rescales it, ``debias`` is ``1 - b1^t`` (or 1), ``radius`` the clip
    radius, applied where ``clipped``. The numbers are plain floats: compiled, they are the kernel's arguments,
    not constants, so a changing ``debias`` or ``lr`` compiles nothing anew."""
    zxg = noise * grad if times_grad else noise
    new_momentum = torch.lerp(momentum, grad, 1.0 - b1)
    shifted = hess + wd
    # ivon-opt's f = ess (hess + wd) noise g with noise = z / sqrt(ess (hess + wd))
    f = sqrt_ess * zxg * torch.sqrt(shifted)
    new_hess = b2 * hess + (1.0 - b2) * f + (0.5 * (1.0 - b2) ** 2) * (hess - f).square() / shifted
    step = (new_momentum / debias + wd * mean) / (new_hess + wd)
    if clipped:
        step = step.clamp(-radius, radius)
    momentum.copy_(new_momentum)
    hess.copy_(new_hess)
    mean.copy_(mean - lr * step)


_KERNELS: dict = {}


def kernels() -> dict | None:
    """:func:`draw`, :func:`draw_each` and :func:`update_each` compiled (``{"draw": ..., "draw_apart": ...,
    "update": ...}``; one compilation each per process and layout, for every size: dynamic shapes), checked once
    on a small group; None, with a warning, where ``torch.compile`` fails here."""
    if "compiled" not in _KERNELS:
        _KERNELS["compiled"] = _compile()
    return _KERNELS["compiled"]


def _compile() -> dict | None:
    try:
        named = (("draw", draw), ("draw_apart", draw_each), ("update", update_each))
        compiled = {key: _compiled(f) for key, f in named}
        _check(compiled)
    except Exception as error:  # no C++ compiler, an unsupported platform, a torch without inductor
        warnings.warn(
            f"IVON's compiled kernels are unavailable ({type(error).__name__}: {str(error).splitlines()[0]}); "
            "its eager step is used",
            stacklevel=3,
        )
        return None
    return compiled


# compilations kept per function: one per layout (whole, weight columns, bias column), group count and mode;
# torch's default of 8 would run a process that trains two nets eagerly from the ninth. Raised process-wide when
# the kernels are first built (a per-call config.patch costs ~40 us, more than the call).
RECOMPILE_LIMIT = 64


def _compiled(f):
    """``f`` compiled with dynamic shapes, dynamo's limit of recompilations raised to ``RECOMPILE_LIMIT``."""
    config = torch._dynamo.config
    config.recompile_limit = max(config.recompile_limit, RECOMPILE_LIMIT)
    return torch.compile(f, dynamic=True)


def _check(compiled: dict) -> None:
    """Run the compiled kernels on a small group (a vector loop and its tail) against the eager functions, the
    kernels apart against those of the joined latent (raises where they differ); the draws with autograd on and
    the updates off, as the optimiser calls them, so that each layout compiles here once."""
    rows, width = 5, 14
    n = rows * width
    # the means a view of a (rows, width) parameter, as the optimiser passes them (guards read views' bases)
    mean = torch.linspace(-1, 1, n).view(rows, width).view(-1)
    hess, seed = torch.linspace(0.1, 2, n), torch.tensor(12345)
    drawn, z, eager_drawn, eager_z = (torch.empty(n) for _ in range(4))
    compiled["draw"](mean, hess, seed, 0.1, 0.5, drawn, z)
    draw(mean, hess, seed, 0.1, 0.5, eager_drawn, eager_z)
    torch.testing.assert_close((drawn, z), (eager_drawn, eager_z))
    parts = [torch.empty(rows, width - 1), torch.empty(rows), torch.empty(rows, width - 1), torch.empty(rows)]
    compiled["draw_apart"]([(mean, hess, seed, 0.1, 0.5, *parts)])
    for part, joined in zip(parts, (drawn, drawn, z, z)):
        whole = joined.view(rows, width)
        torch.testing.assert_close(part, whole[:, :-1] if part.dim() == 2 else whole[:, -1])
    grad = torch.linspace(-3, 3, n)
    grads = grad.view(rows, width)
    settings = (False, 0.9, 0.999, 0.1, 0.05, 0.1, 3.0, 1.0)
    states = [[mean.clone().view(rows, width).view(-1), hess.clone(), torch.zeros(n)] for _ in range(3)]
    with torch.no_grad():
        compiled["update"]([(*states[0], grad, z, True, *settings)])
        update(*states[1], grad, z, True, *settings)
        columns, bias = columns_and_bias(states[2], rows, width)
        compiled["update"]([(*columns, grads[:, :-1].contiguous(), parts[2], True, *settings)])
        compiled["update"]([(*bias, grads[:, -1].contiguous(), parts[3], True, *settings)])
    for ours, eager, apart in zip(*states):
        torch.testing.assert_close((ours, apart), (eager, eager))


class CompiledSteps:
    """:class:`pyrozoo.optim.IVONOptimizer`'s compiled path (``kernel="compiled"``): the methods that call this
    module's kernels, kept beside them. They read the optimiser's groups, scratch buffers and state, and are
    mixed into it."""

    def _sample_compiled(self):
        """:meth:`_sample_params` as one compiled loop per group: the noise from a fresh seed of torch's
        generator, the scale formed from the Hessian of the moment."""
        means, draws = [], []
        for i, group in enumerate(self.param_groups):
            (p,) = self._params(group)
            drawn, z = self._draw_whole(i, group, p, draw_seed())
            means.append(p.data)
            p.data = drawn
            draws.append(z)
        return means, draws

    def _draw_whole(
        self, i: int, group: dict, p: torch.Tensor, seed: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        """Group ``i``'s parameter ``p`` drawn from ``seed`` by one compiled loop into its scratch buffers: the
        drawn parameter (in ``p``'s shape) and its standard normal noise."""
        scratch = self._scratch(i, group["numel"])
        wd, noise_scale = group["weight_decay"], group["ess"] ** -0.5
        self._compiled["draw"](
            p.data.view(-1), group["hess"], seed, wd, noise_scale, scratch["drawn"], scratch["z"]
        )
        return scratch["drawn"].view(p.shape), scratch["z"]

    def draw_apart(self, columns: list) -> list[tuple[torch.Tensor, ...]]:
        """Compiled, one draw (``mc_samples`` 1), for a caller that runs the net from the drawn parameters
        itself (:func:`pyrozoo.guides.ivon.ivon_step`): each group's drawn parameter as new leaves that take a
        gradient, ``(weight, bias)`` apart where ``columns[i]`` is a number (the group's parameter is a
        ``(rows, columns[i] + 1)`` latent whose last column is a bias: :func:`draw_apart`,
        every such group in one call), else ``(drawn,)`` in the parameter's shape; the means stay in the
        parameters. :meth:`collect_apart` takes the gradients; the numbers are those of :meth:`sampled_params`
        from the same seed."""
        self._apart, together = [], []
        for i, (group, columns_i) in enumerate(zip(self.param_groups, columns)):
            (p,) = self._params(group)
            seed, wd, noise_scale = draw_seed(), group["weight_decay"], group["ess"] ** -0.5
            if columns_i is None:
                drawn, z = self._draw_whole(i, group, p, seed)
                parts, noise = (drawn,), (z,)
            else:
                if p.dim() != 2 or p.shape[1] != columns_i + 1:
                    raise ValueError(
                        f"group {i}: a latent of {columns_i} + 1 columns expected, got {tuple(p.shape)}"
                    )
                buffers = self._apart_buffers(i, p.shape[0], columns_i)
                together.append((p.data.view(-1), group["hess"], seed, wd, noise_scale, *buffers))
                parts, noise = buffers[:2], buffers[2:]
            self._apart.append((tuple(t.detach().requires_grad_() for t in parts), noise))
        if together:
            self._compiled["draw_apart"](together)
        return [parts for parts, _ in self._apart]

    def _apart_buffers(self, i: int, rows: int, columns: int) -> tuple[torch.Tensor, ...]:
        """Group ``i``'s kept buffers for :meth:`draw_apart`: weight, bias, and their noise."""
        scratch = self._scratches.setdefault(i, {})
        buffers = scratch.get("apart")
        if buffers is None or buffers[0].shape != (rows, columns):
            shapes = [(rows, columns), (rows,)] * 2
            buffers = tuple(torch.empty(s, device=self._device, dtype=self._dtype) for s in shapes)
            scratch["apart"] = buffers
        return buffers

    def collect_apart(self) -> None:
        """The gradients of the leaves :meth:`draw_apart` gave, as this step's one draw (kept apart: the
        update's loop reads them in the latent's order)."""
        grads, noises = [], []
        for parts, noise in self._apart:
            grads.append(tuple(t.grad if t.grad is not None else torch.zeros_like(t) for t in parts))
            noises.append(noise)
        self.state.update(count=1, avg_grad=grads, avg_nxg=noises)
        self._noise_is_z, self._apart = True, None

    def _update_compiled(self):
        """:meth:`_update` as one compiled loop per group, every group's in one call
        (:func:`update_each`), a group drawn apart as its weight's columns (with the other
        groups) and its bias column (in a second call: strided views of the same state)."""
        self.current_step += 1
        calls, bias_calls = [], []
        for i, group in enumerate(self.param_groups):
            b1, wd, radius = group["beta1"], group["weight_decay"], group["clip_radius"]
            lr = group["lr"] * (group["hess_init"] + wd) if self.rescale_lr else group["lr"]
            debias = 1.0 - pow(b1, float(self.current_step)) if self.debias else 1.0
            settings = (
                radius != math.inf,
                b1,
                group["beta2"],
                wd,
                lr,
                debias,
                math.sqrt(group["ess"]),
                radius,
            )
            (p,) = self._params(group)
            state = (p.data.view(-1), group["hess"], group["momentum"])
            grad, noise = self.state["avg_grad"][i], self.state["avg_nxg"][i]
            if not isinstance(grad, tuple):  # sampled_params' flat vectors
                calls.append((*state, grad, noise, self._noise_is_z, *settings))
            elif len(grad) == 2:  # draw_apart's weight and bias
                columns, bias = columns_and_bias(state, *p.shape)
                calls.append((*columns, grad[0], noise[0], True, *settings))
                bias_calls.append((*bias, grad[1], noise[1], True, *settings))
            else:
                calls.append((*state, grad[0].view(-1), noise[0], True, *settings))
        for each in (calls, bias_calls):
            if each:
                self._compiled["update"](each)
        self._noise_is_z = False
