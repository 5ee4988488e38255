"""FID against closed forms, and class coverage."""

import math

import numpy as np
import pytest

from ddpm.fid import class_histogram, class_kl, frechet_distance, gaussian_stats, sqrtm_psd

NUM_CLASSES = 10


def rotation(angle: float) -> np.ndarray:
    return np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])


def random_spd(rng, dim: int) -> np.ndarray:
    a = rng.standard_normal((dim, dim))
    return a @ a.T + 0.1 * np.eye(dim)


def test_diagonal_covariances_by_hand():
    """Commuting covariances: d^2 = |mu1 - mu2|^2 + sum (sqrt(a_i) - sqrt(b_i))^2."""
    mu1, mu2 = np.zeros(3), np.array([1.0, 2.0, 2.0])  # |mu1 - mu2|^2 = 9
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 4.0, 1.0])  # (1-2)^2 + (2-2)^2 + (3-1)^2 = 5
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(14.0, abs=1e-12)


def test_commuting_rotated_covariances_by_hand():
    """Same eigenbasis, rotated: the trace term is still sum (sqrt(a_i) - sqrt(b_i))^2 = (1-3)^2 + (2-1)^2."""
    r = rotation(0.7)
    sigma1, sigma2 = r @ np.diag([1.0, 4.0]) @ r.T, r @ np.diag([9.0, 1.0]) @ r.T
    assert frechet_distance(np.zeros(2), sigma1, np.zeros(2), sigma2) == pytest.approx(5.0, abs=1e-12)


def test_non_commuting_2d_closed_form():
    """For 2x2, tr((S1 S2)^(1/2)) = sqrt(tr(S1 S2) + 2 sqrt(det S1 det S2)) (the two eigenvalues' roots)."""
    sigma1 = np.array([[2.0, 1.0], [1.0, 2.0]])
    sigma2 = np.array([[1.0, 0.0], [0.0, 4.0]])
    assert not np.allclose(sigma1 @ sigma2, sigma2 @ sigma1)
    # tr(S1 S2) = 2 + 8 = 10, det S1 = 3, det S2 = 4: d^2 = 4 + 5 - 2 sqrt(10 + 4 sqrt(3)) + |(1, -1)|^2
    expected = 9.0 - 2.0 * math.sqrt(10.0 + 4.0 * math.sqrt(3.0)) + 2.0
    assert expected == pytest.approx(2.771220, abs=1e-6)
    distance = frechet_distance(np.array([1.0, 0.0]), sigma1, np.array([0.0, 1.0]), sigma2)
    assert distance == pytest.approx(expected, abs=1e-12)


def test_non_commuting_high_dim_against_eigenvalues_of_the_product():
    """Independently: tr((S1 S2)^(1/2)) is the sum of the roots of the eigenvalues of the
    non-symmetric product S1 S2 (real and positive, as S1 S2 is similar to an SPD matrix)."""
    rng = np.random.default_rng(0)
    dim = 12
    mu1, mu2 = rng.standard_normal(dim), rng.standard_normal(dim)
    sigma1, sigma2 = random_spd(rng, dim), random_spd(rng, dim)
    eigenvalues = np.linalg.eigvals(sigma1 @ sigma2)
    assert np.abs(eigenvalues.imag).max() < 1e-8 and eigenvalues.real.min() > 0
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(sigma1 + sigma2) - 2 * np.sqrt(eigenvalues.real).sum()
    assert frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(expected, rel=1e-9)


def test_one_dimension_is_squared_difference_of_means_and_deviations():
    distance = frechet_distance(np.array([1.0]), np.array([[4.0]]), np.array([-2.0]), np.array([[0.25]]))
    assert distance == pytest.approx(3.0**2 + (2.0 - 0.5) ** 2)


def test_symmetric_and_zero_for_identical_statistics():
    rng = np.random.default_rng(1)
    mu1, mu2 = rng.standard_normal(8), rng.standard_normal(8)
    sigma1, sigma2 = random_spd(rng, 8), random_spd(rng, 8)
    forth, back = frechet_distance(mu1, sigma1, mu2, sigma2), frechet_distance(mu2, sigma2, mu1, sigma1)
    assert forth > 0 and forth == pytest.approx(back, rel=1e-10)
    assert frechet_distance(mu1, sigma1, mu1, sigma1) == pytest.approx(0.0, abs=1e-9)


def test_singular_covariance_from_fewer_samples_than_features():
    rng = np.random.default_rng(2)
    a, b = gaussian_stats(rng.standard_normal((10, 32))), gaussian_stats(rng.standard_normal((10, 32)) + 1.0)
    assert np.linalg.matrix_rank(a.sigma) < 32
    distance = frechet_distance(a.mu, a.sigma, b.mu, b.sigma)
    assert math.isfinite(distance) and distance > 0


def test_sample_statistics_recover_a_known_gaussian_shift():
    """Two large samples of N(0, C) and N(delta, C): FID -> |delta|^2, as the covariance term vanishes."""
    rng = np.random.default_rng(3)
    dim, n = 4, 200_000
    chol = np.linalg.cholesky(random_spd(rng, dim))
    delta = np.array([1.0, -1.0, 0.5, 0.0])  # |delta|^2 = 2.25
    a = gaussian_stats(rng.standard_normal((n, dim)) @ chol.T)
    b = gaussian_stats(rng.standard_normal((n, dim)) @ chol.T + delta)
    assert frechet_distance(a.mu, a.sigma, b.mu, b.sigma) == pytest.approx(2.25, abs=0.05)
    np.testing.assert_allclose(sqrtm_psd(a.sigma) @ sqrtm_psd(a.sigma), a.sigma, atol=1e-10)


def test_bad_inputs_are_errors():
    with pytest.raises(ValueError, match="N >= 2"):
        gaussian_stats(np.zeros((1, 4)))
    with pytest.raises(ValueError, match="mismatched"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))


def one_hot(classes) -> np.ndarray:
    return np.eye(NUM_CLASSES)[np.asarray(classes)]


def test_class_kl_uniform_is_zero_and_one_class_is_log_k():
    assert class_kl(one_hot(np.arange(200) % NUM_CLASSES)) == pytest.approx(0.0, abs=1e-12)
    assert class_kl(one_hot(np.full(50, 3))) == pytest.approx(math.log(NUM_CLASSES))
    assert class_kl(one_hot([0, 1] * 20)) == pytest.approx(math.log(NUM_CLASSES / 2))  # half and half


def test_class_kl_counts_the_predicted_class_not_the_probability_mass():
    probs = np.full((4, NUM_CLASSES), 0.05)
    probs[:, 7] = 0.55  # every row predicts class 7, however soft
    assert class_histogram(probs)[7] == 1.0
    assert class_kl(probs) == pytest.approx(math.log(NUM_CLASSES))
