"""The checkpoint record, in one place: the JSON saved with every checkpoint, saying what made it.

A record is {stage, sampling_steps, guidance_input, model, x_shape, num_classes, parametrization,
diffusion, data, config}, `class_names` where the data set names its classes (a folder, a tfds:NAME
data set), plus `train_steps` (the step at which its stage is complete) once trained and, for a
student, `teacher` (the directory, step and parameter digest of the checkpoint it was distilled
from). Here:
  * make(config, stage=...) builds it, build(record) rebuilds its model, read(ckpt_dir) reads it
    back;
  * IDENTITY_KEYS / check_compatible: when a checkpoint may be resumed or used as a teacher;
  * check_complete, is_stale / check_same_teacher, checkpoint_id: whether a stage may be consumed,
    and what identifies it in caches;
  * stage_inputs / stale_field / check_fresh: the config fields a stage's checkpoint depends on
    (shared with the sweep, which reuses a stage between points with equal inputs), and the refusal
    of a finished stage trained from other values of them.
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
from models.embeddings import GUIDANCE_OPTIONS, GUIDANCE_W_SCALE
from train import checkpoint, files
from train.checkpoint import CheckpointError

# no w input: guidance is applied at sampling time, 2 network calls a step
GUIDED_STAGES = ('teacher', 'direct')
# Keys of the record that must agree for a checkpoint to be resumed or used as a teacher.
IDENTITY_KEYS = ('stage', 'sampling_steps', 'model', 'guidance_input', 'x_shape', 'num_classes',
                 'parametrization', 'data')


def to_json(tree):
  """Plain-JSON form of a config or record (tuples become lists), so saved and fresh records
  compare."""
  return json.loads(json.dumps(tree))


def stage_model_config(config, stage: str) -> dict:
  """config.model for the teacher; for the students with distill.dropout (when >= 0) as their
  dropout, and for the w-input students with distill.guidance_gains, guidance_output and
  guidance_context when set.

  An imported teacher's model (name 'diffusers_unet') also names its folder(s) and the sha256 of
  their weights: the students' records keep them. A w-input student of a two-network teacher is its
  conditional network alone.
  """
  model = config.model.to_dict()
  if stage != 'teacher' and config.distill.dropout >= 0:
    model['dropout'] = config.distill.dropout
  if stage not in GUIDED_STAGES:
    model.update({k: True for k in GUIDANCE_OPTIONS if config.distill.get(k)})
    if config.distill.get('guidance_w_scale', GUIDANCE_W_SCALE) != GUIDANCE_W_SCALE:
      model['guidance_w_scale'] = float(config.distill.guidance_w_scale)
  if stage not in GUIDED_STAGES and model.get('uncond_unet'):
    model['uncond_unet'] = None
  return model


def make(config, *, stage: str, sampling_steps: Optional[int] = None) -> dict:
  """What a checkpoint is: enough to rebuild its model and denoiser without the original command."""
  info = data.dataset_info(config.data)
  # a folder's, a tfds:NAME set's
  named = dict(class_names=list(info.class_names)) if info.class_names else {}
  return to_json(
      dict(stage=stage,
           sampling_steps=sampling_steps,
           guidance_input=stage not in GUIDED_STAGES,
           model=stage_model_config(config, stage),
           x_shape=list(info.shape),
           num_classes=info.num_classes,
           parametrization=config.diffusion.parametrization,
           diffusion=config.diffusion.to_dict(),
           data=config.data.name,
           config=config.to_dict(),
           **named))


def build(record: dict):
  """The model a record describes, and abstract (shape-only) params for it."""
  model = build_model(ml_collections.ConfigDict(record['model']), num_classes=record['num_classes'],
                      guidance_input=record['guidance_input'])
  return model, _abstract_params(model, tuple(record['x_shape']), record['guidance_input'])


@functools.lru_cache(maxsize=None)
def _abstract_params(model, x_shape: tuple, guidance_input: bool):
  """Shape-only params, traced once per network (flax modules compare by fields): every round shares
  them."""
  return jax.eval_shape(lambda: init_params(model, rng=jax.random.key(0), x_shape=x_shape,
                                            guidance_input=guidance_input))


def read(ckpt_dir: str, step: Optional[int] = None) -> dict:
  """The record saved with a checkpoint of ckpt_dir (its latest by default); one CheckpointError
  line when there is none or it cannot be read (`checkpoint.unreadable`)."""
  if not files.is_dir(ckpt_dir):
    raise CheckpointError(f'no checkpoint in {ckpt_dir}: train that stage first (or fix the path)')
  with checkpoint.open_manager(ckpt_dir, create=False) as manager:
    step = manager.latest_step() if step is None else step
    if step is None:
      raise CheckpointError(
          f'no checkpoint in {ckpt_dir}: train that stage first (or fix the path)')
    try:
      return checkpoint.saved_record(manager, step)
    except Exception as err:  # pylint: disable=broad-except  (sorted by is_damage in unreadable)
      raise checkpoint.unreadable(step, ckpt_dir, err) from err


# Model fields that do not change what a checkpoint is: the compute dtype, and where an imported
# teacher's folders were (the sha256 of their weights is what identifies them).
_NOT_IDENTITY = ('dtype', 'folder', 'uncond_folder')


def _identity(key: str, value, other):
  """A record field as compared with the other record's: for the model, the fields both records
  have, except _NOT_IDENTITY; a field added to the config after a checkpoint was written is left
  out, so a new field's default never orphans an existing run."""
  if key == 'model' and isinstance(value, dict) and isinstance(other, dict):
    return {k: v for k, v in value.items() if k not in _NOT_IDENTITY and k in other}
  return value


def check_compatible(saved: dict, expected: dict, ckpt_dir: str) -> None:
  """Raises CheckpointError naming the first identity field where saved and expected records
  differ."""
  for key in IDENTITY_KEYS:
    if key not in expected:
      continue
    if (_identity(key, saved.get(key), expected[key]) !=
        _identity(key, expected[key], saved.get(key))):
      raise CheckpointError(
          f'checkpoint {ckpt_dir} was made with {key}={saved.get(key)!r} but the config gives '
          f'{expected[key]!r}: use another --config.workdir or the config that made it')


def checker(expected: dict, ckpt_dir: str) -> Callable[[dict], None]:
  """check_compatible against expected, as the check_record that checkpoint's restore and
  load_params take."""
  return functools.partial(check_compatible, expected=expected, ckpt_dir=ckpt_dir)


def checkpoint_id(ckpt_dir: str) -> str:
  """'<latest step>-<hash of its record>': another training in the same directory gets another
  id."""
  record = json.dumps(read(ckpt_dir), sort_keys=True)
  return f'{checkpoint.latest_step(ckpt_dir)}-{hashlib.sha1(record.encode()).hexdigest()[:12]}'


def check_complete(ckpt_dir: str, *, allow_incomplete: bool = False) -> int:
  """The latest step of ckpt_dir; CheckpointError if its training stopped before the final step of
  its record.

  run_training writes the section's num_steps into every checkpoint's record as train_steps: a stage
  is complete when its latest checkpoint has reached it. allow_incomplete turns the refusal into a
  warning.
  """
  step, record = checkpoint.latest_step(ckpt_dir), read(ckpt_dir)
  train_steps = record.get('train_steps')
  if train_steps is not None and step < train_steps:
    message = (
        f'{ckpt_dir} is incomplete (step {step} of {train_steps}): finish it first (rerun its mode '
        'with the same config), or pass --config.distill.allow_incomplete_teacher=True to use it '
        'as it is')
    if not allow_incomplete:
      raise CheckpointError(message)
    logging.warning('using an incomplete teacher: %s', message)
  return step


def is_stale(ckpt_dir: str, expected_record: dict) -> bool:
  """True when ckpt_dir holds a student distilled from another teacher than expected_record names.

  Records name their teacher as {'dir', 'step', 'params_sha1'}; a record without one (a dry run, or
  a checkpoint written before records named teachers) is never stale.
  """
  if expected_record.get('teacher') is None or checkpoint.latest_step(ckpt_dir) is None:
    return False
  saved = read(ckpt_dir).get('teacher')
  return saved is not None and saved != expected_record['teacher']


def check_same_teacher(ckpt_dir: str, expected_record: dict) -> None:
  """CheckpointError when ckpt_dir's student was distilled from another teacher than
  expected_record's."""
  if is_stale(ckpt_dir, expected_record):
    saved, expected = read(ckpt_dir)['teacher'], expected_record['teacher']
    raise CheckpointError(
        f'{ckpt_dir} was distilled from another teacher ({saved["dir"]} step {saved["step"]}, '
        f'params {saved["params_sha1"][:12]}) than the one there now (step {expected["step"]}, '
        f'params {expected["params_sha1"][:12]}): pass --config.distill.redistill=True to set it '
        'aside and distill again')


# The config fields no checkpoint depends on: evaluation, output, where things are, how often to log
# or save, and the switches that say what to do with existing checkpoints, and the compute dtype
# (params are float32 whatever it is: a bf16-trained teacher is distilled under float32 and back).
# Keys are sections, or dotted fields; '*.' any section.
_NEVER_INPUTS = ('transfer', 'eval', 'pipeline', 'sample', 'profile', 'workdir', 'retrain_stale',
                 'data.tfds_data_dir', 'distill.allow_incomplete_teacher', 'distill.redistill',
                 'distill.stage', '*.log_every', '*.checkpoint_every', '*.keep_checkpoints',
                 '*.max_nonfinite_steps', 'model.dtype')
# What each stage does not depend on besides: the sections of stages after it (or beside it), and
# for a halving round the number of rounds after it (final_steps).
_NOT_INPUTS = {
    'teacher': ('distill', 'stage1', 'stage2', 'encoder', 'direct'),
    'stage1': ('stage2', 'encoder', 'direct'),
    'stage2': ('encoder', 'direct', 'stage2.final_steps'),
    'encoder': ('stage2', 'direct', 'encoder.final_steps'),
    'direct':
        ('stage1', 'stage2', 'encoder', 'distill.w_min', 'distill.w_max', 'distill.w_zero_fraction',
         'distill.w_distribution', *(f'distill.{k}' for k in GUIDANCE_OPTIONS),
         'distill.guidance_w_scale', 'direct.final_steps'),
}


def flatten(tree: dict, prefix: str = '') -> dict:
  """{'a': {'b': 1}} -> {'a.b': 1}: a nested config dict as dotted fields."""
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat.update(flatten(value, f'{prefix}{key}.'))
    else:
      flat[f'{prefix}{key}'] = value
  return flat


def _excluded(field: str, excluded) -> bool:
  section, _, name = field.partition('.')
  return any(field == key or section == key or key == f'*.{name}' or field.startswith(f'{key}.')
             for key in excluded)


def stage_inputs(config, stage: str) -> dict:
  """{dotted field: value} of every config field a stage's checkpoint depends on (config: a
  ConfigDict or its plain dict, as a record holds it); equal inputs train equal checkpoints."""
  config = to_json(config if isinstance(config, dict) else config.to_dict())
  excluded = (*_NEVER_INPUTS, *_NOT_INPUTS[stage])
  return {k: v for k, v in flatten(config).items() if not _excluded(k, excluded)}


def _continues(field: str, saved: dict, now: dict, stage: str) -> bool:
  """Whether only asking a finished stage for more steps at a constant learning rate: it resumes and
  trains them, as if it had been asked for them from the start."""
  section = 'train' if stage == 'teacher' else stage
  return (field == f'{section}.num_steps' and now[field] > saved[field]
          and saved.get(f'{section}.lr_decay') == now.get(f'{section}.lr_decay') == 'constant')


def is_finished(ckpt_dir: str) -> bool:
  """Whether ckpt_dir holds a checkpoint at the final step of its stage (its record's
  train_steps)."""
  step = checkpoint.latest_step(ckpt_dir)
  if step is None:
    return False
  train_steps = read(ckpt_dir).get('train_steps')
  return train_steps is not None and step >= train_steps


def changed_input(saved_config: dict, config, stage: str) -> Optional[tuple[str, object, object]]:
  """(field, saved value, value in config) of the first field stage depends on (`stage_inputs`)
  where the config its checkpoint was trained with and config differ; None when they agree. Fields
  only one of them has (added to the config later) are left out, as is asking for more steps at a
  constant learning rate (`_continues`)."""
  saved, now = stage_inputs(saved_config, stage), stage_inputs(config, stage)
  for field in sorted(saved.keys() & now.keys()):
    if saved[field] != now[field] and not _continues(field, saved, now, stage):
      return field, saved[field], now[field]
  return None


def stale_field(ckpt_dir: str, config, stage: str) -> Optional[tuple[str, object, object]]:
  """`changed_input` of the finished stage in ckpt_dir against config; None when it is not finished
  (a resumed stage goes on with the config given, e.g. a lower learning rate after a divergence) or
  its record holds no config."""
  if not is_finished(ckpt_dir):
    return None
  saved_config = read(ckpt_dir).get('config')
  return None if saved_config is None else changed_input(saved_config, config, stage)


class StaleStageError(CheckpointError):
  """A finished stage was trained from other values of a field it depends on than the config
  gives."""


def check_fresh(ckpt_dir: str, config, stage: str, *, fix: str) -> None:
  """StaleStageError naming the field and both values when the finished stage in ckpt_dir was
  trained from another value of a field it depends on than config gives; fix says how to retrain
  it."""
  stale = stale_field(ckpt_dir, config, stage)
  if stale is not None:
    field, saved, now = stale
    raise StaleStageError(
        f'{ckpt_dir} was trained with {field}={saved!r} but this config gives {now!r}: rerun with '
        f'the value it was trained with, {fix}, or use another --config.workdir')
