"""--mode=fid end to end on the trained toy run: CSV, table, plots, reuse of finished cells."""

import csv
import os
import re

import numpy as np
import pytest

from conftest import stub_fid_scoring, tiny_config
from eval.images import quantize_uint8
from eval import report as fid_report
from eval.report import write_table
from modes import fid
from modes.validation import ConfigError, validate_config

pytestmark = pytest.mark.integration  # the second tier (tests/conftest.py)


def _rows(path):
  with open(path) as f:
    return list(csv.DictReader(f))


def test_fid_mode_scores_every_method_and_reuses_cells(toy_run, monkeypatch):
  out_dir = fid.run_fid(toy_run)
  rows = _rows(os.path.join(out_dir, 'results.csv'))
  cells = {(r['method'], r['sampler'], int(r['steps']), float(r['w'])): r for r in rows}
  # teacher DDIM 64 and 4, DDPM 64; students: ddim 8 and 4, stochastic 16 and 8; the direct
  # baseline's guided ddim 8 and 4 (toy_run trains it); two w each
  assert len(cells) == 9 * 2 and ('direct PD CFG', 'ddim', 4, 2.0) in cells
  # 2-D 'FID' is a coarse moment match (noise floor ~0.01 at 512 samples): every method of a good
  # toy run is near 0, every sample lands in its own class (accuracy 1) and the 4 classes are
  # balanced (IS ~ 4).
  for row in rows:
    assert float(row['fid']) < 0.05, row
    assert float(row['accuracy']) > 0.99, row
    assert 3.9 < float(row['is_mean']) <= 4.0, row
  for name in ('results.md', 'fid_vs_steps.png', 'fid_vs_is.png'):
    assert os.path.getsize(os.path.join(out_dir, name)) > 0
  for row in rows:  # every cell against the teacher's 64-step CFG DDIM at the same w and noise
    assert 0 <= float(row['precision']) <= 1 and 0 <= float(row['recall']) <= 1, row
    is_reference = (row['method'], row['sampler'], row['steps']) == ('teacher CFG', 'ddim', '64')
    assert (float(row['fidelity']) == 0) == is_reference, row
  with open(os.path.join(out_dir, 'results.md'), encoding='utf-8') as f:
    assert '## Fidelity to the teacher' in f.read()

  def must_not_run(*args, **kwargs):
    raise AssertionError('a finished cell was evaluated again')

  monkeypatch.setattr(fid, 'evaluate_cell', must_not_run)
  fid.run_fid(toy_run)
  assert len(_rows(os.path.join(out_dir, 'results.csv'))) == len(rows)
  monkeypatch.setattr(fid.records, 'checkpoint_id', lambda ckpt_dir: 'retrained')
  with pytest.raises(AssertionError, match='evaluated again'):
    # another training in the same directory: its cells are not served from the cache
    fid.run_fid(toy_run)


def test_reference_statistics_are_keyed_by_example_count_and_a_damaged_file_is_recomputed(
    tmp_path, caplog):
  from conftest import tiny_config  # pylint: disable=g-import-not-at-top
  config = tiny_config(tmp_path)
  name, extract = fid.make_extractor(config)
  cache = tmp_path / 'reference_stats'
  mu, sigma = fid.reference_stats(config, name, extract, str(cache))
  (path,) = cache.iterdir()
  config.eval.reference_examples = 1024
  fid.reference_stats(config, name, extract, str(cache))
  assert len(list(cache.iterdir())) == 2, ('another example count must not reuse the '
                                           'cached statistics')
  config.eval.reference_examples = 2048
  path.write_bytes(b'PK\x03\x04 cut short')
  again_mu, again_sigma = fid.reference_stats(config, name, extract, str(cache))
  assert 'unreadable' in caplog.text
  np.testing.assert_array_equal(mu, again_mu)
  np.testing.assert_array_equal(sigma, again_sigma)
  # the rewritten file reads
  assert fid.reference_stats(config, name, extract, str(cache))[0].shape == mu.shape


def test_table_has_one_row_per_method_and_one_column_per_step_count(tmp_path):
  rows = [dict(
      method='teacher CFG', sampler='ddim', steps=s, nfe=2 * s, w=1.0, fid=10.0 / s, is_mean=2.0)
          for s in (4, 256)]
  rows.append(dict(method='student', sampler='ddim', steps=4, nfe=4, w=1.0, fid=1.5, is_mean=3.0))
  write_table(rows, tmp_path / 'table.md', title='t')
  text = (tmp_path / 'table.md').read_text()
  assert '| method | NFE per step | 4 steps | 256 steps |' in text
  assert '| teacher CFG ddim | 2 | 2.50 / 2.00 | 0.04 / 2.00 |' in text
  assert '| student ddim | 1 | 1.50 / 3.00 |  |' in text


def test_classifier_extractor_trains_the_missing_classifier_once(tmp_path, monkeypatch):
  from configs import digits_teacher  # pylint: disable=g-import-not-at-top
  from eval import classifier  # pylint: disable=g-import-not-at-top
  config = digits_teacher.get_config()
  config.workdir = str(tmp_path / 'run')
  config.eval.classifier_steps = 5
  name, extract = fid.make_extractor(config)
  assert name == 'classifier' and classifier.latest_step(fid.classifier_dir(config)) is not None
  images = np.zeros((4, 8, 8, 1), np.float32)
  assert extract(images)['logits'].shape == (4, 10)

  def no_training(*args, **kwargs):
    raise AssertionError(f'trained again: {args} {kwargs}')
  # cached now: loaded, not retrained
  monkeypatch.setattr(classifier, '_make_train_step', no_training)
  fid.make_extractor(config)


def test_a_changed_protocol_option_reevaluates_exactly_the_cells_it_affects(tmp_path, monkeypatch):
  evaluated = stub_fid_scoring(monkeypatch)
  # teacher ddim 64 and 4, ddpm 64; students ddim 2, 1 and stochastic 4, 2; w 0, 2
  config = tiny_config(tmp_path)
  fid.run_fid(config)
  assert len(evaluated) == 7 * 2
  evaluated.clear()
  fid.run_fid(config)
  assert not evaluated  # everything read back from results.csv
  config.eval.ddpm_variance = 'large'
  fid.run_fid(config)
  # DDIM and stochastic cells do not depend on it
  assert evaluated == [('ddpm', 64, 0.0), ('ddpm', 64, 2.0)]
  evaluated.clear()
  config.eval.quantize_uint8 = True
  fid.run_fid(config)
  assert len(evaluated) == 7 * 2


def test_more_noise_seeds_score_only_the_new_draws_and_the_table_gives_mean_and_spread(
    tmp_path, monkeypatch):
  evaluated = stub_fid_scoring(monkeypatch)
  seeds = []
  stub = fid.evaluate_cell
  monkeypatch.setattr(fid, 'evaluate_cell',
                      lambda *args, seed, **kwargs: seeds.append(seed) or stub(*args, **kwargs))
  config = tiny_config(tmp_path)
  config.eval.seed = 5
  fid.run_fid(config)
  assert set(seeds) == {5} and len(evaluated) == 7 * 2
  evaluated.clear(), seeds.clear()
  config.eval.num_seeds = 3
  out_dir = fid.run_fid(config)
  # seed 5's cells are read back
  assert sorted(set(seeds)) == [6, 7] and len(evaluated) == 7 * 2 * 2
  rows = _rows(os.path.join(out_dir, 'results.csv'))
  assert sorted({int(r['seed']) for r in rows}) == [5, 6, 7] and len(rows) == 7 * 2 * 3
  with open(os.path.join(out_dir, 'results.md'), encoding='utf-8') as f:
    assert '| 1.00 ± 0.00 / 1.00 |' in f.read()  # the stand-in scores 1.0 in every draw


def test_paired_differences_are_taken_seed_by_seed_against_the_teacher(tmp_path):
  # The student is 0.1 worse than the teacher's 8 steps in every draw while the draws themselves
  # move by +-1.
  draws = {0: 4.0, 1: 5.0, 2: 6.0}
  rows = [dict(method='teacher CFG', sampler='ddim', steps=s, nfe=2 * s, w=0.0, seed=k, is_mean=9.0,
               fid=v + (0.0 if s == 8 else -0.3)) for k, v in draws.items() for s in (8, 64)]
  rows += [dict(
      method='student', sampler='ddim', steps=8, nfe=8, w=0.0, seed=k, is_mean=9.0, fid=v + 0.1)
           for k, v in draws.items()]
  (same_steps, converged) = fid_report.paired_differences(rows)
  assert same_steps[1:4] == ('student ddim', 8, 8) and converged[3] == 64
  np.testing.assert_allclose(same_steps[4:6], (0.1, 0.0), atol=1e-12)  # mean, standard error
  np.testing.assert_allclose(converged[4], 0.4)
  assert same_steps[6:] == (0, 3)  # better in 0 of 3 seeds
  write_table(rows, tmp_path / 'table.md', title='t')
  text = (tmp_path / 'table.md').read_text(encoding='utf-8')
  assert '| student ddim | 1 | 5.10 ± 1.00 / 9.00 |' in text
  assert '| 0 | student ddim | 8 | 8 | +0.100 ± 0.000 | 0/3 |' in text


def test_cell_keys_of_rows_written_before_the_protocol_options_existed_mean_their_defaults():
  old = dict(
      method='teacher CFG',
      sampler='ddpm',
      steps='64',
      w='1.0',
      num_samples='512',
      checkpoint='c',
      # a results.csv row without the newer columns
      extractor='toy2d',
      seed='2',
      clip_x='False')
  now = dict(old, quantize_uint8=False, ddpm_variance='small')
  assert fid._cell_key(old) == fid._cell_key(now)
  assert fid._cell_key(dict(now, ddpm_variance='large')) != fid._cell_key(now)
  assert fid._cell_key(dict(now, quantize_uint8=True)) != fid._cell_key(now)
  ddim = dict(now, sampler='ddim', ddpm_variance='')
  assert fid._cell_key(dict(ddim, ddpm_variance='large')) == fid._cell_key(ddim)


def test_reference_statistics_are_keyed_by_quantisation_and_see_quantised_images(tmp_path):
  config = tiny_config(tmp_path)
  config.data.name = 'digits'  # 17 grey levels, not on the uint8 grid: quantising changes them
  config.eval.update(reference_examples=500, batch_size=250)
  extract = lambda images: {'pool': np.asarray(images).reshape(len(images), -1)[:, :6]}  # [B, 6]
  plain, _ = fid.reference_stats(config, 'stand_in', extract, str(tmp_path))
  config.eval.quantize_uint8 = True
  quantized, _ = fid.reference_stats(config, 'stand_in', extract, str(tmp_path))
  assert sorted(p.name.endswith('_u8.npz') for p in tmp_path.glob('ref_*.npz')) == [False, True]
  x = np.concatenate(list(fid._real_batches(config, 250)))  # [500, 8, 8, 1]
  np.testing.assert_array_equal(x, quantize_uint8(x))
  np.testing.assert_allclose(quantized, x.reshape(500, -1)[:, :6].mean(0), rtol=1e-5)
  assert not np.allclose(plain, quantized)


@pytest.mark.parametrize('section, field, value, message', [
    ('sample', 'ddpm_variance', 'medium',
     "unknown sample.ddpm_variance 'medium'; choose one of: small, large"),
    ('eval', 'ddpm_variance', 'fixed_large',
     "unknown eval.ddpm_variance 'fixed_large'; choose one of: small, large"),
    ('eval', 'quantize_uint8', True,
     'eval.quantize_uint8 rounds images to uint8 levels; toy2d is vector data'),
    ('eval', 'num_seeds', 0,
     'eval.num_seeds must be an integer >= 1 (noise draws per cell), got 0'),
])
def test_bad_protocol_options_give_one_line_naming_the_field(
    tmp_path, section, field, value, message):
  config = tiny_config(tmp_path)
  config[section][field] = value
  with pytest.raises(ConfigError, match=re.escape(message)):
    validate_config(config)


def test_direct_baseline_rows_are_listed_for_the_rounds_mode_direct_trained(tmp_path):
  from modes.methods import Method, list_methods  # pylint: disable=g-import-not-at-top
  config = tiny_config(tmp_path)  # direct rounds 4 -> 2 -> 1
  assert not [m for m in list_methods(config, teacher_steps=(8,)) if m.name == 'direct PD CFG']
  os.makedirs(tmp_path / 'direct' / 'steps_0002')  # --mode=direct trained its first round only
  direct = [m for m in list_methods(config, teacher_steps=(8,)) if m.name == 'direct PD CFG']
  assert direct == [Method('direct PD CFG', 'ddim', 2, 4, str(tmp_path / 'direct' / 'steps_0002'),
                           round_steps=2)]  # 2 calls a step


def test_fixed_w_students_are_scored_at_their_own_w_only(toy_run, tmp_path, monkeypatch):
  """eval.fixed_w_dir adds a fixed-w sweep's students as 'student fixed-w' rows, each at the w its
  stage 1 saw."""
  import shutil  # pylint: disable=g-import-not-at-top
  from modes import methods  # pylint: disable=g-import-not-at-top
  assert methods.fixed_w_of(toy_run.workdir) is None  # the w-conditioned run: w ~ U[w_min, w_max]
  point = tmp_path / 'fixed' / 'sweep' / 'distill.w_min=2,distill.w_max=2'
  # a stand-in point: the toy run's chain, read as distilled at w = 2
  for stage in ('stage1', 'stage2'):
    shutil.copytree(os.path.join(toy_run.workdir, stage), point / stage)
  monkeypatch.setattr(methods, 'fixed_w_of', lambda point_dir: 2.0
                      if point_dir.endswith('w_max=2') else None)
  config = toy_run.copy_and_resolve_references()
  config.eval.update(fixed_w_dir=str(tmp_path / 'fixed'), out_dir=str(tmp_path / 'eval'),
                     teacher_steps=(4,), teacher_ddpm_steps=(), student_steps=(4,))
  out_dir = fid.run_fid(config)
  rows = _rows(os.path.join(out_dir, 'results.csv'))
  fixed = {(r['sampler'], int(r['steps']),
            float(r['w'])) for r in rows if r['method'] == 'student fixed-w'}
  assert fixed == {('ddim', 4, 2.0)}  # the 4-step round at w = 2 only, not at w = 0
  with open(os.path.join(out_dir, 'results.md'), encoding='utf-8') as f:
    table = f.read().split('## FID / IS against the real data')[1]  # the FID tables, one per w
  assert table.count('| student fixed-w ddim |') == 1
  assert table.index('## w = 2') < table.index('| student fixed-w ddim |')
  config.eval.fixed_w_dir = str(tmp_path / 'nothing')
  with pytest.raises(ValueError,
                     match=r"eval.fixed_w_dir='.*nothing' holds no sweep/: run `--mode=sweep"):
    fid.run_fid(config)


def test_clipped_teacher_rows_share_the_table_with_unclipped_ones(toy_run, tmp_path):
  """eval.teacher_clipped_steps: 'teacher CFG clipped' rows sampled with per-step x clipping,
  whatever eval.clip_x, keyed as clipped, beside the unclipped teacher of the same run."""
  config = toy_run.copy_and_resolve_references()
  config.eval.update(out_dir=str(tmp_path / 'eval'), teacher_steps=(4,), teacher_clipped_steps=(4,),
                     teacher_ddpm_steps=(), stage1_steps=(), student_steps=(), guidance_ws=(0.0,))
  rows = _rows(os.path.join(fid.run_fid(config), 'results.csv'))
  by_method = {r['method']: r for r in rows}
  assert set(by_method) == {'teacher CFG', 'teacher CFG clipped'}
  assert (by_method['teacher CFG']['clip_x'] == 'False' and
          by_method['teacher CFG clipped']['clip_x'] == 'True')
  # toy points reach past +-1
  assert by_method['teacher CFG']['fid'] != by_method['teacher CFG clipped']['fid']


def test_is_axis_shows_a_classifier_bounded_is_as_its_gap_to_the_class_count_on_a_log_scale():
  # Inception: IS itself
  assert fid_report.is_axis([9.38, 9.97], None) == ([9.38, 9.97], 'IS', 'linear')
  x, label, scale = fid_report.is_axis([9.38, 9.97, 10.0], 10)
  np.testing.assert_allclose(x, [0.62, 0.03, 1e-4], rtol=1e-6)  # 9.97 and 9.99 no longer overlap
  assert scale == 'log' and label.startswith('10 - IS')


def _rescore_without(config, csv_path, rows, dropped, monkeypatch) -> list:
  """results.csv rewritten without the row `dropped`, then --mode=fid again; returns the methods it
  scored."""
  with open(csv_path, 'w', newline='') as f:
    writer = csv.DictWriter(f, fieldnames=fid.CSV_FIELDS)
    writer.writeheader()
    writer.writerows(r for r in rows if r is not dropped)
  scored = []
  real_evaluate_cell = fid.evaluate_cell
  monkeypatch.setattr(
      fid, 'evaluate_cell',
      lambda loaded, method, *a, **k: scored.append(method.name) or real_evaluate_cell(
          loaded, method, *a, **k))
  fid.run_fid(config)
  return scored


def test_a_cell_scored_in_a_later_run_gets_its_fidelity_from_the_stored_reference(
    toy_run, tmp_path, monkeypatch):
  config = toy_run.copy_and_resolve_references()
  config.eval.update(out_dir=str(tmp_path / 'eval'), guidance_ws=(2.0,), teacher_ddpm_steps=(),
                     student_steps=(4,))
  csv_path = os.path.join(fid.run_fid(config), 'results.csv')
  first = {(r['method'], r['sampler'], r['steps']): r for r in _rows(csv_path)}
  student = first[('student', 'ddim', '4')]
  # it alone is scored again
  scored = _rescore_without(config, csv_path, first.values(), student, monkeypatch)
  again = {(r['method'], r['sampler'], r['steps']): r for r in _rows(csv_path)}
  assert scored == ['student']
  assert float(again[('student', 'ddim', '4')]['fidelity']) == pytest.approx(
      float(student['fidelity']), rel=1e-6)
  assert float(student['fidelity']) > 0


def test_a_damaged_reference_cell_is_sampled_again_and_the_others_keep_their_fidelity(
    toy_run, tmp_path, monkeypatch, caplog):
  config = toy_run.copy_and_resolve_references()
  config.eval.update(out_dir=str(tmp_path / 'eval'), guidance_ws=(2.0,), teacher_ddpm_steps=(),
                     student_steps=(4,))
  csv_path = os.path.join(fid.run_fid(config), 'results.csv')
  first = {(r['method'], r['sampler'], r['steps']): r for r in _rows(csv_path)}
  (stats_path,) = [os.path.join(tmp_path, 'eval', 'reference_cells', name)
                   for name in os.listdir(tmp_path / 'eval' / 'reference_cells')]
  with open(stats_path, 'wb') as f:
    f.write(b'PK\x03\x04 cut off')  # a damaged npz
  student = first[('student', 'ddim', '4')]
  # it needs the reference
  scored = _rescore_without(config, csv_path, first.values(), student, monkeypatch)
  rows = _rows(csv_path)
  again = {(r['method'], r['sampler'], r['steps']): r for r in rows}
  assert sorted(scored) == ['student', 'teacher CFG'] and len(rows) == len(first)
  assert 'is unreadable' in caplog.text and stats_path in caplog.text
  assert float(again[('student', 'ddim', '4')]['fidelity']) == pytest.approx(
      float(student['fidelity']), rel=1e-6)
  assert np.load(stats_path)['sigma'].ndim == 2  # written over
