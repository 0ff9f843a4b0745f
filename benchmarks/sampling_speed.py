"""Times the guided teacher's CFG DDIM against the distilled student at 1-8 steps, same batch and
device.

  python benchmarks/sampling_speed.py --config=configs/digits_teacher.py [--batch=256 \
      --teacher_steps=256]

Uses freshly initialised parameters of the config's model (speed does not depend on the weights).
Each sampler is jitted and run once to compile; the figure is the median of --repeats timed runs,
each ended by block_until_ready. The speed-up is to be read next to the network-call ratio (teacher
2 per step).
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position
from absl import app, flags  # pylint: disable=wrong-import-position
from ml_collections import config_flags  # pylint: disable=wrong-import-position

from distill import stages  # pylint: disable=wrong-import-position
from models import init_params  # pylint: disable=wrong-import-position
from models.denoiser import make_denoise_fn  # pylint: disable=wrong-import-position
from samplers import make_sampler  # pylint: disable=wrong-import-position
from train import records  # pylint: disable=wrong-import-position
from train.mesh import (  # pylint: disable=wrong-import-position
    configure_cpu_compiler, set_cpu_devices, shard_rows)

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/digits_teacher.py', 'Config file.')
_BATCH = flags.DEFINE_integer('batch', 256, 'Images per sampling call.')
_TEACHER_STEPS = flags.DEFINE_integer('teacher_steps', 256, 'DDIM steps of the guided teacher.')
_STUDENT_STEPS = flags.DEFINE_list('student_steps', ['1', '2', '4', '8'], 'Student step counts.')
_REPEATS = flags.DEFINE_integer('repeats', 5, 'Timed runs per sampler (median reported).')
_CPU_DEVICES = flags.DEFINE_integer('cpu_devices', 0,
                                    'As main.py: XLA devices of the host CPU (0: one per core).')


def _median_seconds(run, params, inputs) -> float:
  jax.block_until_ready(run(params, *inputs))  # compile
  times = []
  for _ in range(_REPEATS.value):
    start = time.perf_counter()
    jax.block_until_ready(run(params, *inputs))
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def main(_):
  configure_cpu_compiler()  # as main.py: before a backend starts
  set_cpu_devices(_CPU_DEVICES.value)  # as main.py samples: the batch split over every device
  config = _CONFIG.value
  logsnr_fn = stages.logsnr_schedule(config)
  timings = []
  for stage, kind in (('teacher', 'guided'), ('stage1', 'w_input')):
    record = records.make(config, stage=stage)
    model, _ = records.build(record)
    params = init_params(model, rng=jax.random.key(0), x_shape=tuple(record['x_shape']),
                         guidance_input=record['guidance_input'])
    denoise_fn = make_denoise_fn(model, parametrization=config.diffusion.parametrization, kind=kind,
                                 num_classes=record['num_classes'])
    n = _BATCH.value
    inputs = (*shard_rows(jax.random.normal(jax.random.key(1), (n, *record['x_shape'])),
                          jnp.arange(n, dtype=jnp.int32) % record['num_classes'],
                          jnp.full((n,), 2.0)), jax.random.key(2))
    step_counts = ([_TEACHER_STEPS.value]
                   if kind == 'guided' else [int(s) for s in _STUDENT_STEPS.value])
    for steps in step_counts:
      run = make_sampler('ddim', denoise_fn, num_steps=steps, logsnr_fn=logsnr_fn)
      nfe = steps * (2 if kind == 'guided' else 1)
      timings.append((f'{"teacher CFG" if kind == "guided" else "student"} DDIM {steps}', nfe,
                      _median_seconds(run, params, inputs)))
  print(
      f'device: {jax.devices()[0].device_kind} x{jax.device_count()} ({jax.default_backend()}), '
      f'model {config.model.name}, data {config.data.name}, batch {_BATCH.value}, median of '
      f'{_REPEATS.value}')
  teacher_nfe, teacher_seconds = timings[0][1], timings[0][2]
  print(
      f'{"sampler":<24}{"NFE":>6}{"seconds":>10}{"images/s":>11}{"speed-up":>10}{"NFE ratio":>11}')
  for name, nfe, seconds in timings:
    print(f'{name:<24}{nfe:>6}{seconds:>10.4f}{_BATCH.value / seconds:>11.1f}'
          f'{teacher_seconds / seconds:>10.1f}{teacher_nfe / nfe:>11.1f}')


if __name__ == '__main__':
  app.run(main)
