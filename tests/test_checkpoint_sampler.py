"""Checking sampling requests (ddpm.checkpoint_sampler), the one place `ddpm sample` and the registered model share."""

import dataclasses
import re
import time

import numpy as np
import pytest

from ddpm.checkpoint_sampler import (
    MAX_REQUEST_IMAGES,
    CheckpointSampler,
    DrawAbandoned,
    EvaluationBudget,
    SampleRequest,
    SampleRequestError,
)
from ddpm.schedule import NoiseSchedule


def zero_noise(x_t, t):
    """A noise predictor that predicts no noise: enough to run the samplers without a network."""
    return np.zeros_like(x_t)


@pytest.fixture
def sampler(tiny_config):
    config = tiny_config(diffusion={"timesteps": 20}, sample={"steps": 5, "eta": 0.5, "batch_size": 3})
    return CheckpointSampler(config, NoiseSchedule.from_config(config.diffusion), zero_noise)


def test_omitted_values_come_from_the_checkpoint_config(sampler):
    assert sampler.request(4) == SampleRequest(num=4, seed=0, sampler="ddim", steps=5, eta=0.5)
    assert sampler.request(4, 7, "ddim", 20, 0.0) == SampleRequest(4, 7, "ddim", 20, 0.0)
    assert sampler.request(4, sampler="ddpm") == SampleRequest(4, 0, "ddpm", 20, 0.5)  # ddpm walks all T
    assert sampler.request(4, sampler="ddpm", steps=20) == sampler.request(4, sampler="ddpm")


def test_one_error_names_every_bad_value_with_its_range(sampler):
    with pytest.raises(SampleRequestError) as caught:
        sampler.request(0, -1, "ddim", 0, 2.0)
    message = str(caught.value)
    assert message.startswith("bad sampling request: ") and "\n" not in message
    for part in (
        "num must be an integer >= 1, got 0",
        "seed must be an integer in [0, 2**63 - 1], got -1",
        "steps must be an integer in [1, 20] (T, the model's timesteps), got 0",
        "eta must be a number in [0, 1], got 2.0",
    ):
        assert part in message


@pytest.mark.parametrize(
    "kwargs, named",
    [
        ({"steps": 21}, "steps must be an integer in [1, 20]"),
        ({"steps": 2.5}, "steps must be an integer"),
        ({"eta": float("nan")}, "eta must be a number in [0, 1], got nan"),
        ({"eta": -0.1}, "eta must be a number in [0, 1]"),
        ({"seed": 2**63}, "seed must be an integer in [0, 2**63 - 1]"),
        ({"sampler": "euler"}, "sampler must be one of ddpm, ddim, dpmpp_2m, got 'euler'"),
        (
            {"sampler": "ddpm", "steps": 5},
            "sampler ddpm walks all T = 20 steps and takes no eta; omit steps (or give 20)",
        ),
        ({"sampler": "ddpm", "eta": 0.0}, "sampler ddpm walks all T = 20 steps and takes no eta"),
        ({"num": True}, "num must be an integer"),
    ],
)
def test_each_bad_value_is_refused(sampler, kwargs, named):
    with pytest.raises(SampleRequestError, match=re.escape(named)):
        sampler.request(**{"num": 2, **kwargs})


def test_a_request_has_a_maximum_only_when_asked(sampler):
    assert sampler.request(10**6).num == 10**6  # ddpm sample writes arrays of any size, batch by batch
    with pytest.raises(
        SampleRequestError,
        match=f"num must be an integer in \\[1, {MAX_REQUEST_IMAGES:,}\\] per "
        "request, got 1000000000 \\(draw more with `ddpm sample",
    ):
        sampler.requests([{"num": 10**9}])


def test_rows_are_requests_checked_together_before_any_sampling(sampler):
    rows = [{"num": 2, "seed": 1}, {"num": 3, "sampler": "ddpm", "steps": None, "eta": None}]
    assert sampler.requests(rows) == [SampleRequest(2, 1, "ddim", 5, 0.5), SampleRequest(3, 0, "ddpm", 20, 0.5)]
    with pytest.raises(SampleRequestError) as caught:
        sampler.requests([{"num": 2}, {"num": 0}, {"num": 2, "eta": 3.0}])
    assert str(caught.value) == (
        "bad sampling request: row 1: num must be an integer in [1, 256] per request, got 0; "
        "row 2: eta must be a number in [0, 1], got 3.0"
    )
    with pytest.raises(SampleRequestError, match="the rows ask 300 images together, more than 256 per request"):
        sampler.requests([{"num": 200}, {"num": 100}])
    with pytest.raises(SampleRequestError, match="row 0: unknown setps; a row has num, sampler, steps, seed, eta"):
        sampler.requests([{"num": 2, "setps": 3}])
    with pytest.raises(SampleRequestError, match="the request has no rows"):
        sampler.requests([])


def test_same_request_same_images_in_range(sampler):
    request = sampler.request(7, 3, "ddim", 4, 1.0)
    images = sampler.sample(request)
    assert images.shape == (7, 1, 28, 28) and images.dtype == np.float32
    assert np.isfinite(images).all() and images.min() >= -1.0 and images.max() <= 1.0
    np.testing.assert_array_equal(images, np.concatenate(list(sampler.batches(request))))
    assert [len(b) for b in sampler.batches(request)] == [3, 3, 1]  # sample.batch_size
    np.testing.assert_array_equal(images, sampler.draw(7, 3, "ddim", 4, 1.0))


def test_dpm_solver_takes_steps_but_no_eta(sampler):
    request = sampler.request(2, 0, "dpmpp_2m", 4)
    assert (request.sampler, request.steps, request.eta) == ("dpmpp_2m", 4, 0.0)  # not the config's 0.5
    assert sampler.sample(request).shape == (2, 1, 28, 28)
    with pytest.raises(SampleRequestError, match="dpmpp_2m is deterministic and takes no eta"):
        sampler.request(2, 0, "dpmpp_2m", 4, eta=0.5)


def test_a_budget_counts_num_times_steps_over_all_rows_with_ddpm_at_t(sampler):
    budget = EvaluationBudget(100, "this test's limit")
    rows = [{"num": 2, "sampler": "ddpm"}, {"num": 6, "steps": 10}]  # 2 x 20 + 6 x 10 = 100: within
    assert [r.num for r in sampler.requests(rows, budget=budget)] == [2, 6]
    with pytest.raises(SampleRequestError) as caught:
        sampler.requests([*rows, {"num": 1, "steps": 1}], budget=budget)
    assert (
        "the rows ask 101 U-Net evaluations (num x steps; sampler ddpm walks all T = 20), more than the 100 "
        "this test's limit; ask fewer images or steps" in str(caught.value)
    )


def test_more_rows_than_images_are_refused_in_one_short_error(sampler):
    with pytest.raises(SampleRequestError, match=r"^bad sampling request: 5 rows, more than 4 per request$"):
        sampler.requests([{"num": 0}] * 5, max_num=4)


def test_a_draw_past_its_deadline_abandons_itself_between_steps(sampler):
    calls = []

    def counting(x_t, t):
        calls.append(t[0])
        return np.zeros_like(x_t)

    counted = dataclasses.replace(sampler, predict=counting)
    request = counted.request(1, sampler="ddpm")
    with pytest.raises(DrawAbandoned):
        counted.sample(request, deadline=time.monotonic() - 1)
    assert calls == []  # not one step past the deadline
    assert counted.sample(request, deadline=time.monotonic() + 3600).shape == (1, 1, 28, 28)
    assert len(calls) == 20
