"""Where the CPU time of the teacher's train step goes, by kind of operation, at each size.

  python benchmarks/cpu_profile.py [--sizes=default,1m --steps=10]

At each size (benchmarks/sizes.py) the teacher step is built as the train loop runs it (ShardedStep:
jitted, donated state, batch split over every device, waiting after each step on several CPU
devices), compiled, warmed up, and --steps steps are traced with jax.profiler. XLA:CPU names each
operation it runs in the trace after its instruction in the compiled program (HLO), so the time of
each is read from the trace (self time: a loop's body operations are not counted twice) and
grouped by what the instruction computes, read from the HLO:

- convolution / conv weight grad: a fusion or instruction holding a convolution (the weight
  gradient when its window spans the activations: wider than the U-Nets' 3x3 kernels, or dilated);
- dot: matrix products (attention, dense layers, the embeddings);
- reduce: reductions without a product (GroupNorm statistics, means, norms of the update);
- all-reduce: the devices' gradient sum;
- copy / transpose: layout changes;
- elementwise: every other fusion (activations, normalisation, Adam, EMA).

It prints each group's milliseconds per step summed over the devices' threads, and the largest
operations (the grouping and self time: benchmarks/trace_summary.py). Needs no extras (no torch).
"""

import collections
import glob
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position
from absl import app, flags  # pylint: disable=wrong-import-position

from benchmarks.sizes import config_of  # pylint: disable=wrong-import-position
from benchmarks.trace_summary import (  # pylint: disable=wrong-import-position
    category, parse_hlo, self_times)
from distill import stages  # pylint: disable=wrong-import-position
from models import count_params  # pylint: disable=wrong-import-position
from train.loop import ShardedStep  # pylint: disable=wrong-import-position
from train.mesh import (  # pylint: disable=wrong-import-position
    configure_cpu_compiler, set_cpu_devices)

_SIZES = flags.DEFINE_list('sizes', ['default', '1m'], 'Sizes to profile (benchmarks/sizes.py).')
_STEPS = flags.DEFINE_integer('steps', 10, 'Traced train steps.')
_TOP = flags.DEFINE_integer('top', 12, 'Largest operations to list.')
_CPU_DEVICES = flags.DEFINE_integer('cpu_devices', 0,
                                    'As main.py: XLA devices of the CPU (0: one per core).')

def profile_size(name: str) -> None:
  """Builds, compiles, warms up and traces the size's step; prints its groups."""
  config = config_of(name)
  job = stages.teacher_job(config)
  sharded = ShardedStep(job.loss_fn, config.train)
  state = sharded.init_state(job.params, seed=0)
  b, x_shape = config.train.batch_size, tuple(job.record['x_shape'])
  local = {'x': np.random.default_rng(0).uniform(-1, 1, (b, *x_shape)).astype(np.float32),
           'label': np.arange(b, dtype=np.int32) % job.record['num_classes']}
  batch = sharded.global_batch(local)
  # compiled once: the program run is the one whose HLO names the traced operations
  compiled = sharded.step_fn.lower(state, batch, None).compile()
  instructions, computations = parse_hlo(compiled.as_text())

  def run(steps):
    nonlocal state
    for _ in range(steps):
      state, _ = compiled(state, batch, None)
      jax.block_until_ready(state)  # as the train loop on several CPU devices

  run(3)  # warms up
  start = time.perf_counter()
  run(_STEPS.value)
  untraced = (time.perf_counter() - start) / _STEPS.value
  logdir = tempfile.mkdtemp(prefix='cpu_profile_')
  jax.profiler.start_trace(logdir)
  run(_STEPS.value)
  jax.profiler.stop_trace()
  trace = glob.glob(os.path.join(logdir, 'plugins', 'profile', '*', '*.trace.json.gz'))[0]
  totals = self_times(trace)
  # only the compiled step's operations: the host's own events (waits, the profiler) are not XLA's
  totals = collections.Counter({op: t for op, t in totals.items() if op in instructions})
  groups = collections.Counter()
  for op, micros in totals.items():
    groups[category(op, instructions, computations)] += micros
  n, busy = _STEPS.value, sum(groups.values())
  print(f'\n### {name}: {count_params(job.params):,} params, x {x_shape}, batch {b}, '
        f'{jax.device_count()} devices')
  print(f'step: {1e3 * untraced:.1f} ms wall, untraced; its XLA operations: {busy / n / 1e3:.1f} '
        'ms a step, summed over the threads of every device')
  print('| group | ms a step | share |')
  print('|---|---|---|')
  for group, micros in groups.most_common():
    print(f'| {group} | {micros / n / 1e3:.2f} | {100 * micros / busy:.0f}% |')
  print('largest operations: ' + ', '.join(
      f'{op} ({category(op, instructions, computations)}) {micros / n / 1e3:.2f} ms'
      for op, micros in totals.most_common(_TOP.value)))


def main(_):
  configure_cpu_compiler()  # as main.py: before a backend starts
  set_cpu_devices(_CPU_DEVICES.value)
  print(f'device: {jax.devices()[0].device_kind} x{jax.device_count()} ({jax.default_backend()}); '
        f'{_STEPS.value} traced steps a size')
  for name in _SIZES.value:
    profile_size(name)


if __name__ == '__main__':
  app.run(main)
