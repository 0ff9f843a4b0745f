"""Fidelity of a distilled model to its teacher: sample sets drawn from the same noise and labels,
compared.

A student is judged against the guided teacher it was distilled from, not only against the real
data: the teacher's own reference sampler (CFG DDIM at many steps) draws one sample set per guidance
weight w; every other model draws its set from the same initial noise and labels. Scores of a set:
  * fidelity: the Frechet distance between its features and the reference set's features (0 = the
    teacher);
  * precision / recall against the real data's features (k-NN manifolds, Kynkaanniemi et al. 2019);
  * class accuracy (where the extractor's logits are the data set's own classes) and the FID to the
    real data.
A model's fidelity is read against a floor: the teacher's own fewer-step sampler, the same model at
a lower cost. A student more or less guided than its teacher moves away from the reference in every
feature space, as far as a change of w does, which no discretization floor excuses
(tests/test_fidelity.py).
"""

import dataclasses
from typing import Optional

import numpy as np

from eval import metrics

FAITHFUL, DRIFTED = 'faithful', 'drifted'


@dataclasses.dataclass(frozen=True)
class SampleFeatures:
  """One model's sample set as the extractor sees it."""
  pool: np.ndarray  # [N, D] features
  logits: Optional[np.ndarray]  # [N, K] class logits of the data's own classes, or None (Inception)
  labels: np.ndarray  # [N] the labels the samples were drawn for

  @property
  def mean(self) -> np.ndarray:
    return np.mean(np.asarray(self.pool, np.float64), axis=0)  # [D]

  @property
  def cov(self) -> np.ndarray:
    return np.cov(np.asarray(self.pool, np.float64), rowvar=False)  # [D, D]


def frechet_between(a: SampleFeatures, b: SampleFeatures) -> float:
  """Frechet distance between the feature distributions of two sample sets."""
  return metrics.frechet_distance(a.mean, a.cov, b.mean, b.cov)


def score(features: SampleFeatures, *, reference: Optional[SampleFeatures], real_pool: np.ndarray,
          real_stats, k: int = 3) -> dict:
  """Everything the tables show of one sample set.

  Args:
    features: the model's sample set.
    reference: the teacher's reference set drawn from the same noise and labels (None: the set is
      the reference itself, its fidelity is 0).
    real_pool: [M, D] features of real data for precision and recall.
    real_stats: (mu [D], sigma [D, D]) of the real data for the FID.
    k: the k-NN neighbourhood size of precision and recall.

  Returns:
    {'fidelity', 'precision', 'recall', 'accuracy' (None without class logits), 'fid'}.
  """
  precision, recall = metrics.precision_recall(real_pool, features.pool, k=k)
  accuracy = None
  if features.logits is not None:
    accuracy = metrics.classifier_accuracy(features.logits, features.labels)
  return dict(fidelity=0.0 if reference is None else frechet_between(features, reference),
              precision=precision, recall=recall, accuracy=accuracy,
              fid=metrics.frechet_distance(features.mean, features.cov, *real_stats))


def verdict(fidelity: Optional[float], floor: Optional[float]) -> Optional[str]:
  """'faithful' when a model is at least as close to the teacher's reference as the floor, else
  'drifted'.

  The floor is the fidelity of the teacher's own fewer-step sampler: a student that needs no more
  than that distance reproduces its teacher as well as the teacher reproduces itself at a lower
  cost.
  """
  if fidelity is None or floor is None:
    return None
  return FAITHFUL if fidelity <= floor else DRIFTED


def guidance_error(*, x_student, x_teacher, x_conditional) -> float:
  """A student's error as a fraction of the teacher's guidance term, from predictions on the same
  inputs [B, ...]: RMS(x_student - x_teacher) / RMS(x_teacher - x_conditional), where x_teacher -
  x_conditional is w (x_cond - x_uncond). 0: the teacher's guided prediction; 1: as far from it as
  the conditional model is."""
  error = np.asarray(x_student, np.float64) - np.asarray(x_teacher, np.float64)
  guidance = np.asarray(x_teacher, np.float64) - np.asarray(x_conditional, np.float64)
  return float(np.sqrt(np.sum(error * error) / max(np.sum(guidance * guidance), 1e-30)))


def guidance_response(*, x_student, x_teacher, x_conditional) -> float:
  """How much of the teacher's guidance a student reproduces, from predictions on the same inputs
  [B, ...]: the projection of the student's move away from the conditional prediction onto the
  teacher's, <x_student - x_cond, x_teacher - x_cond> / |x_teacher - x_cond|^2. 1: the teacher's
  guidance; 0: none (the conditional model); w' / w for a student guided at w' where the teacher is
  at w (its guided prediction is linear in w). Below 1 at large w and above at small w: a flattened
  response to w."""
  student = np.asarray(x_student, np.float64) - np.asarray(x_conditional, np.float64)
  teacher = np.asarray(x_teacher, np.float64) - np.asarray(x_conditional, np.float64)
  return float(np.sum(student * teacher) / max(np.sum(teacher * teacher), 1e-30))
