"""Reference statistics from the standard files (eval/reference_stats.py), written here in each
format: pytorch-fid's and EDM's {mu, sigma} npz and guided-diffusion's reference batch; their
provenance keys the FID cells."""

import csv
import os
import shutil

import numpy as np
import pytest

from configs import digits_teacher
from conftest import tiny_config
from data.toy2d import TOY2D_COVS, TOY2D_MEANS
from distill import stages
from eval import reference_stats
from modes import fid
from modes.validation import ConfigError, validate_config


def _stats(dim: int, seed: int = 0):
  rng = np.random.default_rng(seed)
  features = rng.standard_normal((4 * dim, dim))
  return features.mean(0), np.cov(features, rowvar=False)  # [D], [D, D]


def write_pytorch_fid(path, mu, sigma):
  """As pytorch-fid's save_fid_stats: np.savez_compressed(path, mu=m1, sigma=s1)."""
  np.savez_compressed(path, mu=mu, sigma=sigma)
  return str(path)


def write_edm(path, mu, sigma):
  """As EDM's `fid.py ref`: np.savez(dest_path, mu=mu, sigma=sigma)."""
  np.savez(path, mu=mu, sigma=sigma)
  return str(path)


def write_guided_diffusion(path, mu, sigma, num_images: int = 6):
  """A reference batch as guided-diffusion's evaluator reads it: arr_0 uint8 NHWC images, arr_1
  labels, the pool statistics mu / sigma and the spatial ones mu_s / sigma_s (here of another size,
  as sFID's are)."""
  rng = np.random.default_rng(1)
  mu_s, sigma_s = _stats(3, seed=2)
  np.savez(path, arr_0=rng.integers(0, 256, (num_images, 8, 8, 3), dtype=np.uint8),
           arr_1=np.arange(num_images) % 3, mu=mu, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s)
  return str(path)


WRITERS = {'pytorch-fid': (write_pytorch_fid, reference_stats.MU_SIGMA),
           'edm': (write_edm, reference_stats.MU_SIGMA),
           'guided-diffusion': (write_guided_diffusion, reference_stats.GUIDED_DIFFUSION)}


@pytest.mark.parametrize('writer', sorted(WRITERS))
def test_each_standard_format_loads_its_mu_and_sigma(writer, tmp_path):
  write, fmt = WRITERS[writer]
  mu, sigma = _stats(8)
  path = write(tmp_path / f'{writer}.npz', mu, sigma)
  loaded_mu, loaded_sigma, reference = reference_stats.load(path)
  np.testing.assert_array_equal(loaded_mu, mu)
  np.testing.assert_array_equal(loaded_sigma, sigma)
  assert loaded_mu.dtype == loaded_sigma.dtype == np.float64
  assert reference.format == fmt and reference.dim == 8
  # the header-only look agrees with the loaded arrays
  assert reference_stats.inspect(path) == reference


def test_float32_statistics_load_as_float64(tmp_path):
  mu, sigma = _stats(4)
  path = write_edm(tmp_path / 'f32.npz', mu.astype(np.float32), sigma.astype(np.float32))
  loaded_mu, loaded_sigma, _ = reference_stats.load(path)
  assert loaded_mu.dtype == np.float64
  np.testing.assert_allclose(loaded_sigma, sigma, rtol=1e-6)


def test_provenance_names_the_file_and_its_digest(tmp_path):
  mu, sigma = _stats(4)
  a = write_edm(tmp_path / 'ref.npz', mu, sigma)
  (tmp_path / 'copy').mkdir()
  copy = shutil.copy(a, tmp_path / 'copy' / 'ref.npz')
  first = reference_stats.provenance(a)
  assert first.startswith('ref.npz@sha256:') and len(first.split(':')[1]) == 16
  assert reference_stats.provenance(str(copy)) == first  # the same file wherever it lies
  write_edm(tmp_path / 'ref.npz', mu + 1.0, sigma)
  assert reference_stats.provenance(a) != first  # other statistics under the same name


@pytest.mark.parametrize('arrays,match', [
    (dict(arr_0=np.zeros((2, 8, 8, 3), np.uint8)), 'holds arr_0, no mu and sigma'),
    (dict(mu=np.zeros(3), sigma=np.zeros((3, 4))), r'has mu \(3,\) and sigma \(3, 4\)'),
    (dict(mu=np.zeros((3, 1)), sigma=np.zeros((3, 3))), r'expected mu \[D\] and sigma \[D, D\]'),
])
def test_files_without_usable_statistics_are_refused_in_one_line(arrays, match, tmp_path):
  path = tmp_path / 'bad.npz'
  np.savez(path, **arrays)
  with pytest.raises(reference_stats.ReferenceStatsError, match=match) as error:
    reference_stats.inspect(str(path))
  assert '\n' not in str(error.value) and str(path) in str(error.value)


def test_a_missing_or_unreadable_file_is_refused_in_one_line(tmp_path):
  with pytest.raises(reference_stats.ReferenceStatsError, match='does not exist'):
    reference_stats.inspect(str(tmp_path / 'none.npz'))
  (tmp_path / 'text.npz').write_text('not a zip')
  with pytest.raises(reference_stats.ReferenceStatsError, match='is not a readable .npz') as error:
    reference_stats.inspect(str(tmp_path / 'text.npz'))
  assert '\n' not in str(error.value)


def test_non_finite_statistics_are_refused(tmp_path):
  mu, sigma = _stats(4)
  mu[1] = np.nan
  with pytest.raises(reference_stats.ReferenceStatsError, match='non-finite'):
    reference_stats.load(write_edm(tmp_path / 'nan.npz', mu, sigma))


def test_a_2048_d_inception_file_needs_the_inception_extractor_before_anything_is_written(tmp_path):
  """The feature spaces must match: the digits classifier's 128-d features against Inception pool
  statistics is refused by the config check (main.py runs it before the workdir is touched), naming
  the fix."""
  mu = np.zeros(2048, np.float32)
  path = write_edm(tmp_path / 'cifar10-32x32.npz', mu, np.eye(2048, dtype=np.float32))
  config = digits_teacher.get_config()
  config.workdir = str(tmp_path / 'run')
  config.eval.reference_stats = path
  with pytest.raises(ConfigError) as error:
    validate_config(config)
  message = str(error.value)
  assert '\n' not in message and 'holds 2048-d statistics' in message
  assert "eval.extractor 'classifier' gives 128-d features" in message
  assert '--config.eval.extractor=inception' in message
  assert not (tmp_path / 'run').exists()
  reference = reference_stats.inspect(path)
  # the right extractor: accepted
  reference_stats.check_dim(reference, extractor='inception', feature_dim=2048)
  small = write_pytorch_fid(tmp_path / 'dims768.npz', *_stats(768 // 96))
  with pytest.raises(reference_stats.ReferenceStatsError,
                     match=r'give a file of 2048-d statistics'):
    reference_stats.check_dim(reference_stats.inspect(small), extractor='inception',
                              feature_dim=2048)


def test_the_extractors_feature_dimensions():
  assert reference_stats.extractor_feature_dim('inception') == 2048
  assert reference_stats.extractor_feature_dim('classifier') == 128
  assert reference_stats.extractor_feature_dim('toy2d') == 2


def _rows(path):
  with open(path) as f:
    return list(csv.DictReader(f))


def test_fid_mode_scores_against_the_files_statistics_and_keys_its_cells_by_the_files_provenance(
    tmp_path, monkeypatch):
  """A tiny toy teacher scored against three EDM-format files whose means differ by 0, +d and -d:
  with the same samples, FID(+d) + FID(-d) - 2 FID(0) = 2 |d|^2 exactly, so the file's statistics
  are what is scored; each file's cells are its own (the provenance in the key), and a rerun with a
  file reuses its cells."""
  config = tiny_config(tmp_path / 'run', train=20)
  stages.train_teacher(config)
  config.eval.update(teacher_steps=(4,), teacher_ddpm_steps=(), student_steps=(),
                     guidance_ws=(0.0,), num_samples=256, batch_size=256,
                     out_dir=str(tmp_path / 'eval'))
  weights = np.full(len(TOY2D_MEANS), 1.0 / len(TOY2D_MEANS))
  mu = weights @ TOY2D_MEANS  # [2]: the mixture's mean and covariance
  sigma = np.einsum('k,kij->ij', weights, TOY2D_COVS) + np.cov(TOY2D_MEANS.T, bias=True)
  shift = np.array([0.5, -0.25])
  fids = {}
  for name, sign in (('zero', 0), ('plus', 1), ('minus', -1)):
    config.eval.reference_stats = write_edm(tmp_path / f'{name}.npz', mu + sign * shift, sigma)
    validate_config(config)
    rows = _rows(os.path.join(fid.run_fid(config), 'results.csv'))
    (row,) = [
        r for r in rows if r['reference'] == reference_stats.provenance(config.eval.reference_stats)
    ]
    fids[name] = float(row['fid'])
  # one cell per file, none reused across
  assert len(rows) == 3 and len({r['reference'] for r in rows}) == 3
  np.testing.assert_allclose(
      fids['plus'] + fids['minus'] - 2 * fids['zero'], 2 * shift @ shift, rtol=1e-6)
  monkeypatch.setattr(fid, 'evaluate_cell',
                      lambda *args, **kwargs: pytest.fail('a finished cell was scored again'))
  config.eval.reference_stats = str(tmp_path / 'plus.npz')
  fid.run_fid(config)  # the same file: its cell is reused
