"""The model sizes the speed benchmarks share (peer_scaling.py, cpu_profile.py): name -> config.

- default: the digits teacher as configured (396,697 parameters, batch 64);
- 1m: the digits U-Net at ch=32 with 2 residual blocks a level (about 1M parameters, batch 128);
- cifar: a CIFAR-10-shaped model (32x32x3): the reference U-Net of configs/cifar10_teacher.py at
  ch=64, float32, batch 64 (a few million parameters).
"""

from configs import cifar10_teacher, digits_teacher


def _digits_1m(config):
  config.model.update(ch=32, num_res_blocks=2)
  config.train.batch_size = 128


def _cifar_small(config):
  config.model.update(ch=64, dtype='float32')
  config.train.batch_size = 64


# name -> (config module, overrides)
SIZES = {'default': (digits_teacher, lambda config: None), '1m': (digits_teacher, _digits_1m),
         'cifar': (cifar10_teacher, _cifar_small)}


def config_of(name: str):
  """The teacher config of a size (SIZES)."""
  module, override = SIZES[name]
  config = module.get_config()
  override(config)
  return config
