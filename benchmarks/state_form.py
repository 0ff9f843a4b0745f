"""The train state's form, measured: packed vectors against params trees (plain, or optax.flatten).

  python benchmarks/state_form.py --config=configs/digits_teacher.py
  python benchmarks/state_form.py --config=configs/digits_teacher.py \
      --config.model.ch=32 --config.model.num_res_blocks=2 --config.train.batch_size=128

Builds the teacher's train step (`train.state.make_train_step`, the loss of `--mode=teacher`) three
ways on the same params and batch:

- `packed`: the state as three vectors [N] (params, EMA, Adam's moments; `ParamLayout`): the update
  is a handful of large element-wise ops;
- `flatten`: params and EMA as trees, the optimizer wrapped in `optax.flatten` (its moments one
  vector each, the library's fused update);
- `tree`: params, EMA and moments as trees, one set of element-wise ops per array.

Each is compiled and warmed up, then the three are timed in turn, `--steps` steps each with
`block_until_ready` at the end (and after every step on several CPU devices, as the train loop
does), for `--rounds` rounds; it prints the median steps/s and the spread
(min-max) of each form, its ratio to `packed` per round (median, min-max), the number of
instructions in each compiled program and the seconds of its `.lower().compile()`. One process on
the devices main.py uses: the figures of the step itself, without input or logging.
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position
import optax  # pylint: disable=wrong-import-position
from jax.sharding import NamedSharding, PartitionSpec  # pylint: disable=wrong-import-position
from absl import app, flags  # pylint: disable=wrong-import-position
from ml_collections import config_flags  # pylint: disable=wrong-import-position

from models import count_params  # pylint: disable=wrong-import-position
from modes import dry_run  # pylint: disable=wrong-import-position
from train import state as state_lib  # pylint: disable=wrong-import-position
from train.mesh import (  # pylint: disable=wrong-import-position
    configure_cpu_compiler, data_mesh, set_cpu_devices)

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/digits_teacher.py', 'Config file.')
_STEPS = flags.DEFINE_integer('steps', 30, 'Timed steps of one form in one round.')
_ROUNDS = flags.DEFINE_integer('rounds', 5, 'Rounds; each times every form once, in turn.')
_WARMUP = flags.DEFINE_integer('warmup', 5, 'Untimed steps of each form after compiling.')
_CPU_DEVICES = flags.DEFINE_integer('cpu_devices', 0, 'As main.py: 0 = a power of two <= cores.')

FORMS = ('packed', 'flatten', 'tree')


def build_step(form: str, job, section):
  """(jitted step, state) of one form, sharded as `train.loop.ShardedStep` shards it: state and
  frozen params replicated, the batch split over every device."""
  tx = state_lib.make_optimizer(section)
  if form == 'flatten':
    tx = optax.flatten(tx)
  step = state_lib.make_train_step(job.loss_fn, tx, ema_decay=section.ema_decay,
                                   lr_schedule=state_lib.learning_rate_schedule(section),
                                   lr_scales=state_lib.lr_scales(section))
  state = state_lib.create_train_state(job.params, tx, seed=0, packed=form == 'packed')
  replicated = NamedSharding(data_mesh(), PartitionSpec())
  jitted = jax.jit(step, in_shardings=(replicated, batch_sharding(), replicated),
                   out_shardings=(replicated, replicated), donate_argnums=(0,))
  return jitted, jax.device_put(state, replicated)


def batch_sharding():
  return NamedSharding(data_mesh(), PartitionSpec('data'))


def compile_and_count(jitted, *args) -> tuple[float, int]:
  """(seconds of `.lower().compile()`, instructions of the optimised HLO: every computation in
  it)."""
  start = time.perf_counter()
  text = jitted.lower(*args).compile().as_text()
  seconds = time.perf_counter() - start
  return seconds, sum(1 for line in text.splitlines()
                      if ' = ' in line and not line.lstrip().startswith('//'))


def time_steps(step, state, batch, frozen, num_steps: int):
  block_each_step = jax.default_backend() == 'cpu' and jax.device_count() > 1  # as train.loop
  start = time.perf_counter()
  for _ in range(num_steps):
    state, _ = step(state, batch, frozen)
    if block_each_step:
      jax.block_until_ready(state)
  jax.block_until_ready(state)
  return state, num_steps / (time.perf_counter() - start)


def main(_):
  configure_cpu_compiler()  # as main.py: before a backend starts
  set_cpu_devices(_CPU_DEVICES.value)
  config = _CONFIG.value
  job = dry_run.build_job(config, 'teacher')
  section = job.section
  rng = np.random.default_rng(0)
  batch = {'x': rng.uniform(-1, 1, (section.batch_size, *job.record['x_shape'])).astype(np.float32),
           'label': rng.integers(0, job.record['num_classes'], section.batch_size).astype(np.int32)}
  batch = jax.device_put(batch, batch_sharding())
  steps, states, counts = {}, {}, {}
  for form in FORMS:
    steps[form], states[form] = build_step(form, job, section)
    counts[form] = compile_and_count(steps[form], states[form], batch, job.frozen)
    states[form], _ = time_steps(steps[form], states[form], batch, job.frozen, _WARMUP.value)
  rates = {form: [] for form in FORMS}
  for _ in range(_ROUNDS.value):
    for form in FORMS:
      states[form], rate = time_steps(steps[form], states[form], batch, job.frozen, _STEPS.value)
      rates[form].append(rate)
  print(f'{count_params(job.params):,} parameters, {len(jax.tree.leaves(job.params))} arrays, '
        f'batch {section.batch_size}, {jax.device_count()} {jax.devices()[0].device_kind} '
        f'device(s); {_ROUNDS.value} rounds of '
        f'{_STEPS.value} steps per form, alternated')
  print('| form | steps/s, median (min-max) | / packed, median (min-max) | HLO instructions | '
        'compile s |')
  print('|---|---|---|---|---|')
  for form in FORMS:
    mine, ratio = np.array(rates[form]), np.array(rates[form]) / np.array(rates['packed'])
    print(f'| {form} | {np.median(mine):.2f} ({mine.min():.2f}-{mine.max():.2f}) | '
          f'{np.median(ratio):.3f} ({ratio.min():.3f}-{ratio.max():.3f}) | {counts[form][1]:,} | '
          f'{counts[form][0]:.1f} |')


if __name__ == '__main__':
  app.run(main)
