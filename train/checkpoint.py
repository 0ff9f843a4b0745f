"""Orbax checkpoints: one manager per stage or round, a JSON record of what made them, clear refusals."""

import hashlib
import json
import os
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from train import files
from train.mesh import data_mesh

# Keys of the record that must agree for a checkpoint to be resumed or used as a teacher.
IDENTITY_KEYS = ('stage', 'sampling_steps', 'model', 'guidance_input', 'x_shape', 'num_classes',
                 'parametrization')


# TensorStore's status codes for bytes that are missing, cut short or wrong (`ValueError: DATA_LOSS: Error reading
# ...`); UNAVAILABLE, RESOURCE_EXHAUSTED, DEADLINE_EXCEEDED, PERMISSION_DENIED ... say nothing about the bytes.
DAMAGE_CODES = ('DATA_LOSS', 'NOT_FOUND', 'OUT_OF_RANGE', 'INVALID_ARGUMENT', 'FAILED_PRECONDITION')


class CheckpointError(ValueError):
  """A checkpoint is missing, incomplete or was made for another model; the message names the fix."""


def is_damage(err: Exception) -> bool:
  """Whether a read error means the checkpoint's files are missing, truncated or corrupted (set the step aside)
  rather than that they cannot be read now: memory, network, permissions, devices (stop, touch nothing)."""
  if isinstance(err, (FileNotFoundError, EOFError, json.JSONDecodeError, UnicodeDecodeError)):
    return True  # a file gone, cut short, or not the JSON / text it should be
  return isinstance(err, ValueError) and str(err).startswith(DAMAGE_CODES)


def _not_damage(step: int, ckpt_dir: str, err: Exception) -> CheckpointError:
  return CheckpointError(f'could not read step {step} of {ckpt_dir} ({_first_line(err)}): not damage to its files, '
                         'so nothing was moved; fix the cause (memory, network, permissions, devices) and rerun')


def open_manager(ckpt_dir: str, *, keep: int = 2, create: bool = True) -> ocp.CheckpointManager:
  """An Orbax manager of ckpt_dir: a local directory (made absolute, as TensorStore needs) or a gs:// one."""
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=create)
  return ocp.CheckpointManager(epath.Path(files.absolute(ckpt_dir)), options=options)


def latest_step(ckpt_dir: str) -> Optional[int]:
  """The newest complete checkpoint's step in ckpt_dir, or None when there is none."""
  if not files.is_dir(ckpt_dir):
    return None
  with open_manager(ckpt_dir, create=False) as manager:
    return manager.latest_step()


def save(manager: ocp.CheckpointManager, state, record: dict) -> None:
  step = int(jax.device_get(state.step))
  manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                             record=ocp.args.JsonSave(record)), force=True)


def read_record(ckpt_dir: str, step: Optional[int] = None) -> dict:
  """The JSON record saved with a checkpoint (stage, model config, sampling steps, full config)."""
  with open_manager(ckpt_dir, create=False) as manager:
    step = manager.latest_step() if step is None else step
    if step is None:
      raise CheckpointError(f'no checkpoint in {ckpt_dir}: train that stage first (or fix the path)')
    return manager.restore(step, args=ocp.args.Composite(record=ocp.args.JsonRestore()))['record']


def _identity(key: str, value, other):
  """A record field as compared with the other record's: for the model, the fields both records have, except
  the compute dtype (it does not change the parameters); a field added to the config after a checkpoint was
  written is left out, so a new field's default never orphans an existing run."""
  if key == 'model' and isinstance(value, dict) and isinstance(other, dict):
    return {k: v for k, v in value.items() if k != 'dtype' and k in other}
  return value


def check_compatible(saved: dict, expected: dict, ckpt_dir: str) -> None:
  """Raises CheckpointError naming the first identity field where saved and expected records differ."""
  for key in IDENTITY_KEYS:
    if key not in expected:
      continue
    if _identity(key, saved.get(key), expected[key]) != _identity(key, expected[key], saved.get(key)):
      raise CheckpointError(
          f'checkpoint {ckpt_dir} was made with {key}={saved.get(key)!r} but the config gives '
          f'{expected[key]!r}: use another --config.workdir or the config that made it')


def _restore_step(manager, step: int, abstract, expected_record: dict, ckpt_dir: str):
  """Restores one step; CheckpointError for a checkpoint of another model, other errors for damage."""
  saved = manager.restore(step, args=ocp.args.Composite(record=ocp.args.JsonRestore()))['record']
  check_compatible(saved, expected_record, ckpt_dir)
  stored = ocp.StandardCheckpointHandler().metadata(manager.directory / str(step) / 'state').tree
  shapes = lambda tree: sorted(tuple(x.shape) for x in jax.tree.leaves(tree))
  if shapes(stored) != shapes(abstract):
    raise CheckpointError(f'checkpoint {ckpt_dir} does not fit the current model (parameter shapes differ): '
                          'use another --config.workdir or the config that made it')
  return manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))['state']


def restore_state(manager: ocp.CheckpointManager, target_state, expected_record: dict, ckpt_dir: str):
  """Restores the newest readable state into target_state's structure and shardings.

  A damaged checkpoint (`is_damage`: missing, truncated or corrupted files) is moved aside to `corrupted.STEP`
  (kept as evidence, never deleted) and the previous one is used, with a warning; if none is readable the run
  stops rather than training from scratch. Any other read error (out of memory, network, permissions) stops the
  run with one line and moves nothing. A checkpoint of another model is refused at once.
  """
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target_state)
  for step in sorted(manager.all_steps(), reverse=True):
    try:
      return _restore_step(manager, step, abstract, expected_record, ckpt_dir)
    except CheckpointError:
      raise
    except Exception as err:  # pylint: disable=broad-except  (sorted by is_damage)
      if not is_damage(err):
        raise _not_damage(step, ckpt_dir, err) from err
      aside = set_aside(manager.directory / str(step), manager.directory / f'corrupted.{step}')
      manager.reload()
      logging.warning('checkpoint step %d in %s is unreadable (%s): moved to %s, trying the previous one',
                      step, ckpt_dir, _first_line(err), aside)
  raise CheckpointError(f'no readable checkpoint left in {ckpt_dir} (damaged ones are in corrupted.*): '
                        'restore them from a backup, or use another --config.workdir to start over')


def checkpoint_id(ckpt_dir: str) -> str:
  """'<latest step>-<hash of its record>': another training in the same directory gets another id."""
  record = json.dumps(read_record(ckpt_dir), sort_keys=True)
  return f'{latest_step(ckpt_dir)}-{hashlib.sha1(record.encode()).hexdigest()[:12]}'


def params_digest(params) -> str:
  """sha1 of a params tree's bytes, leaf by leaf in tree order: the identity of a teacher a student was made from.

  Reads each leaf's first addressable shard, which is the whole leaf for the replicated params of a run.
  """
  digest = hashlib.sha1()
  for leaf in jax.tree.leaves(params):
    data = np.asarray(leaf.addressable_data(0) if isinstance(leaf, jax.Array) else leaf)
    digest.update(f'{data.dtype}{data.shape}'.encode())
    digest.update(np.ascontiguousarray(data).tobytes())
  return digest.hexdigest()


def check_complete(ckpt_dir: str, *, allow_incomplete: bool = False) -> int:
  """The latest step of ckpt_dir; CheckpointError if its training stopped before the final step of its record.

  run_training writes the section's num_steps into every checkpoint's record as train_steps: a stage is
  complete when its latest checkpoint has reached it. allow_incomplete turns the refusal into a warning.
  """
  step, record = latest_step(ckpt_dir), read_record(ckpt_dir)
  train_steps = record.get('train_steps')
  if train_steps is not None and step < train_steps:
    message = (f'{ckpt_dir} is incomplete (step {step} of {train_steps}): finish it first (rerun its mode with '
               'the same config), or pass --config.distill.allow_incomplete_teacher=True to use it as it is')
    if not allow_incomplete:
      raise CheckpointError(message)
    logging.warning('using an incomplete teacher: %s', message)
  return step


def is_stale(ckpt_dir: str, expected_record: dict) -> bool:
  """True when ckpt_dir holds a student distilled from another teacher than expected_record names.

  Records name their teacher as {'dir', 'step', 'params_sha1'}; a record without one (a dry run, or a
  checkpoint written before records named teachers) is never stale.
  """
  if expected_record.get('teacher') is None or latest_step(ckpt_dir) is None:
    return False
  saved = read_record(ckpt_dir).get('teacher')
  return saved is not None and saved != expected_record['teacher']


def check_same_teacher(ckpt_dir: str, expected_record: dict) -> None:
  """CheckpointError when ckpt_dir's student was distilled from another teacher than expected_record's."""
  if is_stale(ckpt_dir, expected_record):
    saved, expected = read_record(ckpt_dir)['teacher'], expected_record['teacher']
    raise CheckpointError(
        f'{ckpt_dir} was distilled from another teacher ({saved["dir"]} step {saved["step"]}, params '
        f'{saved["params_sha1"][:12]}) than the one there now (step {expected["step"]}, params '
        f'{expected["params_sha1"][:12]}): pass --config.distill.redistill=True to set it aside and distill again')


def _unused_name(path: str) -> str:
  """path, or path.1, path.2, ...: the first that does not exist."""
  candidate, n = path, 0
  while files.exists(candidate):
    n += 1
    candidate = f'{path}.{n}'
  return candidate


def set_aside(path, aside) -> str:
  """Renames path to aside, or to aside.1, aside.2, ... if taken (kept as evidence, never deleted); returns it.

  Process 0 renames; with several processes, every process waits until it has, so none reads a half-moved tree.
  On an object store the rename is a copy of every object, then a delete: not atomic, but nothing is lost.
  """
  aside = _unused_name(os.fspath(aside))
  if jax.process_index() == 0:
    epath.Path(path).rename(aside)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(f'set_aside {aside}')
  return aside


def _replicated(tree):
  """Shape-only targets for tree, replicated over every device of this run."""
  sharding = jax.sharding.NamedSharding(data_mesh(), jax.sharding.PartitionSpec())
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


def check_not_all_set_aside(ckpt_dir: str) -> None:
  """CheckpointError when ckpt_dir has no checkpoint left but damaged ones were set aside: never restart silently."""
  if files.is_dir(ckpt_dir) and latest_step(ckpt_dir) is None:
    aside = [name for name in files.listdir(ckpt_dir) if name.startswith('corrupted.')]
    if aside:
      raise CheckpointError(f'every checkpoint in {ckpt_dir} was set aside as damaged ({", ".join(aside)}): '
                            'restore one from a backup, or move them out of the directory to train from scratch')


def load_params(ckpt_dir: str, target_params, expected_record: dict, *, which: str = 'ema_params') -> Any:
  """Loads one params tree (EMA by default) of the latest checkpoint, e.g. a frozen teacher.

  The params come back replicated over this run's devices, whatever number of processes saved them. A damaged
  latest step is one CheckpointError (nothing is moved: the mode that trains it sets it aside on its rerun).
  """
  if latest_step(ckpt_dir) is None:
    raise CheckpointError(f'no checkpoint in {ckpt_dir}: train that stage first (or fix the path)')
  with open_manager(ckpt_dir, create=False) as manager:
    check_compatible(read_record(ckpt_dir), expected_record, ckpt_dir)
    step = manager.latest_step()
    try:
      stored = ocp.StandardCheckpointHandler().metadata(manager.directory / str(step) / 'state').tree[which]
    except Exception as err:  # pylint: disable=broad-except  (sorted by is_damage in _unreadable)
      raise _unreadable(step, ckpt_dir, err) from err
    want = jax.tree.map(lambda x: tuple(x.shape), target_params)
    got = jax.tree.map(lambda x: tuple(x.shape), stored)
    if jax.tree.structure(want) != jax.tree.structure(got) or want != got:
      raise CheckpointError(f'checkpoint {ckpt_dir} holds parameters of another architecture: '
                            'use the config that made it')
    item = {which: _replicated(target_params)}
    try:
      restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
          item, restore_args=ocp.checkpoint_utils.construct_restore_args(item), partial_restore=True)))
    except Exception as err:  # pylint: disable=broad-except
      raise _unreadable(step, ckpt_dir, err) from err
  return restored['state'][which]


def _unreadable(step: int, ckpt_dir: str, err: Exception) -> CheckpointError:
  if not is_damage(err):
    return _not_damage(step, ckpt_dir, err)
  return CheckpointError(f'step {step} of {ckpt_dir} is unreadable ({_first_line(err)}): rerun the mode that '
                         'trained it, which sets a damaged step aside and resumes from the previous one')


def _first_line(err: Exception) -> str:
  return str(err).splitlines()[0][:200] if str(err) else type(err).__name__
