"""--dry_run: build a config's models, shard one batch of (mock) data, run one train step of each
stage.

For paper-scale configs on a machine without their data or accelerators: it checks that the config,
the models, the data pipeline, the sharded step and the teacher -> student wiring fit together, and
prints the parameter count, the compile and step time and XLA's memory estimate of the step. Nothing
is written: no checkpoint, no log, no compilation cache.
"""

import contextlib
import math
import time

import jax
from absl import logging

import data
from distill import stages
from models import count_params, init_params
from modes.validation import ConfigError
from train import records
from train.errors import NonFiniteError, config_section, out_of_memory_as_error
from train.loop import ShardedStep, per_host_batch_size

# The stages of the method a --mode trains (pipeline: all of them).
MODE_STAGES = {'teacher': ('teacher',), 'stage1': ('stage1',), 'stage2': ('stage2',),
               'encoder': ('encoder',), 'direct': ('direct',),
               'pipeline': ('teacher', 'stage1', 'stage2')}
TFDS_DATASETS = ('cifar10', 'imagenet64')


def stages_of(config, mode: str) -> tuple[str, ...]:
  if mode == 'distill':
    return (config.distill.stage,)
  if mode not in MODE_STAGES:
    raise ConfigError(f"--dry_run trains nothing in --mode={mode}; use one of: distill, "
                     f"{', '.join(sorted(MODE_STAGES))}")
  if config.model.name != 'diffusers_unet':
    return MODE_STAGES[mode]
  # an imported teacher is read
  trained = tuple(stage for stage in MODE_STAGES[mode] if stage != 'teacher')
  if not trained:
    raise ConfigError(
        '--dry_run trains nothing in --mode=teacher of an imported teacher (it '
        'converts the folder\'s weights); dry-run --mode=pipeline or --mode=distill')
  return trained


def _fresh_params(config, stage: str, sampling_steps=None):
  """Randomly initialised params of a stage's model: the stand-in teacher of the next stage."""
  record = records.make(config, stage=stage, sampling_steps=sampling_steps)
  model, _ = records.build(record)
  return init_params(model, rng=jax.random.key(config.seed), x_shape=tuple(record['x_shape']),
                     guidance_input=record['guidance_input'])


def build_job(config, stage: str) -> stages.TrainingJob:
  """The job of `stage` (its first round for the halving stages) with a freshly initialised
  teacher."""
  if stage == 'teacher':
    return stages.teacher_job(config)
  if stage == 'stage1':
    return stages.stage1_job(config, teacher_params=_fresh_params(config, 'teacher'))
  student_steps = stages.halving_rounds(config, stage)[0]
  teacher_params = _fresh_params(config, stages.halving_teacher_stage(stage))
  return stages.halving_job(config, student_steps, stage, teacher_params=teacher_params)


@contextlib.contextmanager
def mock_tfds(name: str):
  """tfds.testing.mock_data for the tfds data sets, 'tfds:NAME' too (random examples of the real
  features); else nothing (a folder is read as it is)."""
  if name not in TFDS_DATASETS and not name.startswith(data.TFDS_PREFIX):
    yield
    return
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  (imports TensorFlow)
  with tfds.testing.mock_data(num_examples=16):
    yield


def _one_batch(config, batch_size: int) -> dict:
  """This process's rows of one global batch, through the real input pipeline (tfds mocked)."""
  with mock_tfds(config.data.name):
    iterator = data.make_train_iterator(
        config.data, per_host_batch_size=per_host_batch_size(batch_size), seed=config.seed)
    batch = next(iterator)
    del iterator  # a live mocked tfds pipeline can hang interpreter shutdown
  return batch


def _memory_gib(compiled) -> float:
  """XLA's estimate of the step's device memory per device (arguments + outputs + temporaries), or
  nan."""
  try:
    stats = compiled.memory_analysis()
    total = (stats.argument_size_in_bytes + stats.output_size_in_bytes + stats.temp_size_in_bytes
             - stats.alias_size_in_bytes)
    return total / 2**30
  except Exception:  # pylint: disable=broad-except  (not every backend reports it)
    return float('nan')


def _tflops(compiled) -> float:
  """XLA's count of floating-point operations of one step, in TFLOP, or nan."""
  try:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost['flops']) / 1e12
  except Exception:  # pylint: disable=broad-except
    return float('nan')


def _starts_from_teacher(job: stages.TrainingJob) -> bool:
  """Whether the student's initial params hold every array of its teacher's: stage 1 and the halving
  stages."""
  teacher = (job.frozen or {}).get('teacher_params')
  return teacher is not None and all(
      job.params.get(name) is value for name, value in teacher.items())


def loss_note(loss: float, starts_from_teacher: bool) -> str:
  """Why a first loss that prints as 0.0000 is expected, or ''.

  A student starting from its teacher's weights already matches it: at stage 2's 8192 -> 4096 steps
  one student step all but equals two teacher steps, and a freshly initialised reference U-Net
  outputs exactly 0 (zero output conv), so stage 1's guided target equals the student's output.
  """
  if not starts_from_teacher or f'{loss:.4f}' != '0.0000':  # as the dry run prints it
    return ''
  return " (expected: the student starts from its stand-in teacher's weights)"


def _step(config, stage: str, job: stages.TrainingJob, batch_size: int, measured: dict) -> dict:
  """Shards, compiles (into measured['compiled']) and runs one step of job; returns its result."""
  section = job.section.copy_and_resolve_references()
  section.batch_size = batch_size
  sharded = ShardedStep(job.loss_fn, section)
  starts_from_teacher = _starts_from_teacher(job)
  state = sharded.init_state(job.params, seed=config.seed)
  batch = sharded.global_batch(_one_batch(config, batch_size))
  frozen = sharded.put_frozen(job.frozen)
  start = time.time()
  compiled = measured['compiled'] = sharded.step_fn.lower(state, batch, frozen).compile()
  compile_seconds = time.time() - start
  start = time.time()
  state, metrics = compiled(state, batch, frozen)
  loss = float(jax.block_until_ready(metrics['loss']))
  return dict(stage=stage, title=job.title, params=count_params(job.params),
              batch=tuple(batch['x'].shape), loss=loss,
              loss_note=loss_note(loss, starts_from_teacher), compile_seconds=compile_seconds,
              step_seconds=time.time() - start, memory_gib=_memory_gib(compiled),
              tflops=_tflops(compiled), skipped=int(jax.device_get(state.num_skipped)))


def dry_run_stage(config, stage: str, *, batch_size: int) -> dict:
  """One sharded train step of `stage` on one batch of size batch_size; returns what it measured.

  Out of device memory, it raises OutOfMemoryError: one line with XLA's estimate and the batch to
  lower.
  """
  job = build_job(config, stage)
  # the compiled step, once there is one: XLA's memory estimate for an out-of-memory message
  measured = {}

  def memory_gib():
    return _memory_gib(measured['compiled']) if 'compiled' in measured else float('nan')

  with out_of_memory_as_error(f'[dry run] {job.title}', section=config_section(stage),
                              batch_size=batch_size, dry_run=True, memory_gib=memory_gib):
    result = _step(config, stage, job, batch_size, measured)
  loss = result['loss']
  if result['skipped'] or not math.isfinite(loss):
    raise NonFiniteError(
        f'dry run of {job.title}: the step was not finite (loss {loss}); check the config\'s lr '
        'and data')
  return result


def run_dry_run(config, mode: str, *, batch_size: int = 0) -> list[dict]:
  """Dry-runs every stage `mode` trains; batch_size 0 means one example per device."""
  batch_size = batch_size or jax.device_count()
  results = []
  for stage in stages_of(config, mode):
    result = dry_run_stage(config, stage, batch_size=batch_size)
    logging.info(
        '[dry run] %s: %s params, batch %s on %d %s device(s), loss %.4f%s, compile %.1f '
        's, step %.2f s, XLA estimates: %.3g GiB per device, %.3g TFLOP per step',
        result['title'], f"{result['params']:,}", result['batch'], jax.device_count(),
        jax.default_backend(), result['loss'], result['loss_note'], result['compile_seconds'],
        result['step_seconds'], result['memory_gib'], result['tflops'])
    results.append(result)
  logging.info(
      '[dry run] every stage of --mode=%s builds, shards and steps; nothing was written', mode)
  return results


def estimate_stage(config, stage: str, *, batch_size: int) -> dict:
  """Compiles (never runs) one train step of `stage` at batch_size on abstract inputs: no init, no
  data.

  Returns XLA's per-device memory and FLOP estimates of that step, for sizing runs on other
  hardware.
  """
  built = {}

  def build():
    built['job'] = build_job(config, stage)
    return built['job'].params, built['job'].frozen

  params, frozen = jax.eval_shape(build)  # shapes only: the params are never computed
  job = built['job']
  section = job.section.copy_and_resolve_references()
  section.batch_size = batch_size
  sharded = ShardedStep(job.loss_fn, section)
  state = jax.eval_shape(lambda p: sharded.init_state(p, seed=0), params)
  info = data.dataset_info(config.data)
  batch = {'x': jax.ShapeDtypeStruct((batch_size, *info.shape), jax.numpy.float32),
           'label': jax.ShapeDtypeStruct((batch_size,), jax.numpy.int32)}
  start = time.time()
  compiled = sharded.step_fn.lower(state, batch, frozen).compile()
  return dict(stage=stage, title=job.title, params=count_params(params), batch_size=batch_size,
              memory_gib=_memory_gib(compiled), tflops=_tflops(compiled),
              compile_seconds=time.time() - start)
