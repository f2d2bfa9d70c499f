"""LeNet-5 style convnet (docs/method.md#architectures): 5x5 convs, no padding, tanh, 2x2 average pooling."""

from __future__ import annotations

from torch import nn

from pyrozoo.nets.registry import register_net

# Reference sizes: (conv channels, dense width) for grey-scale (Fashion-MNIST) and colour (CIFAR) inputs.
_SIZES = {1: ((6, 16, 120), 84), 3: ((18, 48, 360), 256)}


class LeNet(nn.Module):
    """Three 5x5 conv layers (pooling after the first two), a dense hidden layer and a linear ``head``."""

    # Each weight layer feeds the next directly, through activations and pooling that map 0 to 0: a unit whose
    # inputs are all pruned outputs exactly 0, so BMR may drop it with its outgoing weights (pyrozoo.bmr.units).
    chain = True

    def __init__(
        self,
        in_channels: int,
        image_size: int,
        channels: tuple[int, int, int],
        hidden: int,
        num_classes: int,
        dropout: float = 0.0,
    ):
        super().__init__()
        c1, c2, c3 = channels
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, c1, 5),
            nn.Tanh(),
            nn.AvgPool2d(2),
            nn.Conv2d(c1, c2, 5),
            nn.Tanh(),
            nn.AvgPool2d(2),
            nn.Conv2d(c2, c3, 5),
            nn.Tanh(),
            nn.Flatten(),
            *([nn.Dropout(dropout)] if dropout else []),
        )
        side = ((image_size - 4) // 2 - 4) // 2 - 4
        if side < 1:
            raise TypeError(f"images of side {image_size} are too small for LeNet (need at least 32)")
        self.classifier = nn.Sequential(
            nn.Linear(c3 * side * side, hidden), nn.Tanh(), *([nn.Dropout(dropout)] if dropout else [])
        )
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x):
        return self.head(self.classifier(self.features(x)))


@register_net(
    "lenet", pad_to=32, start="guide", description="LeNet-5: convs 6-16-120, dense 84 (CIFAR: 18-48-360, 256)"
)
def lenet(
    *,
    in_channels: int,
    image_size: int,
    num_classes: int,
    channels: tuple[int, int, int] | None = None,
    hidden: int | None = None,
    dropout: float = 0.0,
):
    default_channels, default_hidden = _SIZES.get(in_channels, _SIZES[3])
    channels = tuple(channels or default_channels)
    hidden = hidden or default_hidden
    if len(channels) != 3 or min(channels) <= 0 or hidden <= 0:
        raise TypeError(
            f"LeNet needs three positive channel counts and a positive hidden width, got {channels}, {hidden}"
        )
    if not 0 <= dropout < 1:
        raise TypeError(f"dropout must be in [0, 1), got {dropout}")
    return LeNet(in_channels, image_size, channels, hidden, num_classes, dropout=dropout)
