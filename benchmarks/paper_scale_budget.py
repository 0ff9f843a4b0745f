"""Prints XLA's per-device memory and FLOP estimates of every paper-scale train step, and what they
imply.

  python benchmarks/paper_scale_budget.py [--per_device_batch=16 --peak_tflops=156 \
      --utilization=0.4]

Each stage's step is compiled (never run) on abstract inputs at per_device_batch examples per
device, so no parameters are initialised and no data is read: about a minute of CPU per stage.
Memory is XLA's buffer assignment on this backend (arguments + outputs + temporaries); an
accelerator's differs by its fusion and workspaces. Time is an estimate, not a measurement: XLA's
FLOP count of the published global batch times the published iterations, at `utilization` of
`peak_tflops` per device.
"""

import importlib
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # pylint: disable=g-import-not-at-top,wrong-import-position

from distill.stages import halving_rounds  # pylint: disable=wrong-import-position
from modes.dry_run import estimate_stage  # pylint: disable=wrong-import-position
from train.errors import config_section  # pylint: disable=wrong-import-position
from train.mesh import configure_cpu_compiler  # pylint: disable=wrong-import-position

_CONFIGS = flags.DEFINE_list('configs', ['cifar10_teacher', 'imagenet64_teacher'],
                             'Config modules in configs/.')
_STAGES = flags.DEFINE_list('stages', ['teacher', 'stage1', 'stage2'], 'Stages to compile.')
_PER_DEVICE_BATCH = flags.DEFINE_integer(
    'per_device_batch', 16, 'Examples per device of the compiled step.')
_PEAK = flags.DEFINE_float('peak_tflops', 156.0, 'Peak TFLOP/s of one device (A100 TF32: 156).')
_UTILIZATION = flags.DEFINE_float('utilization', 0.4, 'Assumed fraction of the peak reached.')


def _iterations(config, stage: str) -> tuple[int, int]:
  """(optimizer steps of the whole stage, global batch); stage 2 is num_steps per halving round."""
  section = config[config_section(stage)]
  rounds = len(halving_rounds(config)) if stage == 'stage2' else 1
  return section.num_steps * rounds, section.batch_size


def main(_):
  configure_cpu_compiler()  # as main.py: before a backend starts
  print(
      '| config | stage | params | per-device batch | GiB per device (XLA) | TFLOP per '
      'example-step | global batch x iterations | device-hours (estimate) |')
  print('|---|---|---|---|---|---|---|---|')
  for name in _CONFIGS.value:
    config = importlib.import_module(f'configs.{name}').get_config()
    for stage in _STAGES.value:
      result = estimate_stage(config, stage, batch_size=_PER_DEVICE_BATCH.value)
      iterations, global_batch = _iterations(config, stage)
      per_example = result['tflops'] / _PER_DEVICE_BATCH.value
      hours = per_example * global_batch * iterations / (_PEAK.value * _UTILIZATION.value) / 3600
      print(
          f'| {name} | {result["title"]} | {result["params"] / 1e6:.1f}M | '
          f'{_PER_DEVICE_BATCH.value} | {result["memory_gib"]:.1f} | {per_example:.4f} | '
          f'{global_batch} x {iterations:,} | {hours:,.0f} |',
          flush=True)


if __name__ == '__main__':
  app.run(main)
