"""tf.data input pipelines: CIFAR-10, ImageNet 64x64, any tfds data set with image and label
('tfds:NAME'), and a folder of class sub-folders ('folder'); all batched, flipped and scaled by the
same code."""

import functools
from typing import Iterator

import jax
import ml_collections
import numpy as np

from data import folder
from data.errors import DataError

TFDS_NAMES = {'cifar10': 'cifar10', 'imagenet64': 'imagenet_resized/64x64'}
# data.name 'tfds:oxford_flowers102': any tfds data set with 'image' and 'label' features
TFDS_PREFIX = 'tfds:'
# Held-out split names: imagenet_resized has no 'test' split; its 'validation' split plays that
# part.
SPLIT_ALIASES = {'imagenet64': {'test': 'validation'}}


def _hide_gpus_from_tf(tf) -> None:
  """Keeps TensorFlow off the accelerators so JAX owns all their memory."""
  try:
    tf.config.set_visible_devices([], 'GPU')
  except RuntimeError:  # TF runtime already initialized; devices are fixed.
    pass


def _not_prepared_message(name: str, tfds_name: str, data_dir: str) -> str:
  return (
      f"dataset '{name}' is not prepared in {data_dir}: on a machine with"
      f' internet run `tfds build {tfds_name} --data_dir=DIR` (or `python -c'
      " 'import tensorflow_datasets as tfds;"
      f' tfds.load("{tfds_name}", data_dir="DIR")\'`), copy DIR here and set'
      ' --config.data.tfds_data_dir=DIR')


def as_data_config(name_or_config, data_dir: str | None = None) -> ml_collections.ConfigDict:
  """A data config from a config (returned as is) or a bare data set name (older callers, tests)."""
  if isinstance(name_or_config, str):
    return ml_collections.ConfigDict(
        dict(name=name_or_config, tfds_data_dir=data_dir or '', path='', resolution=0))
  return name_or_config


def tfds_name(name: str) -> str:
  """The tfds builder name of data.name 'cifar10', 'imagenet64' or 'tfds:NAME'."""
  return name[len(TFDS_PREFIX):] if name.startswith(TFDS_PREFIX) else TFDS_NAMES[name]


def _builder(name: str, data_dir: str | None):
  """The tfds builder of data.name (its metadata only); DataError (one line) for a name tfds does
  not know."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  (imports TensorFlow)
  builder_name = tfds_name(name)
  try:
    return tfds.builder(builder_name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError as err:
    raise DataError(f"unknown tfds data set '{builder_name}' (data.name '{name}'): see "
                    'https://www.tensorflow.org/datasets/catalog') from err


def check_prepared(name: str, data_dir: str | None = None) -> None:
  """Raises DataError, saying how to prepare it, when tfds data set `name` ('cifar10', 'imagenet64'
  or 'tfds:NAME') is not prepared in data_dir. Nothing is downloaded: a run checks this before it
  writes anything."""
  builder = _builder(name, data_dir)
  if not builder.is_prepared():
    raise DataError(_not_prepared_message(name, tfds_name(name), builder.data_dir_root))


@functools.lru_cache(maxsize=16)
def tfds_features(name: str, resolution: int, data_dir: str | None):
  """(image shape [R, R, 3], class names) of data.name 'tfds:NAME'; DataError (one line) when it
  cannot be used.

  Reads the builder's metadata only (no data). The images are made RGB and, unless they are already
  resolution x resolution (resolution 0: their own fixed square size), resized and centre-cropped to
  it.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  (imports TensorFlow)
  builder_name, builder = tfds_name(name), _builder(name, data_dir)
  features = builder.info.features
  image = features['image'] if 'image' in features else None
  label = features['label'] if 'label' in features else None
  if not isinstance(image, tfds.features.Image) or not isinstance(label, tfds.features.ClassLabel):
    raise DataError(
        f"tfds data set '{builder_name}' has features {sorted(features)}: data.name "
        f"'{name}' needs an 'image' (Image) and a 'label' (ClassLabel) feature")
  height, width, channels = image.shape
  if channels not in (1, 3, 4):
    raise DataError(
        f"tfds data set '{builder_name}' has {channels}-channel images: 1, 3 or 4 "
        "are read (as RGB)")
  if resolution <= 0:
    if height is None or height != width:
      raise DataError(f"tfds data set '{builder_name}' has images of {height}x{width}: set "
                      '--config.data.resolution=R to resize and centre-crop them to RxR')
    resolution = height
  if height is not None and width is not None and min(height, width) < resolution:
    raise DataError(
        f"tfds data set '{builder_name}' has {height}x{width} images, smaller than "
        f'data.resolution={resolution}: upscaling is refused; lower --config.data.resolution')
  return (resolution, resolution, 3), tuple(label.names)


def _tfds_split(data_config, *, split: str, seed: int, shuffle: bool):
  """This host's shard of a prepared tfds split {'image', 'label'}; files shuffled with seed when
  shuffle."""
  import tensorflow_datasets as tfds  # Lazy: pulls in TF.
  name, data_dir = data_config.name, data_config.tfds_data_dir or None
  if name not in TFDS_NAMES and not name.startswith(TFDS_PREFIX):
    raise DataError(
        f"'{name}' is not a tfds dataset; use one of: {', '.join(sorted(TFDS_NAMES))} or "
        f'{TFDS_PREFIX}NAME')
  builder_name = tfds_name(name)
  split = SPLIT_ALIASES.get(name, {}).get(split, split)
  builder = tfds.builder(builder_name, data_dir=data_dir)
  try:
    ds = builder.as_dataset(split=tfds.split_for_jax_process(split), shuffle_files=shuffle,
                            read_config=tfds.ReadConfig(shuffle_seed=seed))
  except (AssertionError, FileNotFoundError, tfds.core.registered.DatasetNotFoundError) as e:
    raise DataError(_not_prepared_message(name, tfds_name(name), builder.data_dir_root)) from e
  except ValueError as e:  # an unknown split name
    raise DataError(f"split '{split}' of {builder_name}: {str(e).splitlines()[0]}") from e
  if name.startswith(TFDS_PREFIX):
    ds = _made_square(ds, data_config)
  return ds


def _made_square(ds, data_config):
  """{'image', 'label'} of a 'tfds:NAME' data set as RGB squares of its resolution (others
  dropped)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from data.transforms import to_rgb, to_square  # pylint: disable=g-import-not-at-top
  shape, _ = tfds_features(data_config.name, data_config.get('resolution', 0),
                           data_config.tfds_data_dir or None)
  return ds.map(lambda example: {'image': to_square(to_rgb(example['image']), shape[0]),
                                 'label': example['label']}, num_parallel_calls=tf.data.AUTOTUNE)


def open_split(data_config, *, split: str, seed: int, shuffle: bool = True):
  """tf.data.Dataset of this host's examples {'image': uint8 [H, W, C], 'label'} of a tfds or folder
  data set."""
  if data_config.name == folder.FOLDER:
    index = folder.scan_folder(data_config.get('path', ''), data_config.get('resolution', 0))
    return folder.folder_split(index, split=split, seed=seed, shuffle=shuffle)
  return _tfds_split(data_config, split=split, seed=seed, shuffle=shuffle)


def _one_line_errors(iterator, data_config):
  """Re-raises a failure inside the pipeline (an image that does not decode, or is too small) as one
  DataError line."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from data.transforms import TOO_SMALL  # pylint: disable=g-import-not-at-top
  source = data_config.get('path', '') if data_config.name == folder.FOLDER else data_config.name
  # looked up now: at interpreter exit `tf.errors` may be gone
  failed = tf.errors.InvalidArgumentError
  try:
    yield from iterator
  except failed as err:
    if TOO_SMALL in str(err):
      raise DataError(f'an {TOO_SMALL} in {source}: lower --config.data.resolution') from err
    message = ' '.join(str(err.message).split())[:200]
    raise DataError(
        f'an image of {source} does not decode ({message}): replace or remove it') from err


def make_tfds_iterator(
    data_config,
    *,
    split: str,
    per_host_batch_size: int,
    seed: int,
    random_flip: bool,
    data_dir: str | None = None,
    shuffle_buffer: int = 10_000,
) -> Iterator[dict[str, np.ndarray]]:
  """Yields endless shuffled batches {'x': [B, H, W, C], 'label': [B]} of a tfds or folder data set.

  Each host reads its own part of `split` (`tfds.split_for_jax_process`; a folder: every
  process_count-th file). Images are scaled from uint8 to float32 in [-1, 1]; with `random_flip`,
  each image is mirrored horizontally with probability 1/2, keyed statelessly on (seed, host,
  element index) so a run is reproducible. Nothing is ever downloaded.

  Args:
    data_config: a data config (or, as older callers pass it, a tfds data set name with data_dir).
    split: the split to read, e.g. 'train'.
    per_host_batch_size: B, the rows of each batch on this host.
    seed: the seed of the shuffles and flips (combined with the host's index).
    random_flip: whether to mirror images horizontally at random.
    data_dir: the tfds data directory, when data_config is a bare name.
    shuffle_buffer: the size of the shuffle buffer, in examples.

  Returns:
    An endless iterator of {'x': [B, H, W, C] float32 in [-1, 1], 'label': [B] int32}.

  Raises:
    DataError: the data set is not prepared (on the call), or an image fails to decode or is
      smaller than data.resolution (while iterating); one line each.
  """
  import tensorflow as tf  # Lazy: TF imports slowly.
  import tensorflow_datasets as tfds
  _hide_gpus_from_tf(tf)
  data_config = as_data_config(data_config, data_dir)
  host_seed = int(
      np.random.SeedSequence([seed, jax.process_index()]).generate_state(1)[0])
  ds = open_split(data_config, split=split, seed=host_seed)
  ds = ds.shuffle(shuffle_buffer, seed=host_seed).repeat().enumerate()

  def preprocess(index, example):
    image = example['image']  # [H, W, C] uint8
    if random_flip:
      image = tf.image.stateless_random_flip_left_right(
          image, seed=tf.stack([tf.constant(host_seed, tf.int64), index]))
    return {
        'x': tf.cast(image, tf.float32) / 127.5 - 1.0,  # [H, W, C] in [-1, 1]
        'label': tf.cast(example['label'], tf.int32),  # []
    }

  ds = ds.map(preprocess, num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.batch(per_host_batch_size, drop_remainder=True)
  ds = ds.prefetch(tf.data.AUTOTUNE)
  return _one_line_errors(iter(tfds.as_numpy(ds)), data_config)


def iterate_examples(data_config, *, split: str, batch_size: int, limit: int,
                     label: int | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """Yields batches of the first `limit` examples of a split, the same ones on every call.

  The split (of one class if `label` is given) is read once in a fixed order (files in seed-0 order,
  no shuffle buffer, no repeat): every call gives the same examples, fewer than `limit` when the
  split holds fewer. Each host reads its own part.

  Args:
    data_config: a data config (or a tfds data set name).
    split: the split to read, e.g. 'train' or 'test'.
    batch_size: b, the rows of each batch (the last batch may hold fewer).
    limit: the most examples to read.
    label: if given, only the examples of this class.

  Yields:
    (x [b, H, W, C] float32 in [-1, 1], label [b] int32).

  Raises:
    DataError: the data set is not prepared, or an image fails to decode or is too small (raised
      while iterating; one line each).
  """
  import tensorflow as tf  # Lazy: TF imports slowly.
  import tensorflow_datasets as tfds
  _hide_gpus_from_tf(tf)
  data_config = as_data_config(data_config)
  ds = open_split(data_config, split=split, seed=0)
  if label is not None:
    ds = ds.filter(lambda example: tf.equal(tf.cast(example['label'], tf.int32), label))
  ds = ds.take(limit).map(lambda example: (tf.cast(example['image'], tf.float32) / 127.5 - 1.0,
                                           tf.cast(example['label'], tf.int32)))
  yield from _one_line_errors(iter(tfds.as_numpy(ds.batch(batch_size))), data_config)


def read_examples(data_config, *, split: str, limit: int, label: int | None = None,
                  data_dir: str | None = None) -> tuple[np.ndarray, np.ndarray]:
  """(x [N, H, W, C] float32 in [-1, 1], label [N] int32): iterate_examples gathered in memory.

  data_config: a data config, or a tfds data set name with data_dir. DataError when there is no
  example.
  """
  data_config = as_data_config(data_config, data_dir)
  batches = list(
      iterate_examples(data_config, split=split, batch_size=256, limit=limit, label=label))
  if not batches:
    raise DataError(
        f"no examples{'' if label is None else f' of class {label}'} in split '{split}' of "
        f'{data_config.name}')
  return np.concatenate([x for x, _ in batches]), np.concatenate([y for _, y in batches])
