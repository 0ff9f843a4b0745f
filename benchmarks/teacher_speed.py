"""Prints the teacher's train steps/s, model FLOP/s and MFU, and guided-DDIM sampling images/s on
this device.

  python benchmarks/teacher_speed.py --config=configs/digits_teacher.py [--steps=50 \
      --sample_steps=64]
  python benchmarks/teacher_speed.py --config=configs/cifar10_teacher.py \
      --config.model.dtype=float32  # on a GPU/TPU

Timing: every function is jitted and run once to compile, then timed with block_until_ready. FLOPs
of a step are the matmuls and convolutions of its traced program (`train/profile.py`); MFU needs a
device kind listed there. It also prints how many operations the compiled step runs one after the
other (the instructions of its optimised XLA program's entry computation: fusions, copies, library
calls): each is a kernel launch on a GPU.
"""

import os
import re
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position
from absl import app, flags  # pylint: disable=wrong-import-position
from ml_collections import config_flags  # pylint: disable=wrong-import-position

from distill import objectives, stages  # pylint: disable=wrong-import-position
from models import count_params, init_params  # pylint: disable=wrong-import-position
from models.denoiser import make_denoise_fn  # pylint: disable=wrong-import-position
from samplers import make_sampler  # pylint: disable=wrong-import-position
from train.loop import ShardedStep  # pylint: disable=wrong-import-position
from train import profile, records  # pylint: disable=wrong-import-position
from train.mesh import (  # pylint: disable=wrong-import-position
    configure_cpu_compiler, set_cpu_devices, shard_rows)

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/digits_teacher.py', 'Config file.')
_STEPS = flags.DEFINE_integer('steps', 50, 'Timed train steps.')
_SAMPLE_STEPS = flags.DEFINE_integer('sample_steps', 64, 'DDIM steps of the guided teacher.')
_SAMPLE_BATCH = flags.DEFINE_integer('sample_batch', 256, 'Images per sampling call.')
_REPEATS = flags.DEFINE_integer('repeats', 3, 'Sampling repeats (median reported).')
_CPU_DEVICES = flags.DEFINE_integer('cpu_devices', 0,
                                    'As main.py: XLA devices of the host CPU (0: one per core).')


def entry_ops(compiled) -> int:
  """Instructions of the entry computation of a compiled program's optimised HLO (parameters and
  tuple plumbing left out)."""
  entry = re.search(r'^ENTRY [^\n]*\{\n(.*?)^\}', compiled.as_text(), re.S | re.M)
  kinds = re.findall(r'= \S+ ([a-z][\w-]*)\(', entry.group(1)) if entry else []
  return sum(kind not in ('parameter', 'get-tuple-element', 'tuple', 'constant', 'bitcast')
             for kind in kinds)


def main(_):
  configure_cpu_compiler()  # as main.py: before a backend starts
  # as main.py runs: the production sharded step over every device
  set_cpu_devices(_CPU_DEVICES.value)
  config = _CONFIG.value
  record = records.make(config, stage='teacher')
  model, _ = records.build(record)
  params = init_params(model, rng=jax.random.key(0), x_shape=tuple(record['x_shape']),
                       guidance_input=False)
  kwargs = dict(logsnr_fn=stages.logsnr_schedule(config),
                parametrization=config.diffusion.parametrization,
                weighting=config.diffusion.loss_weighting)
  loss_fn = objectives.teacher_loss_fn(model, p_uncond=config.train.p_uncond,
                                       num_classes=record['num_classes'], **kwargs)
  sharded = ShardedStep(loss_fn, config.train)
  step_fn, state = sharded.step_fn, sharded.init_state(params, seed=0)
  batch_size = config.train.batch_size
  batch = sharded.global_batch({
      'x': np.random.default_rng(0).uniform(-1, 1,
                                            (batch_size, *record['x_shape'])).astype(np.float32),
      'label': np.arange(batch_size, dtype=np.int32) % record['num_classes']
  })
  ops = entry_ops(step_fn.lower(state, batch, None).compile())
  state, _ = step_fn(state, batch, None)
  jax.block_until_ready(state)
  # as the train loop: CPU collectives
  block_each_step = jax.default_backend() == 'cpu' and jax.device_count() > 1
  start = time.perf_counter()
  for _ in range(_STEPS.value):
    state, _ = step_fn(state, batch, None)
    if block_each_step:
      jax.block_until_ready(state)
  jax.block_until_ready(state)
  train_sps = _STEPS.value / (time.perf_counter() - start)
  utilisation = profile.utilisation(profile.step_flops(step_fn, state, batch, None), train_sps,
                                    profile.peak_flops(dtype=config.model.dtype))

  denoise_fn = make_denoise_fn(model, parametrization=config.diffusion.parametrization,
                               kind='guided', num_classes=record['num_classes'])
  run = make_sampler('ddim', denoise_fn, num_steps=_SAMPLE_STEPS.value,
                     logsnr_fn=kwargs['logsnr_fn'])
  n = _SAMPLE_BATCH.value
  z, label, w = shard_rows(jax.random.normal(jax.random.key(1), (n, *record['x_shape'])),
                           jnp.arange(n, dtype=jnp.int32) % record['num_classes'], jnp.ones((n,)))
  ema_params = sharded.unpack(state).ema_params
  jax.block_until_ready(run(ema_params, z, label, w, jax.random.key(0)))
  times = []
  for _ in range(_REPEATS.value):
    start = time.perf_counter()
    jax.block_until_ready(run(ema_params, z, label, w, jax.random.key(0)))
    times.append(time.perf_counter() - start)
  print(f'device: {jax.devices()[0].device_kind} x{jax.device_count()} ({jax.default_backend()})')
  print(
      f'model: {config.model.name}, {count_params(params):,} params, data {config.data.name} '
      f'{record["x_shape"]}')
  print(
      f'teacher train ({config.model.dtype} compute): {train_sps:.2f} steps/s at batch {batch_size}'
      f'{profile.describe({"examples_per_sec": train_sps * batch_size, **utilisation})}; '
      f'{ops:,} XLA operations a step')
  print(f'teacher guided DDIM {_SAMPLE_STEPS.value} steps ({2 * _SAMPLE_STEPS.value} NFE): '
        f'{n / float(np.median(times)):.1f} images/s at batch {n}')


if __name__ == '__main__':
  app.run(main)
