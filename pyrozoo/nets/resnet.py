"""CIFAR-style ResNets with BatchNorm: ``resnet18`` (3x3 stem, no max-pool, four stages of basic blocks) and
``resnet20`` (He et al. 2016's three stages of 16-32-64 channels, 3 blocks each, 1x1 projection shortcuts).

Their BatchNorm layers stay deterministic in the Bayesian model (point-estimate affine parameters, running
statistics); their channels, coupled across residual additions, are pruned as groups (:mod:`pyrozoo.bmr.units`).
"""

from __future__ import annotations

from torch import nn

from pyrozoo.nets.registry import register_net


class BasicBlock(nn.Module):
    """Two 3x3 conv + BatchNorm layers and a residual connection (a 1x1 projection when the shape changes)."""

    def __init__(self, in_channels: int, channels: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_channels != channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, channels, 1, stride, bias=False), nn.BatchNorm2d(channels)
            )

    def forward(self, x):
        out = self.bn1(self.conv1(x)).relu()
        return (self.bn2(self.conv2(out)) + self.shortcut(x)).relu()


class ResNet(nn.Module):
    """A 3x3 conv stem, stages of basic blocks (the first block of each later stage halves the side), global
    average pooling and a linear ``head``."""

    def __init__(
        self,
        in_channels: int,
        widths: tuple[int, ...],
        blocks: tuple[int, ...],
        num_classes: int,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0])
        )
        stages, width = [], widths[0]
        for i, (channels, count) in enumerate(zip(widths, blocks)):
            stride = 1 if i == 0 else 2
            layers = []
            for j in range(count):
                layers.append(BasicBlock(width, channels, stride if j == 0 else 1))
                width = channels
            stages.append(nn.Sequential(*layers))
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.head = nn.Linear(width, num_classes)

    def forward(self, x):
        x = self.stages(self.stem(x).relu())
        return self.head(self.dropout(self.pool(x).flatten(1)))


def _check(widths, blocks, dropout):
    if len(widths) != len(blocks) or not widths or min(widths) <= 0 or min(blocks) <= 0:
        raise TypeError(f"widths and blocks must be positive and of one length, got {widths} and {blocks}")
    if not 0 <= dropout < 1:
        raise TypeError(f"dropout must be in [0, 1), got {dropout}")


@register_net("resnet18", description="ResNet-18, CIFAR-style (3x3 stem, no max-pool), BatchNorm")
def resnet18(
    *,
    in_channels: int,
    image_size: int,
    num_classes: int,
    widths: tuple[int, ...] = (64, 128, 256, 512),
    blocks: tuple[int, ...] = (2, 2, 2, 2),
    dropout: float = 0.0,
):
    """``widths`` per stage (default 64-128-256-512), ``blocks`` per stage (default 2-2-2-2), ``dropout``
    before the head."""
    widths, blocks = tuple(widths), tuple(blocks)
    _check(widths, blocks, dropout)
    return ResNet(in_channels, widths, blocks, num_classes, dropout)


@register_net("resnet20", description="ResNet-20 (He et al.): 16-32-64 channels, 3 blocks a stage")
def resnet20(
    *,
    in_channels: int,
    image_size: int,
    num_classes: int,
    widths: tuple[int, ...] = (16, 32, 64),
    blocks: tuple[int, ...] = (3, 3, 3),
    dropout: float = 0.0,
):
    """``widths`` per stage (default 16-32-64), ``blocks`` per stage (default 3-3-3), ``dropout`` before the
    head."""
    widths, blocks = tuple(widths), tuple(blocks)
    _check(widths, blocks, dropout)
    return ResNet(in_channels, widths, blocks, num_classes, dropout)
