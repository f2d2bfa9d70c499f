"""Do sparse kernels pay where units survive but most of their weights are pruned?

Opens a finished BMR run, rebuilds its sparse net (dead units cut out, pruned weights at exact zeros), and times in
turns, in one process, on the CPU:

- inference: the whole net's forward pass with its Linear layers dense, as CSR (``F.linear`` with a
  ``sparse_csr`` weight) and as COO (``torch.sparse.mm``), at batch 1 and 256;
- training: one layer's forward and backward at the run's batch size with the gradient of its live weights only,
  dense (``F.linear``, gradient of the whole matrix) against CSR (gradient of the CSR values), for each Linear layer
  of the net, at the layer's density.

Semi-structured 2:4 sparsity needs a GPU with sparse tensor cores (none here). The candidates are timed
round-robin in a shuffled order (step_time's timer); prints each one's time over the dense one's in the same
round, median [IQR].

    python benchmarks/sparse_kernels.py RUN [--repeats 200] [--threads 1]
"""

from __future__ import annotations

import copy
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from pyrozoo.bmr.rebuild import rebuild
from pyrozoo.train import Run
from compact_step import run_arguments  # benchmarks/ is on the path when run as a script
from step_time import print_ratios, timed


class SparseLinear(nn.Module):
    """A Linear layer whose weight is held as a sparse tensor (``layout``: CSR or COO)."""

    def __init__(self, linear: nn.Linear, layout: str):
        super().__init__()
        weight = linear.weight.detach()
        self.layout = layout
        self.weight = weight.to_sparse_csr() if layout == "csr" else weight.to_sparse().coalesce()
        self.bias = None if linear.bias is None else linear.bias.detach()

    def forward(self, x):
        if self.layout == "csr":
            return F.linear(x, self.weight, self.bias)
        out = torch.sparse.mm(self.weight, x.T).T
        return out if self.bias is None else out + self.bias


def sparsified(net: nn.Module, layout: str) -> nn.Module:
    net = copy.deepcopy(net)
    for name, module in list(net.named_modules()):
        if isinstance(module, nn.Linear):
            parent, _, child = name.rpartition(".")
            setattr(net.get_submodule(parent) if parent else net, child, SparseLinear(module, layout))
    return net


def layer_step(weight: torch.Tensor, bias: torch.Tensor, x: torch.Tensor, layout: str):
    """One forward and backward pass of a Linear layer at ``x``, the gradient of the live weights only."""
    if layout == "dense":
        w = weight.clone().requires_grad_(True)

        def step():
            w.grad = None
            F.linear(x, w, bias).square().sum().backward()

        return step
    csr = weight.to_sparse_csr()
    values = csr.values().clone().requires_grad_(True)

    def step():
        values.grad = None
        w = torch.sparse_csr_tensor(csr.crow_indices(), csr.col_indices(), values, csr.shape)
        (torch.sparse.mm(w, x.T).T + bias).square().sum().backward()

    return step


def main() -> None:
    args = run_arguments(__doc__, "--repeats")
    warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
    warnings.filterwarnings("ignore", message="Sparse invariant checks")
    with Run.open(args.run, log=lambda text: None) as run:
        net = rebuild(run.model, run.guide, remove_dead=True).cpu().eval()
        x_test, batch = run.data.x_test.cpu(), run.config.batch_size
        x_train = run.data.x_train[:batch].cpu()
    linears = [(n, m) for n, m in net.named_modules() if isinstance(m, nn.Linear)]
    total = sum(m.weight.numel() for _, m in linears)
    live = sum(int((m.weight != 0).sum()) for _, m in linears)
    print(
        f"run {args.run}, epoch {run.epoch}: rebuilt net, {len(linears)} Linear layers, {total:,d} weights, "
        f"{live:,d} non-zero (density {live / total:.3f}); {args.threads} thread(s), {args.repeats} rounds"
    )
    nets = {"dense": net, "csr": sparsified(net, "csr"), "coo": sparsified(net, "coo")}
    with torch.no_grad():  # not inference_mode: F.linear with a CSR weight refuses inference tensors
        for size in (1, 256):
            x = x_test[:size]
            reference = nets["dense"](x)
            for key, candidate in nets.items():
                torch.testing.assert_close(candidate(x), reference, rtol=1e-4, atol=1e-4)
            times = timed({k: (lambda n=n: n(x)) for k, n in nets.items()}, args.repeats)
            print_ratios(f"inference, batch {size}", times, {"dense": "dense"})
    inputs = {}
    hooks = [
        m.register_forward_hook(lambda m, i, o, n=n: inputs.__setitem__(n, i[0].detach())) for n, m in linears
    ]
    with torch.no_grad():
        net(x_train)
    for hook in hooks:
        hook.remove()
    for name, module in linears:
        weight, bias = module.weight.detach(), module.bias.detach()
        density = float((weight != 0).float().mean())
        times = timed({k: layer_step(weight, bias, inputs[name], k) for k in ("dense", "csr")}, args.repeats)
        print_ratios(
            f"training, layer {name} {tuple(weight.shape)} density {density:.3f}, batch {batch}",
            times,
            {"dense": "dense"},
        )


if __name__ == "__main__":
    main()
