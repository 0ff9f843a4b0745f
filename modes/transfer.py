"""--mode=transfer: encode class A with the distilled guided encoder, decode as class B (vs
DDIM)."""

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from etils import epath

import data
from distill import stages
from eval import metrics
from eval.images import image_grid, save_png, with_column_titles, with_row_labels
from modes.fid import make_extractor
from modes.sampling import load_cached
from train import files
from train.loop import make_writer

CSV_FIELDS = ('method', 'steps', 'w_encode', 'w_decode', 'recon_mse', 'target_accuracy',
              'transfer_fid', 'num_images')


class EncoderDecoder:
  """An encoder and a decoder at N steps: the distilled pair, or the stage-1 model both ways
  (DDIM)."""

  def __init__(self, config, method: str, num_steps: int, cache: dict):
    if method == 'distilled':
      dirs = (stages.stage_dir(config.workdir, 'encoder', num_steps),
              stages.stage_dir(config.workdir, 'stage2', num_steps))
    else:
      dirs = (stages.stage_dir(config.workdir, 'stage1'),) * 2
    self.encoder, self.decoder = (load_cached(cache, d) for d in dirs)
    self.num_steps = num_steps

  def transfer(self, x, source_label, target_label, *, w_encode: float, w_decode: float):
    """x [B, ...] of source_label -> encoded z_1 -> decoded under target_label."""
    z_1 = self.encoder.encode(num_steps=self.num_steps, guidance_w=w_encode, x=jnp.asarray(x),
                              label=source_label)
    return self.decoder.sample(sampler='ddim', num_steps=self.num_steps, guidance_w=w_decode,
                               z_init=jnp.asarray(z_1), label=target_label, seed=0)


def _class_examples(config, label: int, split: str, limit: int):
  """The first `limit` examples of class `label` [N, ...], in-memory or tfds data alike."""
  return data.load_examples(config.data, split, limit=limit, label=label)[0]


def _full(label: int, n: int):
  return jnp.full((n,), label, jnp.int32)


def _write_grid(config, pairs, out_dir: str):
  """(png path, grid or None for 2-D data). One row per (method, steps), distilled rows first, in
  transfer.steps order: sources | reconstructions under A | transfers to B; rows labelled, panels
  titled."""
  tr = config.transfer
  x = _class_examples(config, tr.source_class, 'test', tr.num_images)
  n = len(x)
  rows = []
  for pair in pairs.values():
    recon = pair.transfer(x, _full(tr.source_class, n), _full(tr.source_class, n),
                          w_encode=tr.w_encode, w_decode=tr.w_decode)
    moved = pair.transfer(x, _full(tr.source_class, n), _full(tr.target_class, n),
                          w_encode=tr.w_encode, w_decode=tr.w_decode)
    spacer = np.ones_like(x[:1])  # a white tile between sources, reconstructions and transfers
    rows.append(np.concatenate([x, spacer, recon, spacer, moved]))
  path = files.join(out_dir, f'transfer_{tr.source_class}_to_{tr.target_class}.png')
  if x.ndim != 4:
    return path, None
  scale = 6
  grid = image_grid(np.concatenate(rows), num_rows=len(rows), scale=scale)  # [H, W, C]
  tile = (x.shape[2] + 1) * scale  # one image and its padding, in pixels
  grid = with_column_titles(grid, [
      f'class {tr.source_class} (source)', f'reconstructed as {tr.source_class}',
      f'transferred to {tr.target_class}'],
                            column_width=(n + 1) * tile)
  labels = [
      f'{"distilled pair" if method == "distilled" else "DDIM, stage 1"}, {steps} '
      f'step{"s" * (steps > 1)}'
      for method, steps in pairs
  ]
  row_height = (x.shape[1] + 1) * scale
  grid = with_row_labels(grid, labels, row_height=row_height,
                         top=grid.shape[0] - len(rows) * row_height)
  save_png(path, grid)
  return path, grid


def _evaluate(config, pair, method: str, w_decode: float, extract, reference, *,
              logits_are_classes: bool) -> dict:
  """One row; target_accuracy is None unless the extractor's logits are the data set's own
  classes."""
  tr = config.transfer
  x_all, labels_all = data.load_examples(config.data, 'test', limit=tr.eval_images)
  labels_all = jnp.asarray(labels_all)
  recon = pair.transfer(x_all, labels_all, labels_all, w_encode=tr.w_encode, w_decode=w_decode)
  source = _class_examples(config, tr.source_class, 'train', tr.eval_images)
  moved = pair.transfer(source, _full(tr.source_class, len(source)),
                        _full(tr.target_class, len(source)), w_encode=tr.w_encode,
                        w_decode=w_decode)
  features = extract(jnp.clip(jnp.asarray(moved), -1.0, 1.0))
  pool = np.asarray(features['pool'], np.float64)
  return dict(method=method,
              steps=pair.num_steps,
              w_encode=tr.w_encode,
              w_decode=w_decode,
              recon_mse=float(np.mean((np.asarray(recon) - np.asarray(x_all))**2)),
              target_accuracy=(
                  metrics.classifier_accuracy(features['logits'],
                                              np.full(len(source), tr.target_class))
                  if logits_are_classes else None),
              transfer_fid=metrics.frechet_distance(pool.mean(0), np.cov(pool, rowvar=False),
                                                    *reference),
              num_images=len(source))


def run_transfer(config) -> str:
  """Writes the transfer grid and transfer_results.{csv,md} over steps x w_decode, distilled vs
  DDIM."""
  tr = config.transfer
  # made by its first file: none after a refusal
  out_dir = tr.out_dir or files.join(config.workdir, 'transfer')
  cache = {}
  pairs = {
      (m, n): EncoderDecoder(config, m, n, cache) for m in ('distilled', 'ddim') for n in tr.steps
  }
  grid_path, grid = _write_grid(config, pairs, out_dir)
  extractor_name, extract = make_extractor(config)
  # Inception's 1008 logits are not the data set's classes
  logits_are_classes = extractor_name != 'inception'
  target = np.asarray(extract(jnp.asarray(_class_examples(
      config, tr.target_class, 'train', 10_000)))['pool'], np.float64)
  reference = (target.mean(0), np.cov(target, rowvar=False))
  rows = []
  writer = make_writer(files.join(config.workdir, 'logs', 'transfer'))
  if grid is not None:
    writer.write_images(0, {epath.Path(grid_path).stem: grid[None]})
  for (method, n), pair in pairs.items():
    for w in tr.eval_ws:
      rows.append(_evaluate(config, pair, method, w, extract, reference,
                            logits_are_classes=logits_are_classes))
      scored = ('recon_mse', 'target_accuracy', 'transfer_fid')
      writer.write_scalars(
          n,
          {f'{key}/{method}/w{w:g}': rows[-1][key] for key in scored if rows[-1][key] is not None})
      logging.info('[transfer] %s %d steps w=%g: recon MSE %.4f, target acc %s, FID %.3f', method,
                   n, w, rows[-1]['recon_mse'], _accuracy_text(rows[-1]), rows[-1]['transfer_fid'])
  writer.close()
  if jax.process_index() == 0:
    files.write_csv(files.join(out_dir, 'transfer_results.csv'), rows, CSV_FIELDS)
    _write_table(rows, files.join(out_dir, 'transfer_results.md'), config)
  logging.info('[transfer] grid %s, results in %s', grid_path, out_dir)
  return out_dir


def _accuracy_text(row: dict) -> str:
  return '-' if row['target_accuracy'] is None else f'{row["target_accuracy"]:.3f}'


def _write_table(rows, path, config) -> None:
  tr = config.transfer
  lines = [
      f'# Transfer {tr.source_class} -> {tr.target_class} ({config.data.name})', '',
      f'Encoder w = {tr.w_encode:g}. recon MSE: test images encoded and decoded under '
      f'their own label; target acc / FID: class-{tr.source_class} images decoded as class '
      f'{tr.target_class}, scored by the {config.eval.extractor} features against real '
      f'class-{tr.target_class} images. Equal network calls per row: the distilled pair and DDIM '
      'with the stage-1 model both make N calls each way.' + (
          '' if config.eval.extractor != 'inception' else
          ' target acc is left out (-): Inception\'s logits are '
          'ImageNet\'s 1008 classes, not this data set\'s, and the repository has no '
          'classifier of its own for it.'), '',
      '| method | steps | w decode | recon MSE | target acc | transfer FID |',
      '|---|---|---|---|---|---|']
  lines += [
      f'| {r["method"]} | {r["steps"]} | {r["w_decode"]:g} | {r["recon_mse"]:.4f} | '
      f'{_accuracy_text(r)} | {r["transfer_fid"]:.3f} |' for r in rows
  ]
  files.write_text(path, '\n'.join(lines) + '\n')
