"""CIFAR-10 stage1 of guided distillation at paper scale (see cifar10_teacher.py for data and model).

  python main.py --config=configs/cifar10_stage1.py --mode=distill --config.data.tfds_data_dir=DIR
"""

from configs import cifar10_teacher


def get_config():
  config = cifar10_teacher.get_config()
  config.distill.stage = 'stage1'
  return config
