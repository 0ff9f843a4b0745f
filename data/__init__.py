"""Public data API: dataset metadata, in-memory arrays and train iterators."""

import dataclasses
from typing import Iterator

import jax
import ml_collections
import numpy as np

from data.digits import load_digits_arrays
from data.errors import DataError
from data.folder import FOLDER, scan_folder
from data.tfds_data import (TFDS_PREFIX, check_prepared, iterate_examples, make_tfds_iterator,
                            read_examples, tfds_features)
from data.toy2d import load_toy2d_arrays

__all__ = [
    'FOLDER',
    'TFDS_PREFIX',
    'DataError',
    'DatasetInfo',
    'check_available',
    'dataset_info',
    'iterate_examples',
    'load_arrays',
    'load_examples',
    'make_tfds_iterator',
    'make_train_iterator',
]


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """Static description of a dataset; `shape` is per example; class_names (label k is
  class_names[k]) where the data set names its classes (a folder, a 'tfds:NAME' data set), else
  empty."""

  name: str
  shape: tuple[int, ...]
  num_classes: int
  is_image: bool
  class_names: tuple[str, ...] = ()


_INFOS = {
    'cifar10': DatasetInfo('cifar10', (32, 32, 3), 10, is_image=True),
    'digits': DatasetInfo('digits', (8, 8, 1), 10, is_image=True),
    'imagenet64': DatasetInfo('imagenet64', (64, 64, 3), 1000, is_image=True),
    'toy2d': DatasetInfo('toy2d', (2,), 4, is_image=False),
}
_IN_MEMORY_LOADERS = {'digits': load_digits_arrays, 'toy2d': load_toy2d_arrays}


def dataset_info(data_config) -> DatasetInfo:
  """The DatasetInfo of a data config (its name, and for a folder or 'tfds:NAME' data set its path,
  resolution and tfds_data_dir), or of a bare name of a built-in data set; raises DataError (one
  line) if unusable.

  A folder is scanned and checked (data.folder.scan_folder), a 'tfds:NAME' data set's metadata read
  (data.tfds_data.tfds_features); both are cached per process.
  """
  name = data_config if isinstance(data_config, str) else data_config.name
  if name == FOLDER or name.startswith(TFDS_PREFIX):
    if isinstance(data_config, str):
      raise DataError(
          f"data.name '{name}' is described by the whole data config (path, "
          "resolution), not its name")
    if name == FOLDER:
      index = scan_folder(data_config.get('path', ''), data_config.get('resolution', 0))
      shape, class_names = (index.resolution, index.resolution, 3), index.class_names
    else:
      shape, class_names = tfds_features(
          name, data_config.get('resolution', 0), data_config.tfds_data_dir or None)
    return DatasetInfo(name, shape, len(class_names), is_image=True, class_names=class_names)
  if name not in _INFOS:
    choices = ', '.join(sorted([*_INFOS, FOLDER]))
    raise DataError(
        f"unknown data.name '{name}'; choose one of: {choices}, or {TFDS_PREFIX}NAME "
        '(a tfds data set with image and label features)')
  return _INFOS[name]


def check_available(data_config: ml_collections.ConfigDict) -> None:
  """Raises DataError when data_config's data set cannot be read here (a folder that fails its
  checks, a tfds set not prepared in data.tfds_data_dir); the in-memory sets always can."""
  dataset_info(data_config)
  if data_config.name not in _IN_MEMORY_LOADERS and data_config.name != FOLDER:
    check_prepared(data_config.name, data_config.tfds_data_dir or None)


def load_arrays(name: str, split: str) -> tuple[np.ndarray, np.ndarray]:
  """Returns (x [N, ...] float32, label [N] int32) of an in-memory dataset."""
  dataset_info(name)
  if name not in _IN_MEMORY_LOADERS:
    raise DataError(
        f"dataset '{name}' is streamed from tfds, not held in memory; in-memory"
        f" datasets are: {', '.join(sorted(_IN_MEMORY_LOADERS))}")
  return _IN_MEMORY_LOADERS[name](split)


def load_examples(data_config: ml_collections.ConfigDict, split: str, *, limit: int,
                  label: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """(x [N, ...], label [N]): the first `limit` examples of a split (of one class if `label` is
  given), the same ones on every call, for any data set: in-memory ones sliced, tfds ones read once
  in a fixed order."""
  name = data_config.name
  if name in _IN_MEMORY_LOADERS:
    x, labels = load_arrays(name, split)
    keep = np.ones(len(labels), bool) if label is None else labels == label
    return x[keep][:limit], labels[keep][:limit]
  dataset_info(data_config)
  return read_examples(data_config, split=split, limit=limit, label=label)


def _in_memory_batches(
    name: str, *, batch_size: int, seed: int, random_flip: bool, start_step: int
) -> Iterator[dict[str, np.ndarray]]:
  """Yields this host's rows of global batches sampled with replacement; global batch k is f(seed,
  k), so any number of hosts trains on the batches of one."""
  x, label = load_arrays(name, 'train')  # [N, ...], [N]
  flip = random_flip and dataset_info(name).is_image
  global_size = batch_size * jax.process_count()
  rows = slice(jax.process_index() * batch_size, (jax.process_index() + 1) * batch_size)
  step = start_step
  while True:
    # 0: as host 0 drew before, so 1-host runs keep their batches
    rng = np.random.default_rng([seed, 0, step])
    indices = rng.integers(0, len(label), size=global_size)[rows]  # [B]
    batch_x = x[indices]  # [B, ...]
    if flip:
      mirrored = rng.random(global_size)[rows] < 0.5  # [B]
      batch_x[mirrored] = batch_x[mirrored, :, ::-1, :]  # flip along W
    yield {'x': batch_x, 'label': label[indices]}
    step += 1


def make_train_iterator(
    data_config: ml_collections.ConfigDict,
    *,
    per_host_batch_size: int,
    seed: int,
    start_step: int = 0,
) -> Iterator[dict[str, np.ndarray]]:
  """Yields endless training batches {'x': [B, ...], 'label': [B]} for a host.

  For the in-memory datasets (digits, toy2d) this host's batch at step k is its rows of a global
  batch that is a pure function of (seed, k): resuming with `start_step=k` replays exactly the
  batches of an uninterrupted run, on any number of hosts. tfds datasets (and folders) are not
  bit-exact on resume: the pipeline is reseeded from (seed, start_step).

  Args:
    data_config: the data section; needs `name`, `random_flip` and `tfds_data_dir` (a folder:
      `path`, `resolution`).
    per_host_batch_size: B, the rows of each batch on this host.
    seed: the seed of the batches (and of the flips).
    start_step: the step of the first batch (a resumed run's step).

  Returns:
    An endless iterator of {'x': [B, ...] float32, 'label': [B] int32}: x [B, H, W, C] in [-1, 1]
    for images, [B, 2] for toy2d.

  Raises:
    DataError: the data set is unknown or unusable (dataset_info), or a tfds one is not prepared.
  """
  name = data_config.name
  dataset_info(data_config)
  if name in _IN_MEMORY_LOADERS:
    return _in_memory_batches(
        name,
        batch_size=per_host_batch_size,
        seed=seed,
        random_flip=data_config.random_flip,
        start_step=start_step,
    )
  resume_seed = np.random.SeedSequence([seed, start_step]).generate_state(1)
  return make_tfds_iterator(
      data_config,
      split='train',
      per_host_batch_size=per_host_batch_size,
      seed=int(resume_seed[0]),
      random_flip=data_config.random_flip,
  )
