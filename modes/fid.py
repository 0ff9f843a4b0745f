"""--mode=fid: FID / IS of every method of a run over steps x sampler x w, as a CSV, a table and
plots (fid_vs_steps.png, fid_vs_nfe.png, fid_vs_is.png)."""

import csv
import hashlib
import io
import time
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

import data
from eval import metrics
from eval import reference_stats as standard_stats
from eval.export import export_samples
from eval.images import quantize_uint8
from eval.report import write_plots, write_table
from modes.methods import existing, list_methods
from modes.sampling import LoadedCheckpoint, load_cached
from train import files, records
from train.checkpoint import CheckpointError
from train.loop import make_writer

# Real examples whose features make the real manifold of precision and recall (k-NN balls, k = 3).
PR_EXAMPLES = 10_000
CSV_FIELDS = ('method', 'sampler', 'steps', 'nfe', 'w', 'num_samples', 'fid', 'is_mean', 'is_std',
              'accuracy', 'seconds', 'checkpoint', 'extractor', 'seed', 'clip_x', 'quantize_uint8',
              'ddpm_variance', 'reference', 'fidelity', 'precision', 'recall')
# a cell's 'reference' when the statistics are computed here from the data
COMPUTED_REFERENCE = 'computed'


def classifier_dir(config) -> str:
  """Where the digits classifier is cached: eval.classifier_dir, else WORKDIR/classifier."""
  return config.eval.classifier_dir or files.join(config.workdir, 'classifier')


def balanced_batch(record: dict, *, batch_index: int, batch_size: int, seed: int):
  """(z_init [B, ...], label [B]) of batch batch_index of a fixed-seed class-balanced sample, any
  method."""
  start = batch_index * batch_size
  label = jnp.arange(start, start + batch_size, dtype=jnp.int32) % record['num_classes']  # [B]
  key = jax.random.fold_in(jax.random.key(seed), batch_index)
  return jax.random.normal(key, (batch_size, *record['x_shape'])), label  # [B, ...], [B]


def make_extractor(config):
  """(name, images -> {'pool', 'logits'}) for config.eval.extractor; 'toy2d' uses the known mixture.

  The digits classifier is trained first (eval.classifier_steps, a short run) when
  classifier_dir(config) holds none, so no mode needs a run of its own before it.
  """
  if config.eval.extractor == 'classifier':
    from eval import classifier  # pylint: disable=g-import-not-at-top
    _, accuracy = classifier.train_classifier(ckpt_dir=classifier_dir(config),
                                              num_steps=config.eval.classifier_steps)
    logging.info('[classifier] held-out accuracy %.4f (%s)', accuracy, classifier_dir(config))
    model, params, _ = classifier.load_classifier(classifier_dir(config))
    return 'classifier', classifier.feature_fn(model, params)
  if config.eval.extractor == 'inception':
    from eval import inception  # pylint: disable=g-import-not-at-top
    variables = inception.load_inception_params(config.eval.inception_path)
    model = inception.InceptionV3FID()
    return 'inception', jax.jit(lambda images: model.apply(variables, images))
  if config.eval.extractor == 'toy2d':
    from eval.toy_metrics import toy2d_features  # pylint: disable=g-import-not-at-top
    return 'toy2d', toy2d_features
  raise ValueError(
      f"unknown eval.extractor '{config.eval.extractor}'; choose classifier, inception or toy2d")


def extractor_id(config) -> str:
  """What the features depend on: the extractor and its weights (classifier checkpoint id, Inception
  file sha1)."""
  if config.eval.extractor == 'classifier':
    from eval import classifier  # pylint: disable=g-import-not-at-top
    return f'classifier@{classifier.classifier_id(classifier_dir(config))}'
  if config.eval.extractor == 'inception':
    digest = hashlib.sha1()
    with open(config.eval.inception_path, 'rb') as f:
      for block in iter(lambda: f.read(1 << 20), b''):
        digest.update(block)
    return f'inception@{digest.hexdigest()[:12]}'
  return config.eval.extractor


def _real_batches(config, batch_size: int):
  """Real images of the reference split, in batches, at most eval.reference_examples of them, each
  once.

  Streamed data sets (tfds, a folder) are read once in a fixed order (data.iterate_examples): a
  split smaller than eval.reference_examples gives all its examples, none twice. With
  eval.quantize_uint8 they are rounded to the 256 uint8 levels as the samples are: a no-op for tfds
  and folder data (uint8), a change for the digits (17 grey levels, not on the uint8 grid).
  """
  name, limit = config.data.name, config.eval.reference_examples
  if name in ('digits', 'toy2d'):
    x, _ = data.load_arrays(name, config.eval.reference_split)
    batches = (x[start:min(start + batch_size, limit)]
               for start in range(0, min(len(x), limit), batch_size))
  else:
    batches = (x for x, _ in data.iterate_examples(config.data, split=config.eval.reference_split,
                                                   batch_size=batch_size, limit=limit))
  for images in batches:  # [B, ...]
    yield quantize_uint8(images) if config.eval.quantize_uint8 else images


def _update(stats, features):
  """Adds a batch of features to a FeatureStats made on the first batch (its size fixes the dim)."""
  features = np.asarray(features)
  stats = stats or metrics.FeatureStats(features.shape[1])
  stats.update(features)
  return stats


def _reference_path(config, extractor_name: str, cache_dir: str, kind: str = '') -> str:
  """The cache file of the real data's features: data set, split, example count, extractor_id, uint8
  levels."""
  ev = config.eval
  ident = hashlib.sha1(extractor_id(config).encode()).hexdigest()[:12]
  return files.join(
      cache_dir, f'ref_{config.data.name}_{ev.reference_split}_{ev.reference_examples}_'
      f'{extractor_name}_{ident}{"_u8" if ev.quantize_uint8 else ""}{kind}.npz')


def reference_features(config, extractor_name, extract, cache_dir: str) -> np.ndarray:
  """[M, D] features of the first M <= PR_EXAMPLES real examples of the reference split: the real
  manifold of precision and recall (eval.metrics.precision_recall). Cached beside reference_stats;
  an unreadable cache file is computed again, with a warning."""
  path = _reference_path(config, extractor_name, cache_dir, '_pool')
  cached = files.read_cache(path, lambda path: files.read_npz(path)['pool'])
  if cached is not None:
    return cached
  pool, count = [], 0
  for images in _real_batches(config, config.eval.batch_size):
    pool.append(np.asarray(extract(jnp.asarray(images))['pool'], np.float32)[:PR_EXAMPLES - count])
    count += len(pool[-1])
    if count >= PR_EXAMPLES:
      break
  pool = np.concatenate(pool)  # [M, D]
  files.write_npz(path, pool=pool)
  logging.info('[fid] reference features of %d real examples -> %s', len(pool), path)
  return pool


def reference_id(config) -> str:
  """What a cell's reference statistics are: the provenance of eval.reference_stats
  ('NAME@sha256:...'), or COMPUTED_REFERENCE for statistics computed here from the data (cached per
  data set, split, count, extractor)."""
  if config.eval.reference_stats:
    return standard_stats.provenance(config.eval.reference_stats)
  return COMPUTED_REFERENCE


def reference_stats(config, extractor_name, extract, cache_dir: str):
  """(mu, sigma) of the real data's features: read from eval.reference_stats when given (a
  pytorch-fid, EDM or guided-diffusion file, eval/reference_stats.py), else computed and cached per
  data set, split, example count, extractor_id and eval.quantize_uint8 ('_u8' in the file name).

  A cache file that cannot be read is computed again, with a warning.
  """
  ev = config.eval
  if ev.reference_stats:
    mu, sigma, reference = standard_stats.load(ev.reference_stats)
    standard_stats.check_dim(reference, extractor=extractor_name,
                             feature_dim=standard_stats.extractor_feature_dim(ev.extractor))
    logging.info('[fid] reference statistics: %s, %s, %d-d', ev.reference_stats, reference.format,
                 reference.dim)
    return mu, sigma
  path = _reference_path(config, extractor_name, cache_dir)
  cached = files.read_cache(path, metrics.FeatureStats.load_npz)
  if cached is not None:
    return cached[0], cached[1]
  logging.info('[fid] reference statistics: computing them from %d real examples',
               ev.reference_examples)
  stats = None
  for images in _real_batches(config, ev.batch_size):
    stats = _update(stats, extract(jnp.asarray(images))['pool'])
  stats.save_npz(path)
  logging.info('[fid] reference statistics of %d real examples -> %s', stats.count, path)
  return stats.mean(), stats.cov()


def eval_seeds(config) -> list[int]:
  """The noise seeds of --mode=fid: eval.seed, eval.seed + 1, ... (eval.num_seeds of them).

  Every method is sampled from the same noise and labels for a given seed, so rows of one seed are
  paired.
  """
  return [config.eval.seed + k for k in range(config.eval.num_seeds)]


def _clip_x(config, method) -> bool:
  """Whether a method's samples are clipped: its own setting (the clipped-teacher rows), else
  eval.clip_x."""
  return config.eval.clip_x if method.clip_x is None else method.clip_x


def evaluate_cell(loaded: LoadedCheckpoint, method, w: float, *, extract, reference, config,
                  logits_are_classes: bool, seed=None, export_prefix: str = '',
                  real_pool=None) -> dict:
  """Samples eval.num_samples class-balanced images from noise seed (default eval.seed) and scores
  them.

  With real_pool ([M, D] real features, reference_features) precision and recall of the first
  PR_EXAMPLES samples are scored too. The row's '_stats' holds the samples' (mu, sigma): run_fid's
  fidelity to the teacher.

  With logits_are_classes (the digits classifier, the toy mixture) the extractor's logits are the
  data set's own classes, so class accuracy of the samples is reported too. Samples reach the
  extractor clipped to [-1, 1] and, with eval.quantize_uint8, rounded to the 256 uint8 levels
  (eval.images.quantize_uint8). With export_prefix the samples are also written for the standard
  evaluators (eval/export.py).
  """
  start, stats, logits, labels, kept, pool = time.time(), None, [], [], [], []
  batch_size, seed = config.eval.batch_size, config.eval.seed if seed is None else seed
  for b in range(-(-config.eval.num_samples // batch_size)):
    z_init, label = balanced_batch(loaded.record, batch_index=b, batch_size=batch_size, seed=seed)
    images = loaded.sample(sampler=method.sampler, num_steps=method.steps, guidance_w=w,
                           z_init=z_init, label=label, seed=seed + b,
                           clip_x=_clip_x(config, method), ddpm_variance=config.eval.ddpm_variance)
    images = np.clip(images, -1.0, 1.0)  # [B, ...]
    kept += [images] if export_prefix else []
    features = extract(
        jnp.asarray(quantize_uint8(images) if config.eval.quantize_uint8 else images))
    stats = _update(stats, features['pool'])
    pool += [np.asarray(features['pool'], np.float32)] if sum(map(len, pool)) < PR_EXAMPLES else []
    logits.append(np.asarray(features['logits']))
    labels.append(np.asarray(label))
  logits, labels = np.concatenate(logits), np.concatenate(labels)
  if export_prefix and jax.process_index() == 0:
    logging.info('[fid] samples for the standard evaluators: %s',
                 export_samples(export_prefix, np.concatenate(kept), labels)[0])
  is_mean, is_std = metrics.inception_score(logits)
  precision, recall = ('', '') if real_pool is None else metrics.precision_recall(
      real_pool, np.concatenate(pool)[:PR_EXAMPLES])
  return dict(method=method.name, sampler=method.sampler, steps=method.steps, nfe=method.nfe, w=w,
              num_samples=len(labels),
              fid=metrics.frechet_distance(stats.mean(), stats.cov(), *reference),
              is_mean=is_mean, is_std=is_std,
              accuracy=metrics.classifier_accuracy(logits, labels) if logits_are_classes else '',
              precision=precision, recall=recall, seconds=round(time.time() - start, 1),
              _stats=(stats.mean(), stats.cov()))


def _cell_scalars(row: dict, *, with_seed: bool = False) -> dict:
  """TensorBoard tags of one cell, e.g. 'fid/student_ddim/w1' (step = sampling steps, so a curve per
  row).

  with_seed (several noise seeds) appends the seed: 'fid/student_ddim/w1/seed2'.
  """
  tag = f'{row["method"].replace(" ", "_")}_{row["sampler"]}/w{float(row["w"]):g}'
  tag += f'/seed{row["seed"]}' if with_seed else ''
  scalars = {f'fid/{tag}': row['fid'], f'is/{tag}': row['is_mean'],
             f'seconds/{tag}': row['seconds']}
  for name in ('accuracy', 'fidelity', 'precision', 'recall'):
    if row.get(name, '') != '':
      scalars[f'{name}/{tag}'] = row[name]
  return scalars


def fidelity_reference(methods):
  """The teacher's own reference sampler among methods (CFG DDIM at its most steps, unclipped), or
  None: every cell's fidelity is its Frechet distance to this method's samples at the same w and
  noise seed."""
  teachers = [m for m in methods if m.name == 'teacher CFG' and m.sampler == 'ddim']
  return max(teachers, key=lambda m: m.steps) if teachers else None


def _read_reference_cell(path: str):
  """(mu, sigma) of a reference cell stored at path; None when there is none, or it is unreadable
  (then with a warning)."""
  def read(file_path):
    stored = files.read_npz(file_path)
    mu, sigma = np.asarray(stored['mu']), np.asarray(stored['sigma'])
    if mu.ndim != 1 or sigma.shape != (mu.size, mu.size):
      raise ValueError(f'mu {mu.shape} and sigma {sigma.shape} are not a mean and its covariance')
    return mu, sigma
  return files.read_cache(path, read)


def _reference_cell_path(out_dir: str, cell: dict) -> str:
  """Where the (mu, sigma) of a fidelity-reference cell are kept (by its _cell_key), for reruns."""
  digest = hashlib.sha1(repr(_cell_key(cell)).encode()).hexdigest()[:16]
  return files.join(out_dir, 'reference_cells', f'{digest}.npz')


def _text(value) -> str:
  return f'{value:.4f}' if isinstance(value, float) else 'n/a'


def _fidelity(row: dict, reference: Optional[tuple]):
  """Frechet distance of a fresh cell (its '_stats') to the reference cell's (mu, sigma); '' without
  both."""
  stats = row.get('_stats')
  return '' if stats is None or reference is None else metrics.frechet_distance(*stats, *reference)


def _cell_key(row) -> tuple:
  """Everything a cell depends on: method, sampler, steps, w, samples, checkpoint id, extractor id,
  seed, clip_x, quantize_uint8, the reference statistics (reference_id) and, for DDPM cells,
  ddpm_variance (a row written before a field existed had its default: statistics computed from the
  data)."""
  ddpm_variance = (row.get('ddpm_variance') or 'small') if row['sampler'] == 'ddpm' else ''
  return (
      row['method'], row['sampler'], int(row['steps']), float(row['w']), int(row['num_samples']),
      row.get('checkpoint') or '', row.get('extractor') or '', int(row.get('seed') or -1),
      str(row.get('clip_x')) == 'True', str(row.get('quantize_uint8')) == 'True', ddpm_variance,
      row.get('reference') or COMPUTED_REFERENCE)


def _export_prefix(config, out_dir: str, method, w: float, seed: int) -> str:
  """Where a cell's samples go with eval.export_samples
  (OUT/samples/METHOD_SAMPLER_NsTEPS_wW_seedS), else ''."""
  if not config.eval.export_samples:
    return ''
  name = f'{method.name.replace(" ", "_")}_{method.sampler}_{method.steps}steps_w{w:g}_seed{seed}'
  return files.join(out_dir, 'samples', name)


def _exported(prefix: str) -> bool:
  """Whether a cell's samples were exported (its .npz exists), or no export is asked for."""
  folder, stem = prefix.rsplit('/', 1) if prefix else ('', '')
  return not prefix or (files.exists(folder) and any(
      n.startswith(f'{stem}_') and n.endswith('.npz') for n in files.listdir(folder)))


def _read_rows(path: str) -> list[dict]:
  """The rows of results.csv; [] when there is none or it is unreadable (every cell scored again,
  one warning)."""
  def read(path):
    reader = csv.DictReader(io.StringIO(files.read_text(path)))
    if not set(CSV_FIELDS[:6]) <= set(reader.fieldnames or ()):
      raise ValueError(f'its header is not {",".join(CSV_FIELDS[:6])},...')
    rows = list(reader)
    for row in rows:
      _cell_key(row)  # a row cut short or garbled raises here, not later
    return rows
  return files.read_cache(path, read) or []


def run_fid(config) -> str:
  """Evaluates every method x w of config.workdir; finished cells of results.csv are reused.

  A cell is reused only when everything it depends on is the same (_cell_key: the checkpoint's step
  and record, the extractor and its weights, the sample count and seed, the protocol options); the
  table and plots show this run's cells. Every cell is also scored against the teacher
  (fidelity_reference: the Frechet distance to the teacher's reference samples of the same w and
  noise seed) and, for precision and recall, against the first PR_EXAMPLES real examples.
  """
  out_dir = config.eval.out_dir or files.join(config.workdir, 'eval')
  csv_path = files.join(out_dir, 'results.csv')
  methods = existing(list_methods(
      config, teacher_steps=config.eval.teacher_steps,
      teacher_ddpm_steps=config.eval.teacher_ddpm_steps, stage1_steps=config.eval.stage1_steps,
      student_steps=config.eval.student_steps, fixed_w_dir=config.eval.fixed_w_dir,
      teacher_clipped_steps=config.eval.teacher_clipped_steps))
  if not methods:
    raise CheckpointError(
        f'nothing to evaluate in {config.workdir}: no teacher, stage-1 or stage-2 checkpoint '
        'there; train them first (--mode=pipeline) or fix --config.workdir')
  extractor_name, extract = make_extractor(config)
  reference = reference_stats(config, extractor_name, extract,
                              files.join(config.workdir, 'reference_stats'))
  # every cell ever scored here; a retrained checkpoint's old cells stay, unused
  rows = _read_rows(csv_path)
  done = {_cell_key(r): r for r in rows}
  ids, current, loaded = {}, [], {}
  files.makedirs(out_dir)
  writer = make_writer(files.join(config.workdir, 'logs', 'eval'))
  keys = dict(num_samples=config.eval.num_samples, extractor=extractor_id(config),
              quantize_uint8=config.eval.quantize_uint8, reference=reference_id(config))
  reference_method = fidelity_reference(methods)
  real_pool = reference_features(config, extractor_name, extract,
                                 files.join(config.workdir, 'reference_stats'))
  cells = [
      (method, w, seed)
      for method in methods
      for w in config.eval.guidance_ws
      for seed in eval_seeds(config)
      # a fixed-w student: its own w only
      if method.guidance_w is None or method.guidance_w == w
  ]
  cells.sort(key=lambda cell: cell[0] != reference_method)  # the teacher's reference cells first
  reference_cells = {}  # (w, seed) -> (mu, sigma) of the reference method's samples
  for i, (method, w, seed) in enumerate(cells):
    ckpt_id = ids.setdefault(method.ckpt_dir, records.checkpoint_id(method.ckpt_dir))
    cell = dict(method=method.name, sampler=method.sampler, steps=method.steps, w=float(w),
                checkpoint=ckpt_id, seed=seed,
                ddpm_variance=config.eval.ddpm_variance if method.sampler == 'ddpm' else '',
                clip_x=_clip_x(config, method), **keys)
    is_reference = method == reference_method
    export_prefix = _export_prefix(config, out_dir, method, w, seed)
    stats_path = _reference_cell_path(out_dir, cell) if is_reference else ''
    done_row = done.get(_cell_key(cell))
    if is_reference and done_row is not None and done_row.get('fidelity') in ('', None):
      done_row = None  # scored before fidelity existed: sampled again, for its statistics
    stored = None
    if done_row is not None and stats_path and files.exists(stats_path):
      stored = _read_reference_cell(stats_path)
      if stored is None:
        done_row = None  # its statistics are unreadable: sampled again, and the file written over
    # a cell asked for samples it lacks is sampled again
    if done_row is not None and _exported(export_prefix):
      if stored is not None:
        reference_cells[(float(w), seed)] = stored
      current.append(done_row)
      continue
    row = evaluate_cell(
        load_cached(loaded, method.ckpt_dir), method, w, extract=extract, reference=reference,
        config=config, logits_are_classes=extractor_name != 'inception', seed=seed,
        export_prefix=export_prefix, real_pool=real_pool)
    if is_reference and row.get('_stats') is not None:
      reference_cells[(float(w), seed)] = row['_stats']
      if jax.process_index() == 0:
        files.write_npz(stats_path, mu=row['_stats'][0], sigma=row['_stats'][1])
    row['fidelity'] = 0.0 if is_reference else _fidelity(row, reference_cells.get((float(w), seed)))
    row.pop('_stats', None)
    row.update(cell)
    # a cell scored again replaces its row
    rows = [r for r in rows if _cell_key(r) != _cell_key(row)] + [row]
    current.append(row)
    logging.info('[fid] %d/%d %s w=%g seed %d: FID %.3f IS %.2f fidelity %s (%.0f s)', i + 1,
                 len(cells), method.label, w, seed, row['fid'], row['is_mean'],
                 _text(row['fidelity']), row['seconds'])
    if jax.process_index() == 0:
      # atomically after every cell: a killed run keeps them
      files.write_csv(csv_path, rows, CSV_FIELDS)
    writer.write_scalars(method.steps, _cell_scalars(row, with_seed=config.eval.num_seeds > 1))
  writer.close()
  rows = current
  if jax.process_index() == 0:
    is_max = None if extractor_name == 'inception' else data.dataset_info(config.data).num_classes
    write_table(
        rows, files.join(out_dir, 'results.md'),
        title=f'{config.data.name}, {extractor_name} features, '
        f'{config.eval.num_samples} samples per cell, {config.eval.num_seeds} noise '
        f'seed(s), reference statistics {keys["reference"]}', is_max=is_max)
    write_plots(rows, out_dir, is_max=is_max)  # a classifier's IS is at most its class count
  logging.info('[fid] results in %s', out_dir)
  return out_dir
