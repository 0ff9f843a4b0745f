"""A guard on what is saved: no checkpoint holds a NaN or an infinity, a stage ending in skipped
updates is not complete, the divergence message's advice works when followed, and non-finite
learning rates and guidance weights are bad input."""

import os
import re
import shutil
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_config
from modes.validation import ConfigError, validate_config
from train import checkpoint, records
from train.errors import NonFiniteError
from train.loop import run_training

pytestmark = pytest.mark.integration  # the second tier (tests/conftest.py)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _quadratic(params, batch, rng, frozen):
  del rng, frozen
  return jnp.mean(jnp.square(params['w'] - batch['x'])), {}


def _batches(nan_from: int):
  """Batches of ones, NaN from step nan_from on (a NaN loss and gradient: the update is skipped)."""
  def make_batches(start):
    for step in range(start, 1000):
      yield {'x': np.full((64, 3), np.nan if step >= nan_from else 1.0, np.float32),
             'label': np.zeros(64, np.int32)}
  return make_batches


def _section(tmp_path, **overrides):
  section = tiny_config(tmp_path).train
  section.update(warmup_steps=0, log_every=100, **overrides)
  return section


def test_a_state_with_non_finite_parameters_is_never_saved(tmp_path):
  # lr = inf (validation would refuse it; run_training is called directly): the first update is
  # finite in loss and gradient but makes the parameters non-finite, so nothing skips it.
  section = _section(tmp_path, num_steps=6, checkpoint_every=2, lr=float('inf'))
  ckpt_dir = str(tmp_path / 'ckpt')
  with pytest.raises(
      NonFiniteError, match=r'non-finite values in params, ema_params at step 2 \(not '
      r'saved\): stopped, no checkpoint saved; rerun with a lower learning rate'):
    run_training(title='inf', loss_fn=_quadratic, params={'w': jnp.zeros(3)}, section=section,
                 ckpt_dir=ckpt_dir, record={'stage': 'teacher'},
                 make_batches=_batches(nan_from=1000), seed=0)
  assert checkpoint.latest_step(ckpt_dir) is None


def test_a_stage_whose_last_updates_were_skipped_is_not_complete(tmp_path):
  # 6 steps, far fewer than max_nonfinite_steps (100): the last 2 updates are non-finite and
  # skipped.
  section = _section(tmp_path, num_steps=6, checkpoint_every=4)
  ckpt_dir = str(tmp_path / 'ckpt')
  with pytest.raises(NonFiniteError, match='the last 2 updates up to the final step 6 were '
                     'non-finite, so the stage is not complete: stopped; the last finite '
                     'checkpoint is step 4 in'):
    run_training(
        title='nan', loss_fn=_quadratic, params={'w': jnp.zeros(3)}, section=section,
        ckpt_dir=ckpt_dir, record={'stage': 'teacher'}, make_batches=_batches(nan_from=4), seed=0)
  assert checkpoint.latest_step(ckpt_dir) == 4
  with pytest.raises(checkpoint.CheckpointError, match=r'is incomplete \(step 4 of 6\)'):
    records.check_complete(ckpt_dir)  # not a teacher anything may be distilled from


def test_the_divergence_advice_works_when_followed(tmp_path):
  """lr = 1e19: the first updates leave finite but huge parameters (saved), then the loss
  overflows."""
  section = _section(tmp_path, num_steps=8, checkpoint_every=2, max_nonfinite_steps=4, lr=1e19)
  ckpt_dir = str(tmp_path / 'ckpt')
  train = lambda: run_training(title='diverge', loss_fn=_quadratic, params={'w': jnp.zeros(3)},
                               section=section, ckpt_dir=ckpt_dir, record={'stage': 'teacher'},
                               make_batches=_batches(1000), seed=0)
  with pytest.raises(NonFiniteError) as err:
    train()
  last = checkpoint.latest_step(ckpt_dir)
  assert last is not None and (
      f'the last finite checkpoint is step {last} in {ckpt_dir}. To go on from it, rerun '
      'with a lower learning rate (--config.train.lr, now 1e+19); to restart the stage from '
      f'scratch (if that step has diverged too), mv {ckpt_dir} {ckpt_dir}.diverged and '
      'rerun') in str(err.value)
  section.lr = 1e-2  # going on from it with a lower learning rate ...
  with pytest.raises(NonFiniteError) as err:
    train()
  assert (f'step {last} in {ckpt_dir}, the last finite checkpoint and the one this run resumed '
          'from, has diverged itself (no finite update since): restart the stage '
          'from scratch: mv ') in str(err.value)
  source, target = re.search(r'mv (\S+) (\S+),', str(err.value)).groups()
  shutil.move(source, target)  # ... so, as the message says, from scratch
  state, _ = train()
  assert (checkpoint.latest_step(ckpt_dir) == 8 and
          np.all(np.abs(np.asarray(state.params['w'])) < 1.0))


@pytest.mark.parametrize('field, value, message', [
    ('train.lr', float('inf'), 'train.lr must be a finite number > 0, got inf'),
    ('train.lr', float('nan'), 'train.lr must be a finite number > 0, got nan'),
    ('stage2.lr', 0.0, 'stage2.lr must be a finite number > 0, got 0.0'),
    ('stage1.lr', -1e-3, 'stage1.lr must be a finite number > 0'),
    ('train.weight_decay', float('inf'), 'train.weight_decay must be a finite number >= 0'),
    ('stage1.lr_scales.guidance_embed', float('inf'),
     'stage1.lr_scales.guidance_embed must be a finite number > 0'),
    ('distill.w_max', float('inf'), 'distill.w_max must be a finite guidance weight, got inf'),
    ('sample.guidance_w', float('nan'),
     'sample.guidance_w must be a finite guidance weight, got nan'),
    ('pipeline.guidance_ws',
     (0.0, float('nan')), 'pipeline.guidance_ws[1] must be a finite guidance weight'),
    ('eval.guidance_ws', (float('inf'),), 'eval.guidance_ws[0] must be a finite guidance weight'),
    ('transfer.w_decode', float('nan'), 'transfer.w_decode must be a finite guidance weight'),
    ('distill.w_zero_fraction', 1.5, 'distill.w_zero_fraction must be in [0, 1]'),
])
def test_non_finite_or_non_positive_rates_and_non_finite_guidance_weights_are_bad_input(
    tmp_path, field, value, message):
  config = tiny_config(tmp_path)
  section, name = field.rsplit('.', 1)
  node = config
  for part in section.split('.'):
    node = node[part]
  node[name] = value
  with pytest.raises(ConfigError, match=re.escape(message)):
    validate_config(config)


def test_lr_inf_on_the_command_line_is_one_error_line(tmp_path):
  result = subprocess.run([sys.executable, 'main.py', '--config=configs/tiny.py', '--mode=teacher',
                           '--config.train.lr=inf', f'--config.workdir={tmp_path / "run"}'],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode == 1
  errors = [line for line in result.stderr.splitlines() if line.startswith('error:')]
  assert errors == ['error: train.lr must be a finite number > 0, got inf'], result.stderr[-2000:]
  assert 'Traceback' not in result.stderr
  assert not (tmp_path / 'run').exists()
