"""Every mode logs through clu metric writers: TensorBoard event files and a plain metrics.jsonl per
run."""

import glob
import json
import os

import pytest
from tensorboard.backend.event_processing import event_accumulator

from modes import fid
from modes.pipeline import run_pipeline
from modes.sampling import LoadedCheckpoint
from modes.sampling import run_sample
from train import writers

pytestmark = pytest.mark.integration  # the second tier (tests/conftest.py)

TRAIN_SCALARS = {'loss', 'lr', 'grad_norm', 'steps_per_sec', 'num_skipped', 'consecutive_skipped'}


def tensorboard_tags(logdir) -> dict[str, set]:
  """{'scalars': tags, 'images': tags, 'text': tags} of the event files in logdir (TF2 summaries are
  tensors)."""
  assert glob.glob(os.path.join(logdir, 'events.out.tfevents.*')), f'no event file in {logdir}'
  events = event_accumulator.EventAccumulator(
      str(logdir), size_guidance={event_accumulator.TENSORS: 0})
  events.Reload()
  tags = {}
  for tag in events.Tags()['tensors']:
    tags.setdefault(events.SummaryMetadata(tag).plugin_data.plugin_name, set()).add(tag)
  return tags


def test_jsonl_writer_writes_one_object_per_line_and_skips_a_cut_line(tmp_path):
  path = tmp_path / 'metrics.jsonl'
  writer = writers.JsonlWriter(str(path))
  writer.write_scalars(10, {'loss': 0.5, 'lr': 1e-3})
  writer.write_images(10, {'grid': None})  # TensorBoard only
  writer.write_hparams({'lr': 1e-3})
  writer.close()
  with open(path, 'a') as f:
    f.write('{"step": 20, "loss"')  # a line cut short by a killed process
  rows = writers.read_jsonl(str(path))
  assert [(r['step'], r.get('loss')) for r in rows] == [(10, 0.5), (None, None)]
  assert rows[1]['hparams'] == {'lr': 1e-3}


def test_a_resumed_jsonl_writer_removes_the_cut_line_before_appending(tmp_path):
  path = tmp_path / 'metrics.jsonl'
  path.write_text('{"step": 10, "loss": 0.5}\n{"step": 20, "lo')  # killed in the middle of a line
  writer = writers.JsonlWriter(str(path))  # the resumed run
  writer.write_scalars(20, {'loss': 0.25})
  writer.close()
  lines = path.read_text().splitlines()
  assert [json.loads(line) for line in lines] == [{'step': 10, 'loss': 0.5}, json.loads(lines[1])]
  assert json.loads(lines[1])['loss'] == 0.25 and json.loads(lines[1])['step'] == 20
  path.write_text('{"step": 1')  # a cut first line: nothing of it is kept
  writers.JsonlWriter(str(path)).close()
  assert path.read_text() == ''


def test_every_training_stage_and_round_has_event_files_and_jsonl(toy_run):
  logs = os.path.join(toy_run.workdir, 'logs')
  runs = (['teacher', 'stage1'] +
          [f'{stage}/steps_{n:04d}' for stage in ('stage2', 'encoder') for n in (8, 4)])
  for run in runs:
    assert TRAIN_SCALARS <= tensorboard_tags(os.path.join(logs, run))['scalars'], run
    rows = writers.read_jsonl(os.path.join(logs, run, writers.JSONL_NAME))
    assert TRAIN_SCALARS <= set(rows[-1]), run
    assert rows[-1]['step'] == toy_run[run.split('/')[0].replace('teacher', 'train')].num_steps
    hparams = [r['hparams'] for r in rows if 'hparams' in r]  # the config, once, as the run started
    assert (len(hparams) == 1 and hparams[0]['data.name'] == 'toy2d' and
            hparams[0]['train.lr'] == toy_run.train.lr)
    assert hparams[0]['pipeline.guidance_ws'] == str(list(toy_run.pipeline.guidance_ws)), run
  # one line per halving round: step 1 is 16 -> 8, step 2 is 8 -> 4
  for stage in ('stage2', 'encoder'):
    rounds = writers.read_jsonl(os.path.join(logs, stage, 'rounds', writers.JSONL_NAME))
    assert [(r['step'], r['student_steps']) for r in rounds] == [(1, 8), (2, 4)]
    assert all(r['final_loss'] > 0 and r['seconds'] > 0 for r in rounds)


@pytest.fixture
def toy_copy(toy_run, tmp_path):
  """The trained toy run's config, with this test's own results folders (the checkpoints are
  shared)."""
  config = toy_run.copy_and_resolve_references()
  config.pipeline.update(guidance_ws=(1.0,), teacher_steps=(4,))
  config.sample.out_dir = str(tmp_path / 'samples')
  config.eval.update(out_dir=str(tmp_path / 'eval'), guidance_ws=(1.0,), teacher_steps=(4,),
                     teacher_ddpm_steps=(), student_steps=(4,), num_samples=256)
  return config


def test_sampling_and_eval_modes_write_images_and_scalars(toy_copy):
  logs = os.path.join(toy_copy.workdir, 'logs')
  run_pipeline(toy_copy)
  pipeline_tags = tensorboard_tags(os.path.join(logs, 'pipeline'))
  assert ({'samples/teacher_CFG_ddim_w1', 'samples/student_ddim_w1',
           'samples/student_stochastic_w1'} <= pipeline_tags['images'])
  assert 'saturated/student_ddim_w1' in pipeline_tags['scalars']

  run_sample(toy_copy)
  assert 'teacher_CFG_ddim_64steps_w1' in tensorboard_tags(os.path.join(logs, 'sample'))['images']

  fid.run_fid(toy_copy)
  assert ({'fid/student_ddim/w1', 'is/student_ddim/w1'}
          <= tensorboard_tags(os.path.join(logs, 'eval'))['scalars'])
  rows = [
      r for r in writers.read_jsonl(os.path.join(logs, 'eval', writers.JSONL_NAME))
      if 'fid/student_ddim/w1' in r
  ]
  assert rows[-1]['step'] == 4 and rows[-1]['fid/student_ddim/w1'] >= 0


def test_a_rerun_of_the_pipeline_reads_its_grids_back_and_samples_nothing(toy_copy, monkeypatch):
  run_pipeline(toy_copy)
  results = os.path.join(toy_copy.workdir, 'results')
  pngs = {
      name: open(os.path.join(results, name), 'rb').read()
      for name in os.listdir(results)
      if name.endswith('.png')
  }

  def must_not_sample(*args, **kwargs):
    raise AssertionError(
        'a grid whose checkpoint, noise and settings are unchanged was sampled again')

  monkeypatch.setattr(LoadedCheckpoint, 'sample', must_not_sample)
  run_pipeline(toy_copy)
  assert pngs and all(
      open(os.path.join(results, name), 'rb').read() == png for name, png in pngs.items())
  # other grid inputs (the quality table keeps its rows): grids are drawn again
  toy_copy.pipeline.per_class += 1
  with pytest.raises(AssertionError, match='sampled again'):
    run_pipeline(toy_copy)
