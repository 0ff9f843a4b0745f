"""A folder of images, one sub-folder per class, as a data set: scanned and checked once, then read
by tf.data.

  PATH/
    cat/  0001.png  0002.jpg ...
    dog/  a.jpeg ...

Class names are the sub-folder names, sorted (label k is the k-th name). Images (.png, .jpg, .jpeg,
any case) anywhere below a class folder belong to it; other files are ignored. Every image is
decoded as RGB, resized so that its shorter side is `resolution` (bicubic, antialiased) and
centre-cropped to resolution x resolution. An image whose shorter side is smaller than `resolution`
is refused: it could only be made square at that size by upscaling, which invents pixels.
"""

import dataclasses
import functools
import os

from data.errors import DataError

FOLDER = 'folder'  # its data.name (with data.path and data.resolution)
IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg')
SPLITS = ('train',)  # the whole folder; there is no held-out part


@dataclasses.dataclass(frozen=True)
class FolderIndex:
  """Every image of a checked folder: files[i] has label labels[i] (class_names[labels[i]])."""

  path: str
  resolution: int
  files: tuple[str, ...]
  labels: tuple[int, ...]
  class_names: tuple[str, ...]


def _is_image(name: str) -> bool:
  return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith('.')


def _images_below(folder: str) -> list[str]:
  """Image files anywhere below folder, sorted by their path relative to it (hidden folders
  skipped)."""
  found = []
  for root, dirs, names in os.walk(folder):
    dirs[:] = sorted(d for d in dirs if not d.startswith('.'))
    found += [os.path.join(root, name) for name in sorted(names) if _is_image(name)]
  return found


def _image_size(path: str) -> tuple[int, int]:
  """(width, height) of an image file whose header and (PNG) chunk checksums read; DataError
  otherwise."""
  from PIL import Image, UnidentifiedImageError  # pylint: disable=g-import-not-at-top
  try:
    with Image.open(path) as image:
      size = image.size
      image.verify()  # PNG: every chunk's CRC; JPEG: the markers up to the image data
  except (OSError, SyntaxError, ValueError, UnidentifiedImageError) as err:
    reason = str(err).splitlines()[0] if str(err) else type(err).__name__
    raise DataError(f'cannot read image {path} ({reason}): replace or remove it') from err
  return size


def _check_sizes(sizes: dict[str, tuple[int, int]], resolution: int) -> None:
  small = [(path, size) for path, size in sizes.items() if min(size) < resolution]
  if small:
    path, (width, height) = small[0]
    raise DataError(
        f'{len(small)} of {len(sizes)} images are smaller than data.resolution={resolution} on '
        f'their shorter side, e.g. {path} ({width}x{height}): such an image can only be made '
        f'{resolution}x{resolution} by upscaling, which is refused; remove them or lower '
        '--config.data.resolution')


@functools.lru_cache(maxsize=8)
def scan_folder(path: str, resolution: int) -> FolderIndex:
  """Lists and checks a folder of class sub-folders; raises DataError (one line) for anything it
  cannot use.

  Refused: an empty data.path, a path that is no folder, resolution <= 0, no class sub-folder,
  images outside the class sub-folders, a class folder without images, an image that does not read,
  an image whose shorter side is smaller than resolution. Each image's header is read (not its
  pixels); cached per (path, resolution).

  Args:
    path: the folder (data.path).
    resolution: the side of the square images it is turned into (data.resolution).

  Returns:
    The FolderIndex of every image, class by class.
  """
  if not path:
    raise DataError(
        'data.path is empty: give --config.data.path=DIR, a folder with one sub-folder of PNG/JPEG '
        'images per class')
  if not os.path.isdir(path):
    raise DataError(
        f'data.path {path} is not a folder: give a folder with one sub-folder of images per class')
  if resolution <= 0:
    raise DataError(
        f'data.resolution must be > 0 for a folder of images (the side of the square images it is '
        f'turned into), got {resolution}: e.g. --config.data.resolution=64')
  entries = sorted(os.listdir(path))
  class_names = tuple(
      e for e in entries if not e.startswith('.') and os.path.isdir(os.path.join(path, e)))
  loose = [e for e in entries if _is_image(e) and os.path.isfile(os.path.join(path, e))]
  if loose:
    raise DataError(
        f'{path} holds images outside class sub-folders (e.g. {loose[0]}): move each into '
        f'{path}/CLASS_NAME/')
  if not class_names:
    raise DataError(
        f'{path} holds no class sub-folders: put the images of each class in {path}/CLASS_NAME/')
  files, labels = [], []
  for label, name in enumerate(class_names):
    images = _images_below(os.path.join(path, name))
    if not images:
      raise DataError(
          f'class folder {os.path.join(path, name)} holds no images '
          f'({", ".join(IMAGE_EXTENSIONS)}): add some or remove the folder')
    files += images
    labels += [label] * len(images)
  _check_sizes({file: _image_size(file) for file in files}, resolution)
  return FolderIndex(path, resolution, tuple(files), tuple(labels), class_names)


def folder_split(index: FolderIndex, *, split: str, seed: int, shuffle: bool):
  """tf.data.Dataset of this host's images {'image': uint8 [R, R, 3], 'label': int64} of a scanned
  folder.

  Each host takes every process_count-th file; with shuffle, the file order is reshuffled every pass
  (seed).
  """
  import jax  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top  (imports slowly)
  from data.transforms import to_square  # pylint: disable=g-import-not-at-top
  if split not in SPLITS:
    raise DataError(
        f"a folder data set has one split, 'train' (the whole of {index.path}), not '{split}': use "
        "'train' (e.g. --config.eval.reference_split=train)")
  part = slice(jax.process_index(), None, jax.process_count())
  ds = tf.data.Dataset.from_tensor_slices({
      'path': list(index.files[part]), 'label': list(index.labels[part])})
  if shuffle:
    ds = ds.shuffle(len(index.files[part]), seed=seed, reshuffle_each_iteration=True)

  def load(example):
    image = tf.io.decode_image(tf.io.read_file(example['path']), channels=3,
                               expand_animations=False)
    return {'image': to_square(image, index.resolution),
            'label': tf.cast(example['label'], tf.int64)}

  return ds.map(load, num_parallel_calls=tf.data.AUTOTUNE)
