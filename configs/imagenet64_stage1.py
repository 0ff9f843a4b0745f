"""ImageNet 64x64 stage1 of guided distillation at paper scale (see imagenet64_teacher.py).

  python main.py --config=configs/imagenet64_stage1.py --mode=distill --config.data.tfds_data_dir=DIR
"""

from configs import imagenet64_teacher


def get_config():
  config = imagenet64_teacher.get_config()
  config.distill.stage = 'stage1'
  return config
