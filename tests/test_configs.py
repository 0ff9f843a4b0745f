"""Every config file loads, validates, and builds its model (shapes only: no compile, no data)."""

import glob
import importlib
import os
import subprocess
import sys

import pytest

from distill import stages
from image_folders import write_folder
from train import records
from models import count_params
from modes.validation import prepare_config

# configs/diffusers_teacher.py imports a teacher folder (an override): a tiny one from the fixtures.
DIFFUSERS_FOLDER = os.path.join(
    os.path.dirname(os.path.abspath(__file__)), 'fixtures', 'diffusers', 'teacher_tiny')

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'configs')
NAMES = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(CONFIG_DIR, '*.py'))
               if not p.endswith('__init__.py'))


@pytest.mark.parametrize('name', NAMES)
def test_config_loads_validates_and_builds(name, tmp_path):
  config = importlib.import_module(f'configs.{name}').get_config()
  if config.model.name == 'diffusers_unet':
    config.model.folder = DIFFUSERS_FOLDER
  if config.data.name == 'folder':  # its data is given as an override: --config.data.path=DIR
    config.data.path = write_folder(
        tmp_path / 'images', {'a': ['png'], 'b': ['jpg']}, size=(40, 36))
  prepare_config(config)  # main.py prepares and validates after the command-line overrides
  for stage in ('teacher', 'stage1'):
    _, abstract = records.build(records.make(config, stage=stage))
    assert count_params(abstract) > 0
  assert config.distill.stage in ('stage1', 'stage2')
  assert stages.stage2_rounds(config)[-1] == config.stage2.final_steps


def test_paper_scale_model_sizes():
  sizes = {}
  for name in ('cifar10_teacher', 'imagenet64_teacher'):
    config = importlib.import_module(f'configs.{name}').get_config()
    _, abstract = records.build(records.make(config, stage='teacher'))
    sizes[name] = count_params(abstract)
  # PD CIFAR-10 U-Net: ch 256, 3 levels, 3 blocks
  assert 40e6 < sizes['cifar10_teacher'] < 80e6, sizes
  assert 150e6 < sizes['imagenet64_teacher'] < 400e6, sizes


def test_paper_scale_students_train_without_dropout_and_cifar10_halves_from_8192():
  for name, teacher_dropout in (('cifar10_teacher', 0.2), ('imagenet64_teacher', 0.1)):
    config = importlib.import_module(f'configs.{name}').get_config()
    assert records.make(config, stage='teacher')['model']['dropout'] == teacher_dropout
    for stage, steps in (('stage1', None), ('stage2', 4), ('encoder', 4)):
      assert records.make(config, stage=stage, sampling_steps=steps)['model']['dropout'] == 0.0
  cifar10 = importlib.import_module('configs.cifar10_stage2').get_config()
  assert stages.stage2_rounds(cifar10)[0] == 4096 and len(stages.stage2_rounds(cifar10)) == 13
  digits = importlib.import_module('configs.digits_teacher').get_config()
  assert (
      records.make(digits, stage='stage1')['model']['dropout'] == 0.0 < digits.model.dropout == 0.1)


def test_paper_scale_configs_default_to_the_reference_evaluation_protocol():
  for name in ('cifar10_teacher', 'cifar10_stage1', 'cifar10_stage2', 'imagenet64_teacher',
               'imagenet64_stage1', 'imagenet64_stage2'):
    ev = importlib.import_module(f'configs.{name}').get_config().eval
    assert ev.clip_x and ev.quantize_uint8 and ev.ddpm_variance == 'large', name
    # the paper's 1024-step DDIM teacher
    assert (1024 in ev.teacher_steps) == name.startswith('imagenet64'), name
    # FID-50k, as published
    assert ev.num_samples == 50_000 and ev.reference_examples == 50_000, name
  digits = importlib.import_module('configs.digits_teacher').get_config().eval
  assert not digits.clip_x and not digits.quantize_uint8 and digits.ddpm_variance == 'small'


def test_loading_a_config_imports_neither_jax_nor_the_modes():
  """A config is data: reading one (e.g. a launcher listing a sweep) must not pull in jax, flax or
  orbax."""
  code = ('import importlib, sys\n'
          f'for name in {NAMES!r}:\n'
          '  importlib.import_module(f"configs.{name}").get_config()\n'
          'heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("jax", "flax", "orbax", '
          '"modes", "train"))\nprint(heavy)\n')
  result = subprocess.run([sys.executable, '-c', code], cwd=os.path.dirname(CONFIG_DIR),
                          capture_output=True, text=True, check=True)
  assert result.stdout.strip() == '[]', result.stdout
