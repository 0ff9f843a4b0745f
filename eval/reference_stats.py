"""FID reference statistics from the standard files (eval.reference_stats=PATH), named by their
provenance.

Formats, told apart by their keys (each file is an .npz):
  * pytorch-fid (`fid_score.py --save-stats`: np.savez_compressed(path, mu=..., sigma=...)) and EDM
    (`fid.py ref`: np.savez(path, mu=..., sigma=...)): mu [D], sigma [D, D].
  * guided-diffusion's evaluator reference batches (e.g. VIRTUAL_imagenet64_labeled.npz): arr_0 [N,
    H, W, 3] uint8 images (10,000 of them, for precision and recall), arr_1 labels, and stored
    statistics of the whole data set, mu / sigma (Inception pool_3) and mu_s / sigma_s (spatial, for
    sFID). Its evaluator takes the stored mu / sigma for FID, so they are used here too; the images
    are not read.
A file's provenance, 'NAME@sha256:<16 hex digits>', goes into the key of every FID cell scored
against it.
"""

import dataclasses
import hashlib
import os
import zipfile

import numpy as np
from etils import epath

from data.errors import DataError

MU_SIGMA = 'mu/sigma npz (pytorch-fid, EDM)'
GUIDED_DIFFUSION = 'guided-diffusion reference batch (its stored mu/sigma)'


class ReferenceStatsError(DataError):
  """A reference statistics file that cannot be used; the message names the file and the fix."""


@dataclasses.dataclass(frozen=True)
class ReferenceFile:
  """What a reference statistics file holds, read from its array headers only."""

  path: str
  format: str  # MU_SIGMA or GUIDED_DIFFUSION
  dim: int  # feature dimension D of mu [D] and sigma [D, D]


def _array_shapes(path: str) -> dict[str, tuple[int, ...]]:
  """{array name: shape} of an .npz, from each .npy header (no array data is read)."""
  shapes = {}
  with epath.Path(path).open('rb') as f, zipfile.ZipFile(f) as archive:
    for name in archive.namelist():
      if not name.endswith('.npy'):
        continue
      with archive.open(name) as npy:
        version = np.lib.format.read_magic(npy)
        read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                       else np.lib.format.read_array_header_2_0)
        shapes[name[:-len('.npy')]] = tuple(read_header(npy)[0])
  return shapes


def inspect(path: str) -> ReferenceFile:
  """The format and feature dimension of a reference statistics file; ReferenceStatsError (one line)
  if unusable.

  Args:
    path: an .npz in one of the module's formats.

  Returns:
    Its ReferenceFile.
  """
  if not epath.Path(path).exists():
    raise ReferenceStatsError(
        f'eval.reference_stats {path} does not exist: give a pytorch-fid, EDM or '
        'guided-diffusion .npz file')
  try:
    shapes = _array_shapes(path)
  except (OSError, ValueError, zipfile.BadZipFile) as err:
    raise ReferenceStatsError(
        f'eval.reference_stats {path} is not a readable .npz ({err}): give a pytorch-fid, '
        'EDM or guided-diffusion .npz file') from err
  if 'mu' not in shapes or 'sigma' not in shapes:
    found = ', '.join(sorted(shapes)) or 'no arrays'
    raise ReferenceStatsError(
        f'eval.reference_stats {path} holds {found}, no mu and sigma: a pytorch-fid or EDM '
        'file has mu and sigma, a guided-diffusion reference batch has them beside arr_0')
  mu, sigma = shapes['mu'], shapes['sigma']
  if len(mu) != 1 or sigma != (mu[0], mu[0]):
    raise ReferenceStatsError(
        f'eval.reference_stats {path} has mu {mu} and sigma {sigma}: expected mu [D] and '
        'sigma [D, D]')
  return ReferenceFile(path, GUIDED_DIFFUSION if 'arr_0' in shapes else MU_SIGMA, mu[0])


def check_dim(reference: ReferenceFile, *, extractor: str, feature_dim: int) -> None:
  """ReferenceStatsError unless the file's statistics are of the extractor's features (same
  dimension)."""
  if reference.dim == feature_dim:
    return
  fix = ('set --config.eval.extractor=inception (2048-d Inception pool features)' if reference.dim
         == 2048 else f'give a file of {feature_dim}-d statistics (pytorch-fid: --dims 2048)')
  raise ReferenceStatsError(
      f'eval.reference_stats {reference.path} holds {reference.dim}-d statistics but '
      f"eval.extractor '{extractor}' gives {feature_dim}-d features: {fix}")


def provenance(path: str) -> str:
  """'NAME@sha256:<first 16 hex digits>' of a file: what its statistics are, wherever the file
  lies."""
  digest = hashlib.sha256()
  with epath.Path(path).open('rb') as f:
    for block in iter(lambda: f.read(1 << 20), b''):
      digest.update(block)
  return f'{os.path.basename(path)}@sha256:{digest.hexdigest()[:16]}'


def load(path: str) -> tuple[np.ndarray, np.ndarray, ReferenceFile]:
  """(mu [D] float64, sigma [D, D] float64, its ReferenceFile) of a reference statistics file."""
  reference = inspect(path)
  with epath.Path(path).open('rb') as f, np.load(f) as arrays:
    mu, sigma = np.asarray(arrays['mu'], np.float64), np.asarray(arrays['sigma'], np.float64)
  if not (np.all(np.isfinite(mu)) and np.all(np.isfinite(sigma))):
    raise ReferenceStatsError(
        f'eval.reference_stats {path} holds non-finite statistics: the file is damaged')
  return mu, sigma, reference


def extractor_feature_dim(extractor: str) -> int:
  """The feature dimension of an eval.extractor: 2048 (Inception pool), the digits classifier's, 2
  (toy2d)."""
  if extractor == 'inception':
    from eval.inception import POOL_DIM  # pylint: disable=g-import-not-at-top
    return POOL_DIM
  if extractor == 'classifier':
    from eval.classifier import DigitsClassifier  # pylint: disable=g-import-not-at-top
    return DigitsClassifier.pool_dim
  if extractor == 'toy2d':
    return 2  # the point itself (eval.toy_metrics.toy2d_features)
  raise ValueError(f'unknown extractor {extractor!r}')
