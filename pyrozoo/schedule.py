"""The BMR schedule, a loop callback: a reduction pass after every epoch but the last, once past the warm-up
and once the posterior is informative; a pass that collapses the net undone; the units it killed compacted."""

from __future__ import annotations

import copy
import functools
import time

import torch

from pyrozoo.bmr.compact import compact
from pyrozoo.bmr.units import original_entries, pruned_fraction
from pyrozoo.evaluation import evaluate_setup
from pyrozoo.loop import Callback
from pyrozoo.metrics import beats, input_free_scores
from pyrozoo.runfolder import BMR_LOG

# BMR's first pass waits until the posterior has moved from its start on more than this fraction of the live
# weights (Posterior.moved), unless --warmup-steps is given.
INFORMATIVE = 0.5
# Posterior draws of the evaluation that tells a collapsed net after a BMR pass (its NLL is at the
# class prior's, far from a working net's: a few draws tell them apart).
COLLAPSE_DRAWS = 10
COLLAPSE_POINTS = 1000  # training points it judges on (a fixed random subset; never the test set)


class BMRSchedule(Callback):
    """The run's reduction (``setup.bound.reduction``) after each epoch the schedule holds, recorded in the
    epoch's metrics row and in bmr.csv; ``compaction`` (None: ``--no-compact``) cuts out what a pass killed.
    """

    def __init__(self, compaction: "Compaction | None" = None):
        self.compaction = compaction
        self.collapse: CollapseCheck | None = None
        self.said_wait = self.said_first = False  # BMR's wait, and its first pass, are said once

    def start(self, loop) -> None:
        bound, p = loop.setup.bound, loop.progress
        self.collapse = CollapseCheck(loop.setup)
        if p.epoch != 0:
            return
        c = loop.config
        if bound.bmr_passes() == 0:
            loop.log(
                f"warning: no BMR pass will run: the first comes after {bound.first_pass_step()} warm-up steps and "
                f"after an epoch but the last, and this run has {c.epochs} x {c.steps_per_epoch} steps; lower "
                "--warmup-steps or train longer"
            )
        elif c.warmup_steps is not None:  # the user's schedule: BMR does not wait for the posterior
            warning = loop.setup.guide.forced_pass_warning(c.warmup_steps)
            if warning:
                loop.log(warning)

    def catch_up(self, loop, row: dict) -> None:
        # passes use no random numbers, so the rest of the run is what a run asked for this many epochs from the
        # start had
        self.end_of_epoch(loop, row)

    def end_of_epoch(self, loop, row: dict) -> None:
        """The pass after the epoch just finished, if the schedule has one there and the posterior is ready."""
        setup, p, c = loop.setup, loop.progress, loop.config
        if not (0 < p.epoch < c.epochs and p.step >= setup.bound.first_pass_step()):
            return
        if not p.bmr_log and not self._posterior_ready(loop):
            return
        reduction = setup.bound.reduction
        before = None if getattr(reduction, "allows_empty", False) else _state(setup)
        report = reduction(setup.model, setup.guide)
        setup.world.broadcast(setup.model, setup.guide)  # rank 0's masks and posterior, on every rank
        if before is not None and self.collapse.collapsed(loop, before, report.seconds, row):
            return
        for layer in report.layers:
            if layer.note:
                loop.log(f"epoch {p.epoch}, {layer.layer}: {layer.note}")
        p.bmr_log += [{"epoch": p.epoch, "step": p.step, **r} for r in report.table().to_dict("records")]
        loop.folder.write_table(BMR_LOG, p.bmr_log)
        seconds = self.compaction(loop) if self.compaction else 0.0
        row["bmr_seconds"] = round(report.seconds + seconds, 4)
        row["pruned_fraction"] = report.pruned_fraction  # just computed, of the original net

    def _posterior_ready(self, loop) -> bool:
        """Whether the first BMR pass may come now. With ``--warmup-steps`` given, at once (the user's
        schedule); else only once the posterior has moved from its start on more than ``INFORMATIVE`` of the
        live weights (a posterior still at its start, such as IVON's Hessian at ``hess_init``, makes every
        removal look good and would prune the net to death), saying when it waits and when, and why, the pass
        then comes."""
        c, p = loop.config, loop.progress
        when = f"epoch {p.epoch} (step {p.step})"
        moved = None if c.warmup_steps is not None else loop.setup.guide.moved(loop.setup.model)
        if moved is None:  # the schedule alone: the given --warmup-steps, or a posterior with no fixed start
            return True
        fraction, what = moved
        if fraction > INFORMATIVE:
            if not self.said_first:  # not again when a collapse undid it and a later one comes
                loop.log(
                    f"{when}: first BMR pass, the posterior now informative: {what} on {fraction:.0%} of the "
                    f"live weights (BMR waits for more than {INFORMATIVE:.0%}; --warmup-steps forces a schedule)"
                )
                self.said_first = True
            return True
        if not self.said_wait:
            loop.log(
                f"{when}: BMR waits for an informative posterior: {what} on only {fraction:.0%} of the live "
                f"weights, and the first pass needs more than {INFORMATIVE:.0%} (--warmup-steps forces a schedule)"
            )
            self.said_wait = True
        return False


def _state(setup) -> tuple[dict, dict, dict]:
    """Copies of the guide's, model's and optimiser's state, to undo a pass with."""
    return tuple(copy.deepcopy(part.state_dict()) for part in (setup.guide, setup.model, setup.optimizer))


def _load_state(setup, state: tuple[dict, dict, dict]) -> None:
    """Restore a :func:`_state` (in the order a checkpoint is loaded)."""
    for part, value in zip((setup.guide, setup.model, setup.optimizer), state):
        part.load_state_dict(value)


class CollapseCheck:
    """Whether a pass collapsed the net, judged on a fixed random subset of the training set: never the test
    set, which must not shape the trained model. A collapsed net is no better than an input-free prediction on
    any data, the data it trained on included."""

    def __init__(self, setup):
        self.setup = setup

    @functools.cached_property
    def points(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The check points, drawn once per run (from its seed)."""
        d = self.setup.data
        order = torch.randperm(
            len(d.x_train), generator=torch.Generator().manual_seed(self.setup.config.seed)
        )
        chosen = order[:COLLAPSE_POINTS].to(d.x_train.device)
        return d.x_train[chosen], d.y_train[chosen]

    @functools.cached_property
    def input_free(self) -> dict[str, float]:
        """The check points' scores of the best prediction that ignores the inputs (computed once per run)."""
        return input_free_scores(self.setup.data, self.points[1])

    def held_out(self, epoch: int) -> dict[str, float]:
        """Metrics on the check points from a few posterior draws: enough to tell a collapsed net from a
        working one."""
        samples = min(self.setup.config.samples, COLLAPSE_DRAWS)
        return evaluate_setup(self.setup, epoch, samples=samples, on=self.points)

    def collapsed(self, loop, before: tuple[dict, dict, dict], seconds: float, row: dict) -> bool:
        """Whether the pass just made collapsed the net: took a score on the check points (NLL; accuracy, or
        for regression RMSE) that beat every prediction ignoring the inputs (the class prior, the target mean)
        to no better than those. If so the state ``before`` the pass is restored, one line says so, and ``row``
        records the pass's time and the pruned fraction as they now are. A score no better before the pass (an
        overconfident net's NLL, a barely trained net's) is not the pass's doing and does not count."""
        start, setup, epoch = time.perf_counter(), self.setup, loop.progress.epoch
        reference = self.input_free
        after = self.held_out(epoch)
        if beats(after, reference) == set(reference):
            return False
        kept = _state(setup)
        _load_state(setup, before)
        lost = beats(self.held_out(epoch), reference) - beats(after, reference)
        if not lost:
            _load_state(setup, kept)
            return False
        what = "the target mean" if setup.data.task == "regress" else "the class prior"
        scores = ", ".join(f"{key} {after[key]:.4g} against {reference[key]:.4g}" for key in sorted(lost))
        loop.log(
            f"epoch {epoch}: BMR pass undone: it collapsed the net (on training points, {scores}: no better than "
            f"predicting {what}); BMR tries again after the next epoch. The posterior was read too early, or the "
            "rule prunes too much of it at once: raise --warmup-steps (left out, BMR waits for an informative "
            "posterior) or the rule's cut-off (--rule-option margin=... for threshold); allow_empty=true keeps "
            "such a pass"
        )
        row["bmr_seconds"] = round(seconds + time.perf_counter() - start, 4)
        row["pruned_fraction"] = pruned_fraction(setup.model)
        return True


class Compaction:
    """Cut the units a pass killed out of the model, guide and optimiser, so that training gets cheaper."""

    def __init__(self):
        self.note = ""  # said once, not after every pass

    def __call__(self, loop) -> float:
        """Compact now; returns the seconds it took."""
        start, setup, epoch = time.perf_counter(), loop.setup, loop.progress.epoch
        removed, note = compact(setup.model, setup.guide, setup.optimizer)
        if note and note != self.note:
            loop.log(f"epoch {epoch}, compaction: {note}")
            self.note = note
        if removed:
            sizes = sum(layer.shape.numel() for layer in setup.model.layers)
            total = original_entries(setup.model, setup.model.layers)
            loop.log(
                f"epoch {epoch}: compacted {removed} unit{'s' * (removed != 1)} (gone with the weights pruned so "
                "far, or by a units "
                f"rule); the latents now hold {sizes:,d} of the original {total:,d} entries"
            )
        return time.perf_counter() - start
