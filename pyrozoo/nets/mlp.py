"""Multi-layer perceptron (docs/method.md#architectures: input -> 500 x 4 -> classes, SiLU)."""

from __future__ import annotations

from torch import nn

from pyrozoo.nets.registry import register_net


class MLP(nn.Module):
    """Flattens the image, then hidden Linear + activation layers, then a linear ``head``."""

    # Each weight layer feeds the next directly, through activations and pooling that map 0 to 0: a unit whose
    # inputs are all pruned outputs exactly 0, so BMR may drop it with its outgoing weights (pyrozoo.bmr.units).
    chain = True

    def __init__(
        self,
        in_features: int,
        hidden: tuple[int, ...],
        num_classes: int,
        activation=nn.SiLU,
        dropout: float = 0.0,
    ):
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), activation()] + ([nn.Dropout(dropout)] if dropout else [])
            width = h
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x):
        return self.head(self.body(x))


@register_net("mlp", start="guide", description="MLP, 4 hidden layers of 500 SiLU units")
def mlp(
    *,
    in_channels: int,
    image_size: int,
    num_classes: int,
    hidden: tuple[int, ...] = (500, 500, 500, 500),
    dropout: float = 0.0,
):
    if not hidden or min(hidden) <= 0:
        raise TypeError(f"hidden sizes must be positive, got {hidden}")
    if not 0 <= dropout < 1:
        raise TypeError(f"dropout must be in [0, 1), got {dropout}")
    return MLP(in_channels * image_size * image_size, tuple(hidden), num_classes, dropout=dropout)
