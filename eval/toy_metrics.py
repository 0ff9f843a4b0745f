"""Distances between sample sets for low-dimensional data: sliced Wasserstein and per-class
moments."""

import numpy as np


def sliced_wasserstein(a, b, *, num_projections: int = 256, seed: int = 0) -> float:
  """Mean over random unit directions of the 1-D Wasserstein-1 distance between projections of a and
  b.

  a [N, D], b [M, D]; quantiles are compared on a common grid so N and M may differ.
  """
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  directions = np.random.default_rng(seed).standard_normal((a.shape[1], num_projections))
  directions /= np.linalg.norm(directions, axis=0, keepdims=True)
  quantiles = np.linspace(0.0, 1.0, min(len(a), len(b)))
  proj_a = np.quantile(a @ directions, quantiles, axis=0)  # [Q, P]
  proj_b = np.quantile(b @ directions, quantiles, axis=0)
  return float(np.mean(np.abs(proj_a - proj_b)))


def per_class_moment_errors(samples, labels, means, covs):
  """Max over classes of |sample mean - mean| and of the max-abs covariance entry error."""
  mean_err, cov_err = 0.0, 0.0
  for c in range(len(means)):
    x = np.asarray(samples)[np.asarray(labels) == c]
    mean_err = max(mean_err, float(np.max(np.abs(x.mean(axis=0) - means[c]))))
    cov_err = max(cov_err, float(np.max(np.abs(np.cov(x.T) - covs[c]))))
  return mean_err, cov_err


def gaussian_mixture_log_posterior(x, means, covs):
  """log p(c | x) [N, C] under a Gaussian mixture with equal class priors."""
  x = np.asarray(x, np.float64)
  log_densities = []
  for mean, cov in zip(means, covs):
    diff = x - mean
    maha = np.einsum('ni,ij,nj->n', diff, np.linalg.inv(cov), diff)
    log_densities.append(-0.5 * maha - 0.5 * np.log(np.linalg.det(cov)))
  log_densities = np.stack(log_densities, axis=1)  # [N, C]
  log_norm = np.log(np.sum(
      np.exp(log_densities - log_densities.max(axis=1, keepdims=True)), axis=1, keepdims=True))
  return log_densities - log_densities.max(axis=1, keepdims=True) - log_norm


def toy2d_features(x):
  """The toy set's stand-in for Inception: the point itself and its true class log-posterior."""
  from data.toy2d import TOY2D_COVS, TOY2D_MEANS  # pylint: disable=g-import-not-at-top
  return {'pool': np.asarray(x, np.float64),
          'logits': gaussian_mixture_log_posterior(x, TOY2D_MEANS, TOY2D_COVS)}
