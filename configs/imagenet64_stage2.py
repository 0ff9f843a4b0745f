"""ImageNet 64x64 stage2 of guided distillation at paper scale (see imagenet64_teacher.py).

  python main.py --config=configs/imagenet64_stage2.py --mode=distill --config.data.tfds_data_dir=DIR
"""

from configs import imagenet64_teacher


def get_config():
  config = imagenet64_teacher.get_config()
  config.distill.stage = 'stage2'
  return config
