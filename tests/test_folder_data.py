"""The folder data source (data/folder.py) on generated PNG/JPEG folders: classes, squares, the
input pipeline, every bad-input case as one line before anything is written; and 'tfds:NAME' data
sets (mocked)."""

import os

import ml_collections
import numpy as np
import pytest

import data
from configs import folder_tiny
from data.folder import scan_folder
from image_folders import write_folder, write_image
from modes.validation import ConfigError, validate_config


def _data_config(path, resolution=8, name='folder', random_flip=False):
  return ml_collections.ConfigDict(dict(name=name, path=str(path), resolution=resolution,
                                        random_flip=random_flip, tfds_data_dir=''))


def _take(iterator, n):
  batches = [next(iterator) for _ in range(n)]
  del iterator  # a live tf.data pipeline can hang interpreter shutdown
  return batches


def test_classes_are_the_sorted_sub_folders_and_every_image_below_them_counts(tmp_path):
  root = write_folder(tmp_path / 'f', {'dog': ['png', 'jpg'], 'cat': ['jpeg', 'PNG']})
  # grey, deeper down
  write_image(tmp_path / 'f' / 'cat' / 'nested' / 'x.png', width=9, height=20, mode='L')
  write_image(tmp_path / 'f' / 'dog' / 'y.png', width=8, height=8, mode='RGBA')
  (tmp_path / 'f' / 'cat' / 'notes.txt').write_text('not an image')
  (tmp_path / 'f' / '.hidden').mkdir()
  index = scan_folder(root, 8)
  assert index.class_names == ('cat', 'dog')
  names = [os.path.relpath(f, root) for f in index.files]
  assert names == [
      'cat/000.jpeg', 'cat/001.PNG', 'cat/nested/x.png', 'dog/000.png', 'dog/001.jpg', 'dog/y.png']
  assert index.labels == (0, 0, 0, 1, 1, 1)
  info = data.dataset_info(_data_config(root))
  assert info == data.DatasetInfo('folder', (8, 8, 3), 2, True, ('cat', 'dog'))


def test_the_pipeline_yields_labelled_rgb_squares_in_minus_one_one(tmp_path):
  root = write_folder(
      tmp_path / 'f', {'a': ['png'] * 3, 'b': ['jpg'] * 2, 'c': ['jpeg']}, size=(13, 9))
  write_image(tmp_path / 'f' / 'c' / 'grey.png', width=8, height=11, mode='L')
  batches = _take(
      data.make_train_iterator(_data_config(root, random_flip=True), per_host_batch_size=4, seed=0),
      3)
  for batch in batches:
    assert batch['x'].shape == (4, 8, 8, 3) and batch['x'].dtype == np.float32
    assert batch['x'].min() >= -1.0 and batch['x'].max() <= 1.0
    assert batch['label'].dtype == np.int32 and set(batch['label']) <= {0, 1, 2}
  x, labels = data.load_examples(_data_config(root), 'train', limit=100)
  assert x.shape == (7, 8, 8, 3) and sorted(labels) == [0, 0, 0, 1, 1, 2, 2]  # each image once
  again, _ = data.load_examples(_data_config(root), 'train', limit=100)
  np.testing.assert_array_equal(x, again)  # a fixed order


def _square(tmp_path, **image):
  root = tmp_path / 'sq'
  write_image(root / 'only' / 'image.png', **image)
  x, _ = data.load_examples(_data_config(root, resolution=8), 'train', limit=1)
  # [8, 8, 3] back to the file's pixel values
  return np.round((x[0] + 1.0) * 127.5).astype(np.uint8)


def test_an_image_whose_shorter_side_is_the_resolution_is_only_centre_cropped(tmp_path):
  path = write_image(tmp_path / 'wide.png', width=14, height=8, seed=3)
  from PIL import Image  # pylint: disable=g-import-not-at-top
  pixels = np.asarray(Image.open(path))  # [8, 14, 3]
  square = _square(tmp_path, width=14, height=8, seed=3)
  # columns (14 - 8) // 2 ... + 8: no resampling
  np.testing.assert_array_equal(square, pixels[:, 3:11])


def test_a_larger_image_is_resized_by_its_shorter_side_then_centre_cropped(tmp_path):
  assert np.all(_square(tmp_path, width=40, height=24, value=77) == 77)  # a constant stays constant
  from PIL import Image  # pylint: disable=g-import-not-at-top
  pixels = np.zeros((16, 32, 3), np.uint8)  # [H, W, 3]: left half black, right half white
  pixels[:, 16:] = 255
  (tmp_path / 'halves' / 'k').mkdir(parents=True)
  Image.fromarray(pixels).save(tmp_path / 'halves' / 'k' / 'x.png')
  x, _ = data.load_examples(_data_config(tmp_path / 'halves'), 'train', limit=1)
  square = x[0]  # [8, 8, 3]: 16x32 -> 8x16, centre columns 4..11: half black, half white
  assert np.all(square[:, :3] < -0.9) and np.all(square[:, 5:] > 0.9)


@pytest.mark.parametrize('case,match', [
    ('empty path', 'data.path is empty: give --config.data.path=DIR'),
    ('not a folder', 'is not a folder'),
    ('empty folder', 'holds no class sub-folders'),
    ('empty class folder', r'class folder .*b holds no images \(.png, .jpg, .jpeg\)'),
    ('loose images', r'holds images outside class sub-folders \(e.g. stray.png\)'),
    ('unreadable image', r'cannot read image .*broken.png'),
    ('truncated png', r'cannot read image .*cut.png'),
    ('too small', r'1 of 3 images are smaller than data.resolution=8 on their shorter side, e.g. '
                  r'.*small.jpg \(20x7\): such an image can only be made 8x8 by upscaling, '
                  r'which is refused'),
    ('resolution 0', 'data.resolution must be > 0'),
])
def test_each_bad_folder_is_refused_in_one_line_before_anything_is_written(case, match, tmp_path):
  root, resolution = tmp_path / 'f', 8
  write_folder(root, {'a': ['png', 'jpg']})
  if case == 'empty path':
    root = ''
  elif case == 'not a folder':
    root = tmp_path / 'f' / 'a' / '000.png'
  elif case == 'empty folder':
    root = tmp_path / 'empty'
    root.mkdir()
  elif case == 'empty class folder':
    (root / 'b').mkdir()
    (root / 'b' / 'readme.txt').write_text('no images here')
  elif case == 'loose images':
    write_image(root / 'stray.png', width=8, height=8)
  elif case == 'unreadable image':
    (root / 'a' / 'broken.png').write_bytes(b'this is not a PNG file')
  elif case == 'truncated png':
    whole = (root / 'a' / '000.png').read_bytes()
    (root / 'a' / 'cut.png').write_bytes(whole[:len(whole) // 2])
  elif case == 'too small':
    write_image(root / 'a' / 'small.jpg', width=20, height=7)
  elif case == 'resolution 0':
    resolution = 0
  config = folder_tiny.get_config()
  config.data.update(path=str(root), resolution=resolution)
  config.workdir = str(tmp_path / 'run')
  with pytest.raises(ConfigError, match=match) as error:
    validate_config(config)
  assert '\n' not in str(error.value)
  assert not (tmp_path / 'run').exists()
  with pytest.raises(data.DataError, match=match):  # the data API says the same
    data.dataset_info(config.data)


def test_a_folder_has_one_split(tmp_path):
  root = write_folder(tmp_path / 'f', {'a': ['png']})
  with pytest.raises(data.DataError, match="a folder data set has one split, 'train'"):
    data.load_examples(_data_config(root), 'test', limit=1)
  config = folder_tiny.get_config()
  config.data.path, config.eval.reference_split = root, 'test'
  with pytest.raises(ConfigError, match='set --config.eval.reference_split=train'):
    validate_config(config)


def test_an_image_that_reads_but_does_not_decode_stops_the_pipeline_in_one_line(tmp_path):
  """The scan reads headers (and PNG checksums); a JPEG whose data is cut short passes it and fails
  to decode."""
  root = write_folder(tmp_path / 'f', {'a': ['png']})
  whole = open(write_image(tmp_path / 'x.jpg', width=64, height=64), 'rb').read()
  (tmp_path / 'f' / 'a' / 'cut.jpg').write_bytes(whole[:len(whole) // 3])
  assert len(scan_folder(str(root), 8).files) == 2  # the JPEG's header reads
  with pytest.raises(data.DataError, match=r'an image of .* does not decode') as error:
    data.load_examples(_data_config(root), 'train', limit=10)
  assert '\n' not in str(error.value)


# ---------------------------------------------------------------- tfds:NAME


def _tfds_config(name='tfds:oxford_flowers102', resolution=8, data_dir=None):
  return ml_collections.ConfigDict(dict(name=name, path='', resolution=resolution,
                                        random_flip=False, tfds_data_dir=data_dir or ''))


def test_any_tfds_data_set_with_image_and_label_features_by_name(tmp_path):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  config = _tfds_config(resolution=4, data_dir=str(tmp_path))
  info = data.dataset_info(config)
  assert (info.shape == (4, 4, 3) and info.num_classes == 102 and
          info.class_names[0] == 'pink primrose')
  # random examples of its features: images of 5..49 pixels a side
  with tfds.testing.mock_data(num_examples=12):
    batches = _take(data.make_train_iterator(config, per_host_batch_size=4, seed=0), 2)
  for batch in batches:
    assert batch['x'].shape == (4, 4, 4, 3) and batch['x'].min() >= -1 and batch['x'].max() <= 1
    assert batch['label'].min() >= 0 and batch['label'].max() < 102


@pytest.mark.parametrize('name,resolution,match', [
    ('tfds:oxford_flowers102', 0, r'has images of NonexNone: set --config.data.resolution=R'),
    ('tfds:no_such_data_set_xyz', 8, "unknown tfds data set 'no_such_data_set_xyz'"),
    ('tfds:celeb_a', 8, r"needs an 'image' \(Image\) and a 'label' \(ClassLabel\) feature"),
    ('tfds:cifar10', 64,
     r'has 32x32 images, smaller than data.resolution=64: upscaling is refused'),
])
def test_unusable_tfds_data_sets_are_refused_in_one_line(name, resolution, match, tmp_path):
  with pytest.raises(data.DataError, match=match) as error:
    data.dataset_info(_tfds_config(name, resolution, data_dir=str(tmp_path)))
  assert '\n' not in str(error.value)


def test_a_tfds_data_set_of_fixed_square_images_keeps_its_size_by_default(tmp_path):
  info = data.dataset_info(_tfds_config('tfds:cifar10', 0, data_dir=str(tmp_path)))
  assert info.shape == (32, 32, 3) and info.num_classes == len(info.class_names) == 10


def test_the_default_digits_path_takes_none_of_these_checks(monkeypatch, tmp_path):
  """The digits config's check scans no folder, reads no tfds metadata and no teacher record: none
  of this is on the default pipeline's path."""
  from configs import digits_teacher  # pylint: disable=g-import-not-at-top
  from train import checkpoint  # pylint: disable=g-import-not-at-top
  untouched = lambda *args, **kwargs: pytest.fail(
      'the digits path called a folder, tfds or teacher check')
  monkeypatch.setattr(data, 'scan_folder', untouched)
  monkeypatch.setattr(data, 'tfds_features', untouched)
  monkeypatch.setattr(checkpoint, 'latest_step', untouched)
  config = digits_teacher.get_config()
  config.workdir = str(tmp_path / 'run')
  validate_config(config)
  assert data.dataset_info(config.data) == data.DatasetInfo('digits', (8, 8, 1), 10, True)
