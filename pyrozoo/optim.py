"""Optimisers: Adam (the default) and AdaBelief, the reference's choice (docs/method.md#schedule), for SVI;
IVON, which trains a plain net and keeps its own posterior (pyrozoo.guides.ivon), for the methods whose
posterior it is.

torch has no AdaBelief, so it is written here from the paper's algorithm (Zhuang et al., NeurIPS 2020,
"AdaBelief optimizer: adapting stepsizes by the belief in observed gradients", Algorithm 2). IVON is ivon-opt's,
its per-step arithmetic redone in place for speed (:class:`IVONOptimizer` says why).
"""

from __future__ import annotations

import math
from math import pow
from typing import Iterable

import torch

from ivon import IVON

from pyrozoo import ivon_kernels
from pyrozoo.registry import Registry


class AdaBelief(torch.optim.Optimizer):
    """Adam with the second moment of the gradient replaced by that of its deviation from the running mean.

    ``s`` tracks ``(g - m)^2``: where gradients agree with their mean (the "belief"), steps are large, where they
    scatter, small. Defaults follow the paper and optax (betas 0.9, 0.999; eps 1e-16, added to ``s`` at every
    step as in the paper, and to the denominator).
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-16,
    ):
        if not lr > 0:
            raise ValueError(f"lr must be positive, got {lr}")
        if not all(0 <= b < 1 for b in betas):
            raise ValueError(f"betas must lie in [0, 1), got {betas}")
        if not eps >= 0:
            raise ValueError(f"eps must not be negative, got {eps}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            eps, lr = group["eps"], group["lr"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("AdaBelief does not support sparse gradients")
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["m"] = torch.zeros_like(p)
                    state["s"] = torch.zeros_like(p)
                state["step"] += 1
                t, m, s = state["step"], state["m"], state["s"]
                m.lerp_(p.grad, 1 - beta1)
                deviation = p.grad - m
                s.mul_(beta2).addcmul_(deviation, deviation, value=1 - beta2).add_(eps)
                denominator = (s / (1 - beta2**t)).sqrt_().add_(eps)
                p.addcdiv_(m, denominator, value=-lr / (1 - beta1**t))
        return loss


class IVONOptimizer(ivon_kernels.CompiledSteps, IVON):
    """IVON (ivon-opt, the authors' code): trains a plain net and keeps a diagonal Gaussian posterior; only for the
    ivon methods, whose guide is that posterior. Its step counter is added to ``state_dict`` (debiasing reads it),
    and its per-group buffers (Hessian, momentum) follow the parameters' device on loading.

    The three per-step methods (draw the weights, collect the gradient, update) are ivon-opt's algorithm rewritten
    in place: ivon-opt concatenates every parameter and gradient into new flat vectors and makes a new tensor for
    each of its ~25 elementwise operations, which on the 1.15 M-weight MLP cost more than the forward and
    backward passes together (experiments/RESULTS.md, IVON step). Here a one-parameter group (pyrozoo's: one
    layer each) is read through views, the momentum and Hessian are updated in their own storage, and the mean
    in the parameter's; the draw goes into buffers kept across steps (the noise drawn by ``randn`` into a kept
    buffer, ivon-opt's numbers) and is swapped in and out, so the means are never perturbed and
    restored; ivon-opt's ``noise * g`` is kept as ``z * g`` with the draw's scale applied once in the update,
    whose Hessian step takes two passes over the weights instead of five. The arithmetic is ivon-opt's
    (``price`` Hessian estimate, debiasing, learning-rate rescaling, clipping), up to the rounding of fused
    operations (tests/guides/test_ivon.py runs both side by side from the same random draws). The state layout
    (``group["hess"]``, ``group["momentum"]``) is ivon-opt's, so its ``state_dict`` is unchanged.

    ``kernel="compiled"`` (float32 on the CPU, one contiguous parameter per group as pyrozoo's groups are, no
    ``sync``): the draw and the update each one loop compiled by ``torch.compile`` (:mod:`pyrozoo.ivon_kernels`),
    the noise from a counter-based generator seeded from torch's, not ivon-opt's ``randn`` (the update's numbers
    are ivon-opt's given the same noise, tested); where compiling fails, a warning and the eager step. With
    :meth:`draw_apart` and :meth:`collect_apart` a caller runs the net from a layer's weight and bias drawn
    apart, as :func:`pyrozoo.guides.ivon.ivon_step` does.
    """

    KERNELS = ("eager", "compiled")

    def __init__(self, *args, kernel: str = "eager", **kwargs):
        super().__init__(*args, **kwargs)
        self._scratches: dict[int, dict] = {}
        if self.hess_approx != "price":
            raise ValueError("pyrozoo's IVON step implements hess_approx='price' (ivon-opt's default) only")
        if kernel not in self.KERNELS:
            raise ValueError(f"kernel must be one of {', '.join(self.KERNELS)}, got {kernel!r}")
        if kernel == "compiled" and not self._compilable():
            raise ValueError(
                "kernel 'compiled' takes float32 parameters on the CPU, one contiguous parameter per group, "
                "and no sync across processes"
            )
        self._compiled = ivon_kernels.kernels() if kernel == "compiled" else None
        self.kernel = "compiled" if self._compiled else "eager"  # eager where compiling failed (warned)
        self._noise_is_z = False  # the collected noise holds the draw's z, not z * g (one draw, compiled)
        self._apart = None  # draw_apart's leaves and noise until collect_apart

    def _compilable(self) -> bool:
        params = [p for group in self.param_groups for p in self._params(group)]
        one_each = all(len(self._params(group)) == 1 for group in self.param_groups)
        return (
            one_each
            and not self.sync
            and self._device.type == "cpu"
            and all(p.is_contiguous() and p.dtype == torch.float32 for p in params)
        )

    def state_dict(self) -> dict:
        state = super().state_dict()
        state["state"] = {**state["state"], "current_step": self.current_step}
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        inner = dict(state_dict["state"])
        step = inner.pop("current_step", 0)
        super().load_state_dict({**state_dict, "state": inner})
        self.current_step = step
        for group in self.param_groups:
            for key in ("hess", "momentum"):
                group[key] = group[key].to(device=self._device, dtype=self._dtype)

    @staticmethod
    def _flat(tensors: list) -> torch.Tensor:
        """A group's tensors as one flat vector: a view of a single contiguous tensor, else a concatenation."""
        if len(tensors) == 1 and tensors[0].is_contiguous():
            return tensors[0].view(-1)
        return torch.cat([t.reshape(-1) for t in tensors])

    def _params(self, group: dict) -> list:
        return [p for p in group["params"] if p is not None]

    def _scratch(self, i: int, numel: int) -> dict:
        """Group ``i``'s scratch vectors, kept across steps (one allocation, not one per step; reallocated when
        compaction resizes the group): ``drawn`` (the drawn weights) and ``z`` (the draw's standard normal
        noise, then ``z * g``); eagerly also ``shifted`` (``hess + wd``) and ``scale`` (``(hess + wd)^-1/2``,
        the noise's scale but for ``ess^-1/2``), which the compiled loops form in registers. Not in
        ``state_dict``."""
        scratch = self._scratches.get(i)
        if scratch is None or "z" not in scratch or scratch["z"].numel() != numel:
            keys = ("drawn", "z") if self._compiled else ("shifted", "scale", "drawn", "z")
            made = {key: torch.empty(numel, device=self._device, dtype=self._dtype) for key in keys}
            scratch = self._scratches[i] = {**(scratch or {}), **made}
        return scratch

    @staticmethod
    def _mark_scale(group: dict, scratch: dict) -> None:
        """Record which Hessian (the tensor and its in-place version) and weight decay the scratch's ``shifted``
        and ``scale`` were computed from."""
        scratch["from"] = (group["hess"], group["hess"]._version, group["weight_decay"])

    @staticmethod
    def _scale_current(group: dict, scratch: dict) -> bool:
        """Whether ``shifted`` and ``scale`` are still those of the group's Hessian: computed by the last update
        (while its data is in cache), and neither written in place since (a BMR pass, a load) nor replaced."""
        made = scratch.get("from")
        return (
            made is not None
            and made[0] is group["hess"]
            and made[1] == group["hess"]._version
            and made[2] == group["weight_decay"]
        )

    def _sample_params(self):
        """Each parameter becomes ``mean + z / sqrt(ess (hess + wd))``, ``z`` ivon-opt's ``randn`` of the group
        (three passes over the weights besides the draw, where ivon-opt makes five new tensors),
        written into a buffer kept across steps (the parameter's ``data`` swapped to it, its own tensor, the
        mean, untouched); returns the means and each group's ``z`` (standard normal, not scaled: the gradient
        collection and the update need it only through ``z * g``, with the scale kept from this draw)."""
        if self._compiled:
            return self._sample_compiled()
        means, draws = [], []
        for i, group in enumerate(self.param_groups):
            scratch = self._scratch(i, group["numel"])
            if not self._scale_current(group, scratch):
                torch.add(group["hess"], group["weight_decay"], out=scratch["shifted"])
                torch.rsqrt(scratch["shifted"], out=scratch["scale"])  # ess is a number: folded in below
                self._mark_scale(group, scratch)
            # ivon-opt's torch.randn(numel), into a kept buffer (the call as ivon-opt makes it, which tests patch)
            z = torch.randn(group["numel"], out=scratch["z"])
            params = self._params(group)
            mean = self._flat([p.data for p in params])
            torch.addcmul(mean, z, scratch["scale"], value=group["ess"] ** -0.5, out=scratch["drawn"])
            offset = 0
            for p in params:
                means.append(p.data)
                p.data = scratch["drawn"][offset : offset + p.numel()].view(p.shape)
                offset += p.numel()
            draws.append(z)
        return means, draws

    def _restore_param_average(self, train: bool, param_avg, noise):
        """The means back in place; with ``train``, the gradient and ``z * gradient`` of this draw enter their
        running means over the draws (Welford, as ivon-opt; ivon-opt's ``noise * gradient`` is this over the
        draw's scale, which :meth:`_update` applies once)."""
        params = [p for group in self.param_groups for p in self._params(group)]
        grads = [p.grad if p.requires_grad and p.grad is not None else torch.zeros_like(p) for p in params]
        for p, mean in zip(params, param_avg):
            p.data = mean
        if not train:
            return
        count = self.state["count"] + 1
        self.state["count"] = count
        avg_grad, avg_nxg = self.state["avg_grad"] or [], self.state["avg_nxg"] or []
        # one draw, compiled: z kept as it is, the update's loop multiplies it by the gradient
        self._noise_is_z = self._compiled is not None and self.mc_samples == 1
        first = 0
        for i, group in enumerate(self.param_groups):
            n = len(self._params(group))
            grad = self._flat(grads[first : first + n])
            first += n
            zxg = noise[i] if self._noise_is_z else noise[i].mul_(grad)  # z is not needed after this draw
            if count == 1:  # with more draws to come, copies: the next draw reuses z's buffer
                avg_grad.append(grad.clone() if self.mc_samples > 1 else grad)
                avg_nxg.append(zxg.clone() if self.mc_samples > 1 else zxg)
            else:
                avg_grad[i].add_(grad.sub(avg_grad[i]).div_(count))
                avg_nxg[i].add_(zxg.sub_(avg_nxg[i]).div_(count))
        self.state["avg_grad"], self.state["avg_nxg"] = avg_grad, avg_nxg

    def _sync_samples(self):  # (eager only: the compiled kernel refuses sync)
        world_size = torch.distributed.get_world_size()
        for tensor in (*self.state["avg_grad"], *self.state["avg_nxg"]):
            torch.distributed.all_reduce(tensor)
            tensor.div_(world_size)

    def _update(self):
        if self._compiled:
            return self._update_compiled()
        self.current_step += 1
        for i, group in enumerate(self.param_groups):
            b1, b2, wd = group["beta1"], group["beta2"], group["weight_decay"]
            lr = group["lr"] * (group["hess_init"] + wd) if self.rescale_lr else group["lr"]
            debias = 1.0 - pow(b1, float(self.current_step)) if self.debias else 1.0
            momentum, hess = group["momentum"], group["hess"]
            scratch = self._scratch(i, group["numel"])  # hess + wd and the scale, as the draws used them
            shifted = scratch["shifted"]
            momentum.lerp_(self.state["avg_grad"][i], 1.0 - b1)  # b1 momentum + (1 - b1) gradient
            # ivon-opt's f = ess (hess + wd) noise g; noise = z r / sqrt(ess), r = (hess + wd)^-1/2, so
            # f = sqrt(ess) z g / r
            zxg = self.state["avg_nxg"][i]
            d = torch.addcdiv(
                hess, zxg, scratch["scale"], value=-math.sqrt(group["ess"]), out=zxg
            )  # hess - f
            # hess <- b2 hess + (1 - b2) f + (1 - b2)^2 / 2 (hess - f)^2 / (hess + wd), as
            # hess + d (c d / (hess + wd) - (1 - b2)) with c = (1 - b2)^2 / 2: two passes, not five
            c = 0.5 * (1.0 - b2) ** 2
            rate = torch.addcdiv(hess.new_tensor(b2 - 1.0), d, shifted, value=c, out=scratch["scale"])
            hess.addcmul_(d, rate)
            # mean <- mean - lr clip((momentum / debias + wd mean) / (hess + wd), radius)
            params = self._params(group)
            mean = self._flat([p.data for p in params])
            torch.add(hess, wd, out=shifted)
            # debias (momentum / debias + wd mean), into d's storage
            step = torch.add(momentum, mean, alpha=wd * debias, out=d)
            if group["clip_radius"] == float("inf"):
                mean.addcdiv_(step, shifted, value=-lr / debias)
            else:
                step.div_(shifted).mul_(1.0 / debias).clamp_(-group["clip_radius"], group["clip_radius"])
                mean.sub_(step, alpha=lr)
            if mean.data_ptr() != params[0].data.data_ptr():  # a concatenation, not a view: write it back
                offset = 0
                for p in params:
                    p.data.copy_(mean[offset : offset + p.numel()].view(p.shape))
                    offset += p.numel()
            torch.rsqrt(shifted, out=scratch["scale"])  # the next draw's, while hess + wd is in cache
            self._mark_scale(group, scratch)


def _tensors(params: list) -> list[torch.Tensor]:
    """The tensors of ``params``: a list of tensors or of parameter groups (dicts with ``"params"``)."""
    if params and isinstance(params[0], dict):
        return [p for group in params for p in group["params"]]
    return params


def _fusable(tensors: list[torch.Tensor]) -> bool:
    """Whether torch's fused Adam kernel takes every tensor: floating point, on one device type it has it for."""
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

    kinds = {p.device.type for p in tensors}
    return (
        len(kinds) == 1
        and kinds <= set(_get_fused_kernels_supported_devices())
        and all(torch.is_floating_point(p) for p in tensors)
    )


class Adam(torch.optim.Adam):
    """torch's Adam, fused (``fused=True``: the whole update of a parameter in one kernel) wherever torch has the
    kernel for every parameter. Unfused, torch runs a dozen kernels per parameter on the CPU (it takes its
    ``foreach`` path only on a GPU), which was an eighth of the MLP's SVI step (experiments/RESULTS.md); the
    update is the same up to the rounding of the fused arithmetic. Pass ``fused=False`` for torch's default.
    """

    def __init__(self, params, lr: float = 1e-3, **kwargs):
        params = list(params)
        if "fused" not in kwargs and not kwargs.get("foreach") and not kwargs.get("differentiable"):
            kwargs["fused"] = _fusable(_tensors(params)) or None
        super().__init__(params, lr=lr, **kwargs)


OPTIMIZERS = Registry("optimizer")
OPTIMIZERS.register(
    "adam",
    Adam,
    description="Adam (torch.optim.Adam, fused where torch has the kernel), the optimiser of every method but the "
    "ivon ones",
)
OPTIMIZERS.register("adabelief", AdaBelief)
OPTIMIZERS.register("ivon", IVONOptimizer)  # only with the ivon guide and step (method ivon-bmr), see config
