"""Training machinery: the sharded step on one and two devices, kill-and-resume, checkpoint
refusals and fallbacks, out of memory and other step errors in one line."""

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
from train import checkpoint, records
from train.state import create_train_state, unpack_state

pytestmark = pytest.mark.integration  # the second tier (tests/conftest.py)

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
