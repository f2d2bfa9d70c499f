"""Shifted test sets made from the data at hand: rotations and Gaussian noise of increasing severity, in the
spirit of the corruption benchmarks (Hendrycks & Dietterich 2019, MNIST-C; Ovadia et al. 2019 for measuring
calibration under shift).

Shifts act on the stored images (uint8, ``(N, C, H, W)``), before the run's standardisation, so a shifted set
is standardised with the training statistics exactly as the clean test set is. Torchvision's functional
rotation would do the same; this module keeps it to ``torch.nn.functional`` (an affine grid, bilinear sampling,
zeros outside the image), which is all it needs.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from pyrozoo.errors import PyrozooError
from pyrozoo.registry import Registry

# Severity k (1..5) of each shift: a rotation by ROTATION_DEGREES[k-1] degrees, or Gaussian noise of standard
# deviation NOISE_STD[k-1] on pixel values scaled to [0, 1] (then clipped back into [0, 1]).
ROTATION_DEGREES = (15, 30, 45, 60, 90)
NOISE_STD = (0.08, 0.16, 0.24, 0.32, 0.40)
SEVERITIES = (1, 2, 3, 4, 5)

SHIFTS = Registry("shift")


@SHIFTS.register(
    "rotate",
    description=f"rotate every image by {'/'.join(map(str, ROTATION_DEGREES))} degrees at severity 1..5",
)
def rotate(images: torch.Tensor, severity: int, seed: int = 0) -> torch.Tensor:
    """Rotate every image by ``ROTATION_DEGREES[severity - 1]`` degrees (counter-clockwise, about its centre)."""
    angle = math.radians(ROTATION_DEGREES[_check(severity) - 1])
    x = images.float() / 255
    cos, sin = math.cos(angle), math.sin(angle)
    theta = torch.tensor([[cos, -sin, 0.0], [sin, cos, 0.0]], dtype=x.dtype).expand(len(x), 2, 3)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return _to_uint8(out)


@SHIFTS.register(
    "noise",
    description=f"add Gaussian noise of std {'/'.join(map(str, NOISE_STD))} (pixels in [0, 1]) at severity 1..5",
)
def noise(images: torch.Tensor, severity: int, seed: int = 0) -> torch.Tensor:
    """Add Gaussian noise of standard deviation ``NOISE_STD[severity - 1]`` (pixels scaled to [0, 1]), from a
    stream seeded by ``seed``, so the shifted set is the same every time."""
    std = NOISE_STD[_check(severity) - 1]
    generator = torch.Generator().manual_seed(seed)
    x = images.float() / 255
    return _to_uint8(x + std * torch.randn(x.shape, generator=generator))


def _check(severity: int) -> int:
    if severity not in SEVERITIES:
        raise PyrozooError(f"severity must be one of {', '.join(map(str, SEVERITIES))}, got {severity}")
    return severity


def _to_uint8(x: torch.Tensor) -> torch.Tensor:
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)
