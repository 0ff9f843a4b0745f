"""Every mode logs through the metric writers of train/writers.py: TensorBoard event files and a
plain metrics.jsonl per run."""

import glob
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from tensorboard.backend.event_processing import event_accumulator

from modes import fid
from modes.pipeline import run_pipeline
from modes.sampling import LoadedCheckpoint
from modes.sampling import run_sample
from train import writers

pytestmark = pytest.mark.integration  # the second tier (tests/conftest.py)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
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


def test_tensorboard_writer_round_trips_values_and_images_as_tf_summary_does(tmp_path):
  writer = writers.TensorBoardWriter(str(tmp_path))
  grid = np.arange(6 * 7, dtype=np.uint8).reshape(1, 6, 7, 1) * 6  # [N, H, W, C]
  rgb = np.linspace(-0.2, 1.2, 4 * 5 * 3).reshape(4, 5, 3)  # floats: clipped to [0, 1], 255 levels
  writer.write_scalars(7, {'loss': 0.25})
  writer.write_images(7, {'grid': grid, 'rgb': rgb})
  writer.write_texts(0, {'timings': '{"teacher": 1.5}'})
  writer.write_hparams({'train.lr': 2e-3, 'data.name': 'toy2d'})
  writer.close()
  events = event_accumulator.EventAccumulator(
      str(tmp_path), size_guidance={event_accumulator.TENSORS: 0})
  events.Reload()
  assert tensorboard_tags(tmp_path) == {'scalars': {'loss'}, 'images': {'grid', 'rgb'},
                                        'text': {'timings'},
                                        'hparams': {'_hparams_/session_start_info'}}
  assert [(e.step, e.tensor_proto.float_val[0]) for e in events.Tensors('loss')] == [(7, 0.25)]
  assert events.Tensors('timings')[0].tensor_proto.string_val == [b'{"teacher": 1.5}']
  for tag, want in (('grid', grid[0]), ('rgb', np.floor(np.clip(rgb, 0, 1) * 255 + 0.5))):
    width, height, png = events.Tensors(tag)[0].tensor_proto.string_val
    pixels = np.asarray(Image.open(io.BytesIO(png))).reshape(want.shape)
    assert (int(width), int(height)) == want.shape[1::-1] and np.array_equal(pixels, want), tag


def test_the_modes_never_import_tensorflow():
  """Importing TensorFlow costs every command seconds at start-up: only tfds data sets need it."""
  code = ('import sys; from modes import pipeline, fid, sampling, transfer, stage_quality; '
          'from train import loop, writers; from distill import stages; '
          'print(sorted(m for m in sys.modules if m.split(".")[0] == "tensorflow"))')
  out = subprocess.run([sys.executable, '-c', code], cwd=REPO, capture_output=True, text=True,
                       check=True).stdout
  assert out.strip() == '[]', out


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
