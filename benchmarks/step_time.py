"""One training step of each contender, as a ratio to pyrozoo's mean-field SVI step, paired per round.

For each net at batch 120 on the CPU: a plain PyTorch Adam step of the deterministic net (``torch.optim.Adam`` as
a user builds it, unfused on the CPU, and once more fused); a hand-written plain
PyTorch mean-field step of the same Bayesian model (weights sampled as ``loc + scale * noise``, analytic KL
for the weights, the layer-scale hyperprior sampled log-normally with a one-sample KL, Adam), the step as one
would write it by hand without tuning; one pyrozoo SVI step with each guide (flat prior); one step of
tiered-ff (regularised-horseshoe prior, our mean-field guide); one IVON step (methods ivon, ivon-bmr: the
plain net trained by IVON, whose state is the posterior) and the same step with ivon-opt's own update (before
pyrozoo's in-place rewrite); for the MLP, the mean-field SVI step of the net pruned to 99% with whole units
dead and compacted (:func:`compacted_step`); and the peers of ``benchmarks/peers.py`` where they are installed
(``pip install -e ".[bench]"``; otherwise their lines are skipped and say so): bayesian-torch with its shipped
averaged KL and with that KL summed (the true ELBO), TyXe and plain Pyro, each on the same net with a N(0, 1)
prior.

Every contender is built once; then every round calls each once, in an order shuffled afresh, after warm-up
rounds (:func:`pyrozoo.costs.round_robin`; a round is ``--passes`` such shuffled passes, each contender's fastest
counting; by default with one thread the time is the thread's CPU time, which the machine's other jobs do not
enter), and each is reported as its time over pyrozoo's mean-field step's
(and over the plain Adam step's) *in the same round*, median [first-third quartile] over the rounds
(:func:`pyrozoo.costs.paired_ratios`): the load of a shared machine drifts, but within a round it falls on
every contender alike, so the paired ratios hold where absolute times do not.

    python benchmarks/step_time.py [--nets mlp lenet bn_cnn vit mixer] [--rounds 100] [--warmup 10]
        [--passes 2] [--threads 1] [--clock cpu|wall] [--only WORD ...] [--with-checks]

``bn_cnn`` is the compress issue's BatchNorm CNN (``benchmarks/bn_cnn.py``, 32x32 input) as a fresh Bayesian
model: its convolutions and linear layers random, BatchNorm's affine a point estimate trained beside the guide
(the IVON lines are left out: IVON trains no deterministic parameters). pyrozoo's steps train with the optimiser
a run builds (``STEPS["svi"].optimizer``: the registry's Adam, fused on the CPU); bayesian-torch's with torch's
default Adam and torch's default memory order, as its examples do, and once more tuned as pyrozoo is (``fused
Adam, channels-last``: :func:`peers.bayesian_torch`), for the share of the difference that is tuning.

ViT and MLP-Mixer steps take seconds on a CPU: time them with fewer rounds (``--rounds 10 --warmup 2``).
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import platform
import time

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from torch.func import functional_call

from pyrozoo.guides import make_guide
from pyrozoo.models import BayesianModel
from pyrozoo.guides.ivon import ivon_step
from pyrozoo.models.priors import gaussian
from pyrozoo.models.priors import tiered as tiered_prior
from pyrozoo.nets import NETS, create_net
from pyrozoo.costs import paired_ratios, round_robin
from pyrozoo.steps import STEPS, svi_step

from bn_cnn import bn_cnn  # benchmarks/ is on the path when run as a script
from peers import bayesian_torch, peers

BATCH, DATASET_SIZE, CLASSES = 120, 60_000, 10
CLOCKS = {"cpu": time.thread_time, "wall": time.perf_counter}


def timed(calls: dict, rounds: int, warmup: int = 10, passes: int = 1, clock=None) -> dict:
    """Seconds of each call per round, timed round-robin in a shuffled order (:func:`pyrozoo.costs.round_robin`;
    with ``passes``, each call's fastest of that many shuffled passes a round; ``clock`` as there), with Pyro's
    argument checks off as in training: every benchmark's timer."""
    with pyro.validation_enabled(False):
        return round_robin(calls, rounds, warmup, passes=passes, clock=clock)


def ratio_text(quartiles: tuple[float, float, float]) -> str:
    """A paired ratio as ``median [first-third quartile]``."""
    q1, median, q3 = quartiles
    return f"{median:5.2f} [{q1:.2f}-{q3:.2f}]"


def print_ratios(title: str, times: dict[str, list[float]], bases: dict[str, str]) -> None:
    """One line per call: its paired ratio (:func:`pyrozoo.costs.paired_ratios`) to each base, ``{column: base's
    key}``."""
    ratios = {column: paired_ratios(times, base) for column, base in bases.items()}
    width = max(map(len, times))
    print(f"{title:{width}s}  " + "  ".join(f"{'/ ' + column:>18s}" for column in bases))
    for name in times:
        print(f"{name:{width}s}  " + "  ".join(f"{ratio_text(r[name]):>18s}" for r in ratios.values()))


class HandWrittenMeanField:
    """The flat-prior Bayesian net and its mean-field posterior written out in plain PyTorch."""

    def __init__(self, model: BayesianModel, lr: float):
        self.model, self.params = model, []
        self.layers = []
        for layer in model.layers:
            loc = torch.empty(layer.shape).uniform_(-2, 2).requires_grad_()
            raw = torch.full(layer.shape, math.log(math.expm1(0.1))).requires_grad_()
            prec_loc = torch.empty(()).uniform_(-2, 2).requires_grad_()
            prec_raw = torch.tensor(math.log(math.expm1(0.1))).requires_grad_()
            self.layers.append((layer, loc, raw, prec_loc, prec_raw))
            self.params += [loc, raw, prec_loc, prec_raw]
        self.gamma = dist.Gamma(torch.tensor(2.0), torch.tensor(2.0))
        self.optimizer = torch.optim.Adam(self.params, lr=lr)

    def step(self, x, y):
        kl, weights = 0.0, {}
        for layer, loc, raw, prec_loc, prec_raw in self.layers:
            prec_scale = F.softplus(prec_raw)
            log_prec = prec_loc + prec_scale * torch.randn(())
            prec = log_prec.exp()
            # one-sample KL of the log-normal posterior of the precision against its Gamma(2, 2) prior
            log_q = (
                -0.5 * ((log_prec - prec_loc) / prec_scale) ** 2
                - prec_scale.log()
                - 0.5 * math.log(2 * math.pi)
            )
            kl = kl + (log_q - log_prec) - self.gamma.log_prob(prec)
            scale = F.softplus(raw)
            z = loc + scale * torch.randn_like(loc)
            kl = kl + (0.5 * (scale**2 + loc**2 - 1) - scale.log()).sum()
            c = prec.rsqrt() if layer.is_output else prec.rsqrt() / 10
            weights.update(layer.split(c * z))
        logits = functional_call(self.model.net, weights, (x,))
        loss = F.cross_entropy(logits, y, reduction="sum") * (DATASET_SIZE / len(x)) + kl
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()


def published_ivon(optimizer):
    """ivon-opt's own optimiser (its update as published, concatenating every parameter) with the same groups and
    settings as pyrozoo's in-place one: the before of pyrozoo's rewrite, timed in the same run."""
    from ivon import IVON

    first = optimizer.param_groups[0]
    settings = {key: first[key] for key in ("lr", "ess", "hess_init", "beta1", "beta2", "clip_radius")}
    groups = [{"params": g["params"], "weight_decay": g["weight_decay"]} for g in optimizer.param_groups]
    return IVON(groups, mc_samples=optimizer.mc_samples, **settings)


# the stand-in for a trained posterior (compacted_step): the fraction of each group's units that survive (about 55
# of the MLP's 500 per layer, as bmr-th's run keeps), and of the entries between survivors that matter (a little
# more than a 99% budget leaves)
COMPACTED_SURVIVORS, COMPACTED_DENSITY = 0.11, 0.25


def compacted_step(name: str, side: int, x, y, sparsity: float = 0.99, seed: int = 0):
    """An SVI step (mean-field guide, flat prior, Adam) of the net pruned to ``sparsity`` (the true fraction,
    dead units' entries counted) with whole units dead, then compacted (:mod:`pyrozoo.bmr.compact`), as a run
    trains once BMR has killed them; and a line describing it.

    The posterior stands in for a trained one as bmr-th leaves it (run runs/mlp-bmr-th of
    experiments/run-metrics.csv: 99.7% pruned, the rebuilt net 51,687 parameters of which 3,093 non-zero): in
    each group a random ``COMPACTED_SURVIVORS`` of
    the units survive, and a random ``COMPACTED_DENSITY`` of the entries between surviving units (and inputs)
    carry weights far from 0 (mean 2-4, scale 0.5 in ``z``), every other entry a weight near 0 (mean 0.01), so
    that BMR's dF ranks those first; :class:`~pyrozoo.bmr.TargetSparsity` then prunes to ``sparsity``, which
    kills the other units and thins the survivors, and compaction cuts the dead units out."""
    from pyrozoo.bmr import TargetSparsity, pruned_fraction
    from pyrozoo.bmr.compact import compact
    from pyrozoo.bmr.units import model_units
    from pyrozoo.models.priors import flat

    g = torch.Generator().manual_seed(seed)
    model = BayesianModel(create_net(name, in_channels=1, image_size=side, num_classes=CLASSES), prior=flat)
    model.logits(x[:2], {layer.name: layer.join(model.net) for layer in model.layers})  # its example batch
    guide = make_guide("meanfield", model)
    strong = {layer.name: torch.rand(layer.shape, generator=g) < COMPACTED_DENSITY for layer in model.layers}
    for units in model_units(model):
        dies = torch.rand(units.count, generator=g) >= COMPACTED_SURVIVORS
        for member in units.members:  # the unit's rows in its own layer, its columns in the next
            member.put(strong[member.layer], dies, False)
    for layer in model.layers:
        loc = torch.randn(layer.shape, generator=g).abs() * 0.01
        loc[strong[layer.name]] = 2 + 2 * torch.rand(int(strong[layer.name].sum()), generator=g)
        guide.write_posterior(layer.site, loc, torch.full(layer.shape, 0.5))
    TargetSparsity(sparsity)(model, guide)
    fraction = pruned_fraction(model)
    removed, note = compact(model, guide)
    if not removed:
        raise RuntimeError(f"the benchmark's model did not compact: {note}")
    held = sum(layer.shape.numel() for layer in model.layers)
    full = sum(shape.numel() for shape in model.full_shapes.values())
    optimizer = STEPS["svi"].optimizer(model, guide, 1e-3, "adam", DATASET_SIZE)
    describe = (
        f"{fraction:.4f} pruned, {removed} units removed; the compacted latents hold {held:,} of {full:,} entries"
    )
    return (lambda: svi_step(model, guide, optimizer, x, y, DATASET_SIZE)), describe


def print_set_up(threads: int | None, before: str = "") -> None:
    """Set the threads (None or 0: torch's choice) and the seed, and print the line that says what was timed on,
    with the machine's load average (1, 5, 15 minutes)."""
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    print(
        f"# {before}batch {BATCH}, CPU, {torch.get_num_threads()} threads, torch {torch.__version__}, "
        f"pyro {pyro.__version__}, {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"load average {' '.join(f'{v:.1f}' for v in os.getloadavg())}"
    )


def adam_step(net, x, y, fused: bool = False):
    """One plain Adam step of ``net`` on the batch ``(x, y)`` (cross-entropy, lr 1e-3): the floor every
    Bayesian step is compared with, ``torch.optim.Adam`` as a user builds it (unfused on the CPU, torch's
    default there), or ``fused``."""
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3, fused=fused or None)

    def step():
        loss = F.cross_entropy(net(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


PLAIN, FLOOR, OURS = "plain pytorch (deterministic)", "hand-written mean-field", "pyrozoo svi, guide=meanfield"
PLAIN_FUSED = PLAIN + ", fused Adam"
IVON, PUBLISHED = "pyrozoo ivon (plain net + IVON)", "pyrozoo ivon, ivon-opt's own update"
COMPILED = "pyrozoo ivon, compiled kernel"
SUMMED = "bayesian-torch, KL summed (true ELBO)"
SUMMED_FUSED = SUMMED + ", fused Adam, channels-last"


def contenders(name: str, x, y, only=(), with_checks: bool = False) -> dict:
    """Every contender's step on the batch ``(x, y)`` of net ``name``, built once: ``{name: step()}``."""
    side = x.shape[-1]

    def fresh():
        if name == "bn_cnn":
            return bn_cnn(1, CLASSES)
        return create_net(name, in_channels=1, image_size=side, num_classes=CLASSES)

    model = BayesianModel(fresh())
    hand = HandWrittenMeanField(model, lr=1e-3)
    steps = {PLAIN: adam_step(fresh(), x, y), PLAIN_FUSED: adam_step(fresh(), x, y, fused=True)}
    steps[FLOOR] = lambda: hand.step(x, y)

    def pyrozoo_step(bayesian, guide, validate=None):
        # the optimiser a run trains with (the registry's Adam, fused on the CPU; BatchNorm's affine beside)
        optimizer = STEPS["svi"].optimizer(bayesian, guide, 1e-3, "adam", DATASET_SIZE)
        return lambda: svi_step(bayesian, guide, optimizer, x, y, DATASET_SIZE, validate=validate)

    for kind in ("meanfield", "autonormal", "autodelta"):
        steps[f"pyrozoo svi, guide={kind}"] = pyrozoo_step(model, make_guide(kind, model, x, y, DATASET_SIZE))
    tiered = BayesianModel(fresh(), prior=tiered_prior)
    steps["pyrozoo svi, tiered-ff"] = pyrozoo_step(tiered, make_guide("meanfield", tiered))
    if not model.deterministic_parameters():  # IVON trains only random layers (no BatchNorm)
        ivon_model = BayesianModel(fresh(), prior=gaussian)
        ivon_guide = make_guide("ivon", ivon_model)
        ivon_optimizer = ivon_guide.make_optimizer(lr=0.1, dataset_size=DATASET_SIZE)
        steps[IVON] = lambda: ivon_step(ivon_model, ivon_guide, ivon_optimizer, x, y, DATASET_SIZE)
        published_model = copy.deepcopy(ivon_model)
        published_guide = make_guide("ivon", published_model)
        published = published_ivon(published_guide.make_optimizer(lr=0.1, dataset_size=DATASET_SIZE))
        published_guide.optimizer = published
        steps[PUBLISHED] = lambda: ivon_step(published_model, published_guide, published, x, y, DATASET_SIZE)
        compiled_model = BayesianModel(fresh(), prior=gaussian)
        compiled_guide = make_guide("ivon", compiled_model, options={"kernel": "compiled"})
        compiled = compiled_guide.make_optimizer(lr=0.1, dataset_size=DATASET_SIZE)
        steps[COMPILED] = lambda: ivon_step(compiled_model, compiled_guide, compiled, x, y, DATASET_SIZE)
    if with_checks:  # Pyro's and torch's argument checks on, as Pyro has them by default
        steps["pyrozoo svi, meanfield, checks on"] = pyrozoo_step(
            model, make_guide("meanfield", model), validate=True
        )
    compacted = "pyrozoo svi, compacted at 99% pruned"
    if name == "mlp" and (not only or any(word in compacted for word in only)):
        steps[compacted], describe = compacted_step(name, side, x, y)
        print(f"{name}: {compacted}: {describe}")
    built, missing = peers(fresh(), DATASET_SIZE, 1e-3)
    for line in missing:
        print(f"{name}: {line}")
    fused = bayesian_torch(fresh(), DATASET_SIZE, 1e-3, summed=True, fused=True)
    for peer in built + ([fused] if fused else []):
        steps[peer.name] = lambda step=peer.step: step(x, y)
    if only:
        bases = (PLAIN, PLAIN_FUSED, FLOOR, OURS)
        steps = {k: v for k, v in steps.items() if k in bases or any(word in k for word in only)}
    return steps


def bench_net(
    name: str, rounds: int, warmup: int, only=(), with_checks: bool = False, passes: int = 1, clock=None
) -> None:
    side = 32 if name == "bn_cnn" else NETS[name].pad_to or 28
    x, y = torch.randn(BATCH, 1, side, side), torch.randint(0, CLASSES, (BATCH,))
    times = timed(contenders(name, x, y, only, with_checks), rounds, warmup, passes, clock)
    print(f"{name}: {rounds} rounds of {passes} passes; paired ratios per round, median [IQR]")
    print_ratios(name, times, {"pyrozoo meanfield": OURS, "plain Adam": PLAIN, "fused Adam": PLAIN_FUSED})
    for peer in (SUMMED, SUMMED_FUSED):
        if peer in times:
            print(f"{name}: pyrozoo meanfield / {peer} {ratio_text(paired_ratios(times, peer)[OURS])}")
    if IVON in times and PUBLISHED in times:
        ratio = ratio_text(paired_ratios(times, PUBLISHED)[IVON])
        print(f"{name}: pyrozoo's in-place IVON update / ivon-opt's {ratio}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nets", nargs="+", default=["mlp", "lenet", "bn_cnn"])
    parser.add_argument("--rounds", type=int, default=100, help="timed rounds (each contender once per round)")
    parser.add_argument("--warmup", type=int, default=10, help="untimed rounds first")
    parser.add_argument(
        "--passes",
        type=int,
        default=2,
        help="shuffled passes a round, each contender's fastest counting (a preempted call's spike dropped)",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's choice)")
    parser.add_argument(
        "--clock",
        choices=("cpu", "wall"),
        help="cpu: the thread's CPU time, which other jobs on the machine do not enter (the default with one "
        "thread); wall: wall-clock time (the default with more threads, whose work the main thread's CPU time "
        "leaves out)",
    )
    parser.add_argument(
        "--only",
        nargs="+",
        default=(),
        help="time only contenders whose name holds one of these words "
        "(besides the two plain Adam steps, hand-written and pyrozoo's mean-field step, the bases of the ratios)",
    )
    parser.add_argument(
        "--with-checks", action="store_true", help="also time our step with Pyro's argument checks on"
    )
    args = parser.parse_args()
    clock = args.clock or ("cpu" if args.threads == 1 else "wall")
    print_set_up(args.threads, before=f"{clock} clock, ")
    for name in args.nets:
        bench_net(name, args.rounds, args.warmup, args.only, args.with_checks, args.passes, CLOCKS[clock])


if __name__ == "__main__":
    main()
