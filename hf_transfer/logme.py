"""LogME: how well a backbone's features suit a labelled task, without training (You et al., "LogME: Practical Assessment
of Pre-trained Models for Transfer Learning", ICML 2021).

For each class, a Bayesian linear model y = F w + noise (prior w ~ N(0, 1/alpha), noise ~ N(0, 1/beta)) is fitted to the
class's one-hot column y of the labels: alpha and beta maximise the model's evidence p(y | F, alpha, beta) by the paper's
fixed-point iteration (its Algorithm 1, on one SVD of F). The score is the log evidence per image, averaged over classes:
higher means the labels are more linearly predictable from the features at a lower model complexity.

Written here rather than installed: the authors' `LogME` code is not on PyPI as a maintained package; this is the same
algorithm (a test checks its fixed point against a grid search of the same evidence).
"""

from __future__ import annotations

import numpy as np

MAX_ITERATIONS = 11  # the paper's implementation: the fixed point converges in a few steps
TOLERANCE = 1e-3  # relative change of alpha / beta at which it stops (the paper's 1e-2 on the ratio would stop earlier)


def log_evidence(features: np.ndarray, target: np.ndarray, alpha: float, beta: float) -> float:
    """The log evidence per image of `target` (N,) under the Bayesian linear model on `features` (N, D) with prior precision
    `alpha` and noise precision `beta` (the paper's equation 2, the posterior mean m at these alpha and beta)."""
    features, target = np.asarray(features, np.float64), np.asarray(target, np.float64)
    count, dim = features.shape
    _, singular, right = thin_svd(features)
    sigma = singular**2
    projected = right @ (features.T @ target)  # V^T F^T y, in the eigenbasis of F^T F
    mean = right.T @ (beta * projected / (alpha + beta * sigma))
    return _evidence(features, target, mean, sigma, dim, count, alpha, beta)


def _evidence(features, target, mean, sigma, dim, count, alpha, beta) -> float:
    residual = float(np.sum((features @ mean - target) ** 2))
    # log |alpha I + beta F^T F| over all D eigenvalues: those of F^T F beyond rank(F) are 0
    log_det = float(np.sum(np.log(alpha + beta * sigma))) + (dim - len(sigma)) * np.log(alpha)
    evidence = (dim / 2 * np.log(alpha) + count / 2 * np.log(beta) - count / 2 * np.log(2 * np.pi)
                - beta / 2 * residual - alpha / 2 * float(mean @ mean) - log_det / 2)
    return float(evidence / count)


def fit_class(features: np.ndarray, target: np.ndarray, left: np.ndarray, singular: np.ndarray,
              right: np.ndarray) -> tuple[float, float, float]:
    """`(log evidence per image, alpha, beta)` at the fixed point for one target column; `left, singular, right` the thin
    SVD of `features`."""
    count, dim = features.shape
    sigma = singular**2
    projected = singular * (left.T @ target)  # V^T F^T y = S U^T y
    alpha, beta = 1.0, 1.0
    for _ in range(MAX_ITERATIONS):
        gamma = float(np.sum(beta * sigma / (alpha + beta * sigma)))  # the effective number of parameters
        weights = beta * projected / (alpha + beta * sigma)  # the posterior mean in the eigenbasis
        mean_norm = float(weights @ weights)
        residual = float(np.sum((left @ (singular * weights) - target) ** 2))
        new_alpha = gamma / max(mean_norm, 1e-30)
        new_beta = (count - gamma) / max(residual, 1e-30)
        converged = abs(new_alpha - alpha) / alpha < TOLERANCE and abs(new_beta - beta) / beta < TOLERANCE
        alpha, beta = new_alpha, new_beta
        if converged:
            break
    weights = beta * projected / (alpha + beta * sigma)
    mean = right.T @ weights
    return _evidence(features, target, mean, sigma, dim, count, alpha, beta), alpha, beta


def thin_svd(features: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`(U, S, V^T)` of `features` over its non-zero singular values, from the eigenvectors of the smaller Gram matrix: 4x
    faster than `np.linalg.svd` on 2,000 x 1,280 features (1.5 s against 6.6 s on 2 busy cores), as the paper's code does."""
    count, dim = features.shape
    if count >= dim:
        sigma, right = np.linalg.eigh(features.T @ features)
        keep = sigma > max(sigma.max(), 0) * 1e-10
        singular, right = np.sqrt(sigma[keep]), right[:, keep].T
        left = features @ right.T / singular
    else:
        sigma, left = np.linalg.eigh(features @ features.T)
        keep = sigma > max(sigma.max(), 0) * 1e-10
        singular, left = np.sqrt(sigma[keep]), left[:, keep]
        right = (features.T @ left / singular).T
    return left, singular, right


def logme(features: np.ndarray, labels: np.ndarray) -> float:
    """The LogME score of `features` (N, D) for class ids `labels` (N,): the mean over classes of the maximised log
    evidence per image of that class's one-hot column."""
    features = np.asarray(features, np.float64)
    labels = np.asarray(labels)
    if features.ndim != 2 or len(features) != len(labels) or len(features) < 2:
        raise ValueError(f"LogME needs (images, dim) features and one label per image, not {features.shape} and {labels.shape}.")
    left, singular, right = thin_svd(features)
    scores = [fit_class(features, (labels == label).astype(np.float64), left, singular, right)[0] for label in np.unique(labels)]
    return float(np.mean(scores))
