"""Samples for the standard evaluators (eval/export.py), read back by readers written to their
documented layouts: guided-diffusion's evaluations/evaluator.py (npz arr_0 streamed from the zip,
arr_1 labels) and EDM's fid.py (training.dataset.ImageFolderDataset over a zip of PNGs with
dataset.json labels)."""

import io
import json
import os
import zipfile

import numpy as np
import pytest
from PIL import Image

from eval.export import export_samples

pytestmark = pytest.mark.integration  # the second tier (tests/conftest.py)


def read_like_guided_diffusion(path, batch_size=4):
  """As evaluator.py's open_npz_array(path, 'arr_0'): the .npy member's header, then raw batches of
  its bytes."""
  batches = []
  with open(path, 'rb') as f, zipfile.ZipFile(f, 'r') as zip_f:
    names = zip_f.namelist()
    assert 'arr_0.npy' in names
    with zip_f.open('arr_0.npy', 'r') as arr_f:
      version = np.lib.format.read_magic(arr_f)
      assert version in ((1, 0), (2, 0))  # else the evaluator falls back to loading it whole
      shape, fortran, dtype = np.lib.format.read_array_header_1_0(arr_f)
      assert not fortran and not dtype.hasobject  # the streaming reader's conditions
      for start in range(0, shape[0], batch_size):
        count = min(batch_size, shape[0] - start)
        data = arr_f.read(int(count * np.prod(shape[1:]) * dtype.itemsize))
        batches.append(np.frombuffer(data, dtype=dtype).reshape([count, *shape[1:]]))
  with np.load(path) as arrays:
    labels = arrays['arr_1']
  return np.concatenate(batches), labels, names


def read_like_edm(path):
  """As ImageFolderDataset(path=ZIP): files with a PIL image extension, sorted; labels from
  dataset.json."""
  Image.init()
  with zipfile.ZipFile(path) as archive:
    names = set(archive.namelist())
    image_names = sorted(n for n in names if os.path.splitext(n)[1].lower() in Image.EXTENSION)
    images = [np.array(Image.open(io.BytesIO(archive.read(n)))) for n in image_names]
    labels = dict(json.loads(archive.read('dataset.json'))['labels'])
  return np.stack(images), np.array([labels[n] for n in image_names]), archive


def _samples(n=10, size=5, channels=3, seed=0):
  rng = np.random.default_rng(seed)
  # some outside [-1, 1]
  images = rng.uniform(-1.2, 1.2, (n, size, size, channels)).astype(np.float32)
  images[0] = -1.0
  images[1] = 1.0
  return images, np.arange(n) % 3


def test_the_exported_npz_is_what_guided_diffusions_evaluator_reads(tmp_path):
  images, labels = _samples()
  npz, _ = export_samples(str(tmp_path / 'teacher_ddim_8steps_w1'), images, labels)
  # N x H x W x C, as its sampler names it
  assert os.path.basename(npz) == 'teacher_ddim_8steps_w1_10x5x5x3.npz'
  pixels, read_labels, names = read_like_guided_diffusion(npz)
  assert pixels.dtype == np.uint8 and pixels.shape == (10, 5, 5, 3)
  expected = np.round((np.clip(images, -1, 1) + 1) * 127.5)
  np.testing.assert_array_equal(pixels, expected)
  assert pixels[0].max() == 0 and pixels[1].min() == 255
  np.testing.assert_array_equal(read_labels, labels)
  # else the evaluator would read stored statistics instead of the images
  assert 'mu.npy' not in names


def test_the_exported_zip_is_what_edms_fid_reads_and_holds_the_same_pixels(tmp_path):
  images, labels = _samples(n=12)
  npz, archive_path = export_samples(str(tmp_path / 'student'), images, labels)
  pixels, read_labels, archive = read_like_edm(archive_path)
  with np.load(npz) as arrays:
    # PNG is lossless: the same images in both files
    np.testing.assert_array_equal(pixels, arrays['arr_0'])
  np.testing.assert_array_equal(read_labels, labels)
  assert all(info.compress_type == zipfile.ZIP_STORED for info in archive.infolist())


def test_grey_samples_are_written_as_rgb(tmp_path):
  images, labels = _samples(n=4, channels=1)
  npz, archive_path = export_samples(str(tmp_path / 'digits'), images, labels)
  pixels, _, _ = read_like_guided_diffusion(npz)
  assert pixels.shape == (4, 5, 5, 3) and os.path.basename(npz).endswith('_4x5x5x3.npz')
  for channel in range(3):
    np.testing.assert_array_equal(pixels[..., channel],
                                  np.round((np.clip(images[..., 0], -1, 1) + 1) * 127.5))
  np.testing.assert_array_equal(read_like_edm(archive_path)[0], pixels)
