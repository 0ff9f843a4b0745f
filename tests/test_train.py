"""The train step's own rules: non-finite updates skipped and counted, Adam unchanged by them,
learning-rate scales, which errors count as damage or out of memory, the CPU compiler level."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import tiny_config
from distill import stages
from train import checkpoint, mesh
from train.state import create_train_state, make_train_step, unpack_state


def test_configure_cpu_compiler_adds_the_level_once_and_only_for_the_cpu(monkeypatch):
  monkeypatch.setattr(mesh, '_cpu_is_default', lambda: True)
  monkeypatch.setenv('XLA_FLAGS', '--xla_force_host_platform_device_count=2')
  assert mesh.configure_cpu_compiler() and mesh.configure_cpu_compiler()
  assert os.environ['XLA_FLAGS'] == ('--xla_force_host_platform_device_count=2 '
                                     '--xla_backend_optimization_level=1')
  monkeypatch.setenv('XLA_FLAGS', '')
  assert mesh.configure_cpu_compiler(level=0)  # the tests' level (tests/conftest.py)
  assert os.environ['XLA_FLAGS'] == '--xla_backend_optimization_level=0'
  monkeypatch.setenv('XLA_FLAGS', '--xla_backend_optimization_level=3')  # the user's level is kept
  assert (mesh.configure_cpu_compiler() and
          os.environ['XLA_FLAGS'] == '--xla_backend_optimization_level=3')
  # an accelerator's code generation reads it too
  monkeypatch.setattr(mesh, '_cpu_is_default', lambda: False)
  monkeypatch.delenv('XLA_FLAGS')
  assert not mesh.configure_cpu_compiler() and 'XLA_FLAGS' not in os.environ


def test_missing_teacher_checkpoint_is_a_clear_error(tmp_path):
  with pytest.raises(checkpoint.CheckpointError,
                     match='no checkpoint in .*stage1: train that stage first'):
    stages.train_stage2(tiny_config(tmp_path))


def test_non_finite_updates_are_skipped_and_counted():
  def loss_fn(params, batch, rng, frozen):
    del rng, frozen
    return jnp.sum(params['w'] * batch['x']) / batch['scale'], {}

  tx = optax.sgd(0.1)
  step = jax.jit(
      make_train_step(loss_fn, tx, ema_decay=0.9, lr_schedule=optax.constant_schedule(0.1)))
  state = create_train_state({'w': jnp.ones(3)}, tx, seed=0)
  state, metrics = step(state, {'x': jnp.ones(3), 'scale': jnp.array(0.0)}, None)  # inf loss
  np.testing.assert_array_equal(unpack_state(state).params['w'], jnp.ones(3))
  np.testing.assert_array_equal(unpack_state(state).ema_params['w'], jnp.ones(3))
  assert int(state.num_skipped) == 1 and int(metrics['num_skipped']) == 1 and int(state.step) == 1
  state, _ = step(state, {'x': jnp.ones(3), 'scale': jnp.array(1.0)}, None)
  np.testing.assert_allclose(unpack_state(state).params['w'], 0.9 * jnp.ones(3))
  assert int(state.num_skipped) == 1


@pytest.mark.parametrize(
    'err,damage',
    [(ValueError('DATA_LOSS: Error opening "zarr" driver: Error reading "params/.zarray"'), True),
     (ValueError('OUT_OF_RANGE: Error reading "ema_params/w/0"'), True),
     (FileNotFoundError('Metadata file (named _METADATA) does not exist'), True),
     (json.JSONDecodeError('Expecting value', '', 0), True),
     (ValueError('UNAVAILABLE: Error reading "gs://bucket/run/teacher/10/state/manifest.ocdbt"'),
      False),
     (ValueError('RESOURCE_EXHAUSTED: Out of memory while trying to allocate 1.2GiB'), False),
     (ValueError('sharding of the target does not fit 4 devices'), False), (MemoryError(), False),
     (ConnectionError('reset by peer'), False), (PermissionError('denied'), False),
     (TimeoutError(), False), (RuntimeError('INTERNAL: CUDA error'), False)])
def test_only_errors_about_the_files_count_as_damage(err, damage):
  assert checkpoint.is_damage(err) == damage


def test_adam_after_skipped_non_finite_steps_continues_as_if_they_never_happened():
  def loss_fn(params, batch, rng, frozen):
    del rng, frozen
    return jnp.sum(jnp.square(params['w'] - batch['x'])) / batch['scale'], {}

  tx = optax.adam(0.1)
  step = jax.jit(
      make_train_step(loss_fn, tx, ema_decay=0.0, lr_schedule=optax.constant_schedule(0.1)))
  good = [{'x': jnp.array([1.0, -2.0, 3.0]), 'scale': jnp.array(1.0)},
          {'x': jnp.array([0.5, 0.5, -1.0]), 'scale': jnp.array(1.0)}]
  # a NaN gradient, then an inf loss
  bad = {'x': jnp.array([jnp.nan, 0.0, 0.0]), 'scale': jnp.array(1.0)}
  clean = skipped = create_train_state({'w': jnp.zeros(3)}, tx, seed=0)
  for batch in good:
    clean, _ = step(clean, batch, None)
  for batch in (good[0], bad, dict(good[0], scale=jnp.array(0.0)), good[1]):
    skipped, _ = step(skipped, batch, None)
  assert int(skipped.num_skipped) == 2 and int(skipped.consecutive_skipped) == 0
  leaves = lambda state: jax.tree.leaves((state.params, state.opt_state))
  for a, b in zip(leaves(clean), leaves(skipped), strict=True):
    # moments and Adam's step count untouched by the skipped updates
    np.testing.assert_array_equal(a, b)


def test_lr_scales_multiply_the_learning_rate_of_one_top_level_key():
  """stage1.lr_scales.guidance_embed = 10: Adam's first step moves that key 10x as far as the
  rest."""
  from train.state import (  # pylint: disable=g-import-not-at-top
      learning_rate_schedule, lr_scales, make_optimizer)
  section = tiny_config('/tmp/unused').stage1
  section.warmup_steps = 0  # full lr at the first step
  # moved = the update
  params = {'guidance_embed': {'kernel': jnp.zeros(3)}, 'conv': {'kernel': jnp.zeros(3)}}
  loss_fn = lambda p, batch, rng, frozen: (sum(jnp.sum(leaf) for leaf in jax.tree.leaves(p)), {})

  def moved(section):
    tx = make_optimizer(section)
    step = make_train_step(loss_fn, tx, ema_decay=0.0, lr_schedule=learning_rate_schedule(section),
                           lr_scales=lr_scales(section))
    state, _ = step(create_train_state(params, tx, seed=0), None, None)
    return jax.tree.map(lambda new, old: new - old, unpack_state(state).params, params)

  plain = moved(section)
  section.lr_scales.guidance_embed = 10.0
  scaled = moved(section)
  np.testing.assert_allclose(scaled['conv']['kernel'], plain['conv']['kernel'], rtol=1e-6)
  np.testing.assert_allclose(scaled['guidance_embed']['kernel'],
                             10 * plain['guidance_embed']['kernel'], rtol=1e-5)
  assert float(jnp.abs(plain['conv']['kernel'][0])) > 0


@pytest.mark.parametrize('err, expected', [
    (jax.errors.JaxRuntimeError('RESOURCE_EXHAUSTED: Out of memory while trying to '
                                'allocate 12.50GiB.'), True),
    (jax.errors.JaxRuntimeError('RESOURCE_EXHAUSTED: Ran out of memory in memory space hbm.'),
     True),
    (RuntimeError('INTERNAL: Failed to allocate: CUDA_ERROR_OUT_OF_MEMORY: out of memory'), True),
    (jax.errors.JaxRuntimeError('INVALID_ARGUMENT: shapes do not match'), False),
    (RuntimeError('INTERNAL: cuDNN failed'), False),
    (ValueError('out of memory'), False),  # not XLA's runtime error
])
def test_is_out_of_memory_matches_xla_out_of_memory_errors_only(err, expected):
  from train.errors import is_out_of_memory  # pylint: disable=g-import-not-at-top
  assert is_out_of_memory(err) is expected


