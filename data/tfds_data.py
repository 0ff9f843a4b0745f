"""tensorflow-datasets input pipelines for CIFAR-10 and ImageNet 64x64."""

from typing import Iterator

import jax
import numpy as np

from data.errors import DataError

TFDS_NAMES = {'cifar10': 'cifar10', 'imagenet64': 'imagenet_resized/64x64'}
# Held-out split names: imagenet_resized has no 'test' split; its 'validation' split plays that part.
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
      ' --config.data.tfds_data_dir=DIR'
  )


def check_prepared(name: str, data_dir: str | None = None) -> None:
  """Raises DataError, saying how to prepare it, when tfds data set `name` is not prepared in data_dir.

  Nothing is downloaded: a run checks this before it writes anything.
  """
  import tensorflow_datasets as tfds  # Lazy: pulls in TF.
  builder = tfds.builder(TFDS_NAMES[name], data_dir=data_dir)
  if not builder.is_prepared():
    raise DataError(_not_prepared_message(name, TFDS_NAMES[name], builder.data_dir_root))


def _load_split(name, *, split, seed, data_dir):
  """Returns this host's shard of a prepared split, with files shuffled."""
  import tensorflow_datasets as tfds  # Lazy: pulls in TF.
  if name not in TFDS_NAMES:
    raise DataError(f"'{name}' is not a tfds dataset; use one of: "
                    + ', '.join(sorted(TFDS_NAMES)))
  tfds_name = TFDS_NAMES[name]
  split = SPLIT_ALIASES.get(name, {}).get(split, split)
  builder = tfds.builder(tfds_name, data_dir=data_dir)
  try:
    return builder.as_dataset(
        split=tfds.split_for_jax_process(split),
        shuffle_files=True,
        read_config=tfds.ReadConfig(shuffle_seed=seed),
    )
  except (AssertionError, FileNotFoundError,
          tfds.core.registered.DatasetNotFoundError) as e:
    message = _not_prepared_message(name, tfds_name, builder.data_dir_root)
    raise DataError(message) from e


def make_tfds_iterator(
    name: str,
    *,
    split: str,
    per_host_batch_size: int,
    seed: int,
    random_flip: bool,
    data_dir: str | None = None,
    shuffle_buffer: int = 10_000,
) -> Iterator[dict[str, np.ndarray]]:
  """Yields endless shuffled batches {'x': [B, H, W, C], 'label': [B]}.

  Each host reads its own part of `split` (`tfds.split_for_jax_process`).
  Images are scaled from uint8 to float32 in [-1, 1]; with `random_flip`,
  each image is mirrored horizontally with probability 1/2, keyed
  statelessly on (seed, host, element index) so a run is reproducible.
  Raises DataError when the dataset is not prepared in `data_dir`; nothing
  is ever downloaded.
  """
  import tensorflow as tf  # Lazy: TF imports slowly.
  import tensorflow_datasets as tfds
  _hide_gpus_from_tf(tf)
  host_seed = int(
      np.random.SeedSequence([seed, jax.process_index()]).generate_state(1)[0])
  ds = _load_split(name, split=split, seed=host_seed, data_dir=data_dir)
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
  return iter(tfds.as_numpy(ds))


def read_examples(name: str, *, split: str, limit: int, label: int | None = None,
                  data_dir: str | None = None) -> tuple[np.ndarray, np.ndarray]:
  """(x [N, H, W, C] float32 in [-1, 1], label [N] int32): the first `limit` examples of a split (of one class
  if `label` is given) in a fixed order (files in seed-0 order, read once: no shuffle buffer, no repeat), so
  every call gets the same examples. N < limit when the split holds fewer. Each host reads its own part."""
  import tensorflow as tf  # Lazy: TF imports slowly.
  import tensorflow_datasets as tfds
  _hide_gpus_from_tf(tf)
  ds = _load_split(name, split=split, seed=0, data_dir=data_dir)
  if label is not None:
    ds = ds.filter(lambda example: tf.equal(tf.cast(example['label'], tf.int32), label))
  ds = ds.take(limit).map(lambda example: (tf.cast(example['image'], tf.float32) / 127.5 - 1.0,
                                           tf.cast(example['label'], tf.int32)))
  xs, labels = [], []
  for x, y in tfds.as_numpy(ds.batch(256)):
    xs.append(x)
    labels.append(y)
  if not xs:
    raise DataError(f"no examples{'' if label is None else f' of class {label}'} in split '{split}' of {name}")
  return np.concatenate(xs), np.concatenate(labels)
