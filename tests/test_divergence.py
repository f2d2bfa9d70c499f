"""Tests for pyrozoo.divergence: a loss or a posterior that leaves the numbers stops the run with a
TrainingDiverged that says how to go on, and the last committed epoch is kept."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from configs import quiet, with_loss
from configs import tiny_config as tiny

from pyrozoo.build import build
from pyrozoo.divergence import Divergence
from pyrozoo.elbo import negative_elbo
from pyrozoo.errors import PyrozooError, TrainingDiverged
from pyrozoo.loop import Progress, Training
from pyrozoo.runfolder import CHECKPOINT, METRICS, RunFolder
from pyrozoo.train import Run


def test_nan_loss_stops_training_and_keeps_the_last_epoch(tmp_path, monkeypatch):
    real, calls = negative_elbo, []

    def nan_from_epoch_two(*args, **kwargs):
        calls.append(1)
        loss = real(*args, **kwargs)
        return loss * float("nan") if len(calls) > 4 + 2 else loss  # epoch 1 = calls 1-4; NaN at step 7

    config = tiny(epochs=3, steps_per_epoch=4)
    run = Run(config, tmp_path, log=quiet)
    with_loss(run, nan_from_epoch_two)
    with pytest.raises(TrainingDiverged, match=r"epoch 2, step 7") as info:
        run.train(progress=False)
    assert info.value.exit_code == 1 and isinstance(info.value, PyrozooError)
    assert len(calls) == 7

    checkpoint = torch.load(tmp_path / CHECKPOINT, weights_only=False)
    assert (checkpoint["epoch"], checkpoint["step"]) == (1, 4)
    assert all(torch.isfinite(t).all() for t in checkpoint["guide"].values())
    assert len(pd.read_csv(tmp_path / METRICS)) == 1

    # The folder is a valid epoch-1 state: with the loss fixed, resuming finishes the run.
    run.close()
    resumed = Run(config, tmp_path, resume=True, log=quiet)
    assert resumed.epoch == 1
    resumed.train(progress=False)
    assert list(pd.read_csv(tmp_path / METRICS)["epoch"]) == [1, 2, 3]
    assert all(torch.isfinite(t).all() for t in resumed.guide.state_dict().values())


@pytest.mark.parametrize("epoch", [0, 2])
@pytest.mark.parametrize("what", ["loss", "posterior"])
def test_the_message_says_where_it_diverged_and_how_to_go_on(tmp_path, epoch, what):
    """Before any epoch is committed there is nothing to resume: train again with a smaller --lr; after one,
    the resume command with the learning rate lowered tenfold."""
    setup = build(tiny(lr=0.01))
    loop = Training(setup, RunFolder(tmp_path / "run"), Progress(epoch=epoch, step=5))
    if what == "loss":
        with pytest.raises(
            TrainingDiverged, match=rf"the loss became inf at epoch {epoch + 1}, step 6;"
        ) as info:
            Divergence().after_step(loop, float("inf"))
    else:
        Divergence().after_steps(loop)  # a finite posterior is no divergence
        with torch.no_grad():
            next(iter(setup.guide.parameters())).fill_(float("nan"))
        degenerate = rf"the posterior of \S+ became degenerate at epoch {epoch + 1}, step 5"
        with pytest.raises(TrainingDiverged, match=degenerate) as info:
            Divergence().after_steps(loop)
    message = str(info.value)
    if epoch == 0:
        assert "nothing to resume" in message and "--lr 0.001" in message and "--resume" not in message
    else:
        resume = f"pyrozoo train --out {tmp_path / 'run'} --resume --lr 0.001 --override lr"
        assert message.endswith(resume) and f"state after epoch {epoch}" in message
