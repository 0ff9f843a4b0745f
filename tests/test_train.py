"""Training machinery: sharded step equality, kill-and-resume, checkpoint refusals, non-finite
skips."""

import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from conftest import Killed, kill_after, tiny_config
from distill import stages
from train import checkpoint, mesh, records
from train.state import create_train_state, make_train_step, unpack_state

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_TRAIN_SCRIPT = """
import sys, json, numpy as np, jax
sys.path[:0] = [{repo!r}, {tests!r}]
from conftest import Killed, kill_after, tiny_config
from distill import stages
config = tiny_config({workdir!r}, train=3)
config.train.update(batch_size=8, checkpoint_every=3)
stages.train_teacher(config)
_, params, _ = stages.load_stage_params(config, 'teacher')
np.savez({out!r}, *[np.asarray(x) for x in jax.tree.leaves(params)])
print('devices', jax.device_count())
"""


def _train_on_devices(tmp_path, num_devices):
  workdir, out = tmp_path / f'run{num_devices}', tmp_path / f'params{num_devices}.npz'
  env = dict(os.environ, XLA_FLAGS=f'--xla_force_host_platform_device_count={num_devices}',
             JAX_PLATFORMS='cpu')
  script = _TRAIN_SCRIPT.format(
      repo=REPO, tests=os.path.join(REPO, 'tests'), workdir=str(workdir), out=str(out))
  result = subprocess.run(
      [sys.executable, '-c', script], env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  assert f'devices {num_devices}' in result.stdout
  with np.load(out) as arrays:
    return [arrays[k] for k in sorted(arrays.files, key=lambda k: int(k.split('_')[1]))]


def test_train_steps_on_one_and_two_devices_give_the_same_params(tmp_path):
  one, two = _train_on_devices(tmp_path, 1), _train_on_devices(tmp_path, 2)
  assert len(one) == len(two)
  for a, b in zip(one, two):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def _params(config, stage, steps=None):
  return jax.tree.leaves(stages.load_stage_params(config, stage, steps)[1])


def _assert_same(a, b):
  """Bit-identical, as docs/running.md promises for a resumed run."""
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)


def test_configure_cpu_compiler_adds_the_level_once_and_only_for_the_cpu(monkeypatch):
  monkeypatch.setattr(mesh, '_cpu_is_default', lambda: True)
  monkeypatch.setenv('XLA_FLAGS', '--xla_force_host_platform_device_count=2')
  assert mesh.configure_cpu_compiler() and mesh.configure_cpu_compiler()
  assert os.environ['XLA_FLAGS'] == ('--xla_force_host_platform_device_count=2 '
                                     '--xla_backend_optimization_level=1')
  monkeypatch.setenv('XLA_FLAGS', '--xla_backend_optimization_level=3')  # the user's level is kept
  assert (mesh.configure_cpu_compiler() and
          os.environ['XLA_FLAGS'] == '--xla_backend_optimization_level=3')
  # an accelerator's code generation reads it too
  monkeypatch.setattr(mesh, '_cpu_is_default', lambda: False)
  monkeypatch.delenv('XLA_FLAGS')
  assert not mesh.configure_cpu_compiler() and 'XLA_FLAGS' not in os.environ


def test_the_cpu_compiler_level_reaches_the_programs_compiled_after_it(tmp_path):
  """Set after `import jax` but before a backend starts (as main.py does), the level is in the debug
  options of a program compiled later: XLA's dump of them says so."""
  script = (f'import sys; sys.path.insert(0, {REPO!r})\n'
            'import jax\nfrom train.mesh import configure_cpu_compiler\n'
            'assert configure_cpu_compiler()\njax.jit(lambda x: x * 2)(1.0)\n')
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS=f'--xla_dump_to={tmp_path}')
  result = subprocess.run(
      [sys.executable, '-c', script], env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  options = [p.read_text() for p in tmp_path.glob('*jit__lambda*.debug_options')]
  assert options and all('xla_backend_optimization_level: 1' in o for o in options), options


def test_teacher_killed_after_a_checkpoint_resumes_to_the_same_params(tmp_path, monkeypatch):
  full = tiny_config(tmp_path / 'full', train=30)
  stages.train_teacher(full)
  killed = tiny_config(tmp_path / 'killed', train=30)
  with monkeypatch.context() as patch:
    kill_after(patch, 25)  # checkpoints at 10 and 20; dies at 26
    with pytest.raises(Killed):
      stages.train_teacher(killed)
  assert checkpoint.latest_step(str(tmp_path / 'killed' / 'teacher')) == 20
  stages.train_teacher(killed)  # same command again: resumes at 20
  _assert_same(_params(full, 'teacher'), _params(killed, 'teacher'))


def _count_loss_traces(monkeypatch) -> list:
  """[n]: how often the halving losses built from now on run in Python, that is are traced (not
  stepped)."""
  traces, real = [0], stages._halving_loss_fn  # pylint: disable=protected-access

  def counted(*args, **kwargs):
    loss_fn = real(*args, **kwargs)

    def traced(*loss_args):
      traces[0] += 1
      return loss_fn(*loss_args)
    return traced

  monkeypatch.setattr(stages, '_halving_loss_fn', counted)
  return traces


def test_stage2_killed_in_round_two_keeps_round_one_and_matches(tmp_path, monkeypatch):
  full = tiny_config(tmp_path / 'full', train=10, stage1=10, stage2=20)
  stages.train_teacher(full)
  stages.train_stage1(full)
  traces = _count_loss_traces(monkeypatch)
  stages.train_stage2(full)  # rounds 4 -> 2 -> 1
  assert traces == [1], 'the rounds did not share one compiled step (stages.halving_step)'
  killed = tiny_config(tmp_path / 'killed', train=10, stage1=10, stage2=20)
  for stage in ('teacher', 'stage1'):
    shutil.copytree(tmp_path / 'full' / stage, tmp_path / 'killed' / stage)
  with monkeypatch.context() as patch:
    kill_after(patch, 35)  # round 1: 20 batches; round 2 dies after its checkpoint at 10
    with pytest.raises(Killed):
      stages.train_stage2(killed)
  round_one = tmp_path / 'killed' / 'stage2' / 'steps_0002'
  before = {p: os.path.getmtime(p) for p in round_one.rglob('*')}
  stages.train_stage2(killed)
  assert before == {p: os.path.getmtime(p) for p in round_one.rglob('*')}, (
      'finished round was retrained')
  for steps in (2, 1):
    _assert_same(_params(full, 'stage2', steps), _params(killed, 'stage2', steps))
  record = records.read(str(tmp_path / 'killed' / 'stage2' / 'steps_0001'))
  assert (record['stage'], record['sampling_steps']) == ('stage2', 1)


def test_checkpoint_of_another_model_is_refused_and_kept(tmp_path):
  config = tiny_config(tmp_path, train=10)
  stages.train_teacher(config)
  files = {p: os.path.getmtime(p) for p in (tmp_path / 'teacher').rglob('*')}
  config.model.hidden = 32
  with pytest.raises(checkpoint.CheckpointError, match='model'):
    stages.train_teacher(config)
  with pytest.raises(checkpoint.CheckpointError, match='model'):
    stages.train_stage1(config)
  assert files == {p: os.path.getmtime(p) for p in (tmp_path / 'teacher').rglob('*')}


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


def _truncate_step(ckpt_dir, step):
  for path in (ckpt_dir / str(step) / 'state').rglob('*'):
    if path.is_file():
      path.write_bytes(b'')


def test_truncated_latest_checkpoint_falls_back_to_the_previous_one(tmp_path):
  full = tiny_config(tmp_path / 'full', train=30)
  stages.train_teacher(full)
  damaged = tiny_config(tmp_path / 'damaged', train=20)
  stages.train_teacher(damaged)  # checkpoints at 10 and 20
  ckpt_dir = tmp_path / 'damaged' / 'teacher'
  _truncate_step(ckpt_dir, 20)
  damaged.train.num_steps = 30
  stages.train_teacher(damaged)  # warns, resumes from 10, trains to 30
  assert (ckpt_dir / 'corrupted.20' / 'state').is_dir(), 'the damaged checkpoint must be kept'
  assert checkpoint.latest_step(str(ckpt_dir)) == 30
  _assert_same(_params(full, 'teacher'), _params(damaged, 'teacher'))


def test_no_readable_checkpoint_stops_instead_of_starting_over(tmp_path):
  config = tiny_config(tmp_path, train=10)
  stages.train_teacher(config)
  _truncate_step(tmp_path / 'teacher', 10)
  config.train.num_steps = 20
  with pytest.raises(checkpoint.CheckpointError, match='no readable checkpoint left'):
    stages.train_teacher(config)
  assert (tmp_path / 'teacher' / 'corrupted.10').is_dir()
  assert checkpoint.latest_step(str(tmp_path / 'teacher')) is None
  with pytest.raises(checkpoint.CheckpointError,
                     match=r'every checkpoint in .* was set aside as damaged \(corrupted.10\)'):
    stages.train_teacher(config)  # the rerun does not silently start from step 0


def test_loading_a_damaged_teacher_is_one_clear_error(tmp_path):
  config = tiny_config(tmp_path, train=10, stage1=10)
  stages.train_teacher(config)
  _truncate_step(tmp_path / 'teacher', 10)
  with pytest.raises(checkpoint.CheckpointError,
                     match='step 10 of .*teacher is unreadable .*: rerun the mode'):
    stages.train_stage1(config)


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


def test_a_read_error_that_is_not_damage_stops_the_run_and_moves_nothing(tmp_path, monkeypatch):
  config = tiny_config(tmp_path, train=10)
  stages.train_teacher(config)
  monkeypatch.setattr(checkpoint, '_restore_step', lambda *args:
                      (_ for _ in ()).throw(MemoryError('host RAM')))
  config.train.num_steps = 20
  with pytest.raises(
      checkpoint.CheckpointError, match=r'could not read step 10 of .*teacher \(host RAM\): not '
      'damage to its files, so nothing was moved'):
    stages.train_teacher(config)
  assert sorted(os.listdir(tmp_path / 'teacher')) == ['10', 'config.json']


def test_loading_a_teacher_that_cannot_be_read_now_moves_nothing(tmp_path, monkeypatch):
  config = tiny_config(tmp_path, train=10, stage1=10)
  stages.train_teacher(config)
  monkeypatch.setattr(
      checkpoint.ocp.CheckpointManager, 'restore', lambda *args, **kwargs:
      (_ for _ in ()).throw(ValueError('UNAVAILABLE: connection reset')))
  with pytest.raises(checkpoint.CheckpointError,
                     match='could not read step 10 of .*teacher .*nothing was moved'):
    stages.train_stage1(config)
  assert sorted(os.listdir(tmp_path / 'teacher')) == ['10', 'config.json']


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


def _saved_teacher_dir(tmp_path):
  config = tiny_config(tmp_path, train=10)
  stages.train_teacher(config)
  return str(tmp_path / 'teacher')


def test_restoring_into_parameters_of_other_shapes_is_refused_and_moves_nothing(tmp_path):
  ckpt_dir = _saved_teacher_dir(tmp_path)
  # the record passes,
  state = unpack_state(create_train_state({'w': jnp.zeros(3)}, optax.adam(0.1), seed=0))
  # the shapes do not
  with checkpoint.open_manager(ckpt_dir, create=False) as manager:
    with pytest.raises(checkpoint.CheckpointError, match='does not fit the current model'):
      checkpoint.restore_state(manager, state, ckpt_dir, check_record=lambda saved: None)
  assert sorted(os.listdir(ckpt_dir)) == ['10', 'config.json']


def test_loading_parameters_of_another_architecture_is_refused(tmp_path):
  ckpt_dir = _saved_teacher_dir(tmp_path)
  with pytest.raises(checkpoint.CheckpointError, match='holds parameters of another architecture'):
    checkpoint.load_params(ckpt_dir, {'w': jax.ShapeDtypeStruct((3,), jnp.float32)},
                           check_record=lambda saved: None)


def test_a_step_saved_before_records_held_shapes_is_checked_on_its_metadata(tmp_path, monkeypatch):
  ckpt_dir = _saved_teacher_dir(tmp_path)
  record = records.read(ckpt_dir)
  saved_shapes = record[checkpoint.SHAPES_KEY]['ema_params']
  _, abstract = records.build(record)
  # as a record written before shapes
  monkeypatch.setattr(checkpoint, 'SHAPES_KEY', 'not_in_this_record')
  params = checkpoint.load_params(ckpt_dir, abstract, check_record=lambda saved: None)
  assert checkpoint.tree_shapes(params) == saved_shapes
  with pytest.raises(checkpoint.CheckpointError, match='holds parameters of another architecture'):
    checkpoint.load_params(ckpt_dir, {'w': jax.ShapeDtypeStruct((3,), jnp.float32)},
                           check_record=lambda saved: None)


def test_a_run_of_non_finite_steps_stops_and_keeps_the_last_good_checkpoint(tmp_path):
  from train.errors import NonFiniteError  # pylint: disable=g-import-not-at-top
  from train.loop import run_training  # pylint: disable=g-import-not-at-top
  section = tiny_config(tmp_path).train
  section.update(
      num_steps=20, log_every=10, checkpoint_every=2, max_nonfinite_steps=3, warmup_steps=0)

  def loss_fn(params, batch, rng, frozen):
    del rng, frozen
    return jnp.mean(jnp.square(params['w'] - batch['x'])), {}

  def make_batches(start):
    for step in range(start, 100):  # finite data for 4 steps, then NaN
      yield {'x': np.full((64, 3), np.nan if step >= 4 else 1.0, np.float32),
             'label': np.zeros(64, np.int32)}

  # Steps 5, 6, 7 are non-finite: the limit of 3 is reached at step 7, between log steps, and the
  # run stops there.
  with pytest.raises(NonFiniteError, match='3 non-finite steps in a row at step 7: stopped; the '
                                           'last finite checkpoint is step 6 in'):
    run_training(title='nan', loss_fn=loss_fn, params={'w': jnp.zeros(3)}, section=section,
                 ckpt_dir=str(tmp_path / 'ckpt'), record={'stage': 'teacher'},
                 make_batches=make_batches, seed=0)
  assert checkpoint.latest_step(str(tmp_path / 'ckpt')) == 6  # nothing after the limit was saved
  with checkpoint.open_manager(str(tmp_path / 'ckpt'), create=False) as manager:
    saved = manager.restore(6, args=checkpoint.ocp.args.Composite(
        state=checkpoint.ocp.args.StandardRestore()))['state']
  saved_w = saved['params']['w'] if isinstance(saved, dict) else saved.params['w']
  # the 4 good updates are kept
  assert np.all(np.isfinite(saved_w)) and not np.allclose(saved_w, 0.0)


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


def _train_raising(tmp_path, err, stage='stage2'):
  """run_training of a tiny section whose first batch raises err, as a step out of device memory
  would."""
  from train.loop import run_training  # pylint: disable=g-import-not-at-top
  section = tiny_config(tmp_path).stage2

  def make_batches(start):
    del start
    raise err
    yield  # pylint: disable=unreachable

  run_training(
      title=f'{stage} 4->2 steps', loss_fn=lambda params, batch, rng, frozen:
      (jnp.sum(params['w']), {}), params={'w': jnp.zeros(3)}, section=section,
      ckpt_dir=str(tmp_path / 'ckpt'), record={'stage': stage}, make_batches=make_batches, seed=0)


def test_a_train_step_out_of_memory_is_one_line_naming_the_batch_to_lower(tmp_path):
  from train.errors import OutOfMemoryError  # pylint: disable=g-import-not-at-top
  oom = jax.errors.JaxRuntimeError(
      'RESOURCE_EXHAUSTED: Out of memory while trying to allocate 12.50GiB.\n'
      'BufferAssignment OOM Debugging.\n...')
  with pytest.raises(OutOfMemoryError) as caught:
    _train_raising(tmp_path, oom)
  message, devices = str(caught.value), jax.device_count()
  assert '\n' not in message and caught.value.__cause__ is oom
  assert message.startswith(
      f'[stage2 4->2 steps] train step: out of device memory at global batch 64 '
      f'({64 // devices} per device on {devices} ')
  assert '--dry_run --dry_run_batch_size=64' in message  # where XLA's memory estimate is
  assert message.endswith(
      f'lower the batch per device: --config.stage2.batch_size={64 // devices // 2 * devices}, '
      'or run on more devices')


def test_other_runtime_errors_of_a_train_step_pass_unchanged(tmp_path):
  other = jax.errors.JaxRuntimeError('INTERNAL: something else')
  with pytest.raises(jax.errors.JaxRuntimeError) as caught:
    _train_raising(tmp_path, other)
  assert caught.value is other


def test_a_shared_step_built_for_other_optimizer_settings_is_refused(tmp_path):
  """run_training(sharded_step=...) would train with the step's optimizer and schedule, not the
  section's."""
  from train.loop import ShardedStep, run_training  # pylint: disable=g-import-not-at-top
  config = tiny_config(tmp_path)
  other = ml_collections.ConfigDict(config.stage2.to_dict())
  other.lr *= 2
  loss_fn = lambda params, batch, rng, frozen: (jnp.sum(params['w']), {})
  with pytest.raises(ValueError, match='another optimizer section'):
    run_training(title='shared', loss_fn=loss_fn, params={'w': jnp.zeros(3)}, section=other,
                 ckpt_dir=str(tmp_path / 'run'), record={'stage': 'stage2'}, make_batches=None,
                 seed=0, sharded_step=ShardedStep(loss_fn, config.stage2))
  assert not (tmp_path / 'run').exists()
