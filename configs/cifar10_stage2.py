"""CIFAR-10 stage2 of guided distillation at paper scale (see cifar10_teacher.py for data and
model).

  python main.py --config=configs/cifar10_stage2.py --mode=distill --config.data.tfds_data_dir=DIR
  python main.py --config=configs/cifar10_stage2.py --mode=distill \
      --dry_run  # one step on any machine

Expected cost: 13 rounds 8192 -> 1 steps, ~3.9 GiB per device at 16 per device, ~11 device-hours at
35% MFU (estimates, docs/results.md; see cifar10_teacher.py).
Multi-host: add --multihost on every host (docs/running.md).
"""

from configs import cifar10_teacher


def get_config():
  config = cifar10_teacher.get_config()
  config.distill.stage = 'stage2'
  return config
