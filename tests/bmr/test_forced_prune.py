"""Channels die wherever the function allows (issue 28): the forced-prune check, constants folded into the
consumers, BatchNorm in its channels' group, and a reason in words wherever a group or a unit stays."""

import pytest
import torch
from torch import nn

from pyrozoo.bmr.forced import (
    MAX_PARAMETERS,
    forced_prune_check,
    parameters_of,
    prepare,
    train_like_norms,
    zoo_names,
)
from pyrozoo.bmr.rebuild import rebuild
from pyrozoo.bmr.units import structure
from pyrozoo.guides import make_guide
from pyrozoo.models import BayesianModel
from pyrozoo.nets import create_net


def _bn_cnn():
    layers, channels = [], 3
    for width in (8, 12, 16):
        layers += [
            nn.Conv2d(channels, width, 3, padding=1),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.MaxPool2d(2),
        ]
        channels = width
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(16 * 4 * 4, 10))


def _sigmoid_cnn():
    return nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.Sigmoid(), nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, 5),
    )  # fmt: skip


def _pointwise_consumer():
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 1, bias=False),
        nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5),
    )  # fmt: skip


def _grouped_cnn():
    """A grouped 3x3 conv (4 groups) and a depthwise one: a unit is one position in every group."""
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 24, 3, groups=4),
        nn.BatchNorm2d(24), nn.ReLU(), nn.Conv2d(24, 24, 3, groups=24, padding=1), nn.BatchNorm2d(24), nn.ReLU(),
        nn.Conv2d(24, 8, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5),
    )  # fmt: skip


def _tv_resnet18():
    import torchvision

    return torchvision.models.resnet18(num_classes=4)


NETS = {
    "bn-cnn": (_bn_cnn, 32),
    "sigmoid-after-conv": (_sigmoid_cnn, 16),
    "1x1-consumer": (_pointwise_consumer, 16),
    "grouped-and-depthwise": (_grouped_cnn, 16),
    "resnet20": (lambda: create_net("resnet20", in_channels=3, image_size=32, num_classes=4), 32),
    "tv-resnet18": pytest.param((_tv_resnet18, 32), marks=pytest.mark.slow),
}


@pytest.mark.parametrize("case", list(NETS.values()), ids=list(NETS))
def test_forced_prune_check_the_channels_go_and_the_rebuilt_net_computes_the_same(case):
    make, side = case
    torch.manual_seed(0)
    found = forced_prune_check(make(), torch.randn(2, 3, side, side))
    assert found.sparse < found.dense and found.removed > 0
    assert found.difference <= 1e-5 and found.same_class and found.export == ""
    assert found.passed


# Every torchvision classifier and timm's four families (pyrozoo.bmr.forced.zoo_names); the quick ones at 32x32
# run in the default suite, the others are slow. A net is left out only by prepare's rule (skipped, with why).
QUICK = ("tv:squeezenet1_1",)


@pytest.mark.parametrize(
    "name", [name if name in QUICK else pytest.param(name, marks=pytest.mark.slow) for name in zoo_names()]
)
def test_forced_prune_check_passes_on_every_zoo_net_that_fits(name):
    prepared = prepare(name)
    if isinstance(prepared, str):
        pytest.skip(prepared)
    found = forced_prune_check(*prepared)
    assert found.passed, found


def test_a_zoo_net_is_left_out_only_when_too_large_or_it_does_not_run_at_32x32():
    names = zoo_names()
    assert {"tv:resnet18", "tv:swin_t", "tv:vit_b_16", "timm:vit_tiny_patch16_224"} <= set(names)
    assert any(name.startswith(f"timm:{family}") for family in ("resnet", "efficientnet", "convnext", "vit")
               for name in names)  # fmt: skip
    assert parameters_of("tv:vit_b_16") > MAX_PARAMETERS
    assert prepare("tv:vit_b_16") == f"{parameters_of('tv:vit_b_16'):,} parameters, over {MAX_PARAMETERS:,}"
    assert prepare("tv:regnet_y_400mf", max_parameters=1000).endswith("parameters, over 1,000")
    net, x = prepare("timm:vit_tiny_patch16_224")  # a ViT at 32x32: 4x4 patches
    assert x.shape == (2, 3, 32, 32) and net(x).shape == (2, 10)


def _model(net, x, **options):
    model = BayesianModel(net, example_input=x, **options).eval()
    guide = make_guide("meanfield", model)
    return model, guide


def _silence(model, name, rows):
    keep = model.mask(name).bool().clone()
    keep[rows] = False
    model.set_mask(name, keep)


@torch.no_grad()
def _rebuilt_and_expected(model, guide, x):
    expected = model.logits(x, model.weights_from(guide.mean()))
    return rebuild(model, guide), expected


def test_a_batch_norm_shift_goes_into_a_linear_bias_and_a_following_batch_norms_running_mean():
    """Conv rows pruned, BatchNorm's shift left: the constant folds into the bias-less 1x1 conv by moving the
    next BatchNorm's running mean, and into the head's bias; every silenced channel goes."""
    torch.manual_seed(0)
    net = _pointwise_consumer()
    train_like_norms(net)
    x = torch.randn(2, 3, 16, 16)
    model, guide = _model(net, x)
    _silence(model, "0", [0, 1, 2])
    _silence(model, "3", [4, 5])
    sparse, expected = _rebuilt_and_expected(model, guide, x)
    assert sparse[0].out_channels == 5
    assert sparse[3].out_channels == 6 and sparse[3].bias is None  # the shift went into BatchNorm 4
    assert not torch.equal(sparse[4].running_mean, model.net[4].running_mean[[0, 1, 2, 3, 6, 7]])
    torch.testing.assert_close(sparse(x), expected, rtol=1e-5, atol=1e-5)
    assert structure(model).stayed == {}


def test_a_constant_into_a_zero_padded_convolution_stays_and_the_report_says_why():
    """A zero-padded 3x3 conv reads zeros at its borders where the constant is not: no exact fold. A channel
    whose shift ReLU maps to 0 still goes (no constant), the others stay, and ``kept`` names the conv."""
    torch.manual_seed(0)
    net = _bn_cnn()
    train_like_norms(net)
    x = torch.randn(2, 3, 32, 32)
    model, guide = _model(net, x)
    _silence(model, "0", list(range(8)))
    bn = model.net[1]
    shift = bn.bias - bn.weight * bn.running_mean / (bn.running_var + bn.eps).sqrt()
    zero = int((shift <= 0).sum())
    assert 0 < zero < 8
    sparse, expected = _rebuilt_and_expected(model, guide, x)
    assert sparse[0].out_channels == 8 - zero
    torch.testing.assert_close(sparse(x), expected, rtol=1e-5, atol=1e-5)
    why = structure(model).stayed["0"]
    assert why.startswith(f"{8 - zero} of its 8 units have every weight pruned but stay") and "'4'" in why
    assert "zero-padded convolution" in why


def test_a_random_batch_norm_switched_off_with_its_conv_outputs_exactly_zero_and_goes():
    """A random, prunable BatchNorm's rows are producers of its conv's group: pruned together, the channel
    outputs exactly 0, so it goes even before a zero-padded conv; a random BatchNorm that is not prunable
    leaves its group removable (a constant to fold), not fixed."""
    torch.manual_seed(0)
    net = _bn_cnn()
    train_like_norms(net)
    x = torch.randn(2, 3, 32, 32)
    model, guide = _model(net, x, random=[nn.BatchNorm2d], prunable_kinds=("weight", "norm"))
    first = next(u for u in structure(model).units if u.name == "0")
    assert {(m.layer, m.produces) for m in first.producers} == {("0", True), ("1", True)}
    assert first.passthrough == ("1",)
    _silence(model, "0", list(range(5)))
    _silence(model, "1", list(range(5)))
    sparse, expected = _rebuilt_and_expected(model, guide, x)
    assert sparse[0].out_channels == 3 and sparse[1].num_features == 3
    torch.testing.assert_close(sparse(x), expected, rtol=1e-5, atol=1e-5)

    fixed_norms, _ = _model(net, x, random=[nn.BatchNorm2d])
    assert [u.name for u in structure(fixed_norms).units] == ["0", "4", "8"]
    assert not any("normalisation" in why for why in structure(fixed_norms).fixed.values())


def test_why_a_group_is_fixed_is_said_in_words_not_autograd_node_names():
    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv, self.proj, self.head = nn.Linear(8, 24), nn.Linear(8, 8), nn.Linear(8, 3)

        def forward(self, x):
            q, k, v = self.qkv(x).unflatten(-1, (3, 2, 4)).permute(2, 0, 3, 1, 4)
            out = nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
            return self.head(self.proj(out).mean(1))

    model, _ = _model(Attention(), torch.randn(2, 5, 8))
    fixed = structure(model).fixed
    assert fixed and not any("Backward" in why or "Cpu" in why for why in fixed.values())
    assert any("attention (a scaled dot-product)" in why or "matrix product" in why for why in fixed.values())

    class HuggingFaceLike(Attention):  # an attention module pyrozoo cannot cut heads out of: its own reason
        num_attention_heads = 2

    model, _ = _model(HuggingFaceLike(), torch.randn(2, 5, 8))
    assert structure(model).fixed[""] == (
        "its 2 attention heads stay: pyrozoo cuts the heads of timm's Attention (fused qkv, proj) and of Hugging "
        "Face's BERT- and ViT-style attention (separate query, key and value layers, a key and value head per "
        "query head), not of HuggingFaceLike"
    )


def test_a_grouped_convolutions_unit_is_one_position_in_every_group():
    torch.manual_seed(0)
    model, _ = _model(_grouped_cnn(), torch.randn(2, 3, 16, 16))
    groups = {u.name: u for u in structure(model).units}
    first, second = groups["0"], groups["6"]
    assert first.count == 4 and torch.equal(first.channels[1], torch.tensor([1, 5, 9, 13]))
    assert {m.layer: tuple(m.index.shape) for m in first.members} == {"0": (4, 4), "3": (4, 9)}
    # the grouped conv's rows (6 per group) with the depthwise conv's and the 1x1 conv's columns
    assert second.count == 6 and {m.layer for m in second.producers} == {"3", "6"}


def test_a_swin_passes_with_its_heads_and_window_reshaped_channels_fixed_in_words():
    """torchvision's Swin: its attention heads and the channels that pass its window partition cannot go (said
    in words, found without filling memory), its MLPs' hidden channels do."""
    from torchvision.models.swin_transformer import SwinTransformer

    torch.manual_seed(0)
    net, x = SwinTransformer([4, 4], 8, [1, 1], [2, 2], [2, 2], num_classes=5), torch.randn(2, 3, 16, 16)
    found = forced_prune_check(net, x)
    assert found.passed and found.removed > 0 and found.difference <= 1e-5
    model, _ = _model(net.eval(), x)
    fixed = structure(model).fixed
    assert fixed["features.1.0.attn"].startswith(
        "its 2 attention heads stay: ShiftedWindowAttention computes"
    )
    assert any("window partition" in why for why in fixed.values())
    assert {u.name for u in structure(model).units} == {"features.1.0.mlp.0", "features.3.0.mlp.0"}


def test_a_multihead_attention_keeps_its_heads_and_says_why_while_its_feed_forward_shrinks():
    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.head = nn.Linear(6, 8), nn.Linear(8, 3)
            layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
            self.encoder = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)

        def forward(self, x):
            return self.head(self.encoder(self.embed(x)).mean(1))

    torch.manual_seed(0)
    net, x = Encoder(), torch.randn(2, 5, 6)
    found = forced_prune_check(net, x)
    assert found.passed and found.removed > 0
    model, _ = _model(net.eval(), x)
    assert structure(model).fixed["encoder.layers.0.self_attn"] == (
        "its 2 attention heads stay: nn.MultiheadAttention needs as many attention channels as input channels"
    )
    assert [u.name for u in structure(model).units] == ["encoder.layers.0.linear1"]


def test_a_timm_attention_with_a_deterministic_qkv_keeps_its_heads_and_says_why():
    from timm.layers import Attention

    net = nn.Sequential(Attention(8, num_heads=2), nn.Flatten(), nn.Linear(40, 3))
    model, _ = _model(net, torch.randn(2, 5, 8), deterministic=["0.qkv"])
    assert structure(model).fixed["0"] == (
        "its 2 attention heads stay: its qkv or proj layer is deterministic (make both random to let heads go)"
    )
    assert [u.heads_of for u in structure(_model(net, torch.randn(2, 5, 8))[0]).units] == ["0"]
