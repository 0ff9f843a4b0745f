"""Tests of eval/: Frechet distance, feature statistics, Inception Score, InceptionV3 and the digits
classifier."""

import json
import os
import shutil
import sys
import time
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from scipy import linalg

import data
from eval import classifier, inception
from eval.metrics import FeatureStats, classifier_accuracy, frechet_distance, inception_score
from train.checkpoint import CheckpointError


def _random_spd(rng, dim):
  a = rng.standard_normal((dim, dim + 3))
  return a @ a.T / dim  # [D, D]


def _direct_frechet(mu1, sigma1, mu2, sigma2):
  """Tr sqrt(S1 S2) from scipy's general matrix square root of the product (pytorch-fid's way),
  independent of the symmetric eigendecompositions eval.metrics uses."""
  root = linalg.sqrtm(sigma1 @ sigma2).real
  diff = mu1 - mu2
  return diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(root)


# ----------------------------------------------------------------------------------------- metrics


def test_frechet_distance_matches_direct_computation():
  rng = np.random.default_rng(0)
  mu1, mu2 = rng.standard_normal(6), rng.standard_normal(6)
  sigma1, sigma2 = _random_spd(rng, 6), _random_spd(rng, 6)
  expected = _direct_frechet(mu1, sigma1, mu2, sigma2)
  assert frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(expected, rel=1e-8)


def test_frechet_distance_of_identical_statistics_is_zero():
  rng = np.random.default_rng(1)
  mu, sigma = rng.standard_normal(8), _random_spd(rng, 8)
  assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-8
  few = rng.standard_normal((5, 10))  # Fewer samples than dimensions: a singular covariance.
  mu, sigma = few.mean(axis=0), np.cov(few, rowvar=False)
  assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-4


def test_frechet_distance_shifted_means_is_squared_shift():
  rng = np.random.default_rng(2)
  sigma, mu, shift = _random_spd(rng, 5), rng.standard_normal(5), rng.standard_normal(5)
  assert frechet_distance(mu, sigma, mu + shift, sigma) == pytest.approx(shift @ shift, rel=1e-7)


def test_frechet_distance_one_dimensional():
  m1, s1, m2, s2 = 0.3, 1.5, -0.4, 0.7
  expected = (m1 - m2) ** 2 + (s1 - s2) ** 2
  assert frechet_distance([m1], [[s1**2]], [m2], [[s2**2]]) == pytest.approx(expected, rel=1e-10)
  assert frechet_distance(m1, s1 ** 2, m2, s2 ** 2) == pytest.approx(expected, rel=1e-10)


def test_frechet_distance_refuses_mismatched_shapes():
  with pytest.raises(ValueError, match='mismatched'):
    frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_frechet_distance_of_sample_covariances_matches_scipy_and_refuses_nan():
  """Feature sets as the tables have them (64 dimensions, correlated, 500 samples each)."""
  rng = np.random.default_rng(3)
  mix = rng.standard_normal((64, 64))
  a, b = rng.standard_normal((500, 64)) @ mix, 0.2 + rng.standard_normal((500, 64)) @ (mix + 0.1)
  stats = [(x.mean(axis=0), np.cov(x, rowvar=False)) for x in (a, b)]
  expected = _direct_frechet(*stats[0], *stats[1])
  assert frechet_distance(*stats[0], *stats[1]) == pytest.approx(expected, rel=1e-8)
  with pytest.raises(ValueError, match='not finite'):
    frechet_distance(stats[0][0], np.full((64, 64), np.nan), *stats[1])


def test_feature_stats_streaming_equals_whole_array(tmp_path):
  features = np.random.default_rng(3).standard_normal((103, 7)).astype(np.float32) * 3 + 1  # [N, D]
  stats = FeatureStats(7)
  for chunk in np.array_split(features, 5):
    stats.update(chunk)
  assert stats.count == 103
  np.testing.assert_allclose(stats.mean(),
                             features.astype(np.float64).mean(axis=0), rtol=1e-12, atol=1e-12)
  np.testing.assert_allclose(
      stats.cov(), np.cov(features.astype(np.float64), rowvar=False), rtol=1e-10)
  stats.save_npz(str(tmp_path / 'ref' / 'stats.npz'))
  mu, sigma, count = FeatureStats.load_npz(str(tmp_path / 'ref' / 'stats.npz'))
  np.testing.assert_array_equal(mu, stats.mean())
  np.testing.assert_array_equal(sigma, stats.cov())
  assert count == 103


def test_inception_score_uniform_predictions_is_one():
  mean, std = inception_score(np.zeros((50, 10)), num_splits=5)
  assert mean == pytest.approx(1.0, abs=1e-12) and std == pytest.approx(0.0, abs=1e-12)


def test_inception_score_confident_even_predictions_is_num_classes():
  num_classes = 10
  logits = 100.0 * np.eye(num_classes)[np.arange(200) % num_classes]  # [N, K], one-hot-like
  mean, std = inception_score(logits, num_splits=10)
  assert mean == pytest.approx(num_classes, rel=1e-6) and std < 1e-6
  probs = np.eye(num_classes)[np.arange(200) % num_classes]
  assert inception_score(probs, num_splits=10,
                         from_probs=True)[0] == pytest.approx(num_classes, rel=1e-6)


def test_classifier_accuracy():
  logits = np.array([[2.0, 1.0], [0.0, 3.0], [1.0, 0.0], [0.0, 1.0]])
  assert classifier_accuracy(logits, np.array([0, 1, 1, 1])) == 0.75


# --------------------------------------------------------------------------------------- inception


@pytest.fixture(scope='module')
def inception_flat():
  """Random InceptionV3FID variables {'/'-joined path: array}, He-scaled so activations stay
  O(1)."""
  rng = np.random.default_rng(0)
  flat = {}
  for key, shape in inception.expected_shapes().items():
    leaf = key.rsplit('/', 1)[1]
    if leaf == 'kernel':
      fan_in = int(np.prod(shape[:-1]))
      flat[key] = (
          (rng.standard_normal(shape, np.float32) * np.sqrt(2.0 / fan_in)).astype(np.float32))
    elif leaf == 'var':
      flat[key] = rng.uniform(0.5, 1.5, shape).astype(np.float32)
    else:  # scale, bias, mean
      flat[key] = (rng.standard_normal(shape) * 0.1 + (leaf == 'scale')).astype(np.float32)
  return flat


@pytest.fixture(scope='module')
def inception_apply():
  return jax.jit(inception.InceptionV3FID().apply)


def test_inception_shapes_determinism_and_batch_independence(inception_flat, inception_apply):
  variables = traverse_util.unflatten_dict(inception_flat, sep='/')
  # [3, H, W, 3]
  images = jax.random.uniform(jax.random.key(0), (3, 16, 16, 3), minval=-1.0, maxval=1.0)
  first = inception_apply(variables, images[:2])
  assert (first['pool'].shape == (2, inception.POOL_DIM) and
          first['logits'].shape == (2, inception.NUM_LOGITS))
  assert np.all(np.isfinite(first['logits'])) and float(jnp.std(first['pool'])) > 1e-3
  again = inception_apply(variables, images[:2])
  np.testing.assert_array_equal(np.asarray(first['pool']), np.asarray(again['pool']))
  swapped = inception_apply(variables, images[::2])  # Same first image, another second one.
  np.testing.assert_allclose(np.asarray(swapped['logits'][0]), np.asarray(first['logits'][0]),
                             rtol=1e-5, atol=1e-5)
  assert not np.allclose(np.asarray(swapped['logits'][1]), np.asarray(first['logits'][1]))


def test_load_inception_params_round_trip_and_wrong_shape(inception_flat, tmp_path):
  path = tmp_path / 'weights.npz'
  np.savez(path, **inception_flat)
  loaded = traverse_util.flatten_dict(inception.load_inception_params(str(path)), sep='/')
  assert loaded.keys() == inception_flat.keys()
  for key, value in inception_flat.items():
    np.testing.assert_array_equal(np.asarray(loaded[key]), value)
  broken = dict(inception_flat)
  broken['params/Mixed_6b/branch7x7_2/conv/kernel'] = np.zeros((7, 1, 128, 128), np.float32)
  np.savez(tmp_path / 'broken.npz', **broken)
  with pytest.raises(inception.WeightsError, match='params/Mixed_6b/branch7x7_2/conv/kernel'):
    inception.load_inception_params(str(tmp_path / 'broken.npz'))


def test_missing_inception_weights_message(tmp_path):
  path = str(tmp_path / 'nowhere.npz')
  with pytest.raises(FileNotFoundError) as info:
    inception.load_inception_params(path)
  assert isinstance(info.value, inception.WeightsError) and isinstance(info.value, ValueError)
  message = str(info.value)
  assert ('\n' not in message and path in message and
          'pt_inception-2015-12-05-6726825d.pth' in message)
  assert 'python -m eval.inception --convert SRC.pth DST.npz' in message


def _to_torch_state_dict(flat):
  """Inverse of convert_torch_state_dict: flax paths -> pytorch-fid state_dict names and layouts."""
  leaves = {'params/kernel': 'weight', 'params/bias': 'bias', 'params/scale': 'weight',
            'batch_stats/mean': 'running_mean', 'batch_stats/var': 'running_var'}
  state_dict = {}
  for key, value in flat.items():
    collection, *module, leaf = key.split('/')
    name = '.'.join(module) + '.' + leaves[f'{collection}/{leaf}']
    if leaf == 'kernel':
      value = value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T
    state_dict[name] = value
    if module[-1] == 'bn' and leaf == 'mean':
      state_dict['.'.join(module) + '.num_batches_tracked'] = np.array(0)
  return state_dict


def test_convert_torch_state_dict_inverts_the_mapping(inception_flat):
  state_dict = _to_torch_state_dict(inception_flat)
  assert state_dict['fc.weight'].shape == (inception.NUM_LOGITS, inception.POOL_DIM)
  assert state_dict['Conv2d_1a_3x3.conv.weight'].shape == (32, 3, 3, 3)
  assert 'Mixed_7c.branch3x3dbl_3b.bn.running_var' in state_dict
  converted = inception.convert_torch_state_dict(state_dict)
  assert converted.keys() == inception_flat.keys()
  for key, value in inception_flat.items():
    np.testing.assert_array_equal(converted[key], value)


def test_convert_command_with_stand_in_torch(inception_flat, tmp_path, monkeypatch):
  state_dict = {name: types.SimpleNamespace(numpy=lambda v=value: v)
                for name, value in _to_torch_state_dict(inception_flat).items()}
  fake_torch = types.SimpleNamespace(load=lambda path, map_location: state_dict)
  monkeypatch.setitem(sys.modules, 'torch', fake_torch)
  inception.main(['--convert', str(tmp_path / 'src.pth'), str(tmp_path / 'dst.npz')])
  loaded = traverse_util.flatten_dict(
      inception.load_inception_params(str(tmp_path / 'dst.npz')), sep='/')
  np.testing.assert_array_equal(np.asarray(loaded['params/fc/kernel']),
                                inception_flat['params/fc/kernel'])


# -------------------------------------------------------------------------------------- classifier


@pytest.fixture(scope='module')
def trained_classifier(tmp_path_factory):
  ckpt_dir = str(tmp_path_factory.mktemp('classifier'))
  params, accuracy = classifier.train_classifier(ckpt_dir=ckpt_dir, num_steps=300, batch_size=128)
  return ckpt_dir, params, accuracy


def test_classifier_accuracy_and_cache(trained_classifier, monkeypatch):
  ckpt_dir, params, accuracy = trained_classifier
  assert accuracy > 0.9
  monkeypatch.setattr(classifier, '_make_train_step', lambda *args: pytest.fail('retrained'))
  start = time.time()
  cached_params, cached_accuracy = classifier.train_classifier(ckpt_dir=ckpt_dir, num_steps=300)
  assert time.time() - start < 10.0 and cached_accuracy == accuracy
  jax.tree.map(np.testing.assert_array_equal, cached_params, params)
  model, loaded_params, record = classifier.load_classifier(ckpt_dir)
  assert record['num_steps'] == 300 and record['arch'] == model.arch()
  test_x, test_label = data.load_arrays('digits', 'test')
  outputs = classifier.feature_fn(model, loaded_params)(test_x)
  assert (outputs['pool'].shape == (len(test_x), model.pool_dim) and
          outputs['logits'].shape == (len(test_x), 10))
  assert classifier_accuracy(outputs['logits'], test_label) == pytest.approx(accuracy)


def test_the_classifier_features_are_named_by_its_checkpoint(trained_classifier, tmp_path):
  """The id --mode=fid and the pipeline's table key their cached features by (its own checkpoint
  layout)."""
  from configs import digits_teacher  # pylint: disable=g-import-not-at-top
  from modes import fid  # pylint: disable=g-import-not-at-top
  ckpt_dir, _, _ = trained_classifier
  config = digits_teacher.get_config()
  config.update(workdir=str(tmp_path))
  config.eval.classifier_dir = ckpt_dir
  assert fid.extractor_id(config) == f'classifier@{classifier.classifier_id(ckpt_dir)}'
  assert classifier.classifier_id(ckpt_dir).startswith('300-')
  with pytest.raises(CheckpointError, match='no classifier in'):
    classifier.classifier_id(str(tmp_path / 'empty'))


def test_a_classifier_whose_params_are_not_the_bytes_written_is_refused(trained_classifier,
                                                                        tmp_path):
  ckpt_dir = str(tmp_path / 'classifier')
  shutil.copytree(trained_classifier[0], ckpt_dir)
  step = classifier.latest_step(ckpt_dir)
  _, params, record = classifier.load_classifier(ckpt_dir)
  assert record['digest']['params'] == classifier.params_digest(params)
  changed = jax.tree.map(lambda x: x + 1.0, params)  # other bytes under the same record: damage
  shutil.rmtree(os.path.join(ckpt_dir, str(step)))
  classifier._save(ckpt_dir, changed, {k: v for k, v in record.items() if k != 'digest'})
  with open(os.path.join(ckpt_dir, str(step), 'record', 'metadata'), 'r+', encoding='utf-8') as f:
    saved = json.load(f)
    saved['digest'] = record['digest']  # the digest of the params first written
    f.seek(0)
    f.truncate()
    f.write(json.dumps(saved))
  with pytest.raises(CheckpointError, match='classifier in .* is damaged .* delete that folder'):
    classifier.load_classifier(ckpt_dir)


def test_load_classifier_missing(tmp_path):
  with pytest.raises(CheckpointError, match='no classifier in .*: --mode=fid trains one there'):
    classifier.load_classifier(str(tmp_path / 'empty'))


def test_classifier_fid_ranks_digits_above_noise(trained_classifier):
  ckpt_dir = trained_classifier[0]
  model, params, _ = classifier.load_classifier(ckpt_dir)
  features = classifier.feature_fn(model, params)
  train_x, _ = data.load_arrays('digits', 'train')
  test_x, _ = data.load_arrays('digits', 'test')
  noise = np.random.default_rng(0).uniform(-1.0, 1.0, test_x.shape).astype(np.float32)

  def stats(images):
    pool = np.asarray(features(images)['pool'], np.float64)  # [N, D]
    return pool.mean(axis=0), np.cov(pool, rowvar=False)

  reference = stats(test_x)
  fid_digits = frechet_distance(*stats(train_x), *reference)
  fid_noise = frechet_distance(*stats(noise), *reference)
  assert fid_digits >= 0 and fid_noise > 10 * fid_digits


def test_row_labels_sit_beside_their_rows_and_keep_the_grid():
  from eval.images import image_grid, with_row_labels  # pylint: disable=g-import-not-at-top
  grid = image_grid(np.ones((6, 8, 8, 1)), num_rows=3, scale=4)  # white images, 3 rows of 36 px
  labelled = with_row_labels(grid, ['teacher CFG ddim 64 (NFE 128)', 'student ddim 8 (NFE 8)', ''],
                             row_height=36, top=4)
  margin = labelled.shape[1] - grid.shape[1]
  assert margin > 50 and labelled.shape[0] == grid.shape[0]
  np.testing.assert_array_equal(labelled[:, margin:], grid)
  ink = [(labelled[4 + 36 * i:4 + 36 * (i + 1), :margin] < 128).sum() for i in range(3)]
  assert ink[0] > ink[1] > 0 and ink[2] == 0  # the longer label has more ink; an empty one none


def test_column_titles_sit_above_their_columns_and_keep_the_grid():
  from eval.images import image_grid, with_column_titles  # pylint: disable=g-import-not-at-top
  # white images, 12 columns of 36 px
  grid = image_grid(np.ones((12, 8, 8, 3)), num_rows=1, scale=4)
  titled = with_column_titles(grid, ['class 3 (source)', '', 'transferred to 8'], column_width=144)
  margin = titled.shape[0] - grid.shape[0]
  assert margin >= 12 and titled.shape[1] == grid.shape[1]
  np.testing.assert_array_equal(titled[margin:], grid)
  ink = [(titled[:margin, 144 * j:144 * (j + 1)] < 128).sum() for j in range(3)]
  # each title over its own columns; an empty one none
  assert ink[0] > 0 and ink[1] == 0 and ink[2] > 0


def test_quantize_uint8_lands_on_the_256_levels_is_idempotent_and_moves_at_most_half_a_level():
  from eval.images import quantize_uint8, to_uint8  # pylint: disable=g-import-not-at-top
  x = np.random.default_rng(0).uniform(-1.0, 1.0, (4, 8, 8, 3)).astype(np.float32)  # [B, H, W, C]
  x[0, 0, 0] = [-1.0, 1.0, 0.0]
  q = quantize_uint8(x)
  k = to_uint8(x).astype(np.float32)
  assert q.dtype == np.float32 and q.shape == x.shape
  np.testing.assert_array_equal(q, k / np.float32(127.5) - np.float32(1.0))  # exactly k / 127.5 - 1
  np.testing.assert_array_equal(quantize_uint8(q), q)
  assert np.max(np.abs(q - x)) <= 1 / 255 + 1e-7
  assert len(np.unique(quantize_uint8(np.linspace(-1.0, 1.0, 10_001)))) == 256
  np.testing.assert_array_equal(quantize_uint8(np.array([-3.0, 3.0])), [-1.0, 1.0])  # clipped first
