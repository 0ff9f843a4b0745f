"""Small generated image folders (one sub-folder per class) for the folder data source's tests."""

import os

import numpy as np
from PIL import Image


def write_image(path, *, width: int, height: int, mode: str = 'RGB', seed: int = 0,
                value=None) -> str:
  """Writes a random (or constant `value`) image of mode RGB, L or RGBA; the format follows the
  extension."""
  channels = {'RGB': 3, 'L': 1, 'RGBA': 4}[mode]
  rng = np.random.default_rng(seed)
  pixels = (np.full((height, width, channels), value, np.uint8) if value is not None
            else rng.integers(0, 256, (height, width, channels), dtype=np.uint8))
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(pixels[..., 0] if mode == 'L' else pixels, mode).save(path)
  return str(path)


def write_folder(root, classes: dict, *, size=(12, 10)) -> str:
  """root/CLASS/NNN.EXT for classes {name: [extension, ...]} (png, jpg, jpeg), random images of size
  (w, h)."""
  for c, (name, extensions) in enumerate(sorted(classes.items())):
    for i, extension in enumerate(extensions):
      write_image(os.path.join(root, name, f'{i:03d}.{extension}'), width=size[0], height=size[1],
                  seed=100 * c + i)
  return str(root)
