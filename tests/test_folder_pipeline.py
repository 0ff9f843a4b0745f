"""A tiny pipeline on a generated image folder, end to end (configs/folder_tiny.py: 8x8 images, a
one-level U-Net, 4 steps a stage); its samples exported for the standard evaluators; a folder of
other classes refused before anything is written in its workdir."""

import csv
import os
import subprocess
import sys

import pytest

from configs import folder_tiny
from distill import stages
from image_folders import write_folder
from modes import fid
from modes.pipeline import run_pipeline
from modes.sampling import run_sample
from modes.validation import ConfigError, validate_config
from test_export import read_like_edm, read_like_guided_diffusion
from train import checkpoint, records

pytestmark = pytest.mark.integration  # the second tier (tests/conftest.py)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASSES = {'ant': ['png', 'jpg', 'png'], 'bee': ['jpeg', 'png', 'png', 'jpg']}


@pytest.fixture(scope='module')
def folder_run(tmp_path_factory):
  """configs/folder_tiny.py's pipeline on a 2-class folder of PNG and JPEG images of 12x10
  pixels."""
  root = tmp_path_factory.mktemp('folder_run')
  config = folder_tiny.get_config()
  config.data.path = write_folder(root / 'images', CLASSES, size=(12, 10))
  config.workdir = str(root / 'run')
  # the grids' batch: their compiled samplers serve --mode=fid
  config.eval.update(batch_size=4, num_samples=12)
  validate_config(config)
  run_pipeline(config)
  return config


def _snapshot(folder) -> dict:
  """{path: (size, mtime)} of every file below folder."""
  return {os.path.join(root, n): (os.path.getsize(os.path.join(root, n)),
                                  os.path.getmtime(os.path.join(root, n)))
          for root, _, names in os.walk(folder) for n in names}


def test_the_pipeline_trains_every_stage_on_the_folder_and_records_its_classes(folder_run):
  for stage, steps in (('teacher', None), ('stage1', None), ('stage2', 2)):
    ckpt_dir = stages.stage_dir(folder_run.workdir, stage, steps)
    assert checkpoint.latest_step(ckpt_dir) == 4, ckpt_dir
    record = records.read(ckpt_dir)
    assert (record['class_names'] == ['ant', 'bee'] and record['num_classes'] == 2 and
            record['x_shape'] == [8, 8, 3])
    assert record['data'] == 'folder' and record['config']['data']['path'] == folder_run.data.path
  results = os.path.join(folder_run.workdir, 'results')
  assert os.path.getsize(os.path.join(results, 'summary.md')) > 0
  assert any(name.endswith('.png') for name in os.listdir(results))


def test_sample_mode_exports_what_the_standard_evaluators_read(folder_run, tmp_path):
  config = folder_run.copy_and_resolve_references()
  config.sample.update(export_samples=True, num_steps=2, per_class=2, out_dir=str(tmp_path))
  run_sample(config)
  (npz,) = [n for n in os.listdir(tmp_path) if n.endswith('_4x8x8x3.npz')]
  pixels, labels, _ = read_like_guided_diffusion(os.path.join(tmp_path, npz))
  assert pixels.shape == (4, 8, 8, 3) and list(labels) == [0, 0, 1, 1]
  edm_pixels, edm_labels, _ = read_like_edm(os.path.join(tmp_path, npz[:-len('.npz')] + '.zip'))
  assert (edm_pixels == pixels).all() and list(edm_labels) == [0, 0, 1, 1]


def test_fid_mode_exports_every_scored_cell_and_samples_again_a_cell_whose_export_is_gone(
    folder_run, tmp_path, monkeypatch):
  """The scoring plumbing on folder data with a stand-in extractor (Inception's weights are not
  here): reference statistics from the folder's images, one export per cell, a cell reused only when
  its export is there."""
  stand_in = lambda images: {'pool': images.reshape(images.shape[0], -1)[:, :3],  # [B, 3]
                             'logits': images.reshape(images.shape[0], -1)[:, :2]}  # [B, 2]
  monkeypatch.setattr(fid, 'make_extractor', lambda config: ('stand_in', stand_in))
  monkeypatch.setattr(fid, 'extractor_id', lambda config: 'stand_in')
  config = folder_run.copy_and_resolve_references()
  config.eval.update(export_samples=True, out_dir=str(tmp_path / 'eval'))
  out_dir = fid.run_fid(config)
  with open(os.path.join(out_dir, 'results.csv')) as f:
    rows = list(csv.DictReader(f))
  # teacher CFG ddim 2 and student ddim 2 (eval.student_steps=(2,)); w 0 and 1
  assert len(rows) == 2 * 2
  exported = sorted(os.listdir(os.path.join(out_dir, 'samples')))
  assert len(exported) == 2 * len(rows) and all(
      r['reference'] == fid.COMPUTED_REFERENCE for r in rows)
  pixels, labels, _ = read_like_guided_diffusion(os.path.join(out_dir, 'samples', exported[0]))
  assert pixels.shape == (12, 8, 8, 3) and sorted(labels) == [0] * 6 + [1] * 6  # class-balanced
  scored = []
  real_evaluate_cell = fid.evaluate_cell
  monkeypatch.setattr(fid, 'evaluate_cell', lambda *a, **k: scored.append(k['export_prefix']) or
                      real_evaluate_cell(*a, **k))
  os.remove(os.path.join(out_dir, 'samples', exported[0]))
  fid.run_fid(config)
  assert len(scored) == 1 and exported[0].startswith(os.path.basename(scored[0]))


def test_a_folder_of_other_classes_than_the_teachers_is_refused_before_anything_is_written(
    folder_run, tmp_path):
  other = write_folder(tmp_path / 'three', {'ant': ['png'], 'bee': ['png'], 'cow': ['png']})
  before = _snapshot(folder_run.workdir)
  result = subprocess.run(
      [sys.executable, os.path.join(REPO, 'main.py'), '--config=configs/folder_tiny.py',
       '--mode=stage1', f'--config.data.path={other}', f'--config.workdir={folder_run.workdir}'],
      capture_output=True, text=True, timeout=300, cwd=REPO, check=False)
  assert result.returncode == 1, result.stderr[-2000:]
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith(f'error: the data ({other}) has 3 classes but the teacher in ') and \
      'was trained on 2 (ant, bee): use its data or another --config.workdir' in last, last
  assert _snapshot(folder_run.workdir) == before
  renamed = write_folder(tmp_path / 'renamed', {'ant': ['png'], 'wasp': ['png']})
  config = folder_run.copy_and_resolve_references()
  config.data.path = renamed
  with pytest.raises(ConfigError, match=r"class 1 is 'wasp' here, 'bee' there"):
    validate_config(config)
  config.data.update(path=folder_run.data.path, resolution=4)
  with pytest.raises(ConfigError,
                     match=r'examples of shape \(4, 4, 3\) but the teacher .* on \(8, 8, 3\)'):
    validate_config(config)
