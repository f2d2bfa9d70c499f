"""Temperature scaling folded into a net's head (pyrozoo.calibration), and compress --calibrate."""

import pytest
import torch
from torch import nn
from torch.nn import functional

from pyrozoo.calibration import fit_temperature, fold_temperature
from pyrozoo.errors import PyrozooError


def test_the_fitted_temperature_is_the_nll_minimum_a_grid_search_finds():
    """Logits made twice as sharp as the labels' own model: the fit lands on the grid's minimum (near 2)."""
    g = torch.Generator().manual_seed(0)
    true = torch.randn(4000, 5, generator=g, dtype=torch.float64) * 2
    labels = torch.multinomial(true.softmax(-1), 1, generator=g).squeeze(1)
    logits = 2 * true
    grid = torch.linspace(0.5, 4, 3501, dtype=torch.float64)
    nll = torch.stack([functional.cross_entropy(logits / t, labels) for t in grid])
    best = float(grid[nll.argmin()])
    assert fit_temperature(logits.float(), labels) == pytest.approx(best, abs=2e-3)
    assert 1.8 < best < 2.2


def test_inputs_all_right_with_growing_margins_get_the_lowest_temperature_not_zero():
    """Every input classified right: the NLL falls toward T = 0, and the fit stops at the bound."""
    from pyrozoo.calibration import BOUNDS

    logits = torch.tensor([[3.0, 0.0], [0.0, 2.0], [5.0, 1.0]])
    assert fit_temperature(logits, torch.tensor([0, 1, 0])) == BOUNDS[0]
    assert (
        fit_temperature(-logits, torch.tensor([0, 1, 0])) == BOUNDS[1]
    )  # every one wrong: as flat as allowed


def _heads():
    torch.manual_seed(0)
    linear = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 5))
    conv = nn.Sequential(  # a convolutional classifier (SqueezeNet's): the logits pooled after the head
        nn.Conv2d(1, 4, 3, stride=2, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 5, 1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
    )  # fmt: skip
    return {"linear": (linear, "3"), "conv": (conv, "3")}


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_a_folded_temperature_divides_the_nets_outputs(kind):
    net, head = _heads()[kind]
    net.train()  # put back as it was
    x = torch.randn(6, 1, 6, 6)
    before = net.eval()(x)
    net.train()
    fold_temperature(net, head, 1.7, x[:2])
    assert net.training
    torch.testing.assert_close(net.eval()(x), before / 1.7)


def test_a_head_that_something_non_homogeneous_follows_is_refused_and_put_back():
    """After a Linear head, a BatchNorm's shift does not scale with the logits: the fold would not temper."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)).eval()
    net[1].bias.data.fill_(0.5)
    state = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(PyrozooError, match="0 is not the net's last linear map"):
        fold_temperature(net, "0", 2.0, torch.randn(8, 3))
    for key, value in net.state_dict().items():
        assert torch.equal(value, state[key]), key
    with pytest.raises(PyrozooError, match="a temperature is positive"):
        fold_temperature(net, "0", 0.0, torch.randn(8, 3))
    with pytest.raises(PyrozooError, match="has no weight"):
        fold_temperature(nn.Sequential(nn.Linear(3, 4), nn.ReLU()), "1", 2.0, torch.randn(8, 3))


def test_compress_calibrates_every_net_on_held_out_test_inputs_and_reads_the_rest():
    """--calibrate: each row has its temperature and metrics of the other test inputs; the returned net is the
    calibrated one (its temperature refitted on the held-out inputs is 1); the caller's net is not changed."""
    import pyrozoo
    from pyrozoo import data as datasets
    from pyrozoo.baselines import finetune
    from pyrozoo.compress import _held_out, markdown
    from pyrozoo.metrics import evaluate_net
    from pyrozoo.nets import create_net

    d = datasets.prepare(datasets.load("fashion-mnist-mini"), pad_to=32)
    torch.manual_seed(0)
    net = create_net("lenet", in_channels=1, image_size=32, num_classes=10)
    finetune(net, d.x_train, d.y_train, 30, 1e-3, 64, 0)
    state = {k: v.clone() for k, v in net.state_dict().items()}
    result = pyrozoo.compress(net, d, "params=0.5", finetune_steps=3, fit_size=64, baselines=("tp-l1",),
                              repeats=1, calibrate=300, seed=2, progress=False, log=lambda text: None)  # fmt: skip
    rows = {row["method"]: row for row in result.table}
    assert all(row["temperature"] > 0 for row in rows.values()) and len(rows) == 4
    rest, (x_held, y_held) = _held_out(d, 300, 2)
    assert len(rest.y_test) == len(d.y_test) - 300 and len(y_held) == 300
    small = result.net
    assert rows["pyrozoo"]["accuracy"] == evaluate_net(small, rest.x_test, rest.y_test, 10)["accuracy"]
    with torch.no_grad():
        assert fit_temperature(small.eval()(x_held), y_held) == pytest.approx(1.0, abs=1e-3)
    for key, value in net.state_dict().items():
        assert torch.equal(value, state[key]), key
    text = markdown(result.table, None)
    assert (
        "- Temperatures (each net's logits divided by its own, fitted on the held-out inputs): dense " in text
    )
    assert f"pyrozoo at params=0.5 {rows['pyrozoo']['temperature']:.3f}" in text
    for count in (1000, 901, 99, -1, 2.5):
        with pytest.raises(
            PyrozooError, match=r"0 \(none, the default\) or from 100 to 900 \(at least 100 held "
        ):
            _held_out(d, count, 0)
