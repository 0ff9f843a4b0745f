"""Sample grids as PNG files: one row per class for images, a scatter plot for 2-D points; each
titled."""

import io

import jax
import numpy as np
from PIL import Image, ImageDraw, ImageFont, PngImagePlugin

from train import files


def to_uint8(images):
  """[-1, 1] floats -> uint8 [0, 255]."""
  return np.clip(np.round((np.asarray(images, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def quantize_uint8(images):
  """[-1, 1] floats [B, H, W, C] -> float32 k / 127.5 - 1 with k = to_uint8(images): what a saved
  PNG holds.

  The evaluation protocol's eval.quantize_uint8: samples (and real images) reach the feature
  extractor on the 256 levels of an 8-bit image, as in FIDs computed from saved images. Each value
  moves by at most 1/255 after clipping to [-1, 1]; quantising twice changes nothing.
  """
  return to_uint8(images).astype(np.float32) / np.float32(127.5) - np.float32(1.0)


def image_grid(images, *, num_rows: int, pad: int = 1, scale: int = 1):
  """images [N, H, W, C] in [-1, 1] -> one uint8 grid [rows*(H+pad)+pad, cols*(W+pad)+pad, C]."""
  images = to_uint8(images)
  n, h, w, c = images.shape
  num_cols = -(-n // num_rows)
  grid = np.full((num_rows * (h + pad) + pad, num_cols * (w + pad) + pad, c), 255, np.uint8)
  for i in range(n):
    row, col = divmod(i, num_cols)
    grid[pad + row * (h + pad):pad + row * (h + pad) + h,
         pad + col * (w + pad):pad + col * (w + pad) + w] = images[i]
  if scale > 1:
    grid = grid.repeat(scale, axis=0).repeat(scale, axis=1)
  return grid


def with_row_labels(grid, labels: list[str], *, row_height: int, top: int = 0, font_size: int = 12):
  """grid uint8 [H, W, C] with a white margin on the left holding labels[i] beside row i -> [H, W',
  C]."""
  grid = np.asarray(grid)
  font = ImageFont.load_default(size=font_size)
  text_width = max(int(np.ceil(font.getlength(label))) for label in labels) + 8
  canvas = np.full((grid.shape[0], text_width + grid.shape[1], grid.shape[2]), 255, np.uint8)
  canvas[:, text_width:] = grid
  image = Image.fromarray(canvas[..., 0] if grid.shape[-1] == 1 else canvas)
  draw = ImageDraw.Draw(image)
  for i, label in enumerate(labels):
    draw.text((4, top + i * row_height + row_height // 2), label, fill=0, font=font, anchor='lm')
  pixels = np.asarray(image)
  return pixels[..., None] if pixels.ndim == 2 else pixels


def with_column_titles(grid, titles: list[str], *, column_width: int, font_size: int = 12):
  """grid uint8 [H, W, C] with a white margin on top holding titles[j] centred over the j-th
  column_width pixels."""
  grid = np.asarray(grid)
  font = ImageFont.load_default(size=font_size)
  height = font_size + 8
  canvas = np.full((height + grid.shape[0], grid.shape[1], grid.shape[2]), 255, np.uint8)
  canvas[height:] = grid
  image = Image.fromarray(canvas[..., 0] if grid.shape[-1] == 1 else canvas)
  draw = ImageDraw.Draw(image)
  for j, title in enumerate(titles):
    draw.text(
        (j * column_width + column_width // 2, height // 2), title, fill=0, font=font, anchor='mm')
  pixels = np.asarray(image)
  return pixels[..., None] if pixels.ndim == 2 else pixels


def with_title(grid, title: str, *, font_size: int = 12):
  """grid uint8 [H, W, C] under a white band of title_height(font_size) rows holding `title` -> [H',
  W', C].

  The picture is widened (white on the right) where the title is wider than it.
  """
  grid = np.asarray(grid)
  font = ImageFont.load_default(size=font_size)
  height = title_height(font_size)
  width = max(grid.shape[1], int(np.ceil(font.getlength(title))) + 8)
  canvas = np.full((height + grid.shape[0], width, grid.shape[2]), 255, np.uint8)
  canvas[height:, :grid.shape[1]] = grid
  image = Image.fromarray(canvas[..., 0] if grid.shape[-1] == 1 else canvas)
  ImageDraw.Draw(image).text((4, height // 2), title, fill=0, font=font, anchor='lm')
  pixels = np.asarray(image)
  return pixels[..., None] if pixels.ndim == 2 else pixels


def title_height(font_size: int = 12) -> int:
  """Rows of the band with_title adds on top of a picture."""
  return font_size + 8


# the PNG text chunk holding a picture's title: PIL.Image.open(path).text['Title']
TITLE_KEY = 'Title'


def save_png(path: str, grid, *, title: str = '') -> None:
  """Writes a uint8 grid [H, W, C] as a PNG, atomically; under jax.distributed only process 0
  writes.

  A title (drawn on the picture by with_title) is also stored as the PNG's 'Title' text chunk.
  """
  if jax.process_index() > 0:
    return
  grid = np.asarray(grid)
  image = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)
  info = PngImagePlugin.PngInfo()
  if title:
    info.add_text(TITLE_KEY, title)
  buffer = io.BytesIO()
  image.save(buffer, format='PNG', pnginfo=info)
  files.write_bytes(path, buffer.getvalue())


def samples_image(samples, labels, *, num_rows: int, title: str = ''):
  """uint8 [H, W, C]: a grid (images, one row per class, each row labelled with its class) or a
  scatter plot coloured by class (2-D points); under a title band (with_title) when a title is
  given.

  Images come class-major (modes.sampling.fixed_inputs): row i holds the samples of labels[i *
  per_class].
  """
  samples, labels = np.asarray(samples), np.asarray(labels)
  if samples.ndim == 4:
    scale = max(1, 64 // samples.shape[1])
    pixels = image_grid(samples, num_rows=num_rows, scale=scale)
    row_classes = labels.reshape(num_rows, -1)[:, 0]
    pixels = with_row_labels(pixels, [f'class {c}' for c in row_classes],
                             row_height=(samples.shape[1] + 1) * scale, top=scale)
  else:
    pixels = _scatter(samples, labels)
  return with_title(pixels, title) if title else pixels


def _scatter(points, labels):
  """uint8 [400, 400, 3]: 2-D points [N, 2] coloured by class, with a legend of the classes."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(4, 4), dpi=100)
  colours = plt.get_cmap('tab10').colors
  for c in np.unique(labels):
    ax.scatter(points[labels == c, 0], points[labels == c, 1], s=4,
               color=colours[int(c) % len(colours)], label=f'class {c}')
  ax.set_aspect('equal')
  ax.legend(fontsize=7, markerscale=2, loc='upper right')
  fig.tight_layout()
  fig.canvas.draw()
  pixels = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()  # [400, 400, 3]
  plt.close(fig)
  return pixels


def save_samples_png(path: str, samples, labels, *, num_rows: int, title: str):
  """Writes samples_image(...) under its title as a PNG (title also in the PNG's text) and returns
  it."""
  pixels = samples_image(samples, labels, num_rows=num_rows, title=title)
  save_png(path, pixels, title=title)
  return pixels
