"""Runs the real training loop of a config's stages at full batch and prints what their log lines
measure.

  python benchmarks/train_speed.py --config=configs/cifar10_teacher.py --stages=teacher,stage2 \
      --steps=1500
  python benchmarks/train_speed.py --config=configs/cifar10_teacher.py \
      --input=synthetic  # a machine without TF
  python benchmarks/train_speed.py --config=configs/tiny.py --steps=40 \
      --log_every=10  # a quick check

Each stage is `train.loop.run_training` itself (sharded jitted step, host batches, non-finite
checks, progress lines, the final Orbax save) on the job `--dry_run` builds: the stage's model at
the config's batch size, its first round for stage 2, a freshly initialised stand-in teacher. It
trains `--steps` steps in a temporary workdir (removed after) and reports the last log window, so
compilation is left out: steps/s, examples/s, model TFLOP/s and MFU (the figures of the progress
lines), and the device's peak memory where the backend reports it (`memory_stats`). Input:
`pipeline` is the real input pipeline (`data.make_train_iterator`; CIFAR-10 and ImageNet 64 read the
prepared data set of `--config.data.tfds_data_dir`, or without one `tfds.testing.mock_data`: random
examples of the real features, flipped, scaled and batched by the same tf.data code); `synthetic`
cycles 8 random host batches through the same loop, for machines without TensorFlow.
`--pipeline_batches=N` times the input pipeline alone first (with mock data that times mock data's
Python generator: give a prepared data set for the pipeline's own figure). `--trace_steps=N` also
writes a jax.profiler trace of N steps into `--trace_dir`.
"""

import contextlib
import importlib.util
import itertools
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position
from absl import app, flags, logging  # pylint: disable=wrong-import-position
from ml_collections import config_flags  # pylint: disable=wrong-import-position

import data  # pylint: disable=wrong-import-position
from models import count_params  # pylint: disable=wrong-import-position
from modes import dry_run  # pylint: disable=wrong-import-position
from train import loop, profile  # pylint: disable=wrong-import-position
from train.loop import per_host_batch_size, run_training  # pylint: disable=wrong-import-position
from train.mesh import (  # pylint: disable=wrong-import-position
    configure_cpu_compiler, host_description, set_cpu_devices)

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/cifar10_teacher.py', 'Config file.')
_STAGES = flags.DEFINE_list('stages', ['teacher', 'stage2'],
                            'Stages to train: teacher, stage1, stage2, direct.')
_STEPS = flags.DEFINE_integer('steps', 1500, 'Train steps of each stage.')
_LOG_EVERY = flags.DEFINE_integer('log_every', 0,
                                  'Log window in steps (0: steps / 3); the last one is reported.')
_INPUT = flags.DEFINE_enum('input', 'pipeline', ['pipeline', 'synthetic'],
                           'Where the batches come from.')
_TRACE_STEPS = flags.DEFINE_integer('trace_steps', 0, 'Steps of a jax.profiler trace (0: none).')
_TRACE_DIR = flags.DEFINE_string('trace_dir', '', 'Where the trace goes (a stage subfolder each).')
_PIPELINE_BATCHES = flags.DEFINE_integer(
    'pipeline_batches', 0, 'Also time the input pipeline alone on this many '
    'batches (0: no); with --stages= it trains nothing.')
_CPU_DEVICES = flags.DEFINE_integer('cpu_devices', 0,
                                    'As main.py: XLA devices of the host CPU (0: one per core).')


def _synthetic_batches(config, batch_size: int):
  """make_batches for run_training: 8 random host batches {'x', 'label'}, cycled."""
  info = data.dataset_info(config.data)
  rng = np.random.default_rng(config.seed)
  batches = [{
      'x': rng.uniform(-1, 1, (batch_size, *info.shape)).astype(np.float32),
      'label': rng.integers(0, info.num_classes, batch_size).astype(np.int32)} for _ in range(8)]
  return lambda start_step: itertools.cycle(batches)


def _pipeline_batches(config, batch_size: int, seed: int):
  return lambda start_step: data.make_train_iterator(
      config.data, per_host_batch_size=batch_size, seed=seed, start_step=start_step)


def time_pipeline(config, num_batches: int) -> tuple[float, int]:
  """(examples/s, batch) of this host's input pipeline alone at the teacher's batch size: no model
  runs."""
  batch_size = per_host_batch_size(config.train.batch_size)
  batches = data.make_train_iterator(config.data, per_host_batch_size=batch_size, seed=config.seed)
  next(batches)  # builds the pipeline and fills its buffers
  start = time.perf_counter()
  for _ in range(num_batches):
    next(batches)
  return num_batches * batch_size / (time.perf_counter() - start), batch_size


def _peak_memory_gib() -> float:
  """The first local device's peak memory in use so far (cumulative over this process), or nan."""
  stats = jax.local_devices()[0].memory_stats() or {}
  return stats['peak_bytes_in_use'] / 2**30 if 'peak_bytes_in_use' in stats else float('nan')


def train_stage(config, stage: str, workdir: str) -> dict:
  """Trains `stage` for --steps steps in workdir; returns its last log window's scalars and
  sizes."""
  job = dry_run.build_job(config, stage)
  section = job.section.copy_and_resolve_references()
  log_every = _LOG_EVERY.value or max(_STEPS.value // 3, 1)
  section.update(num_steps=_STEPS.value, log_every=log_every, checkpoint_every=_STEPS.value,
                 keep_checkpoints=1)
  local_batch = per_host_batch_size(section.batch_size)
  make_batches = (_synthetic_batches(config, local_batch) if _INPUT.value == 'synthetic'
                  else _pipeline_batches(config, local_batch, config.seed))
  profile_config = config.profile.copy_and_resolve_references()
  trace_dir = None
  if _TRACE_STEPS.value:
    trace_dir = os.path.join(_TRACE_DIR.value or os.path.join(workdir, 'trace'), stage)
    profile_config.update(num_steps=_TRACE_STEPS.value, start_step=max(log_every // 2, 1))
  _, scalars = run_training(title=f'{stage} speed', loss_fn=job.loss_fn, params=job.params,
                            section=section, ckpt_dir=os.path.join(workdir, stage),
                            record=job.record, make_batches=make_batches, seed=config.seed,
                            frozen=job.frozen, logdir=trace_dir, profile=profile_config)
  return dict(scalars, stage=stage, title=job.title, params=count_params(job.params),
              batch=section.batch_size, peak_gib=_peak_memory_gib(), log_every=log_every)


def main(_):
  configure_cpu_compiler()  # as main.py: before a backend starts
  set_cpu_devices(_CPU_DEVICES.value)
  # e.g. a GPU image with jax but no TF: clu's TensorBoard
  if importlib.util.find_spec('tensorflow') is None:
    # writer needs TF; these figures come from run_training's return
    loop.make_writer = lambda logdir: None
  config = _CONFIG.value
  # else the prepared data set
  mocked = _INPUT.value == 'pipeline' and not config.data.get('tfds_data_dir')
  mock = dry_run.mock_tfds(config.data.name) if mocked else contextlib.nullcontext()
  rows = []
  workdir = tempfile.mkdtemp(prefix='train_speed_')
  try:
    with mock:
      pipeline = time_pipeline(config, _PIPELINE_BATCHES.value) if _PIPELINE_BATCHES.value else None
      for stage in _STAGES.value:
        rows.append(train_stage(config, stage, workdir))
  finally:
    shutil.rmtree(workdir, ignore_errors=True)
  if pipeline:
    print(f'input pipeline alone ({_INPUT.value}): {pipeline[0]:.0f} examples/s per host, '
          f'{_PIPELINE_BATCHES.value} batches of {pipeline[1]}')
  if not rows:
    return
  peak = profile.peak_flops(dtype=config.model.dtype)
  print(
      f'machine: {host_description()}; device {jax.devices()[0].device_kind} '
      f'x{jax.device_count()}, peak {"n/a" if peak is None else f"{peak / 1e12:.0f} TFLOP/s"} at '
      f'{config.model.dtype}')
  print(
      f'config {config.data.name}, model {config.model.name} ({config.model.dtype}), input '
      f'{_INPUT.value}, {_STEPS.value} steps a stage, figures of the last {rows[0]["log_every"]}')
  print(
      '| stage | params | batch | steps/s | examples/s | model TFLOP/s | MFU | peak memory (GiB) |')
  print('|---|---|---|---|---|---|---|---|')
  for row in rows:
    tflops = row.get('model_flops_per_sec', float('nan')) / 1e12
    mfu = f'{100 * row["mfu"]:.1f}%' if 'mfu' in row else 'n/a'
    print(f'| {row["title"]} | {row["params"]:,} | {row["batch"]} | {row["steps_per_sec"]:.2f} | '
          f'{row["examples_per_sec"]:.0f} | {tflops:.1f} | {mfu} | {row["peak_gib"]:.2f} |')


if __name__ == '__main__':
  logging.set_verbosity(logging.INFO)
  app.run(main)
