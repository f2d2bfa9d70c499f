"""MLP-Mixer (docs/method.md#architectures), built from timm's ``MlpMixer`` class: no pretrained weights."""

from __future__ import annotations

from pyrozoo.nets.registry import register_net
from pyrozoo.nets.vit import check_dropout, sizes_from

# docs/method.md#architectures: 4x4 patches, width 256, 6 blocks, token MLP 64 -> 512 -> 64 and channel MLP
# 256 -> 512 -> 256
# (timm sizes both hidden layers as ratio x width).
PRESETS = {
    "paper": dict(patch_size=4, embed_dim=256, num_blocks=6, mlp_ratio=(2.0, 2.0)),
    "tiny": dict(patch_size=8, embed_dim=32, num_blocks=2, mlp_ratio=(2.0, 2.0)),
}


@register_net(
    "mixer",
    pad_to=32,
    start="guide",
    description="MLP-Mixer (timm): 4x4 patches, width 256, 6 blocks, hidden 512",
)
def mixer(
    *,
    in_channels: int,
    image_size: int,
    num_classes: int,
    preset: str = "paper",
    patch_size: int | None = None,
    embed_dim: int | None = None,
    num_blocks: int | None = None,
    mlp_ratio: tuple[float, float] | None = None,
    dropout: float = 0.0,
):
    """Pre-norm token- and channel-mixing MLP blocks, GELU, final LayerNorm, mean pooling, linear head."""
    from timm.models.mlp_mixer import MlpMixer  # timm is slow to import; only when asked

    overrides = dict(patch_size=patch_size, embed_dim=embed_dim, num_blocks=num_blocks, mlp_ratio=mlp_ratio)
    sizes = sizes_from(PRESETS, preset, overrides)
    sizes["mlp_ratio"] = tuple(sizes["mlp_ratio"])
    check_dropout(dropout)
    if image_size % sizes["patch_size"]:
        raise TypeError(f"image side {image_size} must be a multiple of the patch size {sizes['patch_size']}")
    return MlpMixer(
        num_classes=num_classes,
        img_size=image_size,
        in_chans=in_channels,
        drop_rate=dropout,
        proj_drop_rate=dropout,
        **sizes,
    )
