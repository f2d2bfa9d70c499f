"""Optimisers: Adam (the default) and AdaBelief, the reference's choice (PAPER.md §3), for SVI; IVON, which trains
a plain net and keeps its own posterior (pyrozoo.guides.ivon), for the methods whose posterior it is.

torch has no AdaBelief, so it is written here from the paper's algorithm (Zhuang et al., NeurIPS 2020,
"AdaBelief optimizer: adapting stepsizes by the belief in observed gradients", Algorithm 2).
"""

from __future__ import annotations

from typing import Iterable

import torch

from ivon import IVON

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


class IVONOptimizer(IVON):
    """IVON (ivon-opt, the authors' code): trains a plain net and keeps a diagonal Gaussian posterior; only for the
    ivon methods, whose guide is that posterior. Its step counter is added to ``state_dict`` (debiasing reads it),
    and its per-group buffers (Hessian, momentum) follow the parameters' device on loading."""

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


OPTIMIZERS = Registry("optimizer")
OPTIMIZERS.register("adam", torch.optim.Adam)
OPTIMIZERS.register("adabelief", AdaBelief)
OPTIMIZERS.register("ivon", IVONOptimizer)  # only with the ivon guide and step (method ivon-bmr), see config
