"""ImageNet 64x64 stage1 of guided distillation at paper scale (see imagenet64_teacher.py).

  python main.py --config=configs/imagenet64_stage1.py --mode=distill \
      --config.data.tfds_data_dir=DIR
  python main.py --config=configs/imagenet64_stage1.py --mode=distill \
      --dry_run  # one step on any machine

Expected cost: ~26 GiB per device at 16 examples per device, ~90 device-hours at 35% MFU (estimates,
docs/results.md; see imagenet64_teacher.py).
Multi-host: add --multihost on every host (docs/running.md).
"""

from configs import imagenet64_teacher


def get_config():
  config = imagenet64_teacher.get_config()
  config.distill.stage = 'stage1'
  return config
