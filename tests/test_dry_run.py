"""--dry_run: every paper-scale config builds its models, shards one batch of mock data and takes
one train step of the stage its command trains, on this CPU, writing nothing."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import tiny_config
from modes import dry_run
from modes.validation import ConfigError
from train.errors import OutOfMemoryError

pytestmark = pytest.mark.integration  # the second tier (tests/conftest.py)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Each paper-scale config with the mode its docstring's command runs.
# (config, mode, stage title, params printed): the teachers' counts are the reference U-Net's
# (tests/test_ref_unet.py derives them layer by layer); the students add their w-embedding (CIFAR-10
# 1,312,768; ImageNet 64 738,816).
PAPER_SCALE = [('cifar10_teacher', 'teacher', 'teacher', 60_015_363),
               ('cifar10_stage1', 'distill', 'stage1', 60_015_363 + 1_312_768),
               ('cifar10_stage2', 'distill', 'stage2 8192->4096 steps', 60_015_363 + 1_312_768),
               ('imagenet64_teacher', 'teacher', 'teacher', 295_900_035),
               ('imagenet64_stage1', 'distill', 'stage1', 295_900_035 + 738_816),
               ('imagenet64_stage2', 'distill', 'stage2 1024->512 steps', 295_900_035 + 738_816)]


def test_tiny_pipeline_dry_run_steps_every_stage_and_writes_nothing(tmp_path):
  config = tiny_config(tmp_path / 'run')
  results = dry_run.run_dry_run(config, 'pipeline')
  assert [r['title'] for r in results] == ['teacher', 'stage1', 'stage2 4->2 steps']
  for result in results:
    assert np.isfinite(result['loss']) and result['loss'] > 0 and result['skipped'] == 0
    assert result['batch'][0] == 1 and result['params'] > 0
    assert result['loss_note'] == ''  # the loss is not 0.0000: nothing to explain
  assert ([r['title'] for r in dry_run.run_dry_run(config, 'encoder', batch_size=4)] ==
          ['encoder 4->2 steps'])
  assert not (tmp_path / 'run').exists()


@pytest.mark.parametrize('stage', ['teacher', 'stage1'])
def test_estimates_of_the_stages_that_initialise_params_trace_their_init(stage, tmp_path):
  """benchmarks/paper_scale_budget.py estimates the teacher and stage 1 too: their fresh params are
  initialised under jax.eval_shape (which refuses a jit with compiler options inside it)."""
  result = dry_run.estimate_stage(tiny_config(tmp_path / 'run'), stage, batch_size=8)
  assert result['params'] > 0 and result['tflops'] > 0 and result['memory_gib'] > 0
  assert not (tmp_path / 'run').exists()


def test_estimates_compile_without_running_and_scale_with_the_batch(tmp_path):
  config = tiny_config(tmp_path / 'run')
  small, large = (dry_run.estimate_stage(config, 'stage2', batch_size=b) for b in (64, 256))
  assert small['title'] == 'stage2 4->2 steps' and small['params'] == large['params'] > 0
  assert 0 < small['tflops'] < large['tflops'] and 0 < small['memory_gib'] < large['memory_gib']
  # the step's work grows with the batch; the params do not
  assert large['tflops'] / small['tflops'] > 2
  assert not (tmp_path / 'run').exists()


def test_a_zero_first_loss_of_a_student_starting_from_its_teacher_says_it_is_expected(tmp_path):
  config = tiny_config(tmp_path / 'run')
  # one student step all but equals two teacher steps
  config.stage2.update(start_steps=8192, final_steps=4096)
  result = dry_run.dry_run_stage(config, 'stage2', batch_size=1)
  assert f"loss {result['loss']:.4f}{result['loss_note']}" == (
      "loss 0.0000 (expected: the student starts from its stand-in teacher's weights)")
  # the teacher: a zero loss would be news
  assert dry_run.loss_note(0.0, starts_from_teacher=False) == ''
  assert dry_run.loss_note(0.0012, starts_from_teacher=True) == ''


def _oom(*args, **kwargs):
  del args, kwargs
  raise jax.errors.JaxRuntimeError(
      'RESOURCE_EXHAUSTED: Out of memory while trying to allocate 9.54GiB.\n...')


def test_a_dry_run_out_of_memory_is_one_line_with_the_estimate_and_the_batch_to_lower(
    tmp_path, monkeypatch):
  monkeypatch.setattr(dry_run, '_tflops', _oom)  # as if the compiled step ran out of memory
  devices = jax.device_count()
  with pytest.raises(OutOfMemoryError) as caught:
    dry_run.run_dry_run(tiny_config(tmp_path / 'run'), 'teacher', batch_size=4 * devices)
  message = str(caught.value)
  assert '\n' not in message and message.startswith(
      f'[dry run] teacher: out of device memory at global batch {4 * devices} (4 per '
      f'device on {devices} ')
  assert ' GiB per device for the step; ' in message and 'XLA estimates ' in message
  assert message.endswith(
      f'lower the batch per device: --config.train.batch_size={2 * devices} '
      f'(--dry_run_batch_size={2 * devices} to check it), or run on more devices')
  assert not (tmp_path / 'run').exists()


_MAIN_OUT_OF_MEMORY = """
import sys
sys.path[:0] = [{repo!r}, {tests!r}]
from modes import dry_run
from test_dry_run import _oom
dry_run._one_batch = _oom
sys.argv = ['main.py', '--config=configs/tiny.py', '--mode=teacher', '--dry_run', '--cpu_devices=1',
            '--dry_run_batch_size=8', '--config.workdir={workdir}']
import main

main.run()
"""


def test_main_prints_a_dry_run_out_of_memory_as_one_error_line(tmp_path):
  script = _MAIN_OUT_OF_MEMORY.format(repo=REPO, tests=os.path.dirname(os.path.abspath(__file__)),
                                      workdir=tmp_path / 'run')
  proc = subprocess.run([sys.executable, '-c', script], cwd=REPO, capture_output=True, text=True,
                        timeout=300, env=dict(os.environ, JAX_PLATFORMS='cpu'))
  errors = [line for line in proc.stderr.splitlines() if line.startswith('error:')]
  assert proc.returncode == 1 and 'Traceback' not in proc.stderr, proc.stderr[-3000:]
  assert errors == ['error: [dry run] teacher: out of device memory at global batch 8 (8 per '
                    'device on 1 cpu device); XLA gave no memory estimate of the step; lower the '
                    'batch per device: --config.train.batch_size=4 (--dry_run_batch_size=4 to '
                    'check it), or run on more devices'], \
      proc.stderr[-3000:]
  assert not (tmp_path / 'run').exists()


def test_modes_that_train_nothing_are_refused(tmp_path):
  with pytest.raises(ConfigError, match='--dry_run trains nothing in --mode=fid'):
    dry_run.run_dry_run(tiny_config(tmp_path), 'fid')


@pytest.mark.paper_scale  # opt-in (--paper-scale): 2-6 min each on 2 CPU cores
# one at a time under pytest-xdist: an ImageNet 64 step takes ~12 GB
@pytest.mark.xdist_group('paper_scale')
@pytest.mark.parametrize('name,mode,title,params', PAPER_SCALE)
def test_paper_scale_config_passes_its_dry_run(name, mode, title, params, tmp_path):
  workdir = tmp_path / 'run'
  proc = subprocess.run([
      sys.executable, 'main.py', f'--config=configs/{name}.py', f'--mode={mode}', '--dry_run',
      f'--config.workdir={workdir}'], cwd=REPO, capture_output=True, text=True, timeout=900,
                        env=dict(os.environ, JAX_PLATFORMS='cpu'))
  output = proc.stdout + proc.stderr
  assert proc.returncode == 0, output[-3000:]
  assert f'[dry run] {title}: {params:,} params, ' in output, output[-3000:]
  assert f'every stage of --mode={mode} builds, shards and steps' in output, output[-3000:]
  assert not workdir.exists()
