"""Stale stages: a rerun whose config differs, in a field a finished stage depends on, from the
config that stage was trained with is refused in one line naming the field and both values;
--config.retrain_stale=True sets the old stage aside and trains it again; log, evaluation and output
fields never trigger it. The sweep shares a stage between points by the same definition of what it
depends on."""

import os
import shutil
import subprocess
import sys

import pytest

from conftest import tiny_config
from distill import stages
from modes import sweep
from train import records

pytestmark = pytest.mark.integration  # the second tier (tests/conftest.py)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = {'train': 4, 'stage1': 4, 'stage2': 4}


@pytest.fixture(scope='module')
def finished(tmp_path_factory):
  """A workdir whose tiny teacher and stage 1 are trained (4 steps each)."""
  config = tiny_config(tmp_path_factory.mktemp('finished'), **STEPS)
  stages.train_teacher(config)
  stages.train_stage1(config)
  return config.workdir


@pytest.fixture
def run(finished, tmp_path):
  shutil.copytree(finished, tmp_path / 'run')
  return tiny_config(tmp_path / 'run', **STEPS)


def test_a_pipeline_rerun_with_another_w_max_is_refused_in_one_line(run):
  args = [f'--config.{section}.num_steps={steps}' for section, steps in STEPS.items()]
  result = subprocess.run([sys.executable, 'main.py', '--config=configs/tiny.py', '--mode=pipeline',
                           f'--config.workdir={run.workdir}', *args, '--config.distill.w_max=2.0'],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
  errors = [line for line in result.stderr.splitlines() if line.startswith('error:')]
  stage1_dir = stages.stage_dir(run.workdir, 'stage1')
  assert result.returncode == 1 and errors == [
      f'error: {stage1_dir} was trained with distill.w_max=4.0 but this config gives 2.0: rerun '
      'with the value it was trained with, pass --config.retrain_stale=True to set it aside and '
      'train it again, or use another --config.workdir'], result.stderr[-3000:]
  assert not os.path.exists(
      stages.stage_dir(run.workdir, 'stage2', 2)), 'nothing distilled from the old stage 1'


def test_retrain_stale_sets_the_old_stage_aside_and_trains_it_again(run):
  run.distill.w_max = 2.0
  run.retrain_stale = True
  stages.train_stage1(run)
  stage1_dir = stages.stage_dir(run.workdir, 'stage1')
  # kept, not deleted
  assert records.read(f'{stage1_dir}.stale')['config']['distill']['w_max'] == 4.0
  assert records.read(stage1_dir)['config']['distill']['w_max'] == 2.0
  assert records.stale_field(stage1_dir, run, 'stage1') is None


def test_a_stale_teacher_is_refused_where_a_student_loads_it(run):
  run.train.lr = 2e-3
  with pytest.raises(records.StaleStageError) as err:
    stages.train_stage1(run)
  teacher_dir = stages.stage_dir(run.workdir, 'teacher')
  assert str(err.value) == (
      f'{teacher_dir} was trained with train.lr=0.001 but this config gives 0.002: rerun with '
      'the value it was trained with, rerun --mode=teacher with --config.retrain_stale=True to '
      'train it again, or use another --config.workdir')


def test_log_evaluation_and_output_fields_do_not_make_a_stage_stale(run):
  run.train.update(log_every=1, checkpoint_every=2, keep_checkpoints=5, max_nonfinite_steps=3)
  run.stage1.update(log_every=1, checkpoint_every=1)
  run.eval.update(num_samples=256, guidance_ws=(1.0,), extractor='toy2d', clip_x=True)
  run.pipeline.update(quality_samples=0, guidance_ws=(3.0,), per_class=2)
  run.sample.update(guidance_w=3.0, num_steps=5)
  run.transfer.update(w_decode=3.0)
  run.profile.update(num_steps=2)
  run.distill.update(allow_incomplete_teacher=True, redistill=True)
  run.data.tfds_data_dir = '/elsewhere'
  for stage in ('teacher', 'stage1'):
    assert records.stale_field(stages.stage_dir(run.workdir, stage), run, stage) is None
  # loads the teacher, finds stage 1 finished: nothing refused, nothing trained
  stages.train_stage1(run)


@pytest.mark.parametrize('field, value, changed', [
    ('train.num_steps', 8, False),  # more steps at a constant lr: the stage resumes and trains them
    ('train.num_steps', 2, True),
    ('train.lr_decay', 'linear', True),
    ('model.hidden', 32, True),
    ('seed', 1, True),
    ('diffusion.loss_weighting', 'snr_plus_one', True),
    ('train.p_uncond', 0.2, True),
])
def test_which_teacher_fields_make_a_finished_teacher_stale(run, field, value, changed):
  saved = records.read(stages.stage_dir(run.workdir, 'teacher'))['config']
  section, _, name = field.rpartition('.')
  (run[section] if section else run)[name] = value
  found = records.changed_input(saved, run, 'teacher')
  assert (found is not None) == changed
  if changed:
    assert found[0] == field and found[2] == value


@pytest.mark.parametrize('field, value', [
    ('distill.w_max', 2.0), ('distill.w_min', 1.0), ('stage1.lr', 5e-4), ('train.lr', 2e-3),
    ('train.log_every', 1), ('eval.num_samples', 256), ('seed', 3), ('model.hidden', 32),
    ('stage2.lr', 1e-4), ('stage2.final_steps', 2), ('pipeline.quality_samples', 0),
    ('train.checkpoint_every', 1), ('sample.guidance_w', 0.5)])
def test_the_sweep_shares_a_stage_exactly_when_a_rerun_would_not_refuse_it(tmp_path, field, value):
  base, point = tiny_config(tmp_path), tiny_config(tmp_path)
  sweep.set_dotted(point, field, value)
  for stage in sweep.SHARED_STAGES:
    shared = sweep.stage_inputs(base, stage) == sweep.stage_inputs(point, stage)
    refused = records.changed_input(records.to_json(base.to_dict()), point, stage) is not None
    assert shared != refused, (stage, field)
