"""The pipeline's per-stage fidelity table on stand-in checkpoints (no training, a few seconds).

The real checkpoints go through it in tests/test_logging.py (run_pipeline on the trained toy run).
"""

import json
import logging
import os
import re
import time

import numpy as np
import pytest

from conftest import tiny_config
from data.toy2d import TOY2D_MEANS
from distill import stages
from modes import fid, pipeline, stage_quality
from modes.methods import Method
from modes.validation import ConfigError, validate_config
from eval import fidelity

# tiny: stage2.start_steps 4, final_steps 1
STAGE_TITLES = ['stage 1', 'stage 2: 4 -> 2', 'stage 2: 2 -> 1']
# A stand-in's sample is the class mean + noise, shifted by its checkpoint's error (the teacher has
# none).
ERRORS = {'teacher': 0.0, 'stage1': 0.02, 'steps_0002': 0.05, 'steps_0001': 0.1}
TEACHER_FLOOR_ERROR = 0.03  # the teacher at tiny's floor_steps = 2


class FakeCheckpoint:
  """LoadedCheckpoint's record and sample() for a 2-D toy run; every call is appended to `calls`."""

  def __init__(self, ckpt_dir: str, calls: list):
    self.ckpt_dir, self.calls = ckpt_dir, calls
    self.record = {'num_classes': 4, 'x_shape': [2]}

  def sample(self, *, sampler, num_steps, guidance_w, z_init, label, seed, clip_x=False):
    del clip_x
    self.calls.append(
        dict(ckpt=os.path.basename(self.ckpt_dir), sampler=sampler, steps=num_steps, w=guidance_w,
             z_init=np.asarray(z_init), label=np.asarray(label), seed=seed))
    error = ERRORS[os.path.basename(self.ckpt_dir)] * (2.0 if sampler == 'stochastic' else 1.0)
    error += (TEACHER_FLOOR_ERROR if
              (os.path.basename(self.ckpt_dir), num_steps) == ('teacher', 2) else 0.0)
    # [B, 2]
    return TOY2D_MEANS[np.asarray(label)] + 0.2 * np.asarray(z_init) + error * (1.0 + guidance_w)


class FakeWriter:
  def __init__(self):
    self.scalars = {}

  def write_scalars(self, step, scalars):
    self.scalars.update({tag: (step, value) for tag, value in scalars.items()})

  def write_images(self, step, images):
    pass

  def write_texts(self, step, texts):
    pass

  def close(self):
    pass


@pytest.fixture
def fake_run(tmp_path, monkeypatch):
  """A tiny config whose checkpoints are FakeCheckpoints; returns (config, the list of sample()
  calls)."""
  calls = []
  monkeypatch.setattr(
      stage_quality, 'load_cached',
      lambda cache, ckpt_dir: cache.setdefault(ckpt_dir, FakeCheckpoint(ckpt_dir, calls)))
  monkeypatch.setattr(stage_quality, 'checkpoint_id', lambda ckpt_dir: 'fake')
  return tiny_config(tmp_path), calls


def _run_all(config, writer=None) -> stage_quality.StageQuality:
  """What run_pipeline does with it: stage 1, then every stage-2 round."""
  quality = stage_quality.StageQuality(config, writer)
  quality.after_stage1()
  for n in stages.stage2_rounds(config):
    quality.after_round(n)
  return quality


def _pipeline_without_training(config, monkeypatch, **stand_ins):
  """run_pipeline with every stage already trained and no sample grids: only the quality table does
  work.

  stand_ins replace a training function (by name) with another stand-in than the one that does
  nothing.
  """
  for name in ('train_teacher', 'train_stage1', 'train_stage2_round'):
    monkeypatch.setattr(pipeline.stages, name, stand_ins.get(name, lambda *args: None))
  monkeypatch.setattr(pipeline, '_sample_all', lambda *args: [])
  writer = FakeWriter()
  monkeypatch.setattr(pipeline, 'make_writer', lambda logdir: writer)
  results_dir = pipeline.run_pipeline(config)
  return results_dir, writer


def _table_rows(summary: str, w: str) -> list[list[str]]:
  """The cells of the rows of the 'w = <w>' table of the fidelity section."""
  section = summary.split('## Fidelity to the teacher, stage by stage')[1].split('\n## ')[0]
  table = section.split(f'### w = {w}\n')[1].split('\n###')[0]
  return [[c.strip() for c in line.split('|')[1:-1]] for line in table.strip().splitlines()[2:]]


def test_pipeline_summary_has_the_teacher_rows_and_one_row_per_stage_for_every_w(
    fake_run, monkeypatch):
  config, _ = fake_run
  results_dir, writer = _pipeline_without_training(config, monkeypatch)
  with open(os.path.join(results_dir, 'summary.md'), encoding='utf-8') as f:
    summary = f.read()
  for w in ('0', '2'):
    rows = [r for r in _table_rows(summary, w) if 'stochastic' not in r[0]]
    assert [r[0] for r in rows] == ['teacher CFG ddim 8 (reference)', 'teacher CFG ddim 2 (floor)',
                                    'stage 1 ddim 8', 'student ddim 2 (stage 2: 4 -> 2)',
                                    'student ddim 1 (stage 2: 2 -> 1)']
    assert [r[1] for r in rows] == ['16', '4', '8', '2', '1']
    fidelities = [float(r[2]) for r in rows]
    assert fidelities[0] == 0.0 and all(f > 0 for f in fidelities[1:])
    # the stand-ins' errors grow round by round
    assert fidelities[2] < fidelities[3] < fidelities[4]
    assert rows[2][3] in ('faithful', 'drifted') and rows[0][3] == '-'
    assert rows[2][4] == rows[2][2]  # stage 1's own teacher is the reference
  with open(os.path.join(results_dir, 'stage_quality.json'), encoding='utf-8') as f:
    # the teacher's (two rows under one key), stage 1, two rounds
    assert len(json.load(f)['rows']) == 4 * 2
  with open(os.path.join(results_dir, 'timings.json'), encoding='utf-8') as f:
    timings = json.load(f)
  # times name their machine
  assert 'quality' in timings and ' cores' in timings['machine (this invocation)']
  assert f'Machine: {timings["machine (this invocation)"]}' in summary
  assert os.path.exists(os.path.join(results_dir, 'fidelity_vs_w.png'))
  step, value = writer.scalars['quality/stage2_4to2/w2/fidelity']
  assert step == 1 and value > 0
  assert {'quality/stage1/w0/paired_rms', 'quality/stage2_2to1/w0/stochastic_fidelity',
          'quality/teacher_floor/w0/fidelity', 'quality/stage1/w0/recall'} <= set(writer.scalars)


def test_the_stochastic_column_follows_quality_stochastic(tmp_path):
  config = tiny_config(tmp_path)
  n = stages.stage2_rounds(config)[-1]
  assert stage_quality.round_comparison(config, n).stochastic.sampler == 'stochastic'
  config.pipeline.quality_stochastic = False
  # no column, no samples, not in the key
  assert stage_quality.round_comparison(config, n).stochastic is None


def test_teacher_and_student_sample_from_identical_noise_and_labels(fake_run):
  config, calls = fake_run
  stage_quality.StageQuality(config).after_stage1()
  teacher = [
      c for c in calls if c['ckpt'] == 'teacher' and c['steps'] == config.pipeline.quality_steps
  ]
  student = [c for c in calls if c['ckpt'] == 'stage1']
  assert len(teacher) == len(student) == 2  # one batch of 256 per w
  for t, s in zip(teacher, student, strict=True):
    assert t['w'] == s['w'] and t['seed'] == s['seed']
    np.testing.assert_array_equal(t['z_init'], s['z_init'])
    np.testing.assert_array_equal(t['label'], s['label'])
    assert np.bincount(t['label']).tolist() == [64] * 4  # class-balanced


def test_a_checkpoint_compared_with_itself_has_fidelity_0_and_rms_0(fake_run):
  config, calls = fake_run
  method = Method('stage 1', 'ddim', 8, 8, stages.stage_dir(config.workdir, 'stage1'))
  _, extract = fid.make_extractor(config)
  sets = []
  for _ in range(2):  # two separately loaded copies of the checkpoint
    samples = stage_quality.sample_set(FakeCheckpoint(method.ckpt_dir, calls), method, w=1.0,
                                       num_samples=512, batch_size=256, seed=config.pipeline.seed)
    sets.append((samples,
                 stage_quality.extract_features(samples, extract=extract, batch_size=256,
                                                num_classes=4, logits_are_classes=True)))
  (teacher, teacher_features), (student, student_features) = sets
  assert teacher.shape == (512, 2)
  assert (
      fidelity.frechet_between(teacher_features, student_features) == pytest.approx(0.0, abs=1e-9))
  assert stage_quality.paired_rms(teacher, student) == 0.0


def test_a_rerun_reads_the_cache_and_samples_nothing_and_a_killed_run_resumes(
    fake_run, monkeypatch):
  config, calls = fake_run
  stage_quality.StageQuality(config).after_stage1()  # a run killed after stage 1's rows
  calls.clear()
  finished = _run_all(config)
  # two rounds at two w: the teacher's and stage 1's rows were kept
  assert finished.computed_rows == 2 * 2

  def must_not_sample(*args, **kwargs):
    raise AssertionError('a finished comparison was sampled again')

  monkeypatch.setattr(stage_quality, 'sample_set', must_not_sample)
  rerun = _run_all(config)
  assert rerun.rows == finished.rows and len(rerun.rows) == 5 * 2
  monkeypatch.setattr(stage_quality, 'checkpoint_id', lambda ckpt_dir: 'retrained')
  with pytest.raises(AssertionError, match='sampled again'):
    _run_all(config)  # another training in the same directory is not served from the cache


def test_a_row_is_keyed_by_the_evaluation_protocol(fake_run):
  config, _ = fake_run
  plain = stage_quality.StageQuality(config)._key('stage1', 1.0)
  # (refused for toy data by validate_config; the key does not look at data)
  config.eval.quantize_uint8 = True
  quantized = stage_quality.StageQuality(config)._key('stage1', 1.0)
  assert quantized != plain and ' | uint8 | ' in quantized


def test_quality_samples_0_turns_it_off(fake_run, monkeypatch):
  config, calls = fake_run
  config.pipeline.quality_samples = 0
  results_dir, writer = _pipeline_without_training(config, monkeypatch)
  assert not calls and not writer.scalars
  assert not os.path.exists(os.path.join(results_dir, 'stage_quality.json'))
  with open(os.path.join(results_dir, 'summary.md'), encoding='utf-8') as f:
    assert 'Fidelity to the teacher' not in f.read()
  with open(os.path.join(results_dir, 'timings.json'), encoding='utf-8') as f:
    assert 'quality' not in json.load(f)


def test_inception_without_weights_skips_the_table_with_one_line(fake_run, caplog):
  config, calls = fake_run
  config.eval.update(extractor='inception', inception_path='/nonexistent/inception.npz')
  with caplog.at_level(logging.WARNING):
    quality = _run_all(config)
  assert not quality.enabled and not calls and quality.summary_lines() == []
  assert len([r for r in caplog.records if '[quality]' in r.getMessage()]) == 1


@pytest.mark.parametrize('field, value, message', [
    ('quality_samples', -1, 'pipeline.quality_samples must be >= 0 (0 = off)'),
    ('quality_samples', 100,
     'pipeline.quality_samples (100) must be a multiple of eval.batch_size (256)'),
    ('quality_steps', 0, 'pipeline.quality_steps must be > 0'),
    ('floor_steps', 8, 'pipeline.floor_steps must be in [1, pipeline.quality_steps=8), got 8'),
    ('quality_ws', (), 'pipeline.quality_ws must name at least one guidance weight'),
])
def test_bad_quality_fields_give_one_line_naming_the_field(tmp_path, field, value, message):
  config = tiny_config(tmp_path)
  config.pipeline[field] = value
  with pytest.raises(ConfigError, match=re.escape(message)):
    validate_config(config)


def test_a_rerun_keeps_the_recorded_time_of_what_it_skipped(fake_run, monkeypatch):
  config, _ = fake_run
  results_dir = os.path.join(config.workdir, 'results')
  os.makedirs(results_dir)
  with open(os.path.join(results_dir, 'timings.json'), 'w', encoding='utf-8') as f:
    json.dump({'teacher': 257.0}, f)  # trained by an earlier invocation
  monkeypatch.setattr(pipeline, '_trained', lambda config, stage, steps=None: stage == 'teacher')
  _pipeline_without_training(config, monkeypatch)
  with open(os.path.join(results_dir, 'timings.json'), encoding='utf-8') as f:
    first = json.load(f)
  # this run's (fast: 0.0)
  assert first['teacher'] == 257.0 and first['stage1'] < 1.0 and first['quality'] >= 0.0
  # a rerun of a finished run
  monkeypatch.setattr(pipeline, '_trained', lambda config, stage, steps=None: True)
  # loading, checks
  _pipeline_without_training(config, monkeypatch, train_stage1=lambda *args: time.sleep(1.5))
  with open(os.path.join(results_dir, 'timings.json'), encoding='utf-8') as f:
    second = json.load(f)
  assert {k: second[k] for k in ('teacher', 'stage1', 'quality')} == {k: first[k] for k in (
      'teacher', 'stage1', 'quality')}
  assert second['pipeline (this invocation)'] >= 1.5

