"""Encoder distillation and style transfer: target identity, exact round trips, the trained toy
pair."""

import csv
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from diffusion import ddim_step, predict_eps_from_v, predict_x_from_v, v_target_between
from distill import objectives
from models import build_model, init_params
from models.denoiser import make_denoise_fn
from modes.transfer import EncoderDecoder, run_transfer
from samplers import encode_ddim, sample_ddim

from exact_denoisers import LOGSNR_FN, MU, STD, X0, gaussian, point_mass


def _round_trip(denoise_fn, x, num_steps):
  kwargs = dict(label=None, guidance_w=None, num_steps=num_steps, logsnr_fn=LOGSNR_FN)
  z_1 = encode_ddim(denoise_fn, None, x=x, **kwargs)
  return sample_ddim(denoise_fn, None, z_init=z_1, **kwargs)


@pytest.mark.parametrize('t, s', [(0.0, 0.125), (0.0, 1.0), (0.3, 0.8), (0.9, 0.2)])
def test_v_target_lands_on_the_target_in_both_directions(t, s):
  z_t, z_s = (
      jax.random.normal(jax.random.key(0), (6, 3)), jax.random.normal(jax.random.key(1), (6, 3)))
  logsnr_t, logsnr_s = jnp.full((6,), LOGSNR_FN(t)), jnp.full((6,), LOGSNR_FN(s))
  v = v_target_between(z_t=z_t, z_s=z_s, logsnr_t=logsnr_t, logsnr_s=logsnr_s)
  assert np.all(np.isfinite(v))
  landed = ddim_step(x_pred=predict_x_from_v(z=z_t, v=v, logsnr=logsnr_t),
                     eps_pred=predict_eps_from_v(z=z_t, v=v, logsnr=logsnr_t), logsnr_s=logsnr_s)
  np.testing.assert_allclose(landed, z_s, atol=1e-5)


def test_encoder_target_equals_two_teacher_encoder_steps_with_a_real_network():
  model = build_model(
      ml_collections.ConfigDict(dict(name='mlp', hidden=32, num_layers=2, dropout=0.0)),
      num_classes=4, guidance_input=True)
  params = init_params(model, rng=jax.random.key(0), x_shape=(2,), guidance_input=True)
  denoise_fn = make_denoise_fn(model, parametrization='v', kind='w_input', num_classes=4)
  z_0 = jax.random.normal(jax.random.key(1), (8, 2))
  label, w = jnp.arange(8, dtype=jnp.int32) % 4, jnp.full((8,), 1.5)
  for t, n in ((0.0, 4), (0.5, 2)):  # t = 0: the first encoder step starts at the data
    logsnrs = [jnp.full((8,), LOGSNR_FN(u)) for u in (t, t + 0.5 / n, t + 1.0 / n)]
    z_end = objectives.two_teacher_steps(
        denoise_fn, params, z_t=z_0, logsnr_t=logsnrs[0], logsnr_mid=logsnrs[1],
        logsnr_end=logsnrs[2], label=label, guidance_w=w)
    v = v_target_between(z_t=z_0, z_s=z_end, logsnr_t=logsnrs[0], logsnr_s=logsnrs[2])
    one_step = ddim_step(x_pred=predict_x_from_v(z=z_0, v=v, logsnr=logsnrs[0]),
                         eps_pred=predict_eps_from_v(z=z_0, v=v, logsnr=logsnrs[0]),
                         logsnr_s=logsnrs[2])
    np.testing.assert_allclose(one_step, z_end, atol=1e-4)


@pytest.mark.parametrize('num_steps', [1, 3, 16])
def test_encode_decode_is_exact_for_point_mass_data(num_steps):
  np.testing.assert_allclose(_round_trip(point_mass, X0, num_steps), X0, atol=1e-5)


def test_encode_decode_error_shrinks_with_steps_for_gaussian_data():
  x = MU + STD * jax.random.normal(jax.random.key(3), (512, 2))
  errors = [float(jnp.mean(jnp.abs(_round_trip(gaussian, x, n) - x))) for n in (1, 4, 16, 64)]
  assert all(a > 1.5 * b for a, b in zip(errors, errors[1:])), errors
  assert errors[-1] < errors[0] / 10 and errors[-1] < 0.03, errors


def test_distilled_toy_encoder_decoder_round_trip_and_transfer(toy_run, tmp_path):
  from data import load_arrays  # pylint: disable=g-import-not-at-top
  x, label = load_arrays('toy2d', 'test')
  x, label = x[:256], jnp.asarray(label[:256])
  cache = {}
  errors = {}
  for method in ('distilled', 'ddim'):
    pair = EncoderDecoder(toy_run, method, 4, cache)
    recon = pair.transfer(x, label, label, w_encode=0.0, w_decode=0.0)
    errors[method] = float(np.mean((recon - x) ** 2))
  assert errors['distilled'] < 0.01, errors  # data variance per class ~0.04: a loose reconstruction
  assert errors['distilled'] < errors['ddim'], errors
  toy_run.transfer.out_dir = str(tmp_path)
  run_transfer(toy_run)
  with open(os.path.join(tmp_path, 'transfer_results.csv')) as f:
    rows = list(csv.DictReader(f))
  assert len(rows) == 2 * 2 * 2  # method x steps x w
  for row in rows:
    if row['method'] == 'distilled':
      assert float(row['target_accuracy']) > 0.95, row


class _IdentityPair:
  """A stand-in encoder-decoder: 'transfers' by returning its input (checkpoints are not what this
  tests)."""

  def __init__(self, config, method, num_steps, cache):
    del config, method, cache
    self.num_steps = num_steps

  def transfer(self, x, source_label, target_label, *, w_encode, w_decode):
    del source_label, target_label, w_encode, w_decode
    return np.asarray(x)


def test_transfer_reads_tfds_data_and_leaves_out_accuracy_for_inception_features(
    tmp_path, monkeypatch):
  """--mode=transfer on a tfds data set (CIFAR-10, mocked): the source and target classes' examples
  come from the tfds pipeline, one class each; with Inception features the target accuracy is '-'
  (its logits are not CIFAR-10's classes), with a note, instead of a meaningless number."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  import data  # pylint: disable=g-import-not-at-top
  from configs import cifar10_teacher  # pylint: disable=g-import-not-at-top
  from modes import transfer  # pylint: disable=g-import-not-at-top
  config = cifar10_teacher.get_config()
  config.workdir = str(tmp_path)
  config.transfer.update(
      source_class=3, target_class=5, num_images=2, steps=(1,), eval_ws=(0.0,), eval_images=16)
  seen = []

  def extractor(cfg):
    assert cfg.eval.extractor == 'inception'

    # [B, 32, 32, 3]: per-channel means and spreads as 'features', 10 fake logits
    def extract(images):
      seen.append(np.asarray(images))
      # [B, 9]
      pool = jnp.concatenate([images.mean((1, 2)), images.std((1, 2)), images.max((1, 2))], axis=1)
      return {'pool': pool, 'logits': jnp.zeros((images.shape[0], 10))}

    return 'inception', extract

  monkeypatch.setattr(transfer, 'EncoderDecoder', _IdentityPair)
  monkeypatch.setattr(transfer, 'make_extractor', extractor)
  monkeypatch.setattr(transfer, 'save_png', lambda path, grid: None)
  with tfds.testing.mock_data(num_examples=200):
    out_dir = transfer.run_transfer(config)
    # what _class_examples reads
    source, labels = data.load_examples(config.data, 'train', limit=4, label=3)
    again = transfer._class_examples(config, 3, 'train', 4)  # pylint: disable=protected-access
  assert source.shape == (4, 32, 32, 3) and -1.0 <= source.min() and source.max() <= 1.0
  # one class, the same examples every call
  assert list(labels) == [3] * 4 and np.array_equal(again, source)
  with open(os.path.join(out_dir, 'transfer_results.csv'), encoding='utf-8') as f:
    rows = list(csv.DictReader(f))
  assert len(rows) == 2 and all(
      row['target_accuracy'] == '' and float(row['recon_mse']) == 0.0 for row in rows)
  with open(os.path.join(out_dir, 'transfer_results.md'), encoding='utf-8') as f:
    table = f.read()
  assert ("target acc is left out (-): Inception's logits" in table and
          '| distilled | 1 | 0 | 0.0000 | - |' in table)
  assert seen and all(batch.shape[1:] == (32, 32, 3) for batch in seen)
