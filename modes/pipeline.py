"""--mode=pipeline: teacher -> stage 1 -> stage-2 rounds -> sample grids and a Markdown summary."""

import json
import time
from typing import Optional

import jax
import numpy as np
from absl import logging

import data
from distill import stages
from eval.images import (image_grid, save_png, save_samples_png, with_column_titles,
                         with_row_labels, with_title)
from eval.report import steps_text
from modes.methods import list_methods
from modes.sampling import fixed_inputs, load_cached
from modes.stage_quality import StageQuality
from train import checkpoint, files, records
from train.errors import config_section
from train.loop import make_writer
from train.mesh import host_description


def _timed(timings: dict, name: str, fn, *args):
  start = time.time()
  result = fn(*args)
  timings[name] = round(time.time() - start, 1)
  logging.info('[pipeline] %s took %.1f s', name, timings[name])
  return result


def _grid_samples(config, results_dir: str, loaded: dict, method, w: float, *, z_init,
                  label) -> np.ndarray:
  """A grid's samples [B, ...] of one method and w, kept in results/grid_samples/ with what they
  depend on.

  A rerun reads them back (without loading the checkpoint) when the checkpoint (by id), sampler,
  steps, w, noise and clip_x are unchanged, as --mode=fid reuses its cells; anything else samples
  them again.
  """
  key = ' | '.join([method.label, records.checkpoint_id(method.ckpt_dir), f'w={w:g}',
                    f'n={len(label)}', f'seed={config.pipeline.seed}',
                    f'clip_x={config.eval.clip_x}'])
  path = files.join(results_dir, 'grid_samples', f'{method.file_stem(w)}.npz')
  stored = files.read_cache(path, _read_grid_samples)
  if stored is not None and stored[0] == key:
    return stored[1]
  samples = load_cached(loaded, method.ckpt_dir).sample(
      sampler=method.sampler, num_steps=method.steps, guidance_w=w, z_init=z_init, label=label,
      seed=config.pipeline.seed, clip_x=config.eval.clip_x)
  if jax.process_index() == 0:
    files.write_npz(path, samples=samples, key=np.array(key))
  return samples


def _read_grid_samples(path: str) -> tuple[str, np.ndarray]:
  """(key, samples) of a grid_samples/*.npz."""
  stored = files.read_npz(path)
  return str(stored['key']), stored['samples']


def _sample_all(config, results_dir: str, writer) -> list[dict]:
  """Samples every method at every w from the same noise and labels (or reads them back:
  _grid_samples); writes titled grids (modes.methods.sample_file_stem names them) and, for images,
  an overview per w.

  The grids also go to TensorBoard (logs/pipeline): tag 'samples/<method>_w<w>', step = sampling
  steps.
  """
  entries, overview = [], {}
  loaded = {}
  for method in list_methods(config, teacher_steps=config.pipeline.teacher_steps):
    z_init, label, num_rows = fixed_inputs(
        records.read(method.ckpt_dir), per_class=config.pipeline.per_class,
        seed=config.pipeline.seed)
    for w in config.pipeline.guidance_ws:
      start = time.time()
      samples = _grid_samples(config, results_dir, loaded, method, w, z_init=z_init, label=label)
      file = f'{method.file_stem(w)}.png'
      grid = save_samples_png(files.join(results_dir, file), samples, np.asarray(label),
                              num_rows=num_rows, title=method.title(w))
      tag = f'{method.name.replace(" ", "_")}_{method.sampler}_w{w:g}'
      writer.write_images(method.steps, {f'samples/{tag}': grid[None]})
      writer.write_scalars(method.steps,
                           {f'saturated/{tag}': float(np.mean(np.abs(samples) > 1.0))})
      # 1 per class
      overview.setdefault(w, []).append((method.description, samples[::config.pipeline.per_class]))
      entries.append(dict(method=method.model_and_sampler, nfe=method.nfe, w=w, file=file,
                          mean=float(samples.mean()), std=float(samples.std()),
                          saturated=float(np.mean(np.abs(samples) > 1.0)),
                          seconds=round(time.time() - start, 2)))
  if np.asarray(overview[config.pipeline.guidance_ws[0]][0][1]).ndim == 4:
    classes = np.asarray(label)[::config.pipeline.per_class]
    for w, rows in overview.items():
      title = overview_title(w, len(classes))
      grid = overview_image(rows, classes, title=title)
      save_png(files.join(results_dir, f'overview_w{w:g}.png'), grid, title=title)
      writer.write_images(0, {f'overview/w{w:g}': grid[None]})
  return entries


def overview_title(w: float, num_classes: int) -> str:
  return (f'All methods at w = {w:g}: one row per method, one sample per class (classes '
          f'0-{num_classes - 1})')


def overview_image(rows: list[tuple], classes, *, title: str) -> np.ndarray:
  """uint8 [H, W, C]: one row per (description, images [num_classes, h, w, c]), rows labelled,
  columns titled with their class, under a title band."""
  descriptions, images = zip(*rows)
  scale = max(1, 32 // images[0].shape[1])
  tile = (images[0].shape[1] + 1) * scale  # one image and its padding, in pixels
  grid = image_grid(np.concatenate(images), num_rows=len(images), scale=scale)
  grid = with_column_titles(grid, [str(c) for c in classes], column_width=tile)
  grid = with_row_labels(grid, list(descriptions), row_height=tile,
                         top=grid.shape[0] - len(images) * tile)
  return with_title(grid, title)


SAMPLES_HOW_TO_READ = (
    'Every method samples from the same noise and labels, so grids compare row by row; each PNG '
    'is titled with its model, sampler, steps, network calls (NFE) and w, and each grid row '
    'with its class.',
    '',
    'What "better" means depends on w. At w = 0 (no guidance) good samples look like the real '
    'data. At w >= 1 guidance trades diversity for class fidelity: the samples become sharper, '
    'more saturated and less varied than the real data by design, so resembling the data is not '
    'the goal there. A distilled student is good when its samples match its teacher\'s at the same '
    'w and noise, whatever the real data look like.',
    '',
    'Columns: **method**: the model ("student N-step" is the student of the stage-2 round to N '
    'steps) and its sampler and step count; **NFE**: network calls per sample (the CFG teacher '
    'makes 2 a step); **w**: the guidance weight; **mean** and **std**: the mean and standard '
    'deviation of all sample values (pixels in [-1, 1], or 2-D point coordinates), beside the real '
    'data\'s in the first row; **saturated**: the fraction of values outside [-1, 1], the pixel '
    'range of images, which guidance pushes values past (saved images clip them; 2-D points: '
    'compare with the real data\'s row); **grid**: the PNG.',
)


def _real_data_row(config) -> Optional[str]:
  """The summary's reference row: mean, std and saturated fraction of the real training data
  (in-memory sets)."""
  try:
    x, _ = data.load_arrays(config.data.name, 'train')  # [N, ...]
  except data.DataError:  # a tfds set: streamed, not read here
    return None
  return (f'| real data ({config.data.name} train) | - | - | {x.mean():.3f} | {x.std():.3f} | '
          f'{np.mean(np.abs(x) > 1.0):.3f} | - |')


def _summary(config, timings: dict, entries: list[dict], quality_lines: list[str], *,
             has_overview: bool) -> str:
  lines = [f'# Pipeline results: {config.data.name}', '', f'Workdir: `{config.workdir}`', '',
           '## Wall time', '', f'Machine: {timings.get("machine (this invocation)", "-")}', '',
           '| stage | seconds |', '|---|---|']
  lines += [f'| {k} | {v} |' for k, v in timings.items() if not isinstance(v, str)]
  lines += ['', *quality_lines] if quality_lines else []
  lines += ['', '## Samples', '', *SAMPLES_HOW_TO_READ, '']
  if has_overview:
    lines += ['Overview per w: one row per method (in the order below), one sample per class: ' +
              ', '.join(f'`overview_w{w:g}.png`' for w in config.pipeline.guidance_ws), '']
  lines += ['| method | NFE | w | mean | std | saturated | grid |', '|---|---|---|---|---|---|---|']
  real = _real_data_row(config)
  lines += [real] if real else []
  lines += [
      f'| {e["method"]} | {e["nfe"]} | {e["w"]:g} | {e["mean"]:.3f} | {e["std"]:.3f} | '
      f'{e["saturated"]:.3f} | [{e["file"]}]({e["file"]}) |' for e in entries
  ]
  return '\n'.join(lines) + '\n'


# timings.json names of runs written before a name changed -> the name now.
LEGACY_TIMING_NAMES = {'stage2 round -> 1 steps': 'stage2 round -> 1 step'}


def _read_timings(path: str) -> dict:
  """timings.json; {} when there is none or it is unreadable (one warning; this run's times are
  written)."""
  def read(path):
    timings = files.read_json(path)
    if not isinstance(timings, dict):
      raise TypeError('not a JSON object')
    return timings
  return files.read_cache(path, read) or {}


def _trained(config, stage: str, sampling_steps=None) -> bool:
  """Whether a stage (or round) already holds its final checkpoint: a rerun will skip it."""
  section = config[config_section(stage)]
  step = checkpoint.latest_step(stages.stage_dir(config.workdir, stage, sampling_steps))
  # imported, not trained: complete at step 0
  if stage == 'teacher' and config.model.name == 'diffusers_unet':
    return step is not None
  return step is not None and step >= section.num_steps


def pipeline_finished(config) -> bool:
  """Whether config.workdir holds a finished --mode=pipeline run of config: every stage and round
  trained to its final step and results/summary.md written (what the notebook opens instead of
  training)."""
  trained = all(_trained(config, stage, steps) for stage, steps in
                [('teacher', None), ('stage1', None)] +
                [('stage2', n) for n in stages.stage2_rounds(config)])
  return trained and files.exists(files.join(config.workdir, 'results', 'summary.md'))


def run_pipeline(config) -> str:
  """Runs (or resumes) every stage, each followed by its rows of the fidelity table; then samples.

  A finished stage trained from other values of a field it depends on is refused first, in one line
  (`stages.check_fresh_stages`; --config.retrain_stale=True retrains it). Returns the results
  folder.
  """
  stages.check_fresh_stages(config, [('teacher', None), ('stage1', None),
                                      # before any work
                                      *(('stage2', n) for n in stages.stage2_rounds(config))])
  results_dir = files.join(config.workdir, 'results')
  timings_path = files.join(results_dir, 'timings.json')
  timings = {LEGACY_TIMING_NAMES.get(k, k): v for k, v in _read_timings(timings_path).items()}
  run, skipped = {}, set()  # this invocation's seconds; the names of stages that were already done
  writer = make_writer(files.join(config.workdir, 'logs', 'pipeline'))
  quality = StageQuality(config, writer)
  trainings = [('teacher', 'teacher', None, stages.train_teacher, ()),
               ('stage1', 'stage1', None, stages.train_stage1, ())]
  halving = stages.halving_step(config, 'stage2')  # the rounds share one compiled step
  trainings += [(f'stage2 round -> {steps_text(n)}', 'stage2', n, stages.train_stage2_round,
                 (n, halving)) for n in stages.stage2_rounds(config)]
  for name, stage, steps, train, args in trainings:
    if _trained(config, stage, steps):
      skipped.add(name)
    _timed(run, name, train, config, *args)
    if stage == 'stage1':
      quality.after_stage1()
    elif stage == 'stage2':
      quality.after_round(steps)
  if quality.enabled:
    quality.write_plot(results_dir)
    run['quality'] = round(quality.seconds, 1)
    skipped.update(() if quality.computed_rows else ('quality',))
    logging.info('[pipeline] quality took %.1f s', run['quality'])
  entries = _timed(run, 'sampling', _sample_all, config, results_dir, writer)
  writer.write_texts(0, {'timings': json.dumps(run)})
  writer.close()
  # A stage skipped on a rerun keeps the time it took when it was trained.
  timings.update({k: v for k, v in run.items() if k not in timings or k not in skipped})
  timings['pipeline (this invocation)'] = round(sum(run.values()), 1)
  # wall times compare only on the same machine
  timings['machine (this invocation)'] = host_description()
  if jax.process_index() == 0:
    files.write_json(timings_path, timings)
    summary = _summary(
        config, timings, entries, quality.summary_lines(), has_overview=any(
            files.exists(files.join(results_dir, f'overview_w{w:g}.png'))
            for w in config.pipeline.guidance_ws))
    files.write_text(files.join(results_dir, 'summary.md'), summary)
  logging.info('[pipeline] results in %s', results_dir)
  return results_dir
