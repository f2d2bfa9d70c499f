"""Likelihoods: the observation site of a model, inside a data plate scaled to the full dataset."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch


class Categorical:
    """``y ~ Categorical(logits = f(x))`` for classification.

    The data plate has the full dataset's size and the minibatch as its subsample, so Pyro scales the
    minibatch log-likelihood by ``dataset_size / batch``: the ELBO stays an unbiased estimate of the full-data one.
    """

    def __call__(self, logits: torch.Tensor, y: torch.Tensor | None, dataset_size: int | None = None):
        batch = logits.shape[0]
        indices = torch.arange(batch, device=logits.device)
        with pyro.plate("data", size=dataset_size or batch, subsample=indices):
            return pyro.sample("y", dist.Categorical(logits=logits), obs=y)

    @staticmethod
    def log_probs(logits: torch.Tensor) -> torch.Tensor:
        """Per-class log-probabilities, as the metrics need them."""
        return torch.log_softmax(logits, dim=-1)
