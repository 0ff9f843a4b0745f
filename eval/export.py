"""Samples written in the files the standard evaluators read (eval.export_samples,
sample.export_samples).

  * PREFIX_NxHxWx3.npz: arr_0 [N, H, W, 3] uint8 images and arr_1 [N] int64 labels, as
    guided-diffusion's `scripts/image_sample.py` saves them (np.savez(out_path, arr, label_arr)) and
    its `evaluations/evaluator.py SAMPLE.npz` reads them (arr_0, streamed batch by batch). No 'mu'
    key: the evaluator would take stored statistics instead of computing them from the images.
  * PREFIX_NxHxWx3.zip: PNGs 000000.png, 000001.png, ... and dataset.json {"labels": [[name, label],
    ...]}, the StyleGAN/EDM data set layout that EDM's `fid.py calc --images=PREFIX_NxHxWx3.zip`
    (its training.dataset.ImageFolderDataset) reads.
Pixels are to_uint8 of the samples clipped to [-1, 1] (round((x + 1) * 127.5)): with
eval.quantize_uint8 they are exactly the images this repo scored. Grey images are written as RGB
(the evaluator's Inception takes 3 channels).
"""

import io
import json
import zipfile

import numpy as np

from eval.images import to_uint8
from train import files


def uint8_rgb(images) -> np.ndarray:
  """[N, H, W, C] floats in [-1, 1] (C 1 or 3) -> [N, H, W, 3] uint8."""
  pixels = to_uint8(np.clip(np.asarray(images, np.float32), -1.0, 1.0))  # [N, H, W, C]
  return np.repeat(pixels, 3, axis=-1) if pixels.shape[-1] == 1 else pixels


def _png_zip(pixels: np.ndarray, labels: np.ndarray) -> bytes:
  """A zip (stored, not deflated) of one PNG per image and dataset.json with their labels."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  buffer = io.BytesIO()
  names = [f'{i:06d}.png' for i in range(len(pixels))]
  with zipfile.ZipFile(buffer, 'w', compression=zipfile.ZIP_STORED) as archive:
    for name, image in zip(names, pixels):
      png = io.BytesIO()
      Image.fromarray(image).save(png, format='PNG')
      archive.writestr(name, png.getvalue())
    archive.writestr('dataset.json',
                     json.dumps({'labels': [[n, int(y)] for n, y in zip(names, labels)]}))
  return buffer.getvalue()


def export_samples(prefix: str, images, labels) -> tuple[str, str]:
  """Writes PREFIX_NxHxWx3.npz (guided-diffusion's evaluator) and PREFIX_NxHxWx3.zip (EDM's fid.py).

  Args:
    prefix: path and file name stem, e.g. OUT/samples/teacher_ddim_8steps_w1_seed2.
    images: [N, H, W, C] samples in [-1, 1].
    labels: [N] their class labels.

  Returns:
    The (npz, zip) paths written.
  """
  pixels, labels = uint8_rgb(images), np.asarray(labels, np.int64)  # [N, H, W, 3], [N]
  stem = f'{prefix}_{"x".join(str(n) for n in pixels.shape)}'
  files.write_npz(f'{stem}.npz', arr_0=pixels, arr_1=labels)
  files.write_bytes(f'{stem}.zip', _png_zip(pixels, labels))
  return f'{stem}.npz', f'{stem}.zip'
