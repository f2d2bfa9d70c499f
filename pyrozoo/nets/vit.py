"""Vision Transformer (docs/method.md#architectures), timm's ``VisionTransformer``, no pretrained weights."""

from __future__ import annotations

from pyrozoo.nets.registry import register_net

# docs/method.md#architectures: 4x4 patches, width 256, depth 6, 8 heads, MLP ratio 2; "tiny" is for fast
# tests and smoke runs.
PRESETS = {
    "paper": dict(patch_size=4, embed_dim=256, depth=6, num_heads=8, mlp_ratio=2.0),
    "tiny": dict(patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0),
}


def sizes_from(presets: dict[str, dict], preset: str, overrides: dict) -> dict:
    """The preset's sizes with the ``overrides`` that are not None applied."""
    if preset not in presets:
        raise TypeError(f"unknown preset {preset!r}; presets: {', '.join(presets)}")
    return {**presets[preset], **{k: v for k, v in overrides.items() if v is not None}}


def check_dropout(dropout: float) -> None:
    if not 0 <= dropout < 1:
        raise TypeError(f"dropout must be in [0, 1), got {dropout}")


@register_net(
    "vit",
    pad_to=32,
    start="guide",
    description="ViT (timm): 4x4 patches, width 256, depth 6, 8 heads, MLP ratio 2",
)
def vit(
    *,
    in_channels: int,
    image_size: int,
    num_classes: int,
    preset: str = "paper",
    patch_size: int | None = None,
    embed_dim: int | None = None,
    depth: int | None = None,
    num_heads: int | None = None,
    mlp_ratio: float | None = None,
    dropout: float = 0.0,
):
    """Pre-norm blocks, GELU, class token, learned position embedding, final LayerNorm, head on the class token.

    ``dropout`` applies after attention and MLP projections and before the head (0 unless the method asks).
    """
    from timm.models.vision_transformer import VisionTransformer  # timm is slow to import; only when asked

    sizes = sizes_from(
        PRESETS,
        preset,
        dict(
            patch_size=patch_size, embed_dim=embed_dim, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio
        ),
    )
    check_dropout(dropout)
    if image_size % sizes["patch_size"] or sizes["embed_dim"] % sizes["num_heads"]:
        raise TypeError(
            f"image side {image_size} must be a multiple of the patch size {sizes['patch_size']} and width "
            f"{sizes['embed_dim']} a multiple of the head count {sizes['num_heads']}"
        )
    return VisionTransformer(
        img_size=image_size,
        in_chans=in_channels,
        num_classes=num_classes,
        global_pool="token",
        class_token=True,
        qkv_bias=True,
        drop_rate=dropout,
        proj_drop_rate=dropout,
        **sizes,
    )
