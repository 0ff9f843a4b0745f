"""Checkpoint integrity: real checkpoints written by Orbax, damaged on disk (values changed under
Orbax, bits flipped in compressed array data, an item removed, a record cut or edited, numeric
folders that are no checkpoint), are caught by every reader: training sets the step aside and
resumes the previous one, every other reader stops with one line."""

import glob
import json
import logging
import os
import shutil

import jax
import numpy as np
import pytest

from conftest import tiny_config
from distill import stages
from modes import fid, sampling
from train import checkpoint, records

pytestmark = pytest.mark.integration  # the second tier (tests/conftest.py)

STEPS = 20  # checkpoints at 10 and 20


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """(workdir of a tiny teacher with checkpoints at 10 and 20, the leaves of its step-20 params)."""
  workdir = tmp_path_factory.mktemp('trained')
  config = tiny_config(workdir, train=STEPS)
  stages.train_teacher(config)
  return (str(workdir),
          [np.asarray(x) for x in jax.tree.leaves(_plain_restore(config, STEPS)['params'])])


@pytest.fixture
def run(trained, tmp_path):
  """A copy of the trained workdir to damage, and its config."""
  shutil.copytree(trained[0], tmp_path / 'run')
  return tiny_config(tmp_path / 'run', train=STEPS)


def _teacher_dir(config):
  return stages.stage_dir(config.workdir, 'teacher')


def _plain_restore(config, step):
  """Orbax's own restore of a step's state, no digest checked (numpy arrays)."""
  with checkpoint.open_manager(_teacher_dir(config), create=False) as manager:
    return manager.restore(step, args=checkpoint.ocp.args.Composite(
        state=checkpoint.ocp.args.StandardRestore()))['state']


def _flip_bits(config, step):
  """Flips one bit a third into each array data file of step: zstd-compressed chunks, so the flip
  either breaks decoding or decodes into other values, and which arrays it reaches depends on how
  Orbax grouped them."""
  pattern = os.path.join(_teacher_dir(config), str(step), 'state', 'ocdbt.process_*', 'd', '*')
  for path in glob.glob(pattern):
    data = bytearray(open(path, 'rb').read())
    if len(data) >= 4096:  # array data, not the small index nodes
      data[len(data) // 3] ^= 0x04
      open(path, 'wb').write(bytes(data))


def _rewrite_with_other_values(config, step):
  """Rewrites step's state item through Orbax itself with one bit of the largest array of params and
  of ema_params flipped: files Orbax reads without an error, as values other than the ones written
  (silent bit rot, made deterministic: a flip inside compressed bytes lands wherever Orbax happened
  to put each array)."""
  state = jax.tree.map(np.array, _plain_restore(config, step))  # writable copies
  for field in ('params', 'ema_params'):
    largest = max(jax.tree.leaves(state[field]), key=lambda x: x.size)
    largest.reshape(-1).view(np.uint32)[0] ^= 0x04  # one mantissa bit of one float32
  state_dir = os.path.join(_teacher_dir(config), str(step), 'state')
  rewritten = state_dir + '.rewritten'
  with checkpoint.ocp.StandardCheckpointer() as writer:
    writer.save(os.path.abspath(rewritten), state)
    writer.wait_until_finished()
  shutil.rmtree(state_dir)
  os.rename(rewritten, state_dir)


def _one_line(err) -> str:
  text = str(err.value)
  assert '\n' not in text, text
  return text


def test_values_orbax_reads_silently_are_caught_set_aside_and_the_step_retrained(
    run, trained, caplog):
  _rewrite_with_other_values(run, STEPS)
  # Orbax itself reads them without an error ...
  read_back = jax.tree.leaves(_plain_restore(run, STEPS)['params'])
  assert (
      any(not np.array_equal(a, b) for a, b in zip(trained[1], read_back))), '... but other values'
  with pytest.raises(checkpoint.CheckpointError) as err:
    stages.load_stage_params(run, 'teacher')  # what stage 1 does with its teacher
  assert 'the ema_params of step 20 are not the bytes written' in _one_line(err)
  with caplog.at_level(logging.WARNING):
    stages.train_teacher(run)  # sets step 20 aside, resumes from 10, trains 10 -> 20 again
  assert [
      r for r in caplog.records
      if 'checkpoint step 20' in r.getMessage() and 'is damaged' in r.getMessage()
  ]
  teacher_dir = _teacher_dir(run)
  assert os.path.isdir(
      os.path.join(teacher_dir, 'corrupted.20')), 'the damaged step is kept as evidence'
  assert checkpoint.latest_step(teacher_dir) == STEPS
  for a, b in zip(trained[1], jax.tree.leaves(_plain_restore(run, STEPS)['params']), strict=True):
    np.testing.assert_array_equal(a, b)  # retrained from step 10 to the very same parameters


def test_flipped_bits_in_compressed_data_are_never_consumed(run, trained):
  """Whatever a raw flip reaches, the teacher is either refused in one line as damage (the advice
  that recovers from it, not "not damage") or exactly the EMA written; training then ends with the
  parameters written."""
  written = jax.tree.leaves(_plain_restore(run, STEPS)['ema_params'])
  _flip_bits(run, STEPS)
  try:
    _, params, _ = stages.load_stage_params(run, 'teacher')
  except checkpoint.CheckpointError as err:
    text = str(err)
    assert '\n' not in text and text.startswith(
        f'step 20 of {_teacher_dir(run)} is unreadable ('), text
    assert 'rerun the mode that trained it' in text and 'not damage' not in text, text
  else:
    for a, b in zip(written, jax.tree.leaves(params), strict=True):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # sets a damaged step 20 aside and trains 10 -> 20 again (or finds it intact)
  stages.train_teacher(run)
  for a, b in zip(trained[1], jax.tree.leaves(_plain_restore(run, STEPS)['params']), strict=True):
    np.testing.assert_array_equal(a, b)


def _restore_newest(config):
  """What a resumed training run does first: checkpoint.restore_state of the newest readable
  step."""
  target = _plain_restore_target(config)
  with checkpoint.open_manager(_teacher_dir(config), create=False) as manager:
    state = checkpoint.restore_state(manager, target, _teacher_dir(config),
                                     check_record=lambda record: None)
  return int(np.asarray(state.step))


def _plain_restore_target(config):
  """An unpacked train state of the tiny teacher (shapes and shardings) to restore into."""
  from train.loop import ShardedStep  # pylint: disable=g-import-not-at-top
  record = records.make(config, stage='teacher')
  model, _ = records.build(record)
  sharded = ShardedStep(lambda *args: (0.0, {}), config.train)
  state = sharded.init_state(stages.fresh_params(model, record, seed=0), seed=0)
  return jax.eval_shape(sharded.unpack, state)


@pytest.mark.parametrize('item', ['record', 'state'])
def test_a_removed_item_is_damage_one_line_to_readers_and_set_aside_by_training(run, item):
  shutil.rmtree(os.path.join(_teacher_dir(run), str(STEPS), item))
  with pytest.raises(checkpoint.CheckpointError) as err:
    stages.load_stage_params(run, 'teacher')
  assert (f'step 20 of {_teacher_dir(run)} is unreadable (step 20 has no {item} item)'
          in _one_line(err))
  assert _restore_newest(run) == 10  # the previous step, not "not damage, nothing moved"
  assert os.path.isdir(os.path.join(_teacher_dir(run), 'corrupted.20'))


def _cut_record(config, step):
  path = os.path.join(_teacher_dir(config), str(step), 'record', 'metadata')
  text = open(path, 'rb').read()
  open(path, 'wb').write(text[:len(text) // 2])


def test_a_cut_record_is_one_line_to_stage1_sample_and_fid_and_set_aside_by_training(run):
  _cut_record(run, STEPS)
  unreadable = f'step 20 of {_teacher_dir(run)} is unreadable ('
  with pytest.raises(checkpoint.CheckpointError) as err:
    stages.load_stage_params(run, 'teacher')  # --mode=stage1's teacher
  assert unreadable in _one_line(err)
  run.sample.checkpoint = _teacher_dir(run)
  with pytest.raises(checkpoint.CheckpointError) as err:
    sampling.run_sample(run)  # --mode=sample
  assert unreadable in _one_line(err)
  with pytest.raises(checkpoint.CheckpointError) as err:
    fid.run_fid(run)  # --mode=fid identifies each checkpoint by its record
  assert unreadable in _one_line(err)
  assert _restore_newest(run) == 10


def test_an_edited_record_that_is_still_json_is_damage(run):
  path = os.path.join(_teacher_dir(run), str(STEPS), 'record', 'metadata')
  record = json.loads(open(path).read())
  record['train_steps'] = 10  # would make the stage look complete at step 10
  open(path, 'w').write(json.dumps(record))
  with pytest.raises(checkpoint.CheckpointError) as err:
    records.read(_teacher_dir(run))
  assert 'the record of step 20 is not the one written' in _one_line(err)


def test_a_directory_of_numeric_folders_is_no_checkpoint_and_one_line(run, tmp_path):
  junk = tmp_path / 'junk'
  for name in ('1', '2/x'):
    (junk / name).mkdir(parents=True)
  run.sample.checkpoint = str(junk)
  with pytest.raises(checkpoint.CheckpointError) as err:
    sampling.run_sample(run)
  assert f'step 2 of {junk} is unreadable (step 2 has no state or record item)' in _one_line(err)
  assert 'fix the path' in str(err.value)


@pytest.mark.parametrize('err, damage', [
    (KeyError('Item "record" was not found in the checkpoint. Available items: [\'state\']'), True),
    (KeyError('params'), False),  # a key error of the code, not of the files
    (checkpoint.DamageError('the params of step 3 are not the bytes written'), True)])
def test_missing_items_and_digest_mismatches_count_as_damage(err, damage):
  assert checkpoint.is_damage(err) == damage


def _wrapped(inner: Exception) -> Exception:
  """What Orbax raises for an array it cannot read: a bare Exception raised from TensorStore's
  error."""
  try:
    try:
      raise inner
    except ValueError as cause:
      raise Exception(  # pylint: disable=broad-exception-raised
          'Encountered error while reading array index: (slice(0, 64, 1),)') from cause
  except Exception as err:  # pylint: disable=broad-except
    return err


def test_the_error_orbax_wraps_decides_whether_it_is_damage():
  assert checkpoint.is_damage(
      _wrapped(ValueError('FAILED_PRECONDITION: Error reading "params/0": Truncated')))
  assert not checkpoint.is_damage(_wrapped(ValueError('UNAVAILABLE: connection reset')))
