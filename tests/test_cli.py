"""main.py on bad input: exit non-zero with one line naming the problem, nothing written."""

import os
import subprocess
import sys

import pytest

from conftest import tiny_config
from distill import stages
from train import records
from modes import MODES

pytestmark = pytest.mark.integration  # the second tier (tests/conftest.py)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _main(*args, workdir):
  cmd = [sys.executable, os.path.join(REPO, 'main.py'), '--config',
         os.path.join(REPO, 'configs', 'tiny.py'), f'--config.workdir={workdir}', *args]
  return subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=REPO)


@pytest.mark.parametrize('args, message', [
    (['--mode=train_everything'],
     'unknown --mode=train_everything: did you mean --mode=pipeline or --mode=teacher?'),
    (['--mode=teacher', '--config.train.num_steps=-5'], 'train.num_steps must be > 0'),
    (['--mode=stage1', '--config.distill.w_min=5.0'], 'guidance range is reversed'),
    (['--mode=teacher', '--config.data.name=mnist'], "unknown data.name 'mnist'"),
    (['--mode=teacher', '--config.data.name=digits', '--config.model.name=unet',
      '--config.model.ch_mult=(1,2,2,2,2)'],
     'image size 8 does not divide by the U-Net downsampling factor 16'),
    (['--mode=stage2', '--config.stage2.start_steps=48'],
     'stage2.start_steps must be a power of two'),
    (['--mode=stage2', '--config.stage2.final_steps=8', '--config.stage2.start_steps=8'],
     'final_steps (8) must be smaller'),
    (['--mode=stage2'], 'no checkpoint in'),
    (['--mode=teacher', '--config.train.learning_rate=0.1'],
     "names no field of the config: 'learning_rate'. Check the spelling"),
    (['--mode=sample', '--config.sample.guidence_w=2.0'],
     'names no field of the config: \'guidence_w\'. Did you mean "guidance_w" instead '
     'of "guidence_w"?'),
    (['--mode=teacher', '--config.train.num_steps=many'],
     "invalid literal for int() with base 10: 'many'"),
    (['--mode=teacher', '--config.data.name=digits'], "model.name 'mlp' is for vector data"),
    (['--mode=fid', '--config.eval.extractor=classifier'], "'classifier' is the digits classifier"),
    (['--mode=stage1', '--config.distill.dropout=1.5'],
     "distill.dropout must be -1 (the teacher's) or in [0, 1)"),
    (['--mode=stage1', '--config.distill.w_distribution=beta'],
     "unknown distill.w_distribution 'beta'"),
    (['--mode=stage1', '--config.stage1.loss_weighting=x'], "unknown stage1.loss_weighting 'x'"),
    (['--mode=stage1', '--config.distill.guidance_output=True'],
     "distill.guidance_output needs model.name 'unet'"),
    (['--mode=sample', '--dry_run'], '--dry_run trains nothing in --mode=sample'),
    (['--mode=teacher', '--config.train.lr_decay=cosine'],
     "unknown train.lr_decay 'cosine'; choose one of"),
    (['--mode=teacher', '--cpu_devices=2', '--config.train.batch_size=63'],
     'train.batch_size 63 does not split over 2 devices'),
    (['--mode=teacher', '--config.workdir='], 'workdir is empty'),
    (['--mode=fid'], 'nothing to evaluate in'),
])
def test_bad_input_gives_one_clear_line(tmp_path, args, message):
  result = _main(*args, workdir=tmp_path / 'run')
  assert result.returncode != 0
  errors = [line for line in result.stderr.splitlines() if line.startswith('error:')]
  assert len(errors) == 1 and message in errors[0], result.stderr[-1500:]
  assert not (tmp_path / 'run' / 'teacher').exists()


def test_sample_refuses_a_step_count_the_student_lacks(toy_run, tmp_path):
  student = stages.stage_dir(toy_run.workdir, 'stage2', 4)
  result = _main('--mode=sample', f'--config.sample.checkpoint={student}',
                 '--config.sample.num_steps=8', workdir=tmp_path / 'run')
  assert result.returncode != 0
  assert 'supports ddim at 4 steps, not 8' in result.stderr, result.stderr[-1500:]
  ok = _main('--mode=sample', f'--config.sample.checkpoint={student}',
             '--config.sample.num_steps=4', f'--config.sample.out_dir={tmp_path / "out"}',
             workdir=tmp_path / 'run')
  assert ok.returncode == 0, ok.stderr[-1500:]
  assert sorted(os.listdir(tmp_path / 'out')) == [
      'student_ddim_4steps_w1.npz', 'student_ddim_4steps_w1.png']


def test_the_mode_flag_lists_every_mode():
  import main  # pylint: disable=g-import-not-at-top
  assert sorted(main.MODE_NAMES) == sorted(MODES)


@pytest.mark.parametrize('mode', sorted(MODES))
def test_every_mode_refuses_an_invalid_config_before_writing(tmp_path, mode):
  result = _main(f'--mode={mode}', '--config.distill.w_min=9.0', workdir=tmp_path / 'run')
  assert result.returncode == 1
  errors = [line for line in result.stderr.splitlines() if line.startswith('error:')]
  assert len(errors) == 1 and 'guidance range is reversed' in errors[0], result.stderr[-1500:]
  assert not (tmp_path / 'run').exists()


def test_step_count_refusal_names_a_checkpoint_that_exists(tmp_path):
  from modes.sampling import SamplingError, check_steps  # pylint: disable=g-import-not-at-top
  config = tiny_config(tmp_path)  # stage-2 students at 2 and 1 steps; encoders at 2 and 1
  record = records.make(config, stage='stage2', sampling_steps=2)

  def advice(sampler, steps):
    with pytest.raises(SamplingError) as err:
      check_steps(record, sampler, steps, 'run/stage2/steps_0002')
    return str(err.value).split('; ', 1)[1]

  check_steps(record, 'ddim', 2, 'run/stage2/steps_0002')
  check_steps(record, 'stochastic', 4, 'run/stage2/steps_0002')
  assert advice('ddim', 1) == 'pick --config.sample.checkpoint=.../stage2/steps_0001'
  assert advice('stochastic', 2) == 'pick --config.sample.checkpoint=.../stage2/steps_0001'
  for sampler, steps in (('ddim', 3), ('ddim', 8), ('stochastic', 3), ('ddpm', 64)):
    assert advice(sampler, steps) == (
        "this run's stage-2 students sample at ddim 2 / stochastic 4, ddim 1 / "
        'stochastic 2 steps; for any step count and sampler use '
        '--config.sample.checkpoint=.../stage1 or .../teacher'), (sampler, steps)
  encoder = records.make(config, stage='encoder', sampling_steps=2)
  with pytest.raises(SamplingError, match=r'use the encoder in \.\.\./encoder/steps_0001'):
    check_steps(encoder, 'encode', 1, 'run/encoder/steps_0002')
  # the direct baseline: guided DDIM only
  direct = records.make(config, stage='direct', sampling_steps=2)
  check_steps(direct, 'ddim', 2, 'run/direct/steps_0002')
  with pytest.raises(SamplingError,
                     match=r'supports ddim at 2 steps, not 1; pick .*=\.\.\./direct/steps_0001$'):
    check_steps(direct, 'ddim', 1, 'run/direct/steps_0002')
  with pytest.raises(SamplingError, match=r'no stochastic sampler, not 4; they run ddim only; this '
                                          r'run\'s direct-baseline students sample with '
                                          r'ddim at 2, 1 steps$'):
    check_steps(direct, 'stochastic', 4, 'run/direct/steps_0002')


def test_a_config_file_that_does_not_exist_gives_one_line(tmp_path):
  result = subprocess.run([sys.executable, os.path.join(REPO, 'main.py'),
                           '--config=configs/nope.py', '--mode=teacher'],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
  assert result.returncode == 1
  assert result.stderr.strip().splitlines() == [
      'error: no config file configs/nope.py: give one of configs/*.py, e.g. '
      '--config=configs/digits_teacher.py']
  assert os.listdir(tmp_path) == []


def test_missing_inception_weights_give_one_line(toy_run, tmp_path):
  result = _main('--mode=fid', '--config.eval.extractor=inception',
                 f'--config.eval.inception_path={tmp_path}/w.pth',
                 f'--config.eval.out_dir={tmp_path / "eval"}', workdir=toy_run.workdir)
  assert result.returncode == 1
  errors = [line for line in result.stderr.splitlines() if line.startswith('error:')]
  assert len(errors) == 1 and 'w.pth' in errors[0], result.stderr[-1500:]
  assert not (tmp_path / 'eval').exists()
