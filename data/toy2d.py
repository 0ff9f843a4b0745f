"""Class-conditional 2-D Gaussian blobs with analytically known statistics."""

import functools

import numpy as np

from data.errors import DataError

NUM_CLASSES = 4
TOY2D_MEANS = np.array(
    [[1.0, 1.0], [-1.0, 1.0], [-1.0, -1.0], [1.0, -1.0]], dtype=np.float32
)  # [4, 2]
TOY2D_COVS = np.array(
    [
        [[0.04, 0.0], [0.0, 0.04]],  # isotropic, std 0.2
        [[0.0625, 0.0], [0.0, 0.0225]],  # axis-aligned, std (0.25, 0.15)
        [[0.04, 0.02], [0.02, 0.04]],  # correlated, rho = 0.5
        [[0.0225, -0.01], [-0.01, 0.0484]],  # correlated, rho ~ -0.30
    ],
    dtype=np.float32,
)  # [4, 2, 2]
_SPLIT_SIZES = {'train': 8192, 'test': 2048}
_SPLIT_SEEDS = {'train': 0, 'test': 1}


def make_toy2d(
    num_examples: int, *, seed: int
) -> tuple[np.ndarray, np.ndarray]:
  """Samples (x [N, 2] float32, label [N] int32) with balanced classes."""
  rng = np.random.default_rng(seed)
  label = rng.permutation(np.arange(num_examples) % NUM_CLASSES)  # [N]
  chol = np.linalg.cholesky(TOY2D_COVS.astype(np.float64))  # [4, 2, 2]
  noise = rng.standard_normal((num_examples, 2))  # [N, 2]
  x = TOY2D_MEANS[label] + np.einsum('nij,nj->ni', chol[label], noise)
  return x.astype(np.float32), label.astype(np.int32)


@functools.lru_cache(maxsize=None)
def _cached_split(split: str) -> tuple[np.ndarray, np.ndarray]:
  x, label = make_toy2d(_SPLIT_SIZES[split], seed=_SPLIT_SEEDS[split])
  x.setflags(write=False)
  label.setflags(write=False)
  return x, label


def load_toy2d_arrays(split: str) -> tuple[np.ndarray, np.ndarray]:
  """Returns the fixed 'train' (8192) or 'test' (2048) toy2d split."""
  if split not in _SPLIT_SIZES:
    raise DataError(f"unknown toy2d split {split!r}; use 'train' or 'test'")
  return _cached_split(split)
