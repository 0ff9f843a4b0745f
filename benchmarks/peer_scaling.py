"""This repo's teacher against diffusers UNet2DModel peers, eager and compiled, at three sizes.

  python -m pip install -r benchmarks/requirements-peer.txt
      # optional extras: torch (CPU) + diffusers
  python benchmarks/peer_scaling.py [--rounds=5 --steps=10 --sample_steps=8 --sample_batch=64 \
      --sizes=default,1m,cifar]

The sizes (benchmarks/sizes.py): the digits default (its config as is), the digits U-Net at ch=32
with 2 residual blocks a level (about 1M parameters, batch 128), and a CIFAR-10-shaped model
(32x32x3: the reference U-Net of configs/cifar10_teacher.py at ch=64, float32, batch 64). At each
size the work of `benchmarks/peer_speed.py` (`build_ours`, `build_peer`: the teacher's train step,
guided DDIM with one network call on [label; null] a step), on three sides: ours, the peer eager and
the peer's network under `torch.compile`. Each side is built and warmed up (ours: compiled; the
compiled peer: traced and compiled), then `--rounds` rounds time the three in turn, `--steps` train
steps each and one `--sample_steps` sampling call each. It prints, per size, each side's median and
spread (min-max) and ours over each peer side per round (median, min-max). Minutes per size on 2
cores, most of them torch.compile's compilation.
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position
from absl import app, flags  # pylint: disable=wrong-import-position

from benchmarks import peer_speed  # pylint: disable=wrong-import-position  (torch, diffusers)
from benchmarks.sizes import config_of  # pylint: disable=wrong-import-position
from train import records  # pylint: disable=wrong-import-position
from train.mesh import (  # pylint: disable=wrong-import-position
    configure_cpu_compiler, set_cpu_devices)

FLAGS = flags.FLAGS
# peer_speed's flags, with defaults for a run of three sizes
FLAGS.set_default('steps', 10)
FLAGS.set_default('sample_steps', 8)
FLAGS.set_default('sample_batch', 64)
_SIZES = flags.DEFINE_list('sizes', ['default', '1m', 'cifar'],
                            'Sizes to run (benchmarks/sizes.py).')
_ROUNDS = flags.DEFINE_integer('rounds', 5, 'Rounds; each times every side once, in turn.')


def _timed(fn) -> float:
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


def measure_size(name: str) -> dict:
  """{side: {'train': [steps/s per round], 'sample': [images/s per round]}} and the sizes."""
  config = config_of(name)
  record = records.make(config, stage='teacher')
  steps, n, sample_steps = FLAGS.steps, FLAGS.sample_batch, FLAGS.sample_steps
  sides = {'ours': peer_speed.build_ours(config, record, sample_steps=sample_steps, sample_batch=n)}
  ch, layers = peer_speed.closest_peer(config.model, sides['ours'][0],
                                       x_shape=tuple(record['x_shape']),
                                       num_classes=record['num_classes'])
  for side, compile_model in (('eager', False), ('compiled', True)):
    sides[side] = peer_speed.build_peer(config, record, ch, layers, sample_steps=sample_steps,
                                        sample_batch=n, compile_model=compile_model)
  warmup = {}
  for side, (_, train, sample) in sides.items():
    warmup[side] = _timed(lambda: (train(2), sample()))  # compiles (ours, compiled)
  rates = {side: {'train': [], 'sample': []} for side in sides}
  for _ in range(_ROUNDS.value):
    for side, (_, train, sample) in sides.items():
      rates[side]['train'].append(steps / _timed(lambda t=train: t(steps)))
      rates[side]['sample'].append(n / _timed(sample))
  return dict(rates=rates, warmup=warmup, params={s: v[0] for s, v in sides.items()},
              batch=config.train.batch_size, x_shape=tuple(record['x_shape']),
              model=f'{config.model.name} ch={config.model.ch} num_res_blocks='
              f'{config.model.num_res_blocks}', peer=f'UNet2DModel ch={ch} layers={layers}')


def _spread(values) -> str:
  values = np.asarray(values)
  return f'{np.median(values):.2f} ({values.min():.2f}-{values.max():.2f})'


def print_size(name: str, result: dict) -> None:
  rates, params = result['rates'], result['params']
  print(f'\n### {name}: {result["model"]} ({params["ours"]:,} params) against {result["peer"]} '
        f'({params["eager"]:,}), x {result["x_shape"]}, train batch {result["batch"]}')
  print('warm-up (compile) s: ' + ', '.join(f'{s} {t:.0f}' for s, t in result['warmup'].items()))
  print('| figure | ours | peer eager | peer compiled | ours / eager | ours / compiled |')
  print('|---|---|---|---|---|---|')
  for figure, label in (('train', 'train steps/s'), ('sample', 'guided DDIM images/s')):
    ours = np.asarray(rates['ours'][figure])
    cells = [_spread(rates[side][figure]) for side in ('ours', 'eager', 'compiled')]
    cells += [_spread(ours / np.asarray(rates[side][figure])) for side in ('eager', 'compiled')]
    print(f'| {label} | ' + ' | '.join(cells) + ' |')


def main(_):
  configure_cpu_compiler()  # as main.py: before a backend starts
  set_cpu_devices(FLAGS.cpu_devices)
  torch = peer_speed.torch
  print(f'device: {jax.devices()[0].device_kind} x{jax.device_count()} ({jax.default_backend()}); '
        f'torch {torch.__version__} on cpu, {torch.get_num_threads()} threads; {_ROUNDS.value} '
        f'rounds; train: {FLAGS.steps} steps a round; sampling: {FLAGS.sample_steps} steps, '
        f'batch {FLAGS.sample_batch}')
  for name in _SIZES.value:
    print_size(name, measure_size(name))


if __name__ == '__main__':
  app.run(main)
