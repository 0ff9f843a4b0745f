"""Sample-quality metrics: Frechet distance, streaming feature statistics, Inception Score,
accuracy."""

import numpy as np
from scipy import special

from train import files

def _trace_sqrt_product(sigma1, sigma2) -> float:
  """Tr sqrt(S1 S2) of two covariances, as Tr sqrt(S1^1/2 S2 S1^1/2).

  S1 S2 is similar to the symmetric positive semi-definite S1^1/2 S2 S1^1/2, so its eigenvalues
  are real and >= 0 and two symmetric eigendecompositions give the trace: no general matrix square
  root (scipy's sqrtm), no imaginary parts to discard, and singular covariances (fewer samples than
  dimensions) need no offset.
  Eigenvalues below 0 are round-off and count as 0.
  """
  values, vectors = np.linalg.eigh(sigma1)  # [D], [D, D]
  root1 = (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T  # S1^1/2 [D, D]
  inner = root1 @ sigma2 @ root1
  return float(np.sum(np.sqrt(np.clip(np.linalg.eigvalsh(0.5 * (inner + inner.T)), 0.0, None))))


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
  """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 sqrt(S1 S2)) in float64: FID on Inception (or other) features.

  mu [D], sigma [D, D]; 1-D means with scalar or [1, 1] variances are accepted as well. Statistics
  that are not finite are refused (ValueError).
  """
  mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
  sigma1, sigma2 = (np.atleast_2d(np.asarray(sigma1, np.float64)),
                    np.atleast_2d(np.asarray(sigma2, np.float64)))
  if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
    raise ValueError(f'mismatched statistics: mu {mu1.shape} vs {mu2.shape}, '
                     f'sigma {sigma1.shape} vs {sigma2.shape}')
  if not all(np.all(np.isfinite(a)) for a in (mu1, mu2, sigma1, sigma2)):
    raise ValueError('Frechet distance of statistics that are not finite')
  diff = mu1 - mu2  # [D]
  traces = np.trace(sigma1) + np.trace(sigma2) - 2.0 * _trace_sqrt_product(sigma1, sigma2)
  return float(diff @ diff + traces)


class FeatureStats:
  """Streaming mean and covariance of features in float64 (sum, sum of outer products, count)."""

  def __init__(self, dim: int):
    self.dim = dim
    self.count = 0
    self._sum = np.zeros(dim, np.float64)  # [D]
    self._outer = np.zeros((dim, dim), np.float64)  # [D, D]

  def update(self, features) -> None:
    """Adds a batch of features [B, D]."""
    features = np.asarray(features, np.float64).reshape(-1, self.dim)  # [B, D]
    self.count += features.shape[0]
    self._sum += features.sum(axis=0)
    self._outer += features.T @ features

  def mean(self):
    """[D] mean of all features seen."""
    if self.count < 1:
      raise ValueError('FeatureStats.mean needs at least one feature vector')
    return self._sum / self.count

  def cov(self):
    """[D, D] unbiased covariance (like np.cov(features, rowvar=False))."""
    if self.count < 2:
      raise ValueError('FeatureStats.cov needs at least two feature vectors')
    mean = self.mean()
    return (self._outer - self.count * np.outer(mean, mean)) / (self.count - 1)

  def save_npz(self, path: str) -> None:
    """Writes {mu, sigma, count} (e.g. cached reference statistics of a data set)."""
    files.write_npz(path, mu=self.mean(), sigma=self.cov(), count=np.int64(self.count))

  @staticmethod
  def load_npz(path: str) -> tuple[np.ndarray, np.ndarray, int]:
    """Reads (mu [D], sigma [D, D], count) written by save_npz."""
    stats = files.read_npz(path)
    return stats['mu'], stats['sigma'], int(stats['count'])


def inception_score(logits_or_probs, *, num_splits: int = 10,
                    from_probs: bool = False) -> tuple[float, float]:
  """(mean, std) over splits of exp(E_x KL(p(y|x) || p(y))); logits [N, K] (probabilities if
  from_probs)."""
  if from_probs:
    log_p = np.log(np.clip(np.asarray(logits_or_probs, np.float64), 1e-30, None))  # [N, K]
  else:
    log_p = special.log_softmax(np.asarray(logits_or_probs, np.float64), axis=1)  # [N, K]
  if len(log_p) < num_splits:
    raise ValueError(
        f'inception_score needs at least num_splits={num_splits} samples, got {len(log_p)}')
  scores = []
  for part in np.array_split(log_p, num_splits):
    log_marginal = special.logsumexp(part, axis=0, keepdims=True) - np.log(len(part))  # [1, K]
    kl = np.sum(np.exp(part) * (part - log_marginal), axis=1)  # [n]
    scores.append(np.exp(kl.mean()))
  return float(np.mean(scores)), float(np.std(scores))


def classifier_accuracy(logits, labels) -> float:
  """Fraction of rows whose argmax logit equals the label; logits [N, K], labels [N]."""
  predictions = np.argmax(np.asarray(logits), axis=-1)  # [N]
  return float(np.mean(predictions == np.asarray(labels)))


def _pairwise_sq_dist(a, b):
  """Squared Euclidean distances [N, M] between rows of a [N, D] and b [M, D], in float64."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  sq = np.sum(a * a, axis=1)[:, None] + np.sum(b * b, axis=1)[None, :] - 2.0 * a @ b.T
  return np.maximum(sq, 0.0)


def knn_radii(features, *, k: int = 3, chunk: int = 1024):
  """Distance of each row of features [N, D] to its k-th nearest other row: the k-NN ball radii [N].

  The manifold estimate of Kynkaanniemi et al. (2019), "Improved Precision and Recall Metric for
  Assessing Generative Models", Sec. 2: the union of these balls approximates the support of the
  distribution.
  """
  features = np.asarray(features, np.float64)
  if len(features) <= k:
    raise ValueError(f'knn_radii needs more than k={k} feature vectors, got {len(features)}')
  radii = np.empty(len(features))
  for start in range(0, len(features), chunk):
    sq = _pairwise_sq_dist(features[start:start + chunk], features)  # [n, N]
    # index 0 is the row itself
    radii[start:start + chunk] = np.sqrt(np.partition(sq, k, axis=1)[:, k])
  return radii


def _fraction_inside(queries, centres, radii, *, chunk: int = 1024) -> float:
  """Fraction of queries [Q, D] that fall inside at least one ball (centres [M, D], radii [M])."""
  inside = 0
  for start in range(0, len(queries), chunk):
    sq = _pairwise_sq_dist(queries[start:start + chunk], centres)  # [q, M]
    inside += int(np.sum(np.any(sq <= np.square(radii)[None, :], axis=1)))
  return inside / len(queries)


def precision_recall(real_features, fake_features, *, k: int = 3) -> tuple[float, float]:
  """Improved precision and recall (Kynkaanniemi et al. 2019) of fake against real features.

  Args:
    real_features: [N, D] features of real data.
    fake_features: [M, D] features of generated samples.
    k: neighbourhood size of the k-NN manifold estimate (the paper's default is 3).

  Returns:
    (precision, recall): precision is the fraction of fake samples inside the real manifold
    (quality), recall the fraction of real samples inside the fake manifold (coverage, diversity).
  """
  real, fake = np.asarray(real_features, np.float64), np.asarray(fake_features, np.float64)
  precision = _fraction_inside(fake, real, knn_radii(real, k=k))
  recall = _fraction_inside(real, fake, knn_radii(fake, k=k))
  return precision, recall
