"""--dry_run: every paper-scale config builds its models, shards one batch of mock data and takes one train
step of the stage its command trains, on this CPU, writing nothing."""

import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import tiny_config
from modes import dry_run
from modes.validation import ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Each paper-scale config with the mode its docstring's command runs.
PAPER_SCALE = [('cifar10_teacher', 'teacher', 'teacher'), ('cifar10_stage1', 'distill', 'stage1'),
               ('cifar10_stage2', 'distill', 'stage2 8192->4096 steps'),
               ('imagenet64_teacher', 'teacher', 'teacher'), ('imagenet64_stage1', 'distill', 'stage1'),
               ('imagenet64_stage2', 'distill', 'stage2 1024->512 steps')]


def test_tiny_pipeline_dry_run_steps_every_stage_and_writes_nothing(tmp_path):
  config = tiny_config(tmp_path / 'run')
  results = dry_run.run_dry_run(config, 'pipeline')
  assert [r['title'] for r in results] == ['teacher', 'stage1', 'stage2 4->2 steps']
  for result in results:
    assert np.isfinite(result['loss']) and result['loss'] > 0 and result['skipped'] == 0
    assert result['batch'][0] == 1 and result['params'] > 0
  assert [r['title'] for r in dry_run.run_dry_run(config, 'encoder', batch_size=4)] == ['encoder 4->2 steps']
  assert not (tmp_path / 'run').exists()


def test_estimates_compile_without_running_and_scale_with_the_batch(tmp_path):
  config = tiny_config(tmp_path / 'run')
  small, large = (dry_run.estimate_stage(config, 'stage2', batch_size=b) for b in (64, 256))
  assert small['title'] == 'stage2 4->2 steps' and small['params'] == large['params'] > 0
  assert 0 < small['tflops'] < large['tflops'] and 0 < small['memory_gib'] < large['memory_gib']
  assert large['tflops'] / small['tflops'] > 2  # the step's work grows with the batch; the params do not
  assert not (tmp_path / 'run').exists()


def test_modes_that_train_nothing_are_refused(tmp_path):
  with pytest.raises(ConfigError, match='--dry_run trains nothing in --mode=fid'):
    dry_run.run_dry_run(tiny_config(tmp_path), 'fid')


@pytest.mark.paper_scale  # opt-in (--paper-scale): 2-6 min each on 2 CPU cores
@pytest.mark.xdist_group('paper_scale')  # one at a time under pytest-xdist: an ImageNet 64 step takes ~12 GB
@pytest.mark.parametrize('name,mode,title', PAPER_SCALE)
def test_paper_scale_config_passes_its_dry_run(name, mode, title, tmp_path):
  workdir = tmp_path / 'run'
  proc = subprocess.run([sys.executable, 'main.py', f'--config=configs/{name}.py', f'--mode={mode}', '--dry_run',
                         f'--config.workdir={workdir}'], cwd=REPO, capture_output=True, text=True, timeout=900,
                        env=dict(os.environ, JAX_PLATFORMS='cpu'))
  output = proc.stdout + proc.stderr
  assert proc.returncode == 0, output[-3000:]
  assert f'[dry run] {title}: ' in output and f'every stage of --mode={mode} builds, shards and steps' in output, \
      output[-3000:]
  assert not workdir.exists()
