"""Data-parallel training over ``torch.distributed``: one run, N processes started by ``torchrun``.

``torchrun --nproc_per_node N -m pyrozoo train ...`` starts N processes (ranks). Each holds the whole data set on
its device (moved there once), and a replica of the model, guide and optimiser. Every rank draws the same global
minibatch indices (one generator, seeded alike) and takes its own contiguous part (:meth:`World.split`); every
rank draws the same weights (one random stream, seeded alike and re-synchronised after every epoch,
:meth:`World.sync_rng`). So the N-process step is the one-process step on the global minibatch:

- rank ``r`` computes ``g_r``, the gradient of the ELBO estimate on its ``b_r`` points (its likelihood scaled by
  ``dataset_size / b_r``, the KL whole). The weighted sum ``sum_r (b_r / B) g_r`` is exactly the gradient of the
  one-process estimate on the ``B`` points of the global batch: the likelihood terms add up to ``dataset_size / B``
  times the batch's sum, and the KL gradient, the same on every rank, has weights summing to 1. With equal parts
  (``B`` a multiple of N) this is the plain average of the gradients.
- :meth:`World.share_gradients` makes that sum with one ``all_reduce`` per step (the loss travels in the same
  buffer), so every rank holds the same gradient and its optimiser takes the same step.

Why not ``DistributedDataParallel``: DDP wraps the module whose ``forward`` produces the loss and averages its
parameters' gradients with hooks during ``backward``. Here the trained parameters belong to the guide, and the
loss is a Pyro trace of the guide replayed through the model (:func:`pyrozoo.elbo.negative_elbo`), whose callers
(BMR, the posterior contract, ``state_dict``) use the guide itself, not a wrapper. DDP also averages with equal
weights, which is exact only for equal parts. An explicit ``all_reduce`` after ``loss.backward()`` is what DDP
does, without the overlap of communication with ``backward`` that its buckets give; for these nets one reduction
of a flat buffer per step costs little next to the step.

A BMR pass is computed on every rank (it uses no random numbers) and rank 0's result, the model's masks and the
guide's posterior, is then broadcast (:meth:`World.broadcast`), so every rank holds the same masks even where
floating-point reductions are not deterministic (some CUDA kernels). Evaluation splits each test batch across the
ranks and gathers the log-probabilities (:meth:`World.sharded`), so every rank computes the same metrics from the
whole test set. Only rank 0 writes files or takes folder locks (:func:`pyrozoo.io.stop_writing` on the others);
a checkpoint holds rank 0's state, which is every rank's, so ``--resume`` works with any number of processes.

``pyrozoo compress`` (:func:`pyrozoo.compress.compress`) uses the same pieces: the Laplace fit's diagonal
curvature is summed over the ranks' parts of each batch (:meth:`World.sum`), its fine-tunes share the gradients of
split minibatches (:func:`pyrozoo.baselines.finetune`), its test metrics are sharded, and every cost it decides by
(a latency, which differs between processes) is measured on rank 0 and given to all (:meth:`World.agree`), so
that every rank removes the same units and holds the same nets.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch
import torch.distributed as dist

from pyrozoo import io
from pyrozoo.errors import PyrozooError


def check_device(device: str) -> None:
    """``device`` is one torch knows, and a CUDA one only where torch sees a GPU: else one PyrozooError."""
    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise PyrozooError(f"unknown device {device!r}: give cpu, cuda or cuda:N") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise PyrozooError(
            f"--device {device} was asked for, but torch sees no CUDA device: give --device cpu"
        )


def _in_place(tensors: list[torch.Tensor], communicate: Callable[[torch.Tensor], object]) -> None:
    """``communicate`` (a collective that changes its tensor in place) applied to ``tensors`` as one flat buffer
    per device and dtype, the result copied back: one message per kind, not one per tensor."""
    by_kind: dict[tuple, list[torch.Tensor]] = {}
    for t in tensors:
        by_kind.setdefault((t.device, t.dtype), []).append(t)
    for group in by_kind.values():
        flat = torch.cat([t.reshape(-1) for t in group])
        communicate(flat)
        for t, part in zip(group, flat.split([t.numel() for t in group])):
            t.copy_(part.view_as(t))


@dataclass(frozen=True)
class World:
    """This process's place in a distributed run: ``rank`` of ``size`` processes, ``local_rank`` on its node.
    ``World()`` is a run of one process, for which every method here does nothing."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Whether this is rank 0, the one that writes the run folder and prints."""
        return self.rank == 0

    @property
    def parallel(self) -> bool:
        return self.size > 1

    def device(self, requested: str) -> str:
        """The device of this process for a run asked to use ``requested``: with ``cuda`` and several
        processes, the GPU of its local rank (one device per process)."""
        if not self.parallel or not requested.startswith("cuda"):
            return requested
        if requested != "cuda":
            raise PyrozooError(
                f"--device {requested} names one GPU, but this run has {self.size} processes: give --device "
                "cuda, and each process takes the GPU of its local rank"
            )
        if self.local_rank >= torch.cuda.device_count():
            raise PyrozooError(
                f"process {self.rank} has local rank {self.local_rank}, but this node has "
                f"{torch.cuda.device_count()} GPUs: start at most that many processes per node"
            )
        torch.cuda.set_device(self.local_rank)
        return f"cuda:{self.local_rank}"

    def check_batch(self, batch_size: int) -> None:
        if batch_size < self.size:
            raise PyrozooError(
                f"--batch-size {batch_size} (the global batch) is smaller than the {self.size} processes that "
                "share it: use at least one point per process"
            )

    def split(self, indices: torch.Tensor) -> tuple[torch.Tensor, float]:
        """This rank's contiguous part of the global minibatch ``indices``, and its weight ``b_r / B``."""
        if not self.parallel:
            return indices, 1.0
        part = indices.tensor_split(self.size)[self.rank]
        return part, len(part) / len(indices)

    def share_hook(self, weight: float) -> Callable | None:
        """The ``share`` hook :func:`pyrozoo.steps.svi_step` calls after ``backward``: it sums this rank's
        ``weight``-ed gradients and loss over the ranks (None for one process)."""
        if not self.parallel:
            return None
        return lambda loss, optimizer: self.share_gradients(loss, optimizer, weight)

    def share_gradients(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer, weight: float):
        """Replace every rank's gradients of ``optimizer``'s parameters by their ``weight``-ed sum over the
        ranks, in one ``all_reduce``; returns the loss summed the same way (what one process would report)."""
        params = [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]
        for p in params:
            if p.grad is None:  # a parameter this step did not reach; another rank's may have
                p.grad = torch.zeros_like(p)
        _in_place([p.grad for p in params], lambda flat: dist.all_reduce(flat.mul_(weight)))
        total = loss.detach().reshape(1).double() * weight
        dist.all_reduce(total)
        return total.to(loss.dtype)[0]

    def broadcast(self, *modules: torch.nn.Module) -> None:
        """Make rank 0's parameters and buffers of ``modules`` every rank's (their load hooks run, so a model
        knows which of its layers are pruned)."""
        if not self.parallel:
            return
        for module in modules:
            state = module.state_dict(keep_vars=False)
            _in_place(
                [t for t in state.values() if torch.is_tensor(t)], lambda flat: dist.broadcast(flat, src=0)
            )
            module.load_state_dict(state)

    def sync_rng(self) -> None:
        """Make rank 0's random state (the CPU's, and its GPU's) every rank's."""
        if not self.parallel:
            return
        state = torch.get_rng_state()
        dist.broadcast(state, src=0)
        torch.set_rng_state(state)
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state = torch.cuda.get_rng_state()  # of this process's device
            dist.broadcast(state, src=0)
            torch.cuda.set_rng_state(state)

    def sharded(
        self, draw: Callable[[torch.Tensor], torch.Tensor], points_dim: int = 0
    ) -> Callable[[torch.Tensor], torch.Tensor]:
        """``draw`` (a batch of inputs -> log-probabilities, the batch's points along ``points_dim`` of its
        result: 0 for ``[B, C]``, 1 for several draws at once, ``[K, B, C]``) computed on this rank's part of each
        batch and gathered from all ranks, in order: every rank gets the whole batch's result."""
        if not self.parallel:
            return draw

        def gathered(x: torch.Tensor) -> torch.Tensor:
            parts = x.tensor_split(self.size)
            # a batch with fewer points than ranks leaves some with none: they run the first point (a net that
            # flattens by view(B, -1) cannot take an empty batch) and send nothing of it
            mine = draw(parts[self.rank] if len(parts[self.rank]) else parts[0][:1])
            mine = mine.narrow(points_dim, 0, len(parts[self.rank]))
            shape = list(mine.shape)
            shape[points_dim] = len(parts[0])  # the largest part
            padded = mine.new_zeros(shape)
            padded.narrow(points_dim, 0, len(parts[self.rank])).copy_(mine)
            pieces = [torch.empty_like(padded) for _ in range(self.size)]
            dist.all_gather(pieces, padded)
            return torch.cat(
                [p.narrow(points_dim, 0, len(part)) for p, part in zip(pieces, parts)], points_dim
            )

        return gathered

    def agree(self, act: Callable):
        """``act()`` on rank 0 alone, its result (pickled: keep it small) or its user error given to every rank
        (so that no rank waits for one that stopped): for what one rank must decide for all, such as a timing,
        which differs between processes."""
        if not self.parallel:
            return act()
        message = [None, None]  # (rank 0's result, its error)
        cpu = torch.device("cpu")  # through gloo: with NCCL beside it, objects would go by the current GPU
        if self.main:
            try:
                message[0] = act()
            except PyrozooError as e:
                dist.broadcast_object_list([None, str(e)], src=0, device=cpu)
                raise
        dist.broadcast_object_list(message, src=0, device=cpu)
        if message[1] is not None:
            raise RankZeroStopped(message[1])
        return message[0]

    @contextmanager
    def batch_statistics(self, net: torch.nn.Module):
        """Within it, every BatchNorm of ``net`` in training mode normalises by the statistics of the whole global
        batch (every rank's part: a sum over the ranks that ``backward`` passes through) and updates its running
        statistics with them, as one process's BatchNorm does on the whole batch; torch's SyncBatchNorm, which
        does the same, takes GPU tensors only. The ranks' losses must be weighted by their shares before
        ``backward`` (``b_r / B``): the gradient reaching a rank's statistics is the sum of every rank's."""
        norms = [m for m in net.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        if not self.parallel:
            yield
            return
        for norm in norms:
            norm.forward = partial(_global_batch_norm, norm)  # the instance's, over its class's
        try:
            yield
        finally:
            for norm in norms:
                del norm.forward

    def sum(self, tensors: list[torch.Tensor]) -> None:
        """Replace every rank's ``tensors`` (the same shapes, in the same order on every rank) by their sum over
        the ranks."""
        if self.parallel:
            _in_place(tensors, dist.all_reduce)


class _Summed(torch.autograd.Function):
    """A tensor summed over the ranks, differentiably: every rank's loss depends on the sum, so the gradient
    reaching each rank's term is the sum of the ranks' gradients of the sum (torch's own,
    ``torch.distributed.nn.functional.all_reduce``, is deprecated)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        total = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(total)
        return total

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        total = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(total)
        return total


def _global_batch_norm(norm, x: torch.Tensor) -> torch.Tensor:
    """``norm``'s forward pass with the mean and (biased) variance of the whole global batch, in two passes over
    the ranks (the mean, then the squared deviations from it, as one process computes them)."""
    if not norm.training:
        return type(norm).forward(norm, x)
    norm._check_input_dim(x)
    dims = [0, *range(2, x.dim())]
    shape = [1, -1] + [1] * (x.dim() - 2)
    count = _Summed.apply(x.new_full((1,), x.numel() / x.shape[1]))
    mean = _Summed.apply(x.sum(dims)) / count
    centred = x - mean.view(shape)
    var = _Summed.apply(centred.square().sum(dims)) / count
    if norm.track_running_stats and norm.running_mean is not None:
        with torch.no_grad():
            norm.num_batches_tracked.add_(1)
            factor = 1 / float(norm.num_batches_tracked) if norm.momentum is None else norm.momentum
            norm.running_mean.lerp_(mean.detach(), factor)
            norm.running_var.lerp_(
                var.detach() * count / (count - 1).clamp(min=1), factor
            )  # unbiased, as torch
    out = centred * torch.rsqrt(var.view(shape) + norm.eps)
    if norm.affine:
        out = out * norm.weight.view(shape) + norm.bias.view(shape)
    return out


class RankZeroStopped(PyrozooError):
    """Rank 0's user error, raised on the other ranks too; rank 0 prints it, they need not."""


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    try:
        return int(value) if value not in (None, "") else default
    except ValueError:
        raise PyrozooError(f"${name} must be a whole number, got {value!r}") from None


def current() -> World:
    """This process's world: from the initialised process group, else a world of one."""
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size(), _env_int("LOCAL_RANK", 0))
    return World()


def setup() -> World:
    """Join the distributed run that ``torchrun`` (or Slurm's ``srun`` with the same variables) started this
    process in, once: ``$WORLD_SIZE`` > 1 initialises the process group, gloo for CPU tensors and NCCL for
    CUDA ones. Ranks other than 0 write nothing from then on. Without ``$WORLD_SIZE``, a world of one."""
    if dist.is_available() and dist.is_initialized():
        return current()
    size = _env_int("WORLD_SIZE", 1)
    if size <= 1:
        return World()
    if not dist.is_available():
        raise PyrozooError("this torch was built without torch.distributed: it cannot run several processes")
    for name in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        if name not in os.environ:
            raise PyrozooError(
                f"$WORLD_SIZE is {size} but ${name} is not set: start distributed runs with torchrun "
                "(torchrun --nproc_per_node N -m pyrozoo train ...)"
            )
    backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend=backend)
    world = current()
    if not world.main:
        io.stop_writing()
    return world


def finish() -> None:
    """Leave the process group (at the end of a distributed run)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
