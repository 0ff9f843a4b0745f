"""The checkpoint record, in one place: the JSON saved with every checkpoint, saying what made it.

A record is {stage, sampling_steps, guidance_input, model, x_shape, num_classes, parametrization, diffusion, data,
config}, `class_names` where the data set names its classes (a folder, a tfds:NAME data set), plus `train_steps`
(the step at which its stage is complete) once trained and, for a student, `teacher` (the directory, step and
parameter digest of the checkpoint it was distilled from). Here:
  * make(config, stage=...) builds it, build(record) rebuilds its model, read(ckpt_dir) reads it back;
  * IDENTITY_KEYS / check_compatible: when a checkpoint may be resumed or used as a teacher;
  * check_complete, is_stale / check_same_teacher, checkpoint_id: whether a stage may be consumed, and what
    identifies it in caches.
train/checkpoint.py does the Orbax I/O and knows records only as JSON it saves and hands to a check.
"""

import functools
import hashlib
import json
from typing import Callable, Optional

import jax
import ml_collections
from absl import logging

import data
from models import build_model, init_params
from train import checkpoint
from train.checkpoint import CheckpointError

GUIDED_STAGES = ('teacher', 'direct')  # no w input: guidance is applied at sampling time, 2 network calls a step
# Keys of the record that must agree for a checkpoint to be resumed or used as a teacher.
IDENTITY_KEYS = ('stage', 'sampling_steps', 'model', 'guidance_input', 'x_shape', 'num_classes',
                 'parametrization')


def to_json(tree):
  """Plain-JSON form of a config or record (tuples become lists), so saved and fresh records compare."""
  return json.loads(json.dumps(tree))


def stage_model_config(config, stage: str) -> dict:
  """config.model for the teacher; for the students with distill.dropout (when >= 0) as their dropout."""
  model = config.model.to_dict()
  if stage != 'teacher' and config.distill.dropout >= 0:
    model['dropout'] = config.distill.dropout
  return model


def make(config, *, stage: str, sampling_steps: Optional[int] = None) -> dict:
  """What a checkpoint is: enough to rebuild its model and denoiser without the original command."""
  info = data.dataset_info(config.data)
  named = dict(class_names=list(info.class_names)) if info.class_names else {}  # a folder's, a tfds:NAME set's
  return to_json(dict(stage=stage, sampling_steps=sampling_steps, guidance_input=stage not in GUIDED_STAGES,
                      model=stage_model_config(config, stage), x_shape=list(info.shape), num_classes=info.num_classes,
                      parametrization=config.diffusion.parametrization, diffusion=config.diffusion.to_dict(),
                      data=config.data.name, config=config.to_dict(), **named))


def build(record: dict):
  """The model a record describes, and abstract (shape-only) params for it."""
  model = build_model(ml_collections.ConfigDict(record['model']), num_classes=record['num_classes'],
                      guidance_input=record['guidance_input'])
  return model, _abstract_params(model, tuple(record['x_shape']), record['guidance_input'])


@functools.lru_cache(maxsize=None)
def _abstract_params(model, x_shape: tuple, guidance_input: bool):
  """Shape-only params, traced once per network (flax modules compare by fields): every round shares them."""
  return jax.eval_shape(lambda: init_params(model, rng=jax.random.key(0), x_shape=x_shape,
                                            guidance_input=guidance_input))


def read(ckpt_dir: str, step: Optional[int] = None) -> dict:
  """The record saved with a checkpoint of ckpt_dir (its latest by default)."""
  with checkpoint.open_manager(ckpt_dir, create=False) as manager:
    step = manager.latest_step() if step is None else step
    if step is None:
      raise CheckpointError(f'no checkpoint in {ckpt_dir}: train that stage first (or fix the path)')
    return checkpoint.saved_record(manager, step)


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


def checker(expected: dict, ckpt_dir: str) -> Callable[[dict], None]:
  """check_compatible against expected, as the check_record that checkpoint's restore and load_params take."""
  return functools.partial(check_compatible, expected=expected, ckpt_dir=ckpt_dir)


def checkpoint_id(ckpt_dir: str) -> str:
  """'<latest step>-<hash of its record>': another training in the same directory gets another id."""
  record = json.dumps(read(ckpt_dir), sort_keys=True)
  return f'{checkpoint.latest_step(ckpt_dir)}-{hashlib.sha1(record.encode()).hexdigest()[:12]}'


def check_complete(ckpt_dir: str, *, allow_incomplete: bool = False) -> int:
  """The latest step of ckpt_dir; CheckpointError if its training stopped before the final step of its record.

  run_training writes the section's num_steps into every checkpoint's record as train_steps: a stage is
  complete when its latest checkpoint has reached it. allow_incomplete turns the refusal into a warning.
  """
  step, record = checkpoint.latest_step(ckpt_dir), read(ckpt_dir)
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
  if expected_record.get('teacher') is None or checkpoint.latest_step(ckpt_dir) is None:
    return False
  saved = read(ckpt_dir).get('teacher')
  return saved is not None and saved != expected_record['teacher']


def check_same_teacher(ckpt_dir: str, expected_record: dict) -> None:
  """CheckpointError when ckpt_dir's student was distilled from another teacher than expected_record's."""
  if is_stale(ckpt_dir, expected_record):
    saved, expected = read(ckpt_dir)['teacher'], expected_record['teacher']
    raise CheckpointError(
        f'{ckpt_dir} was distilled from another teacher ({saved["dir"]} step {saved["step"]}, params '
        f'{saved["params_sha1"][:12]}) than the one there now (step {expected["step"]}, params '
        f'{expected["params_sha1"][:12]}): pass --config.distill.redistill=True to set it aside and distill again')
