"""FID and class coverage from classifier outputs, in float64 numpy; no MindSpore.

FID (Heusel et al., 2017) is the Frechet distance between Gaussians fitted to two sets of features:
    d^2 = |mu1 - mu2|^2 + tr(sigma1) + tr(sigma2) - 2 tr((sigma1 sigma2)^(1/2)).
Class coverage is KL(p || uniform) of the histogram p of the classes a classifier predicts.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class GaussianStats:
    mu: np.ndarray  # (F,)
    sigma: np.ndarray  # (F, F)


def gaussian_stats(features: np.ndarray) -> GaussianStats:
    """Mean and unbiased covariance of (N, F) features, N >= 2."""
    features = np.asarray(features, np.float64)
    if features.ndim != 2 or len(features) < 2:
        raise ValueError(f"need (N, F) features with N >= 2, got shape {features.shape}")
    return GaussianStats(features.mean(axis=0), np.cov(features, rowvar=False))


def sqrtm_psd(a: np.ndarray) -> np.ndarray:
    """The symmetric square root of a symmetric PSD matrix; eigenvalues below 0 (rounding) count as 0."""
    eigenvalues, vectors = np.linalg.eigh((a + a.T) / 2)
    return (vectors * np.sqrt(np.clip(eigenvalues, 0.0, None))) @ vectors.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Squared Frechet (2-Wasserstein) distance between N(mu1, sigma1) and N(mu2, sigma2).

    tr((sigma1 sigma2)^(1/2)) is computed as tr((s1 sigma2 s1)^(1/2)) with s1 = sigma1^(1/2): the
    same eigenvalues, but of a symmetric PSD matrix, so every root is real (no complex sqrtm).
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(f"mismatched statistics: mu {mu1.shape}, {mu2.shape}; sigma {sigma1.shape}, {sigma2.shape}")
    root1 = sqrtm_psd(sigma1)
    inner = root1 @ sigma2 @ root1  # (F, F), symmetric PSD
    trace_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((inner + inner.T) / 2), 0.0, None)).sum()
    diff = mu1 - mu2
    distance = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_covmean
    return float(max(distance, 0.0))  # d^2 >= 0; identical statistics can round to -1e-13


def fid_of(stats1: GaussianStats, stats2: GaussianStats) -> float:
    return frechet_distance(stats1.mu, stats1.sigma, stats2.mu, stats2.sigma)


def class_histogram(probs: np.ndarray) -> np.ndarray:
    """(N, K) class probabilities -> (K,) share of the N predicted (argmax) classes."""
    return np.bincount(probs.argmax(axis=1), minlength=probs.shape[1]) / len(probs)


def class_kl(probs: np.ndarray) -> float:
    """KL(p || uniform) of the predicted-class histogram p: 0 when every class is equally frequent,
    log K when all samples are predicted as one class."""
    p = class_histogram(probs)
    seen = p > 0  # 0 log 0 = 0
    return float(np.sum(p[seen] * np.log(p[seen] * len(p))))
