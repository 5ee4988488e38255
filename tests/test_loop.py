"""The training skeleton both networks share (ddpm.loop) and the learning-rate schedules."""

import numpy as np
import pytest

from ddpm.errors import NonFiniteLossError
from ddpm.loop import epoch_losses
from ddpm.lr_schedules import cosine_decay


def test_epoch_losses_yields_each_loss_and_names_the_first_non_finite_step():
    seen = []

    def step(x):
        seen.append(x)
        return 1.0 / x if x else float("inf")

    losses = epoch_losses(
        [(2,), (4,), (0,), (8,)],
        step,
        epoch=1,
        epochs=3,
        steps=4,
        global_step=10,
        name="classifier",
        fix="lower classifier.lr",
        progress=False,
    )
    assert next(losses) == 0.5 and next(losses) == 0.25
    with pytest.raises(NonFiniteLossError, match=r"^classifier loss is inf at epoch 2, step 13; lower classifier.lr$"):
        next(losses)
    assert seen == [2, 4, 0]  # nothing runs after the bad step


def test_cosine_decay_is_a_half_cosine_after_the_warmup():
    np.testing.assert_allclose(
        cosine_decay(1.0, 0.0, 4), [1.0, (1 + np.cos(np.pi / 4)) / 2, 0.5, (1 + np.cos(3 * np.pi / 4)) / 2]
    )
    lr = cosine_decay(2.0, 0.5, 12, warmup_steps=2)
    assert lr[0] == lr[2] == 2.0 and lr[-1] == pytest.approx(0.5 + 1.5 * (1 + np.cos(np.pi * 9 / 10)) / 2)
