"""scikit-learn's embedded 8x8 handwritten digits as a small image dataset."""

import functools

import numpy as np

from data.errors import DataError

NUM_TEST = 297
_SPLIT_SEED = 0
_MAX_PIXEL = 16.0


@functools.lru_cache(maxsize=None)
def _all_digits() -> tuple[np.ndarray, np.ndarray]:
  """Returns all 1797 digits (read-only), shuffled by a fixed permutation."""
  from sklearn.datasets import load_digits  # Lazy: sklearn imports slowly.
  digits = load_digits()
  images = digits.images.astype(np.float32)  # [N, 8, 8], values 0..16
  x = images[..., None] / (_MAX_PIXEL / 2) - 1.0  # [N, 8, 8, 1] in [-1, 1]
  label = digits.target.astype(np.int32)  # [N]
  order = np.random.default_rng(_SPLIT_SEED).permutation(len(label))
  x, label = x[order], label[order]
  x.setflags(write=False)
  label.setflags(write=False)
  return x, label


def load_digits_arrays(split: str) -> tuple[np.ndarray, np.ndarray]:
  """Returns (x [N, 8, 8, 1] float32 in [-1, 1], label [N] int32) for a split.

  The split is deterministic: after a fixed-seed permutation the last
  `NUM_TEST` examples are 'test' and the rest (1500) are 'train'.
  """
  x, label = _all_digits()
  if split == 'train':
    x, label = x[:-NUM_TEST], label[:-NUM_TEST]
  elif split == 'test':
    x, label = x[-NUM_TEST:], label[-NUM_TEST:]
  else:
    raise DataError(f"unknown digits split {split!r}; use 'train' or 'test'")
  return x, label
