"""Likelihoods: the observation site of a model, inside a data plate scaled to the full dataset.

A likelihood says which ``task`` it serves (``"classify"`` or ``"regress"``), may draw latents of its own
(:meth:`sample_latents`, called by the model with the weights' latents, so every guide covers them), and maps the
net's output to a predictive distribution per posterior draw (:meth:`predictive`), which evaluation and
:mod:`pyrozoo.predict` read.
"""

from __future__ import annotations

import math
from typing import Callable

import pyro
import pyro.distributions as dist
import torch
from torch import nn

from pyrozoo.errors import PyrozooError
from pyrozoo.registry import Registry

LIKELIHOODS = Registry("likelihood")


def _data_plate(batch: int, dataset_size: int | None, device):
    """The data plate: the full dataset's size, the minibatch as its subsample, so Pyro scales the minibatch
    log-likelihood by ``dataset_size / batch`` and the ELBO stays an unbiased estimate of the full-data one.
    """
    return pyro.plate(
        "data", size=dataset_size or batch, subsample=torch.arange(batch, device=device), dim=-1
    )


Part = tuple[int, int] | None  # (first row, rows of the whole batch): a process's part of a batch


def _drawn(part: Part, rows: int, draw: Callable[[int], torch.Tensor]) -> torch.Tensor:
    """The noise for ``rows`` points: ``draw(n)`` (noise for ``n`` points) made for the whole batch ``part`` is of,
    and ``part``'s rows of it, so that a process's part of a batch gets what one process draws for them."""
    first, size = part or (0, rows)
    return draw(size)[first : first + rows]


class Categorical(nn.Module):
    """``y ~ Categorical(logits = f(x))`` for classification."""

    task = "classify"

    def sample_latents(self, like: torch.Tensor) -> dict[str, torch.Tensor]:
        """No latents of its own."""
        return {}

    def forward(
        self, logits: torch.Tensor, y: torch.Tensor | None, dataset_size: int | None = None, latents=None
    ):
        with _data_plate(logits.shape[-2], dataset_size, logits.device):
            return pyro.sample("y", dist.Categorical(logits=logits), obs=y)

    @staticmethod
    def log_probs(logits: torch.Tensor) -> torch.Tensor:
        """Per-class log-probabilities, as the metrics need them."""
        return torch.log_softmax(logits, dim=-1)

    def predictive(self, output: torch.Tensor, latents: dict | None = None) -> torch.Tensor:
        """One draw's predictive distribution: per-class log-probabilities ``[B, C]``."""
        return self.log_probs(output)

    def log_likelihood(
        self, output: torch.Tensor, y: torch.Tensor, latents: dict | None = None
    ) -> torch.Tensor:
        """``log p(y | f(x))`` per example, outside Pyro (a training step that is not SVI's, e.g. IVON's)."""
        return self.log_probs(output).gather(-1, y.unsqueeze(-1)).squeeze(-1)

    def at_point(self, guide=None) -> "Categorical":
        """The likelihood of a deterministic net: itself (it has no latents)."""
        return self

    def check_output(self, output: torch.Tensor) -> None:
        """Refuse a net this likelihood gives no curvature for (one output: a regressor)."""
        if output.shape[-1] == 1:
            raise PyrozooError(
                "a categorical likelihood over a net with 1 output has no curvature: for a regressor pass "
                "likelihood=Gaussian('fixed', precision=1 / noise variance) (pyrozoo.models.likelihoods)"
            )

    def sampled_nll(
        self, output: torch.Tensor, generator: torch.Generator | None = None, part: Part = None
    ) -> torch.Tensor:
        """Summed ``-log p(y | f(x))`` at labels drawn from the net's own predictive (not differentiated): its
        gradient's outer product is, in expectation, the Gauss-Newton matrix (the Monte Carlo Fisher). With
        ``part = (first, size)``, ``output`` is rows ``first...`` of a batch of ``size``: the draw is made for the
        whole batch, so a process's part of it gets the labels one process draws for those rows."""
        self.check_output(output)
        with torch.no_grad():
            probs = output.softmax(-1)
            # torch.multinomial's own draw of one label (the exponential race: the same labels from the same
            # generator), written out so that it can be made for rows this process does not hold
            classes = probs.shape[-1]
            race = _drawn(
                part, len(probs), lambda n: probs.new_empty(n, classes).exponential_(1, generator=generator)
            )
            labels = (probs / race).argmax(-1)
        return -self.log_likelihood(output, labels).sum()


NOISE = ("prior", "fixed", "learned")


class Gaussian(nn.Module):
    """``y ~ N(f(x), 1 / tau)`` for regression (docs/method.md#likelihoods), on standardised targets; ``f(x)``
    is the net's one output.

    ``noise`` says what the noise precision ``tau`` is:

    - ``"prior"`` (default, as the paper): a latent ``noise.precision`` with prior ``Gamma(shape, rate)``
      (``Gamma(2, 2)``); every guide covers it (the mean-field guide with a log-normal, as the layer scales).
    - ``"fixed"``: the constant ``precision``.
    - ``"learned"``: a point estimate, a parameter of the model (``log_precision``, starting at ``log precision``)
      that SVI fits by maximising the ELBO (type-II maximum likelihood), with no prior.
    """

    task = "regress"
    site = "noise.precision"

    def __init__(self, noise: str = "prior", precision: float = 1.0, shape: float = 2.0, rate: float = 2.0):
        super().__init__()
        if noise not in NOISE:
            raise PyrozooError(f"unknown noise {noise!r}; choose from {', '.join(NOISE)}")
        if not (precision > 0 and shape > 0 and rate > 0 and math.isfinite(precision)):
            raise PyrozooError(
                f"noise precision, shape and rate must be positive, got {precision}, {shape}, {rate}"
            )
        self.noise, self.shape, self.rate = noise, float(shape), float(rate)
        # a buffer, so the constant follows the model's device and dtype and is saved with it
        self.register_buffer("fixed_precision", torch.tensor(float(precision)))
        if noise == "learned":
            self.log_precision = nn.Parameter(torch.tensor(math.log(precision)))

    def prior(self, like: torch.Tensor) -> dist.Gamma:
        """The noise precision's prior, ``Gamma(shape, rate)``, on ``like``'s device and dtype."""
        return dist.Gamma(like.new_tensor(self.shape), like.new_tensor(self.rate))

    def sample_latents(self, like: torch.Tensor) -> dict[str, torch.Tensor]:
        """With ``noise="prior"``, draw the noise precision (a Pyro sample site); else nothing."""
        if self.noise != "prior":
            return {}
        return {self.site: pyro.sample(self.site, self.prior(like))}

    def precision(self, latents: dict | None = None) -> torch.Tensor:
        """The noise precision of one draw: the latent's value in ``latents``, the learned or the fixed one."""
        if self.noise == "prior":
            if latents is None or self.site not in latents:
                raise PyrozooError(
                    f"the Gaussian likelihood's noise is a latent: pass its value as {self.site!r}"
                )
            return latents[self.site]
        if self.noise == "learned":
            return self.log_precision.exp()
        return self.fixed_precision

    def forward(
        self, output: torch.Tensor, y: torch.Tensor | None, dataset_size: int | None = None, latents=None
    ):
        mean = _mean(output)
        precision = self.precision(latents)
        if precision.dim():  # draws batched along leading dims (Predictive's parallel plate): one per draw
            precision = precision.reshape(precision.shape + (1,) * (mean.dim() - precision.dim()))
        with _data_plate(mean.shape[-1], dataset_size, mean.device):
            return pyro.sample("y", dist.Normal(mean, precision.rsqrt()), obs=y)

    def predictive(
        self, output: torch.Tensor, latents: dict | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One draw's predictive distribution: mean ``[B]`` and noise variance (a scalar) of ``N(f(x), 1/tau)``."""
        return _mean(output), self.precision(latents).reciprocal()

    def log_likelihood(
        self, output: torch.Tensor, y: torch.Tensor, latents: dict | None = None
    ) -> torch.Tensor:
        """``log p(y | f(x))`` per example, outside Pyro (a training step that is not SVI's, e.g. IVON's)."""
        return dist.Normal(_mean(output), self.precision(latents).rsqrt()).log_prob(y)

    def at_point(self, guide=None) -> "Gaussian":
        """This likelihood with the noise held at one value, for a deterministic net (a rebuilt or a Laplace
        one): the latent's posterior mean under ``guide`` (``noise="prior"``), or the learned or fixed one."""
        if self.noise == "prior":
            if guide is None or self.site not in guide.sites():
                raise PyrozooError(
                    f"the noise precision is a latent: pass the guide that holds {self.site!r}"
                )
            precision = float(guide.site_mean(self.site))
        else:
            precision = float(self.precision())
        return Gaussian("fixed", precision, self.shape, self.rate).to(self.fixed_precision)

    def check_output(self, output: torch.Tensor) -> None:
        """Refuse a net of more than one output."""
        _mean(output)

    def sampled_nll(
        self, output: torch.Tensor, generator: torch.Generator | None = None, part: Part = None
    ) -> torch.Tensor:
        """Summed ``-log p(y | f(x))`` at targets drawn from the net's own predictive (not differentiated): its
        gradient's outer product is, in expectation, the Gauss-Newton matrix ``tau J'J`` (the Monte Carlo
        Fisher). The noise must be held at a point (:meth:`at_point`). ``part``: as :meth:`Categorical.sampled_nll`.
        """
        mean, precision = _mean(output), self.precision()
        with torch.no_grad():
            options = dict(generator=generator, device=mean.device, dtype=mean.dtype)
            noise = _drawn(part, len(mean), lambda n: torch.randn((n, *mean.shape[1:]), **options))
            y = mean + noise * precision.rsqrt()
        return -self.log_likelihood(output, y).sum()


def _mean(output: torch.Tensor) -> torch.Tensor:
    if output.shape[-1] != 1:
        raise PyrozooError(
            f"a Gaussian likelihood needs a net with 1 output, this one has {output.shape[-1]}"
        )
    return output[..., 0]


LIKELIHOODS.register("categorical", Categorical)
LIKELIHOODS.register("gaussian", Gaussian)
