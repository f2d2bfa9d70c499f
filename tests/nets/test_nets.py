import pytest
import torch

from pyrozoo.errors import PyrozooError
from pyrozoo.nets import NETS, create_net


@pytest.mark.parametrize("name", sorted(NETS))
@pytest.mark.parametrize("channels, classes", [(1, 10), (3, 100)])
def test_every_net_maps_images_to_logits(name, channels, classes):
    side = NETS[name].pad_to or 28
    net = create_net(name, in_channels=channels, image_size=side, num_classes=classes)
    assert net(torch.randn(3, channels, side, side)).shape == (3, classes)


def test_reference_sizes():
    mlp = create_net("mlp", in_channels=1, image_size=28, num_classes=10)
    assert [m.out_features for m in mlp.modules() if isinstance(m, torch.nn.Linear)] == [500] * 4 + [10]
    fashion = create_net("lenet", in_channels=1, image_size=32, num_classes=10)
    cifar = create_net("lenet", in_channels=3, image_size=32, num_classes=10)
    convs = lambda net: [
        m.out_channels for m in net.modules() if isinstance(m, torch.nn.Conv2d)
    ]  # noqa: E731
    assert convs(fashion) == [6, 16, 120] and fashion.classifier[0].out_features == 84
    assert convs(cifar) == [18, 48, 360] and cifar.classifier[0].out_features == 256


def test_sizes_are_overridable():
    net = create_net("lenet", in_channels=1, image_size=32, num_classes=10, channels=(4, 8, 16), hidden=12)
    assert net.head.in_features == 12 and net.features[6].out_channels == 16


@pytest.mark.parametrize("kwargs", [{"hidden": (0,)}, {"width": 3}])
def test_bad_sizes_are_user_errors(kwargs):
    with pytest.raises(PyrozooError):
        create_net("mlp", in_channels=1, image_size=28, num_classes=10, **kwargs)


def test_unknown_net():
    with pytest.raises(PyrozooError, match="known nets"):
        create_net("resnet", in_channels=1, image_size=28, num_classes=10)


@pytest.mark.parametrize("name", sorted(NETS))
def test_dropout_is_active_in_training_and_off_in_eval(name):
    side = NETS[name].pad_to or 28
    net = create_net(name, in_channels=1, image_size=side, num_classes=10, dropout=0.5)
    assert any(isinstance(m, torch.nn.Dropout) for m in net.modules())
    with torch.no_grad():  # timm starts some heads at zero, which would hide the dropout
        for p in net.parameters():
            p.normal_(0, 0.1)
    x = torch.randn(4, 1, side, side)
    assert not torch.equal(net(x), net(x))
    net.eval()
    assert torch.equal(net(x), net(x))


def test_map_method_trains_with_dropout():
    from pyrozoo.methods import METHODS

    assert METHODS["flat-map"].net_options == {"dropout": 0.2}
    assert METHODS["flat-ff"].net_options == {}
