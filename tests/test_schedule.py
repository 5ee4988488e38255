import numpy as np
import pytest

from ddpm.schedule import NoiseSchedule, make_betas


def test_tutorial_linear_schedule_keeps_signal_at_T():
    s = NoiseSchedule(make_betas("linear", 200, 1e-4, 0.02))
    assert s.betas[0] == pytest.approx(1e-4) and s.betas[-1] == pytest.approx(0.02)
    assert s.betas[100] == pytest.approx(1e-4 + 100 * (0.02 - 1e-4) / 199)
    # the tutorial's flaw: x_T keeps sqrt(0.132) = 36% of the signal
    assert s.alphas_cumprod[-1] == pytest.approx(0.1322, abs=1e-4)
    assert s.sqrt_alphas_cumprod[-1] == pytest.approx(0.3636, abs=1e-3)


def test_scaled_linear_reaches_pure_noise():
    s = NoiseSchedule(make_betas("scaled_linear", 200, 1e-4, 0.02))
    np.testing.assert_allclose(s.betas[[0, -1]], [5e-4, 0.1])
    assert s.alphas_cumprod[-1] < 1e-4


def test_cosine_matches_closed_form():
    T, offset = 100, 0.008
    s = NoiseSchedule(make_betas("cosine", T, 1e-4, 0.02))
    f = lambda t: np.cos((t / T + offset) / (1 + offset) * np.pi / 2) ** 2  # noqa: E731
    for t in (0, 10, 50, 90):
        assert s.alphas_cumprod[t] == pytest.approx(f(t + 1) / f(0), rel=1e-9)


def test_quadratic_and_sigmoid_endpoints():
    q = make_betas("quadratic", 50, 1e-4, 0.02)
    np.testing.assert_allclose(q[[0, -1]], [1e-4, 0.02])
    np.testing.assert_allclose(np.sqrt(q), np.linspace(0.01, np.sqrt(0.02), 50))
    s = make_betas("sigmoid", 50, 1e-4, 0.02)
    assert 1e-4 < s[0] < s[-1] < 0.02 and np.all(np.diff(s) > 0)


@pytest.mark.parametrize("name", ["linear", "scaled_linear", "cosine", "quadratic", "sigmoid"])
def test_derived_arrays(name):
    s = NoiseSchedule(make_betas(name, 200, 1e-4, 0.02))
    assert np.all(np.diff(s.alphas_cumprod) < 0) and 0 < s.alphas_cumprod[-1] < s.alphas_cumprod[0] < 1
    np.testing.assert_allclose(s.alphas_cumprod, np.cumprod(1 - s.betas))
    np.testing.assert_allclose(s.alphas_cumprod_prev[1:], s.alphas_cumprod[:-1])
    assert s.alphas_cumprod_prev[0] == 1.0 and s.posterior_variance[0] == 0.0
    t = 57
    expected = s.betas[t] * (1 - s.alphas_cumprod[t - 1]) / (1 - s.alphas_cumprod[t])
    assert s.posterior_variance[t] == pytest.approx(expected)


def test_unknown_schedule_is_an_error():
    with pytest.raises(ValueError, match="unknown beta schedule"):
        make_betas("zigzag", 10, 1e-4, 0.02)
