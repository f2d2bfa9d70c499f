"""``pyrozoo compress`` (issue 28): targets, the evidence ranking of units, the reduction to a target measured on
the rebuilt net, the baselines at the same cost, and the command's report."""

from __future__ import annotations

import copy
import json
import math
import statistics
import sys
import time
from types import SimpleNamespace

import pytest
import torch
from clitools import assert_one_line_error, cli
from torch import nn

from pyrozoo import costs, pruners
from pyrozoo.baselines import LR_SCHEDULE_WORDS, LR_SCHEDULES, finetune
from pyrozoo.bmr.rebuild import rebuild
from pyrozoo.bmr.scores import delta_f
from pyrozoo.compress import Target, as_targets, compress, latency_model, rank_units, reduce_to, remove_first
from pyrozoo.errors import PyrozooError
from pyrozoo.posteriors.laplace import laplace


def _cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(8 * 2 * 2, 12), nn.ReLU(), nn.Linear(12, 3),
    )  # fmt: skip


@pytest.fixture(scope="module")
def fitted():
    """A small CNN trained a little on random 3-class data, and its diagonal Laplace posterior."""
    torch.manual_seed(0)
    x, y = torch.randn(96, 1, 8, 8), torch.randint(0, 3, (96,))
    net = _cnn()
    finetune(net, x, y, 30, 1e-2, 32, 0)
    model, posterior = laplace(net, x, "diag", progress=False)
    return net.eval(), model, posterior, x


@pytest.fixture(scope="module")
def fitted_kfac(fitted):
    """The same net's KFAC Laplace posterior."""
    net, _, _, x = fitted
    model, posterior = laplace(net, x, "kron", progress=False)
    return net, model, posterior, x


def _dense_set_gain(k, members, occam: bool) -> float:
    """The dF (or its fit term) of zeroing ``members`` (bool, like the layer's latent) of a Kronecker layer,
    from its dense Gaussian."""
    data = torch.kron(k.G.double(), k.A.double())
    cov = torch.linalg.inv(data + torch.eye(len(data), dtype=data.dtype) / k.prior_var)
    s, mu = members.flatten(), k.mean.flatten()
    fit = float(mu[s] @ torch.linalg.solve(cov[s][:, s], mu[s]))
    if not occam:
        return -0.5 * fit
    logdet = float(torch.linalg.slogdet(cov[s][:, s])[1])
    return 0.5 * (int(s.sum()) * math.log(k.prior_var) - logdet) - 0.5 * fit


@pytest.mark.parametrize("score", ["obd", "evidence"])
def test_under_kfac_a_units_columns_are_scored_jointly(fitted_kfac, score):
    """Under a KFAC posterior a unit's gain sums, per Kronecker layer, the dF of its columns (or rows) zeroed
    together, which the dense Gaussian gives, and per other layer its entries' dFs; not the entries' marginal
    dFs added up."""
    from pyrozoo.bmr.units import model_units
    from pyrozoo.compress import unit_gains

    net, model, posterior, x = fitted_kfac
    kron = {layer.name: posterior.kron[layer.site] for layer in model.layers if layer.site in posterior.kron}
    occam = score == "evidence"
    groups = model_units(model)
    gains = delta_f(model, posterior, {name for units in groups for name in units.layers}, occam=occam)
    for units in groups:
        joint, marginal = unit_gains(units, gains, kron, occam), unit_gains(units, gains)
        for u in range(units.count):
            expected = 0.0
            for m in units.members:
                k = kron.get(m.layer)
                if k is None:
                    expected += float(m.take(gains[m.layer])[u].sum())
                    continue
                members = torch.zeros(k.mean.shape, dtype=torch.bool)
                members[(m.index[u], slice(None)) if m.axis == 0 else (slice(None), m.index[u])] = True
                expected += _dense_set_gain(k, members, occam)
            assert float(joint[u]) == pytest.approx(expected, rel=1e-4, abs=1e-4)
        assert not torch.allclose(joint, marginal)  # the correlations count


def test_under_kfac_a_global_order_shares_by_the_diagonal_fit_and_chooses_by_the_joint_score(fitted, fitted_kfac):
    """For a cost target, every prefix of the global order takes as many units from each group as the diagonal
    posterior's order does, and within each group the units in the order of the KFAC posterior's joint score."""
    from pyrozoo.compress import rank_units

    _, diagonal, diagonal_posterior, _ = fitted
    net, model, posterior, x = fitted_kfac
    options = dict(by="flops", score="obd", min_width=0.25)
    ranking = rank_units(model, posterior, x[:2], **options, shares=(diagonal, diagonal_posterior))
    joint = rank_units(model, posterior, x[:2], **options)
    entries = rank_units(diagonal, diagonal_posterior, x[:2], **options)
    assert [g for g, _ in ranking.order] == [g for g, _ in entries.order]
    assert [g for g, _ in ranking.order] != [g for g, _ in joint.order]  # the shares did change
    for g in range(len(ranking.groups)):
        assert [u for h, u in ranking.order if h == g] == [u for h, u in joint.order if h == g]


def test_a_net_too_wide_for_kfac_is_fitted_with_the_diagonal_posterior(fitted, monkeypatch):
    """A layer whose Kronecker factor would pass KFAC_WIDEST (vgg11_bn's classifier, 25,089 columns) makes
    compress say so and fit the diagonal posterior, whose memory grows with the layer, not its square."""
    import pyrozoo.posteriors.laplace as laplace_module

    module = sys.modules["pyrozoo.compress"]
    net, _, _, x = fitted
    monkeypatch.setattr(module, "KFAC_WIDEST", 60)  # the widest: Conv2d(6, 8, 3)'s 6 x 9 + 1 columns
    assert module._too_wide_for_kfac(net) is None
    monkeypatch.setattr(module, "KFAC_WIDEST", 40)
    assert module._too_wide_for_kfac(net) == ("3", 55)
    fits, said, fit = [], [], laplace_module.laplace

    def spy(net, x, structure, **options):
        fits.append(structure)
        return fit(net, x, structure, **options)

    monkeypatch.setattr(laplace_module, "laplace", spy)
    labelled = (x, torch.arange(len(x)) % 3) * 2
    result = compress(net, labelled, "params=0.5", finetune_steps=0, fit_size=None, baselines=(), repeats=1,
                      progress=False, log=said.append)  # fmt: skip
    assert fits == ["diag"] and any("would be 55 wide (more than 40)" in line and "diag" in line for line in said)
    assert result.curvature == "diag"  # what the report records: the posterior as fitted
    assert "fitting a diag Laplace posterior around the trained weights on all 96 training inputs" in said


def test_under_kfac_the_rebuilt_nets_survivors_compensate(fitted_kfac):
    """The rebuilt net's weights are the reduced posterior mean given the removed inputs (columns), removed rows
    zero; the posterior's means are put back after; and the survivors bring the net's outputs nearer the
    dense net's than the trained weights left as they are."""
    from pyrozoo.compress import rank_units

    net, model, posterior, x = fitted_kfac
    ranking = rank_units(model, posterior, x[:2], by="params", allocation="uniform", score="obd")
    before = {site: loc.clone() for site, loc in posterior.loc.items()}
    count = len(ranking.order) // 3
    remove_first(model, ranking, count)
    plain = rebuild(model, posterior, remove_dead=False)
    with posterior.compensating(model):
        compensated = rebuild(model, posterior, remove_dead=False)
        shifted = dict(posterior.loc)
    for layer in model.layers:
        if layer.site not in posterior.kron:
            continue
        keep = model.mask(layer.name).bool()
        columns = (~keep).all(dim=0).expand(keep.shape)
        if bool(columns.any()):
            mean = posterior.kron[layer.site].conditional_mean(columns)[0]
            torch.testing.assert_close(shifted[layer.site], mean.to(before[layer.site]))
    assert all(torch.equal(posterior.loc[site], before[site]) for site in before)
    with torch.no_grad():
        target = net(x)
        error = [float((candidate(x) - target).square().mean()) for candidate in (plain, compensated)]
    remove_first(model, ranking, 0)
    assert error[1] < error[0]


def test_targets_are_parsed_and_checked():
    assert Target.parse("latency=0.7,0.5") == [Target("latency", 0.7), Target("latency", 0.5)]
    assert Target.parse("evidence") == [Target("evidence")]
    assert str(Target("params", 0.25)) == "params=0.25"
    bad_targets = [("params=1.5", "between 0 and 1"), ("params=x", "not a number"), ("speed=0.5", "unknown"),
                   ("params=inf", "finite"), ("params", "between 0 and 1"),
                   ("evidence=0.5", "takes no value"),
                   ("latency=0.5,params=0.3", "give each kind its own --target"),
                   ("latency=50%", "'50%' is not a number; a fraction of the dense net's, e.g. latency=0.5"),
                   ]  # fmt: skip
    for bad, words in bad_targets:
        with pytest.raises(PyrozooError, match=words):
            Target.parse(bad)
    # the Python API takes a string, a Target, or a list of either
    assert as_targets(["params=0.5", Target("flops", 0.3), "latency=0.7,0.5"]) == [
        Target("params", 0.5), Target("flops", 0.3), Target("latency", 0.7), Target("latency", 0.5)
    ]  # fmt: skip
    with pytest.raises(PyrozooError, match="a target is a string"):
        as_targets([0.5])


def test_units_are_ranked_by_their_joint_evidence_per_parameter(fitted):
    _, model, posterior, x = fitted
    ranking = rank_units(model, posterior, x[:2])
    groups = ranking.groups
    gains = delta_f(model, posterior, {name for g in groups for name in g.layers})
    ones = {name: torch.ones_like(gains[name]) for g in groups for name in g.layers}
    per_cost = [float(groups[g].total(gains)[u] / groups[g].total(ones)[u]) for g, u in ranking.order]
    assert per_cost == sorted(per_cost, reverse=True)
    # the group's dF is the sum over every entry of the unit: producing rows and consuming columns
    g, u = ranking.order[0]
    entries = sum(float(m.take(gains[m.layer])[u].sum()) for m in groups[g].members)
    assert ranking.gain[0] == pytest.approx(entries)
    # each group keeps one unit: fewer candidates than units
    assert len(ranking.order) == sum(group.count - 1 for group in groups)


@pytest.mark.parametrize("kind", ["params", "flops"])
def test_a_target_is_met_by_the_rebuilt_net_with_the_fewest_removals(fitted, kind):
    net, model, posterior, x = fitted
    ranking = rank_units(model, posterior, x[:2], by=kind)
    small, removed, value, _ = reduce_to(model, posterior, ranking, Target(kind, 0.6), net, x[:4])
    assert value <= 0.6 and value == pytest.approx(costs.cost(kind, small, net, x[:4]))
    remove_first(model, ranking, removed - 1)  # one unit fewer does not meet it
    assert costs.cost(kind, rebuild(model, posterior), net, x[:4]) > 0.6
    # the rebuilt net computes what the reduced model's mean net computes, dead units cut out or not
    remove_first(model, ranking, removed)
    with torch.no_grad():
        torch.testing.assert_close(
            small(x), rebuild(model, posterior, remove_dead=False)(x), atol=1e-5, rtol=1e-5
        )
    remove_first(model, ranking, 0)


def test_the_report_says_how_latency_was_read_whenever_a_target_is_latency():
    """With baselines or without, a latency target's report says which clock read it and why the table's
    latencies differ from the search's; a params-only report does not."""
    from pyrozoo.compress import _notes

    dense = {"method": "dense", "target": "-", "params": 10, "nonzero_params": 10}
    mine = {"method": "pyrozoo", "target": "latency=0.5", "params": 5, "allocation": "global", "search_cost": 0.49,
            "search_readings": 4}  # fmt: skip
    tp = {"method": "tp-l1", "target": "latency=0.5", "params": 4, "nonzero_params": 4, "matched_by": "latency",
          "matched": 0.98}  # fmt: skip
    alone, beside = "\n".join(_notes([dense, mine])), "\n".join(_notes([dense, mine, tp]))
    for text in (alone, beside):
        assert "its search read 0.490 of the dense net's latency (4 candidates measured)" in text
        assert "Latency is read on the timing thread's CPU clock with one thread" in text
        assert "read again at the end" in text and "aims 3% below a latency target" in text
    assert "least pruned net no costlier" in beside and "least pruned" not in alone
    params = {**mine, "target": "params=0.5", "allocation": "uniform"}
    assert "Latency is read" not in "\n".join(_notes([dense, params]))


def test_the_latency_model_guesses_a_count_and_readings_correct_it():
    """The model predicts 1 - the removed units' summed shares; one reading scales that, two fit a line (here
    through (0.75, 0.875) and (0.625, 0.8125): 0.5 predicted reads 0.75), and the guess stays in [lo, hi)."""
    from pyrozoo.compress import Ranking, _modelled_guess

    ranking = Ranking([], [(0, i) for i in range(10)], [0.0] * 10, {}, [1 / 16] * 10, modelled=True)
    guess = _modelled_guess(ranking, 0.75)
    assert guess({}, 0, 10) == 4  # 1 - 4/16
    assert guess({4: 0.875}, 5, 10) == 6  # 0.75 * 0.75 / 0.875 = 0.64: 1 - 6/16 below it
    assert guess({4: 0.875, 6: 0.8125}, 7, 10) == 8
    assert guess({}, 6, 10) == 6 and guess({}, 0, 3) == 2


def test_a_latency_search_guided_by_the_model_meets_the_target_in_few_readings(fitted, monkeypatch):
    """With the latency model's ranking, the search reads a few candidates, not a bisection's, and returns one
    at most the aim (LATENCY_MARGIN below the target) and within LATENCY_SLACK of it or with one removal fewer
    above it. The reading here is the FLOPs ratio (deterministic, and not the linear model's)."""
    module = sys.modules["pyrozoo.compress"]
    net, model, posterior, x = fitted
    shares = latency_model(model, net, x[:8], repeats=2)
    ranking = rank_units(model, posterior, x[:2], unit_cost=shares)
    assert ranking.modelled and ranking.cost == pytest.approx([shares[g] for g, _ in ranking.order])
    readings, flops = [], costs.cost

    def reading(kind, candidate, dense, example, repeats=7):
        readings.append(flops("flops", candidate, dense, example))
        return readings[-1]

    monkeypatch.setattr(costs, "cost", reading)
    small, removed, value, measured = reduce_to(model, posterior, ranking, Target("latency", 0.6), net, x[:4])
    monkeypatch.undo()
    aim = 0.6 * (1 - module.LATENCY_MARGIN)  # below the target, so that a second reading still meets it
    assert value <= aim and value in readings
    remove_first(model, ranking, removed - 1)
    fewer = costs.cost("flops", rebuild(model, posterior), net, x[:4])
    remove_first(model, ranking, 0)
    assert value >= aim - 0.6 * module.LATENCY_SLACK or fewer > aim
    assert measured == len(readings) < math.ceil(math.log2(len(ranking.order))) + 1


def test_after_its_guesses_the_search_steps_out_until_the_aim_is_bracketed_then_bisects():
    """Guesses that all land on one side of the aim leave the other unread: the search steps beyond the reading
    nearest it by the last guess's step, doubled at each further step, rather than bisecting everything beyond
    (a BatchNorm CNN's search read 8 more candidates so); once bracketed, it bisects."""
    from pyrozoo.compress import MODEL_PROBES, _next_probe

    def guess(readings, lo, hi):
        return lo

    aim = 0.485
    short = {47: 0.5931, 58: 0.5134, 63: 0.4859}  # session 15's trace: the third guess just above the aim
    assert MODEL_PROBES == 3 and _next_probe(dict(list(short.items())[:2]), 59, 360, aim, guess) == 59
    assert _next_probe(short, 64, 360, aim, guess) == 68  # 63 + 5
    assert _next_probe({**short, 68: 0.49}, 69, 360, aim, guess) == 78  # 68 + 2 * 5
    assert _next_probe({**short, 68: 0.4668}, 64, 68, aim, guess) == 66  # bracketed: bisection
    far = {100: 0.30, 90: 0.35, 80: 0.40}  # every reading far below the aim: step down from the fewest
    assert _next_probe(far, 0, 80, aim, guess) == 70 and _next_probe({**far, 70: 0.45}, 0, 70, aim, guess) == 50
    assert _next_probe({**short, 68: 0.49}, 69, 72, aim, guess) == 71  # never beyond [lo, hi)
    assert _next_probe(short, 64, 360, aim, None) == 212  # no model: bisection throughout


def test_replayed_the_stepping_search_reads_fewer_candidates_than_bisection(monkeypatch):
    """On session 15's BatchNorm CNN trace (latencies read at each count, replayed exactly), the search with the
    steps out reads 6 candidates where bisection after the guesses read 11, and picks the same net."""
    module = sys.modules["pyrozoo.compress"]
    from pyrozoo.compress import Ranking

    trace = {0: 1.0, 47: 0.5931, 58: 0.5134, 63: 0.4859, 64: 0.4859, 65: 0.4814, 66: 0.4657, 68: 0.4668,
             73: 0.4479, 82: 0.3784, 101: 0.3421, 138: 0.2773, 212: 0.2197, 360: 0.1}  # fmt: skip
    known = sorted(trace)

    def latency(count):  # between the traced counts, linear
        below = max(c for c in known if c <= count)
        above = min(c for c in known if c >= count)
        if below == above:
            return trace[count]
        return trace[below] + (trace[above] - trace[below]) * (count - below) / (above - below)

    removed = {}
    monkeypatch.setattr(module, "remove_first", lambda model, ranking, count: removed.update(count=count))
    monkeypatch.setattr(module, "rebuild", lambda model, posterior: removed["count"])
    monkeypatch.setattr(costs, "cost", lambda kind, count, dense, example, repeats=7: latency(count))
    guesses = iter([47, 58, 63])  # the trace's own guesses
    monkeypatch.setattr(module, "_modelled_guess", lambda ranking, aim: lambda readings, lo, hi: next(guesses))
    ranking = Ranking([], [(0, i) for i in range(360)], [0.0] * 360, {}, [1 / 400] * 360, modelled=True)
    net, count, value, readings = reduce_to(None, None, ranking, Target("latency", 0.5), None, None)
    assert (count, value) == (65, 0.4814) and readings == 6


def test_the_evidence_target_removes_exactly_the_units_whose_removal_raises_it(fitted):
    net, model, posterior, x = fitted
    ranking = rank_units(model, posterior, x[:2])
    _, removed, _, _ = reduce_to(model, posterior, ranking, Target("evidence"), net, x[:4])
    assert removed == sum(gain > 0 for gain in ranking.gain)
    remove_first(model, ranking, 0)


@pytest.mark.parametrize("criterion", ["tp-l1", "tp-group-norm", "tp-taylor"])
def test_channel_baselines_meet_the_same_cost(fitted, criterion):
    net, _, _, x = fitted
    y = torch.randint(0, 3, (len(x),))
    measure = lambda candidate: costs.cost("params", candidate, net, x[:4])  # noqa: E731
    pruned, value = pruners.channel_prune_to(net, x[:1], criterion, [net[-1]], measure, 0.6, (x[:16], y[:16]))
    assert value <= 0.6 and value == measure(pruned)
    assert pruned(x).shape == (len(x), 3)  # the head keeps its outputs


def test_global_magnitude_zeroes_the_fraction_and_keeps_the_head(fitted):
    net, _, _, _ = fitted
    pruned = pruners.make_permanent(pruners.global_magnitude(net, [net[-1]], 0.5))
    weights = [m.weight for m in pruned.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    body = torch.cat([w.flatten() for w in weights[:-1]])
    assert (body == 0).float().mean() == pytest.approx(0.5, abs=0.01)
    assert torch.equal(pruned[-1].weight, net[-1].weight)


def test_global_magnitude_in_place_is_torch_prune_through_a_finetune(fitted):
    """The weights zeroed in place, their gradients masked, are those torch.nn.utils.prune's global L1 masks
    zero, and a fine-tune ends at the same weights, bit for bit (the zeros kept), as through its masks."""
    from torch.nn.utils import prune as torch_prune

    net, _, _, x = fitted
    y = torch.randint(0, 3, (len(x),), generator=torch.Generator().manual_seed(1))
    reference = copy.deepcopy(net)
    layers = [(m, "weight") for m in list(reference.modules())[:-1] if isinstance(m, (nn.Conv2d, nn.Linear))]
    torch_prune.global_unstructured(layers, pruning_method=torch_prune.L1Unstructured, amount=0.6)
    pruned = pruners.global_magnitude(net, [net[-1]], 0.6)
    body = [m for m in pruned.modules() if isinstance(m, (nn.Conv2d, nn.Linear))][:-1]
    zeroed = [m.weight == 0 for m in body]
    assert all(torch.equal(z, m.weight_mask == 0) for z, (m, _) in zip(zeroed, layers))
    for tuned in (reference, pruned):
        finetune(tuned, x, y, 5, 1e-2, 32, 0)
        pruners.make_permanent(tuned)
    expected = reference.state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in pruned.state_dict().items())
    assert all(torch.equal(m.weight == 0, z) for m, z in zip(body, zeroed))  # the zeros were kept
    assert not pruners._KEPT_ZERO.get(pruned) and all(not p._backward_hooks for p in pruned.parameters())


def test_the_command_writes_its_report_and_nets(capsys, tmp_path):
    """The command on a pyrozoo net trained briefly: every method's row, the costs, the files."""
    from pyrozoo import data as datasets
    from pyrozoo.nets import NETS, create_net

    torch.manual_seed(0)
    d = datasets.prepare(datasets.load("fashion-mnist-mini"), pad_to=NETS["lenet"].pad_to)
    net = create_net("lenet", in_channels=1, image_size=d.x_train.shape[-1], num_classes=10)
    finetune(net, d.x_train, d.y_train, 20, 1e-3, 64, 0)
    torch.save(net.state_dict(), tmp_path / "lenet.pt")
    out = tmp_path / "out"
    code, stdout, err = cli(
        capsys, "compress", "lenet", "--weights", str(tmp_path / "lenet.pt"), "--data", "fashion-mnist-mini",
        "--target", "params=0.5", "--finetune-steps", "3", "--fit-size", "64", "--baselines", "tp-l1",
        "global-magnitude", "--repeats", "1", "--calibrate", "100", "--no-progress", "--out", str(out),
    )  # fmt: skip
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    rows = {row["method"]: row for row in report["table"]}
    assert set(rows) == {"dense", "dense+finetune", "pyrozoo", "tp-l1", "global-magnitude"}
    assert rows["dense+finetune"]["params"] == rows["dense"]["params"]
    assert (
        rows["pyrozoo"]["params"] <= 0.5 * rows["dense"]["params"]
        and rows["tp-l1"]["params"] <= rows["pyrozoo"]["params"]  # brought to the cost pyrozoo's net reached
    )
    assert rows["global-magnitude"]["nonzero_params"] < rows["dense"]["params"]
    # each pruned net's accuracy before its fine-tune, as the test set reads that net before tuning
    assert all(0 <= rows[m]["untuned_accuracy"] <= 1 for m in ("pyrozoo", "tp-l1", "global-magnitude"))
    assert "untuned_accuracy" not in rows["dense"]  # dense+finetune's before is the dense net's accuracy
    assert rows["dense+finetune"]["untuned_accuracy"] == rows["dense"]["accuracy"]
    assert rows["dense"]["latency_b1"] == rows["dense"]["latency_b256"] == 1.0  # calibrated, timed as itself
    dense_ms = rows["dense"]["latency_ms_b1"], rows["dense"]["latency_ms_b256"]
    assert all(ms > 0 for ms in dense_ms) and "latency_ms_b1" not in rows["pyrozoo"]
    assert f"{dense_ms[0]:.3g} ms per pass at batch 1 and {dense_ms[1]:.3g} ms at batch 256 on the CPU, one " in stdout
    assert f"| {rows['pyrozoo']['accuracy']:.4f} | {rows['pyrozoo']['untuned_accuracy']:.4f} |" in stdout
    assert f"accuracy {rows['pyrozoo']['untuned_accuracy']:.4f} before the fine-tune" in err + stdout
    for name in (
        "report.md",
        "front.png",
        "front.pdf",
        "nets/params-0.5/state_dict.pt",
        "nets/params-0.5/net.pt2",
    ):
        assert (out / name).is_file(), name
    assert "| pyrozoo | params=0.5 |" in stdout
    assert report["lr_schedule"] == "cosine" and "decayed to 0 along a half cosine" in (out / "report.md").read_text()
    from pyrozoo.compress import MIN_WIDTH

    assert report["allocation"] == "auto" and report["min_width"] == MIN_WIDTH  # the CLI's defaults, the API's
    assert report["calibrate"] == 100 and all(row["temperature"] > 0 for row in report["table"])
    assert "Accuracy, NLL and ECE (20 bins of equal count) are read on 900 test inputs; " in stdout
    assert " 100 test inputs (drawn by the seed) were held out to fit each net's temperature" in (
        out / "report.md"
    ).read_text()
    text = (out / "report.md").read_text()
    assert "- params=0.5: pyrozoo's units shared out uniformly; its search read 0." in text
    assert f" ({rows['pyrozoo']['search_readings']} candidates measured)." in text  # a bisection's: several
    assert rows["pyrozoo"]["search_readings"] > 1
    assert "- params=0.5: tp-l1, matched to pyrozoo's net by params, " in text
    assert "of its params as the match read it." in text and ", 1 thread, " in text
    assert "- params=0.5: global-magnitude, matched to pyrozoo's net by nonzero params." in text
    assert rows["pyrozoo"]["reached"] and rows["pyrozoo"]["allocation"] == "uniform"
    loaded = torch.export.load(out / "nets" / "params-0.5" / "net.pt2").module()
    assert loaded(d.x_test[:3]).shape == (3, 10)


def test_the_command_exits_4_where_a_target_is_out_of_reach(capsys, tmp_path):
    """A floor that leaves the target out of reach: the report and nets are written, and the command ends with
    one line naming the target and exit code 4, so that a script notices."""
    from pyrozoo import data as datasets
    from pyrozoo.nets import NETS, create_net

    torch.manual_seed(0)
    d = datasets.prepare(datasets.load("fashion-mnist-mini"), pad_to=NETS["lenet"].pad_to)
    net = create_net("lenet", in_channels=1, image_size=d.x_train.shape[-1], num_classes=10)
    torch.save(net.state_dict(), tmp_path / "lenet.pt")
    code, stdout, err = cli(
        capsys, "compress", "lenet", "--weights", str(tmp_path / "lenet.pt"), "--data", "fashion-mnist-mini",
        "--target", "params=0.3", "--allocation", "global", "--min-width", "0.9", "--finetune-steps", "0",
        "--fit-size", "64", "--baselines", "--repeats", "1", "--no-progress", "--out", str(tmp_path / "out"),
    )  # fmt: skip
    assert code == 4 and "| pyrozoo | params=0.3 (not reached) |" in stdout
    last = err.splitlines()[-1]
    assert "Traceback" not in err and last.startswith("pyrozoo: error: not reached: params=0.3 (0.")
    assert (tmp_path / "out" / "report.json").is_file() and (tmp_path / "out" / "nets" / "params-0.3").is_dir()


def test_the_command_refuses_what_it_cannot_use(capsys, tmp_path):
    assert_one_line_error(*cli(capsys, "compress", "nope:thing", "--weights", str(tmp_path / "w.pt"),
                               "--data", "fashion-mnist-mini"), "cannot find the net factory")  # fmt: skip
    assert_one_line_error(*cli(capsys, "compress", "lenet", "--weights", str(tmp_path / "w.pt"),
                               "--data", "fashion-mnist-mini"), "--weights", "no such file")  # fmt: skip
    assert_one_line_error(*cli(capsys, "compress", "lenet", "--weights", "w.pt", "--target", "latency=2"),
                          "between 0 and 1")  # fmt: skip
    for bad in ("abc", "1.5"):  # not a number, or out of range: the range is said either way
        assert_one_line_error(*cli(capsys, "compress", "lenet", "--weights", "w.pt", "--min-width", bad),
                              "--min-width", "fraction in [0, 1)")  # fmt: skip


def test_the_command_refuses_an_out_it_would_not_replace_before_any_work(capsys, tmp_path, monkeypatch):
    """A --out holding a user's files is refused in one line before the compression runs (a large net's hours
    are not lost to it), and the files are left alone."""
    from pyrozoo.nets import create_net

    torch.save(create_net("lenet", in_channels=1, image_size=32, num_classes=10).state_dict(), tmp_path / "w.pt")
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "notes.txt").write_text("mine")
    monkeypatch.setattr(sys.modules["pyrozoo.compress"], "compress", lambda *a, **k: pytest.fail("compressed"))
    assert_one_line_error(*cli(capsys, "compress", "lenet", "--weights", str(tmp_path / "w.pt"), "--data",
                               "fashion-mnist-mini", "--out", str(tmp_path / "runs")),
                          "it holds 'notes.txt'", "give a new or empty folder")  # fmt: skip
    assert (tmp_path / "runs" / "notes.txt").read_text() == "mine"


def test_compress_refuses_a_device_it_cannot_use(fitted):
    net, _, _, x = fitted
    data = (x, torch.zeros(len(x), dtype=torch.long), x, torch.zeros(len(x), dtype=torch.long))
    with pytest.raises(PyrozooError, match="unknown device 'gpu0'"):
        compress(net, data, "params=0.5", device="gpu0", progress=False)
    if not torch.cuda.is_available():
        with pytest.raises(PyrozooError, match="no CUDA device"):
            compress(net, data, "params=0.5", device="cuda", progress=False)


def test_finetune_holds_or_decays_its_learning_rate_along_a_half_cosine(monkeypatch):
    seen = []
    step = torch.optim.Adam.step

    def spy(self, *args, **kwargs):
        seen.append(self.param_groups[0]["lr"])
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", spy)
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    finetune(nn.Linear(4, 3), x, y, 4, 0.1, 8, 0, schedule="cosine")
    assert seen == pytest.approx([0.1, 0.05 * (1 + 0.5**0.5), 0.05, 0.05 * (1 - 0.5**0.5)])
    seen.clear()
    finetune(nn.Linear(4, 3), x, y, 3, 0.1, 8, 0)
    assert seen == [0.1] * 3
    with pytest.raises(PyrozooError, match="unknown learning-rate schedule 'linear'; known: constant, cosine"):
        finetune(nn.Linear(4, 3), x, y, 3, 0.1, 8, 0, schedule="linear")
    with pytest.raises(PyrozooError, match="unknown lr_schedule"):
        compress(nn.Linear(4, 3), (x, y, x, y), "params=0.5", lr_schedule="linear", progress=False)


def test_the_tables_latencies_are_read_in_one_round_robin_of_every_net(monkeypatch):
    """Every row's latency comes from one round-robin of all the nets (per batch size), so that they compare
    among themselves; the reference is 1.0 and is not timed against itself."""
    torch.manual_seed(0)
    nets = [nn.Linear(64, 64), nn.Sequential(nn.Linear(64, 512), nn.Linear(512, 64))]
    reference = nn.Linear(64, 8)
    rounds = []
    spy = costs.round_robin

    def counted(calls, *args, **kwargs):
        rounds.append((list(calls), kwargs["clock"]))
        assert torch.is_inference_mode_enabled()  # no autograd graph recorded into the timings
        return spy(calls, *args, **kwargs)

    monkeypatch.setattr(costs, "round_robin", counted)
    ratios = costs.latency_ratios([reference, *nets, nets[0]], reference, torch.randn(256, 64), repeats=5)
    assert len(rounds) == 1 and len(rounds[0][0]) == 3  # the two nets and the reference, once each
    assert ratios[0] == 1.0 and ratios[1] == ratios[3] and ratios[2] > ratios[1]  # the wide one is slower
    assert rounds[0][1] is costs.timing_clock()


def test_the_reference_alone_is_timed_for_its_own_seconds_per_pass(monkeypatch):
    """latency_readings gives the reference's seconds per pass from the same round-robin: its median turn over
    the passes in a turn; with the reference alone among the nets, it is still timed (a ratio of 1.0), where
    latency_ratios, which needs no seconds, times nothing."""
    reference = nn.Linear(64, 8)
    turns = []
    spy = costs.round_robin

    def counted(calls, *args, **kwargs):
        times = spy(calls, *args, **kwargs)
        turns.append(times["reference"])
        return times

    monkeypatch.setattr(costs, "round_robin", counted)
    monkeypatch.setattr(costs, "_calls_per_turn", lambda call, clock: 3)
    ratios, seconds = costs.latency_readings([reference, reference], reference, torch.randn(4, 64), repeats=5)
    assert ratios == [1.0, 1.0] and len(turns[0]) == 5
    assert seconds == pytest.approx(statistics.median(turns[0]) / 3) and seconds > 0
    assert costs.latency_ratios([reference], reference, torch.randn(4, 64)) == [1.0] and len(turns) == 1  # untimed


def test_device_latency_times_copies_on_the_device_in_one_round_robin(monkeypatch):
    """On a device (here the CPU, standing in for a GPU), copies of the nets are timed in turns on the wall
    clock: the reference reads 1.0, a copy of it about 1, a net of a fifth of the work well below; the nets
    given are left where they were, and no autograd graph is recorded."""
    torch.manual_seed(0)
    reference = nn.Sequential(nn.Linear(256, 1024), nn.ReLU(), nn.Linear(1024, 10))
    small = nn.Sequential(nn.Linear(256, 200), nn.ReLU(), nn.Linear(200, 10))
    rounds, spy = [], costs.round_robin

    def counted(calls, *args, **kwargs):
        rounds.append(len(calls))
        assert torch.is_inference_mode_enabled() and kwargs.get("clock") is None  # the wall clock
        return spy(calls, *args, **kwargs)

    monkeypatch.setattr(costs, "round_robin", counted)
    before = [p.data_ptr() for p in small.parameters()]
    ratios = costs.device_latency_ratios(
        [reference, copy.deepcopy(reference), small], reference, torch.randn(64, 256), "cpu", repeats=5
    )
    assert rounds == [3] and ratios[0] == 1.0 and 0.6 < ratios[1] < 1.6 and ratios[2] < 0.6
    assert [p.data_ptr() for p in small.parameters()] == before


def test_the_report_adds_gpu_latency_where_there_is_a_gpu(monkeypatch):
    """With a GPU seen, every row gets its latency on the GPU too, in the same order as on the CPU, and the
    Markdown table two more columns; without one, neither."""
    from pyrozoo.compress import _Job, _time_rows, markdown

    torch.manual_seed(0)
    dense, small = nn.Linear(16, 4), nn.Linear(16, 4)
    x = torch.randn(8, 16)
    seen = []

    def on_gpu(nets, reference, example, device, repeats=7):
        seen.append((str(device), len(example)))
        return [0.5 if net is small else 1.0 for net in nets]

    monkeypatch.setattr(costs, "device_latency_ratios", on_gpu)
    row = dict(target="-", accuracy=0.9, nll=0.3, ece=0.01, params=68, flops=10)
    for gpu in (False, True):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu)
        job = _Job(SimpleNamespace(), dense, {1: x[:1], 256: x}, 1, 0, 1e-3, "cosine", 8, 0)
        table = [{**row, "method": "dense"}, {**row, "method": "pyrozoo"}]
        job.timed += [(table[0], dense), (table[1], small)]
        _time_rows(job)
        text = markdown(table)
        assert ("gpu_latency_b256" in table[1]) == gpu and ("GPU latency b256 |" in text) == gpu
    assert seen == [("cuda", 1), ("cuda", 8)]
    assert table[1]["gpu_latency_b1"] == table[1]["gpu_latency_b256"] == 0.5 and table[0]["gpu_latency_b1"] == 1
    assert "| 0.50 | 0.50 |" in text.splitlines()[3]


def test_latency_is_read_on_the_threads_cpu_clock_where_torch_runs_one_thread():
    """One intra-op thread: the calling thread's CPU time (a loaded machine's waits left out); several: the wall
    clock, which their overlapping work needs."""
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert costs.timing_clock() is time.thread_time
        torch.set_num_threads(2)
        assert costs.timing_clock() is time.perf_counter
    finally:
        torch.set_num_threads(threads)


def test_a_latency_targets_baselines_are_timed_against_pyrozoos_net(fitted, monkeypatch):
    """A latency target's baselines are matched by latency (a latency-aware allocation reaches it with more
    FLOPs than a uniform one), each candidate timed in turns with pyrozoo's net itself, not with the dense one:
    the baseline is the least pruned one no slower than pyrozoo's net."""
    net, _, _, x = fitted
    y = torch.randint(0, 3, (len(x),))
    references = []

    def timer(candidate, reference, example, repeats=7):  # a latency that follows the FLOPs, exactly
        references.append(costs.parameters(reference))
        return costs.flops(candidate, example) / costs.flops(reference, example)

    monkeypatch.setattr(costs, "latency_ratio", timer)
    read = lambda nets, ref, x, repeats=7: ([timer(n, ref, x) for n in nets], 1e-3)  # noqa: E731
    monkeypatch.setattr(costs, "latency_readings", read)
    result = compress(net, (x, y, x, y), "latency=0.6", finetune_steps=0, fit_size=None, baselines=("tp-l1",),
                      repeats=1, progress=False, log=lambda text: None)  # fmt: skip
    small = result.net
    rows = {row["method"]: row for row in result.table}
    assert costs.parameters(small) in references  # the baseline's candidates were timed against pyrozoo's net
    measure = lambda candidate: timer(candidate, small, x[:256])  # noqa: E731
    matched, value = pruners.channel_prune_to(net, x[:1], "tp-l1", [net[-1]], measure, 1.0)
    assert rows["tp-l1"]["params"] == costs.parameters(matched) and value <= 1.0
    assert rows["tp-l1"]["latency_b256"] <= rows["pyrozoo"]["latency_b256"] < 0.6


@pytest.mark.parametrize("name", ["resnet20", "tv:mobilenet_v3_small"])
def test_compress_shrinks_issue_28s_nets(name):
    """resnet20 (residual groups, BatchNorm) and MobileNetV3-small (SE blocks, hardswish): compress finds units,
    meets the target with a smaller net of the same class, and Torch-Pruning's row stands beside it."""
    from pyrozoo.nets import create_net

    torch.manual_seed(0)
    net = create_net(name, in_channels=1, image_size=32, num_classes=10).eval()
    x, y = torch.randn(32, 1, 32, 32), torch.randint(0, 10, (32,))
    result = compress(net, (x, y, x, y), "params=0.5", finetune_steps=1, batch_size=16, fit_size=None,
                      baselines=("tp-l1",), repeats=1, progress=False, log=lambda text: None)  # fmt: skip
    rows = {row["method"]: row for row in result.table}
    assert rows["pyrozoo"]["params"] <= 0.5 * rows["dense"]["params"] and rows["pyrozoo"]["units_removed"] > 0
    assert rows["tp-l1"]["params"] <= 0.5 * rows["dense"]["params"]
    assert type(result.net) is type(net) and result.net(x[:2]).shape == (2, 10)


@pytest.mark.slow
def test_the_compress_gpu_script_runs_end_to_end_on_the_cpu(tmp_path):
    """scripts/compress_resnet18_gpu.sh with DEVICE=cpu and a tiny setting: it trains the net, compresses it
    against every baseline and writes the report (the full run needs a GPU; tests/test_cuda.py runs it there).
    """
    import os
    import subprocess
    from pathlib import Path

    env = {**os.environ, "OUT": str(tmp_path), "DEVICE": "cpu", "NET": "lenet", "DATA": "fashion-mnist-mini",
           "EPOCHS": "0.5", "STEPS": "2", "FIT_SIZE": "64", "REPEATS": "1", "THREADS": "1"}  # fmt: skip
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(["bash", "scripts/compress_resnet18_gpu.sh"], cwd=root, env=env, capture_output=True,
                          text=True)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads((tmp_path / "compress" / "report.json").read_text())
    methods = {row["method"] for row in report["table"]}
    assert methods == {"dense", "dense+finetune", "pyrozoo", *pruners.PRUNERS}
    assert report["device"] == "cpu" and (tmp_path / "lenet-dense.pt").is_file()


def test_the_accuracy_before_the_fine_tune_is_the_pruned_nets_own():
    """Without a fine-tune, each pruned net's accuracy before it is its accuracy; with one, it is read before
    the fine-tune moves the net (the fine-tuned nets differ from what pruning left)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                        nn.Linear(8 * 36, 4)).eval()  # fmt: skip
    x, y = torch.randn(64, 1, 6, 6), torch.randint(0, 4, (64,))
    options = dict(fit_size=None, baselines=("tp-l1", "global-magnitude"), repeats=1, progress=False,
                   log=lambda text: None)  # fmt: skip
    still = compress(net, (x, y, x, y), "params=0.5", finetune_steps=0, **options)
    pruned = [row for row in still.table if "untuned_accuracy" in row]
    assert [row["method"] for row in pruned] == ["pyrozoo", "tp-l1", "global-magnitude"]
    assert all(row["untuned_accuracy"] == row["accuracy"] for row in pruned)
    tuned = compress(net, (x, y, x, y), "params=0.5", finetune_steps=30, batch_size=16, **options)
    rows = {row["method"]: row for row in tuned.table}
    assert rows["pyrozoo"]["untuned_accuracy"] == still.table[1]["accuracy"]  # the same net, before its tune
    assert rows["pyrozoo"]["accuracy"] > rows["pyrozoo"]["untuned_accuracy"]  # 30 steps on the test inputs


# a compress call that takes seconds: two fine-tune steps, one baseline, one timed round, silent
QUICK = dict(finetune_steps=2, batch_size=16, fit_size=None, baselines=("tp-l1",), repeats=1, progress=False,
             log=lambda text: None)  # fmt: skip


def _small_cnn() -> tuple[nn.Module, torch.Tensor, tuple]:
    """A conv net on random 6x6 images of 4 classes, the images, and the data as compress takes tensors (the
    test set the training set)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 36, 4)).eval()
    x, y = torch.randn(64, 1, 6, 6), torch.randint(0, 4, (64,))
    return net, x, (x, y, x, y)


def test_the_api_saves_what_the_command_writes(tmp_path):
    """``Compressed.save`` writes the command's folder from the API: the record holds the options, threads and
    date as compress knew them, with what the caller says in front; the report's Markdown leads with the data
    (no command line), and every target's net is exported."""
    net, x, data = _small_cnn()
    result = compress(net, data, "params=0.5", seed=3, **QUICK)
    assert result.record["seed"] == 3 and result.record["threads"] == 1  # timed on one thread, as the command
    assert result.record["net_class"] == "torch.nn.modules.container.Sequential"
    result.save(tmp_path / "out", net="my-cnn")
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert list(report)[:2] == ["net", "data"] and report["net"] == "my-cnn" and report["data"] == "tensors"
    with pytest.raises(PyrozooError, match="save: seed, targets are recorded by compress itself; pass only"):
        result.save(tmp_path / "again", targets="mine", seed=1)  # a recorded fact is not overwritten
    assert report["targets"] == ["params=0.5"] and report["baselines"] == ["tp-l1"] and report["curvature"] == "kfac"
    assert report["table"] == result.table
    text = (tmp_path / "out" / "report.md").read_text()
    assert text.startswith("tensors, ") and "for 2 Adam steps after pruning" in text
    program = torch.export.load(tmp_path / "out" / "nets" / "params-0.5" / "net.pt2").module()
    assert torch.allclose(program(x[:3]), result.net(x[:3]), atol=1e-6)


def test_latency_is_timed_on_its_threads_and_the_rest_computes_on_torchs(monkeypatch):
    """``threads`` sets what latency is timed on alone: the fine-tunes and the test metrics run on torch's own
    count, which is the same after the call; the report records the timing's."""
    module = sys.modules["pyrozoo.compress"]  # the package's attribute of that name is the function
    seen = {"timed": set(), "tuned": set(), "tested": set()}
    spies = dict(timed=(costs, "latency_readings"), tuned=(module, "finetune"), tested=(module, "evaluate_net"))
    for kind, (owner, name) in spies.items():
        def spy(*args, _kind=kind, _call=getattr(owner, name), **kwargs):
            seen[_kind].add(torch.get_num_threads())
            return _call(*args, **kwargs)

        monkeypatch.setattr(owner, name, spy)
    net, _, data = _small_cnn()
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        result = compress(net, data, "params=0.5", threads=1, **QUICK)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert seen == {"timed": {1}, "tuned": {2}, "tested": {2}} and result.record["threads"] == 1
    with pytest.raises(PyrozooError, match=r"threads \(--threads\) is how many torch threads latency is timed on"):
        compress(net, data, "params=0.5", threads=0, progress=False)


def test_the_wall_clock_benchmark_pairs_pyrozoo_with_a_baseline_per_round(tmp_path, capsys, monkeypatch):
    """benchmarks/compress_wall_clock.py: per round the seconds of pyrozoo's method and of the baseline's from
    one compress call, their ratio, and the median; it refuses zero rounds."""
    from pathlib import Path

    from pyrozoo.nets import create_net

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import compress_wall_clock

    torch.manual_seed(0)
    net = create_net("lenet", in_channels=1, image_size=32, num_classes=10)
    torch.save(net.state_dict(), tmp_path / "lenet.pt")
    common = ["lenet", "--weights", str(tmp_path / "lenet.pt"), "--data", "fashion-mnist-mini"]
    seen = []
    compress = compress_wall_clock.pyrozoo.compress
    monkeypatch.setattr(compress_wall_clock.pyrozoo, "compress", lambda *a, **k: seen.append(k) or compress(*a, **k))
    small = ["--finetune-steps", "2", "--fit-size", "64"]
    compress_wall_clock.main([*common, *small, "--target", "params=0.5", "--rounds", "2", "--repeats", "1"])
    lines = capsys.readouterr().out.splitlines()
    assert [k["seed"] for k in seen] == [0, 1] and all(k["baselines"] == ("tp-l1",) for k in seen)
    assert all(k["finetune_steps"] == 2 and k["fit_size"] == 64 for k in seen)
    assert lines[0].startswith("round 0: pyrozoo ") and ", tp-l1 " in lines[0] and ", ratio " in lines[0]
    ratios = sorted(float(line.split("ratio ")[1].split()[0]) for line in lines[:2])
    median = float(lines[2].removeprefix("median ratio ").split()[0])
    assert lines[2].endswith(" over 2 rounds") and ratios[0] - 0.01 <= median <= ratios[1] + 0.01
    with pytest.raises(SystemExit):
        compress_wall_clock.main([*common, "--rounds", "0"])
    assert "--rounds, --repeats and --fit-size are at least 1" in capsys.readouterr().err


def test_a_latency_target_ranks_globally_by_the_latency_model(fitted, monkeypatch):
    from pyrozoo.compress import rank_for

    net, model, posterior, x = fitted
    before = {layer.name: model.mask(layer.name).clone() for layer in model.layers}
    ranking = rank_for(model, posterior, Target("latency", 0.5), net, x[:8], x[:2], "global", repeats=2)
    modelled = latency_model(model, net, x[:8], repeats=2)
    assert all(cost > 0 for cost in modelled.values())
    assert all(torch.equal(model.mask(name), mask) for name, mask in before.items())
    monkeypatch.setattr(
        sys.modules["pyrozoo.compress"], "latency_model", lambda *a, **k: modelled
    )  # the same timings twice
    ranking = rank_for(model, posterior, Target("latency", 0.5), net, x[:8], x[:2], "global", repeats=2)
    per_cost = [gain / modelled[g] for gain, (g, _) in zip(ranking.gain, ranking.order)]
    assert per_cost == sorted(per_cost, reverse=True)


def test_a_uniform_allocation_takes_the_same_fraction_of_every_group(fitted):
    net, model, posterior, x = fitted
    ranking = rank_units(model, posterior, x[:2], allocation="uniform")
    glob = rank_units(model, posterior, x[:2])
    counts = [g.count for g in ranking.groups]
    assert sorted(ranking.order) == sorted(glob.order)  # the same candidates, in another order
    removed = [0] * len(counts)
    for g, u in ranking.order:
        removed[g] += 1
        fractions = [r / n for r, n in zip(removed, counts)]
        assert all(max(fractions) - f <= 1 / n + 1e-9 for f, n in zip(fractions, counts))
    for g in range(len(counts)):  # within a group, the order of the evidence
        assert [u for h, u in ranking.order if h == g] == [u for h, u in glob.order if h == g]
    with pytest.raises(PyrozooError, match="unknown allocation"):
        rank_units(model, posterior, x[:2], allocation="sideways")
    with pytest.raises(PyrozooError, match="unknown allocation"):
        compress(net, (x, torch.zeros(len(x), dtype=torch.long)) * 2, "params=0.5", allocation="sideways")


def test_a_global_allocation_leaves_min_width_of_every_group(fitted):
    """Unbounded, a global order can cut a layer to one unit (resnet20's inner convolutions); ``min_width`` keeps
    that fraction of every group, rounded up, out of the ranking, and a uniform allocation ignores it."""
    import math

    net, model, posterior, x = fitted
    unbounded = rank_units(model, posterior, x[:2], allocation="global")
    for width in (0.25, 0.5):
        ranking = rank_units(model, posterior, x[:2], allocation="global", min_width=width)
        for g, units in enumerate(ranking.groups):
            removable = [u for h, u in ranking.order if h == g]
            assert len(removable) == max(0, units.count - max(1, math.ceil(width * units.count)))
            assert removable == [u for h, u in unbounded.order if h == g][: len(removable)]  # the same order
    uniform = rank_units(model, posterior, x[:2], allocation="uniform", min_width=0.5)
    assert sorted(uniform.order) == sorted(unbounded.order)


def test_a_target_out_of_reach_is_said_so_with_the_fix(fitted, monkeypatch):
    """A floor that leaves the target out of reach (every removable unit gone, the latency still above it) is
    logged and marked in the report, naming --min-width and --allocation uniform."""
    from pyrozoo.compress import markdown

    net, _, _, x = fitted
    monkeypatch.setattr(costs, "latency_ratio", lambda *args: 0.9)  # never below the target
    said = []
    y = torch.arange(len(x)) % 3
    result = compress(net, (x, y) * 2, "latency=0.5", finetune_steps=0, curvature="diag",
                      fit_size=None, baselines=(), repeats=1, min_width=0.5, progress=False,
                      log=said.append)  # fmt: skip
    row = next(r for r in result.table if r["method"] == "pyrozoo")
    assert not row["reached"] and row["allocation"] == "global" and row["min_width"] == 0.5
    assert any("not reached" in line and "--min-width" in line and "--allocation uniform" in line for line in said)
    assert any("removable units (each group keeping at least 50%)" in line for line in said)  # why fewer
    text = markdown(result.table)
    assert "**not reached** with every removable unit gone (each group keeps 50% of its units" in text
    assert "| pyrozoo | latency=0.5 (not reached) |" in text


def test_auto_allocation_is_global_for_latency_and_uniform_otherwise(fitted, monkeypatch):
    from pyrozoo.compress import resolved_allocation

    net, _, _, x = fitted
    labelled = (x, torch.arange(len(x)) % 3) * 2
    monkeypatch.setattr(costs, "latency_ratio", lambda *args: 0.4)
    for curvature, expected in (("kfac", "global"), ("diag", "global")):
        result = compress(net, labelled, "latency=0.5", curvature=curvature, finetune_steps=0, fit_size=None,
                          baselines=(), repeats=1, progress=False, log=lambda text: None)  # fmt: skip
        assert result.table[-1]["allocation"] == expected
    monkeypatch.undo()

    assert resolved_allocation("auto", Target("latency", 0.5)) == "global"
    assert [resolved_allocation("auto", Target(kind, 0.5)) for kind in ("params", "flops")] == ["uniform"] * 2
    assert resolved_allocation("uniform", Target("latency", 0.5)) == "uniform"
    assert resolved_allocation("uniform", Target("evidence")) == "global"  # as rank_for ranks it
    data = (x, torch.zeros(len(x), dtype=torch.long)) * 2
    said = []
    compress(net, labelled, "params=0.5", min_width=0.5, finetune_steps=0, fit_size=None, baselines=(), repeats=1,
             progress=False, log=said.append)  # fmt: skip
    assert "min_width 0.5 is used by a global allocation only, and no target here has one" in said
    for width in (-0.1, 1.0, "0.25", True):
        with pytest.raises(PyrozooError, match=r"min_width \(--min-width\) is the least fraction .* in \[0, 1\)"):
            compress(net, data, "params=0.5", min_width=width, progress=False)
    for repeats in (0, 2.5, True):  # the CLI's --repeats is checked by argparse; the API's here
        with pytest.raises(PyrozooError, match=r"repeats \(--repeats\) .* at least 1"):
            compress(net, data, "latency=0.5", repeats=repeats, progress=False)


def test_units_followed_by_batchnorm_are_scored_by_what_consumes_them():
    from pyrozoo.bmr.units import model_units
    from pyrozoo.compress import unit_gains

    torch.manual_seed(0)
    x, y = torch.randn(64, 1, 8, 8), torch.randint(0, 3, (64,))
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(4 * 4 * 4, 5), nn.ReLU(), nn.Linear(5, 3),
    )  # fmt: skip
    finetune(net, x, y, 10, 1e-2, 32, 0)
    model, posterior = laplace(net.eval(), x, "diag", progress=False)
    groups = {units.name: units for units in model_units(model)}
    gains = delta_f(model, posterior, {name for units in groups.values() for name in units.layers})
    conv, hidden = groups["0"], groups["5"]
    assert conv.passthrough == ("1",) and not hidden.passthrough
    consumers = sum(m.take(gains[m.layer]).sum(dim=1) for m in conv.consumers)
    torch.testing.assert_close(unit_gains(conv, gains), consumers)
    assert not torch.allclose(conv.total(gains), consumers)  # the conv's own rows are left out
    torch.testing.assert_close(unit_gains(hidden, gains), hidden.total(gains))


def test_module_times_follow_the_forward_pass():
    net = _cnn()
    times = costs.module_times(net, torch.randn(4, 1, 8, 8), repeats=3)
    assert [name for name, _, _ in times] == [str(i) for i in range(10)]  # every leaf, in the order it runs
    assert [width for _, _, width in times][:3] == [6, 6, 6] and times[-1][2] == 3
    assert all(seconds > 0 for _, seconds, _ in times)


def test_round_robin_calls_each_once_a_round_in_a_fresh_order_and_pairs_ratios_by_round(monkeypatch):
    """The benchmarks' timer: warm-up rounds untimed, every call once per timed round, the order shuffled; a
    ratio is taken within each round, so a round slowed for all (the third) does not skew it as medians would.
    """
    calls: list[str] = []
    times = costs.round_robin({k: (lambda k=k: calls.append(k)) for k in "abcd"}, rounds=20, warmup=2)
    rounds = [calls[i : i + 4] for i in range(0, len(calls), 4)]
    assert len(rounds) == 22 and all(sorted(r) == list("abcd") for r in rounds)
    assert len({tuple(r) for r in rounds}) > 5 and {k: len(t) for k, t in times.items()} == dict.fromkeys(
        "abcd", 20
    )
    calls.clear()  # several passes a round: each call's fastest of its passes, each pass in its own order
    slow = iter([5.0, 1.0, 3.0] * 2)
    clock = iter(range(10**6))
    monkeypatch.setattr(costs.time, "perf_counter", lambda: next(clock))
    durations = {"a": lambda: [next(clock) for _ in range(int(next(slow)) - 1)], "b": lambda: None}
    times = costs.round_robin(durations, rounds=2, warmup=0, passes=3)
    assert times == {"a": [1, 1], "b": [1, 1]}
    ticks = iter(range(0, 10**6, 7))  # the clock given is the one read
    assert costs.round_robin({"a": lambda: None}, rounds=2, clock=lambda: next(ticks)) == {"a": [7, 7]}
    ratios = costs.paired_ratios({"base": [1.0, 1.0, 10.0], "x": [2.0, 20.0, 20.0]}, "base")
    assert ratios["x"] == (2.0, 2.0, 11.0) and ratios["base"] == (1.0, 1.0, 1.0)  # medians' ratio: 20


MAPPED = """
import ctypes, torch
from pyrozoo import costs

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]

libc = costs._glibc()
libc.mallinfo2.restype = MallInfo2

def mapped_by_a_block():
    before = libc.mallinfo2().hblkhd
    block = torch.empty(12 * 2**20)
    return (libc.mallinfo2().hblkhd - before) / 2**20

outside = mapped_by_a_block()
with costs.steady_allocator():
    inside = mapped_by_a_block()
print(outside, inside, mapped_by_a_block())
"""


@pytest.mark.skipif(
    costs._glibc() is None or not hasattr(costs._glibc(), "mallinfo2"), reason="glibc 2.33 or later's mallopt"
)
def test_timing_keeps_large_blocks_off_mmap_and_puts_the_allocator_back():
    """A 48 MiB block is above glibc's largest mmap threshold: by default it is mapped afresh (and its pages
    faulted in as they are written) each time. Under steady_allocator it comes from the heap, where freed pages
    stay for the next pass; afterwards large blocks are mapped again. Read from glibc's own count of mapped
    bytes (mallinfo2), in a fresh process: where a block comes from depends on what the process did before (a
    heap top left free serves it), and page-fault counts on address-space randomisation too."""
    import os
    import subprocess

    done = subprocess.run([sys.executable, "-c", MAPPED], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    assert done.returncode == 0, done.stderr
    outside, inside, after = map(float, done.stdout.split())
    assert outside >= 48 and inside == 0 and after >= 48


def test_the_latency_model_shares_each_module_among_the_units_it_runs_on(fitted, monkeypatch):
    """A unit's cost is its share of the layers it has entries in, plus 1/count of the modules between its
    producers and its consumers on its channels (here the ReLU and the pooling)."""
    from pyrozoo.bmr.units import model_units

    net, model, _, x = fitted
    widths = {name: width for name, _, width in costs.module_times(net, x[:4], repeats=1)}
    fake = [(str(i), float(2**i), widths[str(i)]) for i in range(10)]  # module i takes 2**i seconds
    monkeypatch.setattr(costs, "module_times", lambda *a, **k: fake)
    found = latency_model(model, net, x[:4])
    # as fractions of the whole pass, 2**10 - 1 seconds
    cost = {units.name: found[g] * 1023 for g, units in enumerate(model_units(model))}
    # conv 0 (1 of 6 rows), ReLU 1 and pool 2 on its 6 channels, conv 3's columns of one input channel (9 of
    # 6 * 9 + 1, the bias's column included)
    assert cost["0"] == pytest.approx(1 / 6 + 2 / 6 + 4 / 6 + 8 * 9 / 55)
    # conv 3's 8 output channels, ReLU 4 and pool 5, then the Flatten's 32 features stop the walk; the Linear 7
    # reads 4 of its 32 + 1 columns per channel
    assert cost["3"] == pytest.approx(8 / 8 + 16 / 8 + 32 / 8 + 128 * 4 / 33)
    assert cost["7"] == pytest.approx(128 / 12 + 256 / 12 + 512 / 13)  # Linear 7, ReLU 8, the head's columns


def test_the_obd_score_is_the_evidence_without_its_occam_term(fitted):
    """delta_f(occam=False) is -1/2 (h + δ) w² per weight, from the curvature, the prior precision and the trained
    weights computed apart; it differs from dF by the Occam term 1/2 ln(1 + h/δ); rank_units orders by it."""
    from pyrozoo.models.layers import find_layers
    from pyrozoo.posteriors.laplace import curvature

    net, model, posterior, x = fitted
    names = {layer.name for layer in model.layers}
    fit, full = delta_f(model, posterior, names, occam=False), delta_f(model, posterior, names)
    h = curvature(net, find_layers(net), x, "diag", progress=False)  # laplace's own (seed 0, all of x)
    for record in model.laplace:
        name, delta = record["layer"], record["prior_precision"]
        w = next(layer for layer in find_layers(net) if layer.name == name).join(net).double()
        expected = -0.5 * (h[name] + delta) * w.square()
        torch.testing.assert_close(fit[name].double(), expected, rtol=1e-4, atol=1e-6)
        occam = 0.5 * torch.log1p(h[name] / delta)
        torch.testing.assert_close((full[name] - fit[name]).double(), occam, rtol=1e-4, atol=1e-6)
    ranking = rank_units(model, posterior, x[:2], score="obd")
    groups = ranking.groups
    scored = {
        g: groups[g].total(fit) for g in range(len(groups))
    }  # no BatchNorm here: every entry of the unit
    assert ranking.gain == pytest.approx([float(scored[g][u]) for g, u in ranking.order], rel=1e-5)
    per_parameter = [gain / float(groups[g].total({n: torch.ones_like(fit[n]) for n in fit})[u])
                     for gain, (g, u) in zip(ranking.gain, ranking.order)]  # fmt: skip
    assert per_parameter == sorted(per_parameter, reverse=True) and max(ranking.gain) <= 0
    with pytest.raises(PyrozooError, match="unknown score"):
        rank_units(model, posterior, x[:2], score="magic")
    with pytest.raises(PyrozooError, match="unknown score"):
        compress(net, (x, torch.zeros(len(x), dtype=torch.long)) * 2, "params=0.5", score="magic")


@pytest.mark.parametrize("schedule", sorted(LR_SCHEDULES))
def test_the_report_words_every_learning_rate_schedule(schedule):
    from pyrozoo.compress import _schedule

    assert _schedule({"lr_schedule": schedule}) and set(LR_SCHEDULE_WORDS) == set(LR_SCHEDULES)


def test_the_report_shows_an_unstructured_nets_non_zero_parameters():
    """Global magnitude keeps the dense shapes: the table gives its non-zero count beside them, so a row at
    ``params=0.5`` does not read as 1.00 alone; a structured net's row shows its parameters once."""
    from pyrozoo.compress import markdown

    row = dict(
        target="params=0.5", accuracy=0.9, nll=0.3, ece=0.01, flops=10, latency_b1=1.0, latency_b256=1.0
    )
    table = [
        {**row, "method": "dense", "params": 100, "nonzero_params": 100},
        {**row, "method": "global-magnitude", "params": 100, "nonzero_params": 50},
        {**row, "method": "pyrozoo", "params": 48, "nonzero_params": 48},
    ]
    text = markdown(table)
    assert "| 100 (1.00), 50 non-zero (0.50) |" in text and text.count("non-zero") == 1
    assert "| 48 (0.48) |" in text
