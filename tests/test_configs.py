"""Every config file loads, validates, and builds its model (shapes only: no compile, no data)."""

import glob
import importlib
import os

import pytest

from distill import stages
from models import count_params

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'configs')
NAMES = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(CONFIG_DIR, '*.py'))
               if not p.endswith('__init__.py'))


@pytest.mark.parametrize('name', NAMES)
def test_config_loads_validates_and_builds(name):
  config = importlib.import_module(f'configs.{name}').get_config()
  for stage in ('teacher', 'stage1'):
    _, abstract = stages.build_from_record(stages.make_record(config, stage=stage))
    assert count_params(abstract) > 0
  assert config.distill.stage in ('stage1', 'stage2')
  assert stages.stage2_rounds(config)[-1] == config.stage2.final_steps


def test_paper_scale_model_sizes():
  sizes = {}
  for name in ('cifar10_teacher', 'imagenet64_teacher'):
    config = importlib.import_module(f'configs.{name}').get_config()
    _, abstract = stages.build_from_record(stages.make_record(config, stage='teacher'))
    sizes[name] = count_params(abstract)
  assert 40e6 < sizes['cifar10_teacher'] < 80e6, sizes  # PD CIFAR-10 U-Net: ch 256, 3 levels, 3 blocks
  assert 150e6 < sizes['imagenet64_teacher'] < 400e6, sizes
