"""Logs that survive a kill (metrics.jsonl on disk up to the last checkpoint, strict JSON) and
result caches that heal (an unreadable stage_quality.json, timings.json, grid_samples/*.npz or
eval/results.csv is computed again, with one warning); --mode=fid's cell key holds the sample count
and the extractor's id."""

import json
import logging
import os

import jax.numpy as jnp
import numpy as np
import pytest

from conftest import Killed, stub_fid_scoring, tiny_config
from modes import fid, pipeline, stage_quality
from modes.methods import Method
from train import writers
from train.loop import run_training

pytestmark = pytest.mark.integration  # the second tier (tests/conftest.py)

GARBAGE = b'\x00{"rows": [1, 2'  # cut JSON, no CSV header, no zip archive


def _quadratic(params, batch, rng, frozen):
  del rng, frozen
  return jnp.mean(jnp.square(params['w'] - batch['x'])), {'nan_metric': jnp.array(jnp.nan)}


def _lines(path) -> list[dict]:
  """metrics.jsonl as strict JSON: NaN or Infinity in it fails."""
  def refuse(constant):
    raise ValueError(f'not JSON: {constant}')
  return [json.loads(line, parse_constant=refuse) for line in open(path, encoding='utf-8')]


def test_metrics_jsonl_is_on_disk_up_to_each_checkpoint_and_a_resume_rewrites_the_rest(tmp_path):
  section = tiny_config(tmp_path).train
  section.update(num_steps=6, warmup_steps=0, log_every=1, checkpoint_every=3)
  logdir, ckpt_dir = tmp_path / 'logs', str(tmp_path / 'ckpt')
  path = logdir / writers.JSONL_NAME
  on_disk = {}

  def make_batches(start, kill_at=None):
    for step in range(start, 100):
      on_disk[step] = path.read_bytes() if path.exists() else b''  # what a kill -9 now would leave
      if step == kill_at:
        raise Killed()
      yield {'x': np.ones((64, 3), np.float32), 'label': np.zeros(64, np.int32)}

  train = lambda batches: run_training(title='log', loss_fn=_quadratic, params={'w': jnp.zeros(3)},
                                       section=section, ckpt_dir=ckpt_dir,
                                       record={'stage': 'teacher'}, make_batches=batches, seed=0,
                                       logdir=str(logdir))
  with pytest.raises(Killed):
    train(lambda start: make_batches(start, kill_at=5))  # killed while step 6's batch is read
  steps_at = (
      lambda step: [line['step'] for line in map(json.loads, on_disk[step].decode().splitlines())])
  assert steps_at(3) == [1, 2, 3]  # every step up to the checkpoint at 3
  path.write_bytes(on_disk[5])  # kill -9 at that moment: lines 4 and 5 were not flushed yet
  train(make_batches)  # resumes from step 3 and logs 4, 5, 6 again
  lines = _lines(path)
  assert [line['step'] for line in lines][-3:] == [4, 5, 6]
  assert {line['step'] for line in lines} == {1, 2, 3, 4, 5, 6}
  assert all(line['nan_metric'] is None for line in lines)  # NaN written as null


def test_metrics_jsonl_writes_non_finite_values_as_null(tmp_path):
  writer = writers.JsonlWriter(str(tmp_path / 'metrics.jsonl'))
  writer.write_scalars(1, {'loss': float('nan'), 'grad_norm': np.float32('inf'),
                           'per_w': np.array([1.0, -np.inf])})
  writer.write_hparams({'train.lr': float('inf')})
  writer.close()
  first, second = _lines(tmp_path / 'metrics.jsonl')
  assert (first['loss'], first['grad_norm'], first['per_w']) == (None, None, [1.0, None])
  assert second['hparams'] == {'train.lr': None}


def _warnings_about(caplog, path) -> list[str]:
  return [
      r.getMessage()
      for r in caplog.records
      if r.levelno == logging.WARNING and str(path) in r.getMessage()
  ]


def test_an_unreadable_stage_quality_json_is_computed_again_with_one_warning(tmp_path, caplog):
  config = tiny_config(tmp_path)  # quality_samples > 0, toy2d features: the table is on
  path = tmp_path / 'results' / stage_quality.RESULTS_NAME
  path.parent.mkdir()
  path.write_bytes(GARBAGE)
  with caplog.at_level(logging.WARNING):
    quality = stage_quality.StageQuality(config)
  # (every row computed again)
  assert quality.enabled and quality._done == {}  # pylint: disable=protected-access
  assert len(_warnings_about(caplog, path)) == 1


def test_an_unreadable_timings_json_is_written_again_with_one_warning(tmp_path, caplog):
  path = tmp_path / 'timings.json'
  for content in (GARBAGE, b'[1, 2]'):  # cut; JSON of another shape
    path.write_bytes(content)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
      assert pipeline._read_timings(str(path)) == {}  # pylint: disable=protected-access
    assert len(_warnings_about(caplog, path)) == 1


class _Sampler:
  """A stand-in checkpoint of the pipeline's grids: counts its sample() calls."""

  def __init__(self):
    self.calls = 0

  def sample(self, *, z_init, **kwargs):
    del kwargs
    self.calls += 1
    return np.asarray(z_init)


def test_unreadable_grid_samples_are_sampled_again_with_one_warning(tmp_path, caplog, monkeypatch):
  config = tiny_config(tmp_path)
  monkeypatch.setattr(pipeline.records, 'checkpoint_id', lambda ckpt_dir: 'fixed')
  method = Method('teacher CFG', 'ddim', 2, 4, str(tmp_path / 'teacher'))
  loaded = {method.ckpt_dir: _Sampler()}
  z_init, label = np.zeros((4, 2), np.float32), np.arange(4)
  grid = lambda: pipeline._grid_samples(  # pylint: disable=protected-access
      config, str(tmp_path / 'results'), loaded, method, 1.0, z_init=z_init, label=label)
  grid()
  grid()
  assert loaded[method.ckpt_dir].calls == 1  # the second is read back
  (path,) = (tmp_path / 'results' / 'grid_samples').iterdir()
  path.write_bytes(GARBAGE)
  with caplog.at_level(logging.WARNING):
    np.testing.assert_array_equal(grid(), z_init)
  assert loaded[method.ckpt_dir].calls == 2 and len(_warnings_about(caplog, path)) == 1
  grid()
  assert loaded[method.ckpt_dir].calls == 2  # healed: written again, read back


# tiny: teacher ddim 64 and 4, ddpm 64; students ddim 2, 1 and stochastic 4, 2; w 0 and 2
CELLS = 7 * 2


@pytest.mark.parametrize('content',
                         [GARBAGE, (','.join(fid.CSV_FIELDS) + '\nteacher CFG,ddim,64\n').encode()],
                         ids=['cut', 'row_cut_short'])
def test_an_unreadable_results_csv_is_scored_again_with_one_warning(
    tmp_path, caplog, monkeypatch, content):
  evaluated = stub_fid_scoring(monkeypatch)
  config = tiny_config(tmp_path)
  path = tmp_path / 'eval' / 'results.csv'
  path.parent.mkdir()
  path.write_bytes(content)
  with caplog.at_level(logging.WARNING):
    fid.run_fid(config)
  assert len(evaluated) == CELLS and len(_warnings_about(caplog, path)) == 1
  evaluated.clear()
  fid.run_fid(config)
  assert not evaluated  # healed: every cell read back


def test_the_fid_cell_key_holds_the_sample_count_and_the_extractor_id(tmp_path, monkeypatch):
  evaluated = stub_fid_scoring(monkeypatch)
  config = tiny_config(tmp_path)
  fid.run_fid(config)
  evaluated.clear()
  config.eval.num_samples = 1024
  fid.run_fid(config)
  assert len(evaluated) == CELLS, 'another sample count must not reuse the cells'
  evaluated.clear()
  monkeypatch.setattr(fid, 'extractor_id', lambda config: 'toy2d@other-weights')
  fid.run_fid(config)
  assert len(evaluated) == CELLS, 'other feature-extractor weights must not reuse the cells'
