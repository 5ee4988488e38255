import mindspore as ms
import numpy as np
import pytest

from ddpm import reverse_process
from ddpm.checkpoint_sampler import make_noise_predictor
from ddpm.config import ConfigError, DiffusionConfig, config_from_dict
from ddpm.diffusion import GaussianDiffusion, min_snr_weights, sigmoid_weights
from ddpm.schedule import NoiseSchedule, make_betas
from ddpm.unet import Unet


@pytest.fixture(scope="module")
def diffusion():
    return GaussianDiffusion.from_config(DiffusionConfig(timesteps=200, schedule="scaled_linear"))


@pytest.fixture(scope="module")
def tiny_predictor():
    ms.set_seed(0)
    schedule = NoiseSchedule.from_config(DiffusionConfig(timesteps=200, schedule="scaled_linear"))
    return make_noise_predictor(Unet(8, 1, (1, 2)), schedule, "eps")


def test_q_sample_statistics(diffusion):
    """x_t | x0 ~ N(sqrt(abar_t) x0, (1 - abar_t) I): check mean and std per t."""
    n = 20000
    x0 = np.full((n, 1, 2, 2), 0.7, np.float32)
    rng = np.random.default_rng(0)
    for t in (0, 50, 199):
        noise = rng.standard_normal(x0.shape).astype(np.float32)
        x_t = diffusion.q_sample(ms.Tensor(x0), ms.Tensor(np.full((n,), t), ms.int32), ms.Tensor(noise)).asnumpy()
        abar = diffusion.schedule.alphas_cumprod[t]
        assert x_t.mean() == pytest.approx(np.sqrt(abar) * 0.7, abs=0.01)
        assert x_t.std() == pytest.approx(np.sqrt(1 - abar), rel=0.01)


def test_losses_on_known_errors():
    schedule = NoiseSchedule(make_betas("linear", 10, 1e-4, 0.02))
    eps = ms.Tensor(np.array([0.0, 0.5, 3.0], np.float32))
    noise = ms.Tensor(np.zeros(3, np.float32))
    expected = {"l1": 3.5 / 3, "l2": 9.25 / 3, "huber": (0.125 + 2.5) / 3}  # huber: 0.5e^2 below 1, |e|-0.5 above
    for name, value in expected.items():
        assert float(GaussianDiffusion(schedule, name).loss_fn(eps, noise).asnumpy()) == pytest.approx(value, rel=1e-6)


def test_ddpm_step_without_clipping_is_the_tutorials_formula(diffusion):
    s = diffusion.schedule
    rng = np.random.default_rng(1)
    x_t, eps, z = (rng.standard_normal((2, 1, 4, 4)) for _ in range(3))
    t = 120
    tutorial = (
        np.sqrt(1 / s.alphas[t]) * (x_t - s.betas[t] * eps / s.sqrt_one_minus_alphas_cumprod[t])
        + np.sqrt(s.posterior_variance[t]) * z
    )
    np.testing.assert_allclose(reverse_process.ddpm_step(s, x_t, t, eps, z, clip_x0=False), tutorial, rtol=1e-10)


def test_ddim_with_exact_noise_recovers_x0(diffusion):
    """With eta=0 and the true noise, one DDIM jump from any t lands on x0 (eq. 12 with t_prev = -1)."""
    rng = np.random.default_rng(2)
    x0 = rng.uniform(-1, 1, (2, 1, 4, 4))
    noise = rng.standard_normal(x0.shape)
    t = 150
    x_t = diffusion.schedule.sqrt_alphas_cumprod[t] * x0 + diffusion.schedule.sqrt_one_minus_alphas_cumprod[t] * noise
    np.testing.assert_allclose(
        reverse_process.ddim_step(diffusion.schedule, x_t, t, -1, noise, 0.0, 0.0, clip_x0=True), x0, atol=1e-10
    )


def test_ddim_timesteps():
    ts = reverse_process.ddim_timesteps(200, 50)
    assert len(ts) == 50 and ts[0] == 199 and ts[-1] == 0 and ts == sorted(ts, reverse=True)
    assert reverse_process.ddim_timesteps(200, 200) == reverse_process.ddpm_timesteps(200)
    with pytest.raises(ValueError):
        reverse_process.ddim_timesteps(200, 201)


@pytest.mark.parametrize(
    "sampler, steps, eta", [("ddpm", None, 0.0), ("ddim", 10, 0.0), ("ddim", 10, 1.0), ("dpmpp_2m", 10, 0.0)]
)
def test_sampling_shape_range_and_seed(tiny_predictor, sampler, steps, eta):
    schedule = NoiseSchedule.from_config(DiffusionConfig(timesteps=20))

    def draw(seed):
        return reverse_process.sample(tiny_predictor, schedule, (3, 1, 28, 28), seed, sampler, steps or 20, eta, True)

    a, b, c = draw(0), draw(0), draw(1)
    assert a.shape == (3, 1, 28, 28) and a.dtype == np.float32
    assert np.abs(a).max() <= 1.0 + 1e-6  # the last step returns the clipped x0 (DDIM) or its posterior mean
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 1e-3


def test_unknown_sampler(tiny_predictor):
    with pytest.raises(ValueError, match="unknown sampler"):
        reverse_process.sample(
            tiny_predictor, NoiseSchedule.from_config(DiffusionConfig(timesteps=5)), (1, 1, 28, 28), 0, "euler"
        )


def test_min_snr_weights_are_min_snr_gamma_over_snr(diffusion):
    s = diffusion.schedule
    snr = s.alphas_cumprod / (1 - s.alphas_cumprod)
    w = min_snr_weights(s, 5.0)
    noisy = snr <= 5.0
    np.testing.assert_array_equal(w[noisy], 1.0)  # SNR below gamma: the plain loss
    np.testing.assert_allclose(w[~noisy], 5.0 / snr[~noisy], rtol=1e-12)  # clean timesteps weigh less
    assert noisy.any() and (~noisy).any() and w[0] < 0.01


def test_min_snr_weighted_loss_is_the_weighted_mean_of_each_images_loss():
    config = DiffusionConfig(timesteps=50, loss="l2", loss_weighting="min_snr", min_snr_gamma=2.0)
    d = GaussianDiffusion.from_config(config)
    rng = np.random.default_rng(3)
    x0 = rng.uniform(-1, 1, (4, 1, 3, 3)).astype(np.float32)
    noise = rng.standard_normal(x0.shape).astype(np.float32)
    t = np.array([0, 10, 30, 49], np.int32)

    def predicts_no_noise(x_t, t):
        return x_t * 0.0

    loss = d.training_loss(predicts_no_noise, ms.Tensor(x0), ms.Tensor(t), ms.Tensor(noise))
    expected = np.mean(min_snr_weights(d.schedule, 2.0)[t] * (noise.astype(np.float64) ** 2).mean(axis=(1, 2, 3)))
    assert float(loss.asnumpy()) == pytest.approx(expected, rel=1e-5)
    plain = GaussianDiffusion.from_config(DiffusionConfig(timesteps=50, loss="l2"))
    unweighted = plain.training_loss(predicts_no_noise, ms.Tensor(x0), ms.Tensor(t), ms.Tensor(noise))
    assert float(unweighted.asnumpy()) == pytest.approx(float((noise.astype(np.float64) ** 2).mean()), rel=1e-5)


def gaussian_data_predictor(s: NoiseSchedule, std: float):
    """The exact noise prediction when x0 ~ N(0, std^2 I): E[noise | x_t] = sigma_t x_t / Var(x_t)."""

    def predict(x_t, t):
        abar = s.alphas_cumprod[t[0]]
        return (np.sqrt(1 - abar) * x_t / (abar * std**2 + 1 - abar)).astype(np.float32)

    return predict


def test_dpm_solver_pp_2m_converges_at_second_order_to_the_exact_ode_solution(diffusion):
    """For Gaussian data the probability-flow ODE is linear: x_0 = x_T * std_0 / std_T, then the last
    step lands on E[x0 | x_0]. DPM-Solver++(2M) closes in on it at second order, DDIM at first."""
    s, std, shape = diffusion.schedule, 0.5, (8, 1, 2, 2)
    x_T = np.random.default_rng(0).standard_normal(shape)  # what `sample` draws first for seed 0

    def marginal_std(t):
        return np.sqrt(s.alphas_cumprod[t] * std**2 + 1 - s.alphas_cumprod[t])

    a0 = s.alphas_cumprod[0]
    exact = np.sqrt(a0) * std**2 / (a0 * std**2 + 1 - a0) * x_T * marginal_std(0) / marginal_std(s.timesteps - 1)
    predict = gaussian_data_predictor(s, std)

    def error(sampler, steps):
        x = reverse_process.sample(predict, s, shape, 0, sampler, steps, 0.0, clip_x0=False)
        return float(np.abs(x - exact).max() / np.abs(exact).max())

    dpm = {steps: error("dpmpp_2m", steps) for steps in (50, 100, 200)}
    ddim = {steps: error("ddim", steps) for steps in (50, 100, 200)}
    assert dpm[50] / dpm[100] > 3.5 and dpm[100] / dpm[200] > 3.5  # halving the step: about 4x less error
    assert 1.5 < ddim[50] / ddim[100] < 2.5  # DDIM: about 2x
    assert all(dpm[n] < ddim[n] for n in dpm) and dpm[200] < ddim[200] / 5  # measured: 0.0019 against 0.0135


def test_dpm_solver_pp_2m_lands_exactly_on_a_point_mass():
    """Data at one point c: every data prediction is c, so any number of steps returns c."""
    s = NoiseSchedule.from_config(DiffusionConfig(timesteps=50))
    c = 0.3

    def predict(x_t, t):
        abar = s.alphas_cumprod[t[0]]
        return ((x_t - np.sqrt(abar) * c) / np.sqrt(1 - abar)).astype(np.float32)

    for steps in (1, 2, 7, 50):
        x = reverse_process.sample(predict, s, (2, 1, 3, 3), 1, "dpmpp_2m", steps, clip_x0=False)
        np.testing.assert_allclose(x, c, atol=1e-5)


def v_of(s: NoiseSchedule, x0, t, noise):
    """Salimans & Ho (2022), eq. 13 (section 4): v = alpha_t noise - sigma_t x0, float64."""
    a, sigma = s.sqrt_alphas_cumprod[t].reshape(-1, 1, 1, 1), s.sqrt_one_minus_alphas_cumprod[t].reshape(-1, 1, 1, 1)
    return a * noise.astype(np.float64) - sigma * x0.astype(np.float64)


def test_a_v_model_is_trained_on_v_and_scores_zero_when_it_outputs_it():
    d = GaussianDiffusion.from_config(DiffusionConfig(timesteps=50, loss="l2", prediction="v"))
    rng = np.random.default_rng(4)
    x0 = rng.uniform(-1, 1, (4, 1, 3, 3)).astype(np.float32)
    noise = rng.standard_normal(x0.shape).astype(np.float32)
    t = np.array([0, 10, 30, 49], np.int32)
    v = v_of(d.schedule, x0, t, noise)

    def outputs_zero(x_t, t):
        return x_t * 0.0

    def outputs_v(x_t, t):
        return ms.Tensor(v.astype(np.float32))

    args = (ms.Tensor(x0), ms.Tensor(t), ms.Tensor(noise))
    assert float(d.training_loss(outputs_zero, *args).asnumpy()) == pytest.approx(float(np.mean(v**2)), rel=1e-5)
    assert float(d.training_loss(outputs_v, *args).asnumpy()) == pytest.approx(0.0, abs=1e-10)


def test_the_noise_a_v_prediction_implies_is_the_noise_that_made_x_t(diffusion):
    s, rng = diffusion.schedule, np.random.default_rng(5)
    x0 = rng.uniform(-1, 1, (5, 1, 4, 4))
    noise = rng.standard_normal(x0.shape)
    t = np.array([0, 1, 100, 198, 199])
    a, sigma = s.sqrt_alphas_cumprod[t].reshape(-1, 1, 1, 1), s.sqrt_one_minus_alphas_cumprod[t].reshape(-1, 1, 1, 1)
    x_t = a * x0 + sigma * noise
    np.testing.assert_allclose(
        reverse_process.eps_from_v(s, x_t, t, v_of(s, x0, t, noise)), noise, rtol=1e-12, atol=1e-12
    )


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpmpp_2m"])
def test_every_sampler_draws_the_same_images_from_the_v_of_a_noise_predictor(diffusion, sampler):
    """The exact predictor for Gaussian data, told as v (through its data prediction), samples as told as eps."""
    s = diffusion.schedule
    predict_eps = gaussian_data_predictor(s, 0.5)

    def predict_v(x_t, t):
        eps = predict_eps(x_t, t).astype(np.float64)
        a, sigma = s.sqrt_alphas_cumprod[t[0]], s.sqrt_one_minus_alphas_cumprod[t[0]]
        x0 = (x_t - sigma * eps) / a
        return (a * eps - sigma * x0).astype(np.float32)

    told_as_v = reverse_process.as_noise_predictor(predict_v, s, "v")
    a = reverse_process.sample(predict_eps, s, (4, 1, 3, 3), 7, sampler, 20, 1.0)
    b = reverse_process.sample(told_as_v, s, (4, 1, 3, 3), 7, sampler, 20, 1.0)
    np.testing.assert_allclose(a, b, atol=1e-5)
    assert reverse_process.as_noise_predictor(predict_eps, s, "eps") is predict_eps


def test_min_snr_weights_for_v_are_min_snr_gamma_over_snr_plus_one(diffusion):
    """v's loss is (SNR + 1) times the x0 loss: min(SNR, gamma) / (SNR + 1) weighs x0 by min(SNR, gamma)."""
    s = diffusion.schedule
    snr = s.alphas_cumprod / (1 - s.alphas_cumprod)
    w = min_snr_weights(s, 5.0, "v")
    np.testing.assert_allclose(w, np.minimum(snr, 5.0) / (snr + 1), rtol=1e-12)
    assert np.all(w <= 1.0) and w[0] < 0.01


def test_sigmoid_weights_turn_the_cosine_schedules_plain_loss_into_the_sigmoid_weighting():
    """Kingma & Gao (2023): the plain epsilon loss at uniform t under the cosine schedule weighs log SNR by
    sech(lambda / 2); times these weights it weighs it by sigmoid(bias - lambda), up to a constant."""
    s = NoiseSchedule.from_config(DiffusionConfig(timesteps=1000, schedule="cosine"))
    log_snr = np.log(s.alphas_cumprod / (1 - s.alphas_cumprod))
    w = sigmoid_weights(s, 2.0)
    implied = w / np.cosh(log_snr / 2) / (1 / (1 + np.exp(log_snr - 2.0)))  # w * sech / sigmoid: constant
    inner = slice(50, 950)  # away from the schedule's clipped ends
    np.testing.assert_allclose(implied[inner], implied[inner].mean(), rtol=0.02)
    assert w.mean() == pytest.approx(1.0) and (w > 0).all()


def test_sigmoid_weights_for_v_are_epsilons_times_alpha_bar(diffusion):
    """v's loss is (SNR + 1) / SNR = 1 / alpha_bar times epsilon's: the same weighting weighs it alpha_bar as much."""
    s = diffusion.schedule
    eps, v = sigmoid_weights(s, 1.0), sigmoid_weights(s, 1.0, "v")
    ratio = v / (eps * s.alphas_cumprod)
    np.testing.assert_allclose(ratio, ratio[0], rtol=1e-9)
    assert v.mean() == pytest.approx(1.0)
    config = DiffusionConfig(
        timesteps=200, schedule="scaled_linear", loss_weighting="sigmoid", sigmoid_bias=1.0, prediction="v"
    )
    weights = GaussianDiffusion.from_config(config).weights
    assert weights is not None
    np.testing.assert_allclose(weights.asnumpy(), v.astype(np.float32))


def test_a_v_network_is_sampled_through_the_noise_its_output_implies(diffusion):
    ms.set_seed(0)
    net = Unet(8, 1, (1, 2))
    raw = make_noise_predictor(net, diffusion.schedule, "eps")
    as_v = make_noise_predictor(net, diffusion.schedule, "v")
    x_t = np.random.default_rng(6).standard_normal((2, 1, 28, 28)).astype(np.float32)
    t = np.array([150, 150], np.int32)
    expected = reverse_process.eps_from_v(diffusion.schedule, x_t.astype(np.float64), t, raw(x_t, t).astype(np.float64))
    np.testing.assert_allclose(as_v(x_t, t), expected, rtol=1e-5, atol=1e-5)


def test_an_unknown_prediction_is_a_config_error():
    with pytest.raises(ConfigError, match=r"diffusion\.prediction"):
        config_from_dict({"diffusion": {"prediction": "x0"}})
