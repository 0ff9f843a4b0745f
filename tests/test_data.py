"""Tests for the data package: embedded sets, iterators and tfds pipelines."""

import ml_collections
import numpy as np
import pytest

import data
from data.toy2d import TOY2D_COVS, TOY2D_MEANS, make_toy2d


def _config(name, random_flip=False, tfds_data_dir=None):
  return ml_collections.ConfigDict(
      {'name': name, 'random_flip': random_flip, 'tfds_data_dir': tfds_data_dir}
  )


def _take(iterator, num_batches):
  return [next(iterator) for _ in range(num_batches)]


def test_digits_arrays():
  train_x, train_label = data.load_arrays('digits', 'train')
  test_x, test_label = data.load_arrays('digits', 'test')
  assert train_x.shape == (1500, 8, 8, 1) and test_x.shape == (297, 8, 8, 1)
  assert train_x.dtype == np.float32 and train_label.dtype == np.int32
  assert train_x.min() == -1.0 and train_x.max() == 1.0
  assert set(np.unique(train_label)) == set(range(10))
  assert set(np.unique(test_label)) == set(range(10))
  train_rows = {row.tobytes() for row in train_x}
  assert not any(row.tobytes() in train_rows for row in test_x)
  again_x, _ = data.load_arrays('digits', 'test')
  np.testing.assert_array_equal(test_x, again_x)


def test_toy2d_statistics_match_analytic():
  x, label = make_toy2d(40_000, seed=3)
  assert x.shape == (40_000, 2) and x.dtype == np.float32
  assert label.dtype == np.int32
  np.testing.assert_array_equal(np.bincount(label), [10_000] * 4)
  for c in range(4):
    x_c = x[label == c]  # [10000, 2]
    np.testing.assert_allclose(x_c.mean(0), TOY2D_MEANS[c], atol=0.01)
    np.testing.assert_allclose(np.cov(x_c.T), TOY2D_COVS[c], atol=0.004)


def test_toy2d_splits():
  train_x, train_label = data.load_arrays('toy2d', 'train')
  test_x, _ = data.load_arrays('toy2d', 'test')
  assert train_x.shape == (8192, 2) and test_x.shape == (2048, 2)
  np.testing.assert_array_equal(np.bincount(train_label), [2048] * 4)
  assert not np.array_equal(train_x[:2048], test_x)


def test_dataset_info():
  assert data.dataset_info('digits') == data.DatasetInfo(
      'digits', (8, 8, 1), 10, True)
  assert data.dataset_info('toy2d').shape == (2,)
  assert not data.dataset_info('toy2d').is_image
  assert data.dataset_info('cifar10').shape == (32, 32, 3)
  assert data.dataset_info('imagenet64').num_classes == 1000


def test_unknown_name_raises():
  with pytest.raises(data.DataError, match='choose one of: cifar10, digits'):
    data.dataset_info('mnist')
  with pytest.raises(data.DataError, match="unknown data.name 'mnist'"):
    data.make_train_iterator(
        _config('mnist'), per_host_batch_size=2, seed=0)
  with pytest.raises(data.DataError, match='not held in memory'):
    data.load_arrays('cifar10', 'train')


@pytest.mark.parametrize('name,random_flip', [('digits', True),
                                              ('toy2d', False)])
def test_in_memory_iterator_is_resumable(name, random_flip):
  config = _config(name, random_flip)
  fresh = _take(
      data.make_train_iterator(config, per_host_batch_size=16, seed=7), 5)
  replay = _take(
      data.make_train_iterator(config, per_host_batch_size=16, seed=7), 5)
  resumed = _take(data.make_train_iterator(
      config, per_host_batch_size=16, seed=7, start_step=3), 2)
  other_seed = next(
      data.make_train_iterator(config, per_host_batch_size=16, seed=8))
  shape = data.dataset_info(name).shape
  for batch in fresh:
    assert batch['x'].shape == (16, *shape) and batch['x'].dtype == np.float32
    assert batch['label'].shape == (16,) and batch['label'].dtype == np.int32
  for a, b in zip(fresh, replay):
    np.testing.assert_array_equal(a['x'], b['x'])
  for a, b in zip(fresh[3:], resumed):
    np.testing.assert_array_equal(a['x'], b['x'])
    np.testing.assert_array_equal(a['label'], b['label'])
  assert not np.array_equal(fresh[0]['x'], fresh[1]['x'])
  assert not np.array_equal(fresh[0]['x'], other_seed['x'])


def test_in_memory_flip_mirrors_images():
  def first_batch(random_flip):
    iterator = data.make_train_iterator(
        _config('digits', random_flip), per_host_batch_size=64, seed=1)
    return next(iterator)

  plain, flipped = first_batch(False), first_batch(True)
  np.testing.assert_array_equal(plain['label'], flipped['label'])
  same = np.all(plain['x'] == flipped['x'], axis=(1, 2, 3))  # [B]
  mirrored = np.all(plain['x'][:, :, ::-1] == flipped['x'], axis=(1, 2, 3))
  assert np.all(same | mirrored)
  assert np.any(mirrored & ~same) and np.any(same & ~mirrored)


def _tfds_batches(name, random_flip, num_batches=2, seed=0):
  """Reads mocked batches; the iterator is dropped before returning."""
  import tensorflow_datasets as tfds  # Lazy: pulls in TF.
  with tfds.testing.mock_data(num_examples=12):
    iterator = data.make_tfds_iterator(
        name, split='train', per_host_batch_size=8, seed=seed,
        random_flip=random_flip)
    batches = _take(iterator, num_batches)
    del iterator  # A live mocked pipeline can hang interpreter shutdown.
  return batches


@pytest.mark.parametrize('name', ['cifar10', 'imagenet64'])
def test_tfds_pipeline_batches(name):
  info = data.dataset_info(name)
  for batch in _tfds_batches(name, random_flip=False):
    assert batch['x'].shape == (8, *info.shape)
    assert batch['x'].dtype == np.float32
    assert batch['x'].min() >= -1.0 and batch['x'].max() <= 1.0
    assert batch['label'].shape == (8,) and batch['label'].dtype == np.int32
    assert batch['label'].min() >= 0
    assert batch['label'].max() < info.num_classes


def test_tfds_flip_and_determinism():
  plain = _tfds_batches('cifar10', random_flip=False)
  flipped = _tfds_batches('cifar10', random_flip=True)
  flipped_again = _tfds_batches('cifar10', random_flip=True)
  for a, b in zip(flipped, flipped_again):
    np.testing.assert_array_equal(a['x'], b['x'])
  x, x_flip = plain[0]['x'], flipped[0]['x']  # [B, 32, 32, 3]
  same = np.all(x == x_flip, axis=(1, 2, 3))  # [B]
  mirrored = np.all(x[:, :, ::-1] == x_flip, axis=(1, 2, 3))  # [B]
  assert np.all(same | mirrored)
  assert np.any(mirrored & ~same)


def test_tfds_missing_dataset_raises(tmp_path):
  with pytest.raises(data.DataError) as error:
    data.make_train_iterator(
        _config('cifar10', tfds_data_dir=str(tmp_path)),
        per_host_batch_size=8, seed=0)
  message = str(error.value)
  assert '\n' not in message
  assert 'tfds build cifar10' in message and str(tmp_path) in message
