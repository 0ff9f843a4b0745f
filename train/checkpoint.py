"""Orbax checkpoints: one manager per stage or round, saved with a JSON record of what made them
(train/records.py owns what a record holds and when one fits) and a digest of what was written,
damaged steps set aside, clear refusals."""

import contextlib
import dataclasses
import hashlib
import json
import os
import re
from typing import Any, Callable, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from train import files
from train.mesh import data_mesh

# TensorStore's status codes for bytes that are missing, cut short or wrong (`ValueError: DATA_LOSS:
# Error reading ...`); UNAVAILABLE, RESOURCE_EXHAUSTED, DEADLINE_EXCEEDED, PERMISSION_DENIED ... say
# nothing about the bytes.
DAMAGE_CODES = ('DATA_LOSS', 'NOT_FOUND', 'OUT_OF_RANGE', 'INVALID_ARGUMENT', 'FAILED_PRECONDITION')


# The items of every step: the train state and the JSON record. The record's 'digest' holds the sha1
# of each state field and of the record itself as they were written (a record without one predates
# digests: read unverified).
ITEMS = ('state', 'record')
DIGEST_KEY = 'digest'
SHAPES_KEY = 'state_shapes'  # {field: {leaf path: shape}} of the saved state (tree_shapes)


class CheckpointError(ValueError):
  """A checkpoint is missing, incomplete or was made for another model; the message names the
  fix."""


class DamageError(ValueError):
  """A checkpoint step's files are missing or hold other bytes than were written (an item gone, a
  digest that does not match)."""


class NonFiniteStateError(ValueError):
  """A state to be saved holds non-finite values; nothing was written."""


def _causes(err: BaseException):
  """err and the errors it was raised from (Orbax wraps TensorStore's errors in a bare
  Exception)."""
  seen = set()
  while err is not None and id(err) not in seen:
    seen.add(id(err))
    yield err
    err = err.__cause__ or err.__context__


def is_damage(err: BaseException) -> bool:
  """Whether a read error means the checkpoint's files are missing, truncated or corrupted (set the
  step aside) rather than that they cannot be read now: memory, network, permissions, devices (stop,
  touch nothing).

  The error and those it was raised from are looked at: any one about the files makes it damage.
  """
  return any(_is_damage_itself(cause) for cause in _causes(err))


def _is_damage_itself(err: BaseException) -> bool:
  if isinstance(
      err, (DamageError, FileNotFoundError, EOFError, json.JSONDecodeError, UnicodeDecodeError)):
    # a file gone, cut short, not the JSON / text it should be, or not the bytes that were written
    return True
  if isinstance(err, KeyError):  # Orbax's 'Item "record" was not found in the checkpoint'
    return 'not found in the checkpoint' in str(err)
  return isinstance(err, ValueError) and str(err).startswith(DAMAGE_CODES)


def _not_damage(step: int, ckpt_dir: str, err: Exception) -> CheckpointError:
  return CheckpointError(
      f'could not read step {step} of {ckpt_dir} ({first_line(err)}): not damage to its files, '
      'so nothing was moved; fix the cause (memory, network, permissions, devices) and rerun')


def open_manager(ckpt_dir: str, *, keep: int = 2, create: bool = True) -> ocp.CheckpointManager:
  """An Orbax manager of ckpt_dir: a local directory (made absolute, as TensorStore needs) or a
  gs:// one.

  Saves are synchronous: training goes on only once a step is on disk, so the first save that fails
  stops it with that save's error (an asynchronous one would surface at a later step, after more
  training).
  """
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=create,
                                         enable_async_checkpointing=False)
  return ocp.CheckpointManager(epath.Path(files.absolute(ckpt_dir)), options=options)


def latest_step(ckpt_dir: str) -> Optional[int]:
  """The newest complete checkpoint's step in ckpt_dir, or None when there is none."""
  if not files.is_dir(ckpt_dir):
    return None
  with open_manager(ckpt_dir, create=False) as manager:
    return manager.latest_step()


def _host_leaf(leaf) -> np.ndarray:
  """A leaf's values on this host: its first addressable shard, the whole leaf for the replicated
  state of a run."""
  return np.asarray(leaf.addressable_data(0) if isinstance(leaf, jax.Array) else leaf)


def params_digest(params) -> str:
  """sha1 of a params tree's bytes, leaf by leaf in tree order: the identity of a teacher a student
  was made from, and the digest of each state field saved with a step."""
  digest = hashlib.sha1()
  for leaf in jax.tree.leaves(params):
    data = _host_leaf(leaf)
    digest.update(f'{data.dtype}{data.shape}'.encode())
    digest.update(np.ascontiguousarray(data).tobytes())
  return digest.hexdigest()


def _fields(state) -> dict:
  """{field name: tree} of a train state (unpacked; the layout is no data)."""
  return {f.name: getattr(state, f.name) for f in dataclasses.fields(state) if f.name != 'layout'}


def _nonfinite(leaves: list[np.ndarray]) -> bool:
  return any(np.issubdtype(x.dtype, np.inexact) and not np.all(np.isfinite(x)) for x in leaves)


def tree_shapes(tree) -> dict:
  """{leaf path: shape} of a tree of arrays: what a step's record says it holds, so a reader checks
  a model's shapes without opening the arrays (the state's metadata opens every one)."""
  leaves = jax.tree_util.tree_leaves_with_path(tree)
  return {jax.tree_util.keystr(path): list(leaf.shape) for path, leaf in leaves}


def _stored_shapes(manager: ocp.CheckpointManager, step: int, record: dict) -> dict:
  """{field: tree_shapes} of a step: from its record, or (a step saved before records held them)
  from its metadata."""
  if SHAPES_KEY in record:
    return record[SHAPES_KEY]
  stored = ocp.StandardCheckpointHandler().metadata(manager.directory / str(step) / 'state').tree
  return {name: tree_shapes(tree) for name, tree in stored.items()}


def record_digest(record: dict) -> str:
  """sha1 of a record's canonical JSON, its digest entry left out."""
  text = json.dumps({k: v for k, v in record.items() if k != DIGEST_KEY}, sort_keys=True)
  return hashlib.sha1(text.encode()).hexdigest()


def save(manager: ocp.CheckpointManager, state, record: dict) -> None:
  """Saves state (unpacked) at its step with record and the digest of both (each field's
  `params_digest`).

  NonFiniteStateError, and nothing written, when a field of state holds a NaN or an infinity.
  """
  # one copy
  host = {
      name: [_host_leaf(x) for x in jax.tree.leaves(tree)] for name, tree in _fields(state).items()
  }
  bad = [name for name, leaves in host.items() if _nonfinite(leaves)]
  if bad:
    raise NonFiniteStateError(f'non-finite values in {", ".join(bad)}')
  digest = {name: params_digest(leaves) for name, leaves in host.items()}
  shapes = {name: tree_shapes(tree) for name, tree in _fields(state).items()}
  record = dict(record, **{SHAPES_KEY: shapes})
  record = dict(record, **{DIGEST_KEY: dict(digest, record=record_digest(record))})
  step = int(jax.device_get(state.step))
  manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                             record=ocp.args.JsonSave(record)), force=True)


class SaveError(CheckpointError):
  """A checkpoint could not be written (disk full, permissions, ...): training stopped at that
  save."""


def os_cause(err: BaseException) -> str:
  """What the operating system said, where err (or an error it was raised from) carries it: 'No
  space left on device'; TensorStore's '[os_error_code=28]' too. Else err's first line."""
  for cause in _causes(err):
    if isinstance(cause, OSError) and cause.strerror:
      return cause.strerror
    code = re.search(r"os_error_code='?(\d+)", str(cause))
    if code:
      return os.strerror(int(code.group(1)))
  return first_line(err)


@contextlib.contextmanager
def save_errors_as_error(title: str, ckpt_dir: str, step: int):
  """Turns an error of writing step's checkpoint into a SaveError of one line naming the directory
  and the cause."""
  try:
    yield
  except (NonFiniteStateError, SaveError):
    raise
  except Exception as err:  # pylint: disable=broad-except  (any failure to write is a failed save)
    raise SaveError(
        f'[{title}] could not save step {step} in {ckpt_dir}: {os_cause(err)}; fix that (free '
        'space, permissions) and run the same command to resume from the last saved step') from err


def _check_items(manager: ocp.CheckpointManager, step: int) -> None:
  """DamageError when a step lacks an item (removed, or a numeric folder that is no checkpoint)."""
  missing = [item for item in ITEMS if not (manager.directory / str(step) / item).is_dir()]
  if missing:
    raise DamageError(f'step {step} has no {" or ".join(missing)} item')


def saved_record(manager: ocp.CheckpointManager, step: int) -> dict:
  """The JSON record saved with step (train/records.py says what it holds), checked against its
  digest.

  DamageError when an item is missing or the record is not the one written; Orbax's own errors
  otherwise.
  """
  _check_items(manager, step)
  record = manager.restore(step, args=ocp.args.Composite(record=ocp.args.JsonRestore()))['record']
  if not isinstance(record, dict):
    raise DamageError(f'the record of step {step} is not a JSON object')
  saved = record.get(DIGEST_KEY)
  if saved is not None and saved.get('record') != record_digest(record):
    raise DamageError(f'the record of step {step} is not the one written (its sha1 differs)')
  return record


def check_digest(record: dict, step: int, fields: dict) -> None:
  """DamageError when a restored field's sha1 differs from the one saved in record (none saved: not
  checked)."""
  saved = record.get(DIGEST_KEY) or {}
  for name, tree in fields.items():
    if name in saved and params_digest(tree) != saved[name]:
      raise DamageError(f'the {name} of step {step} are not the bytes written (their sha1 differs)')


def _restore_step(manager, step: int, abstract, check_record: Callable[[dict], None],
                  ckpt_dir: str):
  """Restores one step, checked against its digest; CheckpointError for a checkpoint of another
  model, other read errors as raised (the caller sorts them with is_damage)."""
  record = saved_record(manager, step)
  check_record(record)
  # Shapes, paths aside: a step saved before records held shapes names the optimizer state's
  # nodes as its metadata does.
  shapes = lambda fields: sorted(shape for tree in fields.values() for shape in tree.values())
  wanted = {name: tree_shapes(tree) for name, tree in _fields(abstract).items()}
  if shapes(_stored_shapes(manager, step, record)) != shapes(wanted):
    raise CheckpointError(
        f'checkpoint {ckpt_dir} does not fit the current model (parameter shapes differ): '
        'use another --config.workdir or the config that made it')
  state = manager.restore(
      step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))['state']
  check_digest(record, step, _fields(state))
  return state


def restore_state(manager: ocp.CheckpointManager, target_state, ckpt_dir: str, *,
                  check_record: Callable[[dict], None]):
  """Restores the newest readable state into target_state's structure and shardings (arrays or
  ShapeDtypeStructs).

  check_record(saved record) raises CheckpointError for a checkpoint of another model
  (`records.checker`).

  A damaged checkpoint (`is_damage`: missing, truncated or corrupted files, or bytes that do not
  match the digest saved with them) is moved aside to `corrupted.STEP` (kept as evidence, never
  deleted) and the previous one is used, with a warning; if none is readable the run stops rather
  than training from scratch. Any other read error (out of memory, network, permissions) stops the
  run with one line and moves nothing. A checkpoint of another model is refused at once.
  """
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target_state)
  for step in sorted(manager.all_steps(), reverse=True):
    try:
      return _restore_step(manager, step, abstract, check_record, ckpt_dir)
    except CheckpointError:
      raise
    except Exception as err:  # pylint: disable=broad-except  (sorted by is_damage)
      if not is_damage(err):
        raise _not_damage(step, ckpt_dir, err) from err
      aside = set_aside(manager.directory / str(step), manager.directory / f'corrupted.{step}')
      manager.reload()
      logging.warning(
          'checkpoint step %d in %s is damaged (%s): moved to %s, trying the previous one', step,
          ckpt_dir, first_line(_damage_cause(err)), aside)
  raise CheckpointError(
      f'no readable checkpoint left in {ckpt_dir} (damaged ones are in corrupted.*): '
      'restore them from a backup, or use another --config.workdir to start over')


def _unused_name(path: str) -> str:
  """path, or path.1, path.2, ...: the first that does not exist."""
  candidate, n = path, 0
  while files.exists(candidate):
    n += 1
    candidate = f'{path}.{n}'
  return candidate


def set_aside(path, aside) -> str:
  """Renames path to aside, or to aside.1, aside.2, ... if taken (kept as evidence, never deleted);
  returns it.

  Process 0 renames; with several processes, every process waits until it has, so none reads a
  half-moved tree. On an object store the rename is a copy of every object, then a delete: not
  atomic, but nothing is lost.
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
  """CheckpointError when ckpt_dir has no checkpoint left but damaged ones were set aside: never
  restart silently."""
  if files.is_dir(ckpt_dir) and latest_step(ckpt_dir) is None:
    aside = [name for name in files.listdir(ckpt_dir) if name.startswith('corrupted.')]
    if aside:
      raise CheckpointError(
          f'every checkpoint in {ckpt_dir} was set aside as damaged ({", ".join(aside)}): '
          'restore one from a backup, or move them out of the directory to train from scratch')


def load_params(ckpt_dir: str, target_params, *, check_record: Callable[[dict], None],
                which: str = 'ema_params') -> Any:
  """Loads one params tree (EMA by default) of the latest checkpoint, e.g. a frozen teacher, checked
  against the digest saved with it.

  check_record(saved record) raises CheckpointError for a checkpoint of another model
  (`records.checker`).

  The params come back replicated over this run's devices, whatever number of processes saved them.
  A damaged latest step is one CheckpointError (nothing is moved: the mode that trains it sets it
  aside on its rerun).
  """
  if latest_step(ckpt_dir) is None:
    raise CheckpointError(f'no checkpoint in {ckpt_dir}: train that stage first (or fix the path)')
  with open_manager(ckpt_dir, create=False) as manager:
    step = manager.latest_step()
    try:
      record = saved_record(manager, step)
    except Exception as err:  # pylint: disable=broad-except  (sorted by is_damage in unreadable)
      raise unreadable(step, ckpt_dir, err) from err
    check_record(record)
    try:
      stored = _stored_shapes(manager, step, record).get(which)
    except Exception as err:  # pylint: disable=broad-except
      raise unreadable(step, ckpt_dir, err) from err
    if stored != tree_shapes(target_params):
      raise CheckpointError(f'checkpoint {ckpt_dir} holds parameters of another architecture: '
                            'use the config that made it')
    item = {which: _replicated(target_params)}
    try:
      restored = manager.restore(
          step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
              item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
              partial_restore=True)))
      params = restored['state'][which]
      check_digest(record, step, {which: params})
    except Exception as err:  # pylint: disable=broad-except
      raise unreadable(step, ckpt_dir, err) from err
  return params


def _damage_cause(err: BaseException) -> BaseException:
  """The error in err's chain that is about the files (err itself when none is)."""
  return next((cause for cause in _causes(err) if _is_damage_itself(cause)), err)


def unreadable(step: int, ckpt_dir: str, err: Exception) -> CheckpointError:
  """The one-line CheckpointError of a step that could not be read where nothing is set aside (a
  teacher, a record): damage says how to recover, anything else that nothing was moved."""
  if not is_damage(err):
    return _not_damage(step, ckpt_dir, err)
  return CheckpointError(
      f'step {step} of {ckpt_dir} is unreadable ({first_line(_damage_cause(err))}): rerun the mode '
      'that trained it, which sets a damaged step aside and resumes from the previous one (or fix '
      'the path, if it names no checkpoint)')


def first_line(err: BaseException, limit: int = 200) -> str:
  """An error's first non-blank line, cut to limit characters (its type's name when it has no text):
  for one-line messages that quote the cause."""
  text = str(err).strip()
  return text.splitlines()[0][:limit] if text else type(err).__name__
