"""--mode=pipeline: teacher -> stage 1 -> stage-2 rounds -> sample grids and a Markdown summary."""

import json
import time

import jax
import numpy as np
from absl import logging

from distill import stages
from eval.images import image_grid, save_png, save_samples_png, with_row_labels
from modes.methods import list_methods
from modes.sampling import fixed_inputs, load_cached
from modes.stage_quality import StageQuality
from train import checkpoint, files, records
from train.loop import config_section, make_writer
from train.mesh import host_description


def _timed(timings: dict, name: str, fn, *args):
  start = time.time()
  result = fn(*args)
  timings[name] = round(time.time() - start, 1)
  logging.info('[pipeline] %s took %.1f s', name, timings[name])
  return result


def _grid_samples(config, results_dir: str, loaded: dict, method, w: float, *, z_init, label) -> np.ndarray:
  """A grid's samples [B, ...] of one method and w, kept in results/grid_samples/ with what they depend on.

  A rerun reads them back (without loading the checkpoint) when the checkpoint (by id), sampler, steps, w, noise
  and clip_x are unchanged, as --mode=fid reuses its cells; anything else samples them again.
  """
  key = ' | '.join([method.label, records.checkpoint_id(method.ckpt_dir), f'w={w:g}', f'n={len(label)}',
                    f'seed={config.pipeline.seed}', f'clip_x={config.eval.clip_x}'])
  path = files.join(results_dir, 'grid_samples', f'{method.file_stem}_w{w:g}.npz')
  stored = files.read_cache(path, _read_grid_samples)
  if stored is not None and stored[0] == key:
    return stored[1]
  samples = load_cached(loaded, method.ckpt_dir).sample(sampler=method.sampler, num_steps=method.steps, guidance_w=w,
                                                        z_init=z_init, label=label, seed=config.pipeline.seed,
                                                        clip_x=config.eval.clip_x)
  if jax.process_index() == 0:
    files.write_npz(path, samples=samples, key=np.array(key))
  return samples


def _read_grid_samples(path: str) -> tuple[str, np.ndarray]:
  """(key, samples) of a grid_samples/*.npz."""
  stored = files.read_npz(path)
  return str(stored['key']), stored['samples']


def _sample_all(config, results_dir: str, writer) -> list[dict]:
  """Samples every method at every w from the same noise and labels (or reads them back: _grid_samples); writes
  grids and an overview.

  The grids also go to TensorBoard (logs/pipeline): tag 'samples/<method>_w<w>', step = sampling steps.
  """
  entries, overview = [], {}
  loaded = {}
  for method in list_methods(config, teacher_steps=config.pipeline.teacher_steps):
    z_init, label, num_rows = fixed_inputs(records.read(method.ckpt_dir), per_class=config.pipeline.per_class,
                                           seed=config.pipeline.seed)
    for w in config.pipeline.guidance_ws:
      start = time.time()
      samples = _grid_samples(config, results_dir, loaded, method, w, z_init=z_init, label=label)
      file = f'{method.file_stem}_w{w:g}.png'
      grid = save_samples_png(files.join(results_dir, file), samples, np.asarray(label), num_rows=num_rows)
      tag = f'{method.name.replace(" ", "_")}_{method.sampler}_w{w:g}'
      writer.write_images(method.steps, {f'samples/{tag}': grid[None]})
      writer.write_scalars(method.steps, {f'saturated/{tag}': float(np.mean(np.abs(samples) > 1.0))})
      overview.setdefault(w, []).append((f'{method.label} (NFE {method.nfe})',
                                         samples[::config.pipeline.per_class]))  # one sample per class
      entries.append(dict(method=method.label, nfe=method.nfe, w=w, file=file,
                          mean=float(samples.mean()), std=float(samples.std()),
                          saturated=float(np.mean(np.abs(samples) > 1.0)), seconds=round(time.time() - start, 2)))
  if np.asarray(overview[config.pipeline.guidance_ws[0]][0][1]).ndim == 4:
    for w, rows in overview.items():
      labels, images = zip(*rows)
      scale = max(1, 32 // images[0].shape[1])
      grid = image_grid(np.concatenate(images), num_rows=len(images), scale=scale)
      grid = with_row_labels(grid, [f'{label}, w={w:g}' for label in labels],
                             row_height=(images[0].shape[1] + 1) * scale, top=scale)
      save_png(files.join(results_dir, f'overview_w{w:g}.png'), grid)
      writer.write_images(0, {f'overview/w{w:g}': grid[None]})
  return entries


def _summary(config, timings: dict, entries: list[dict], quality_lines: list[str]) -> str:
  lines = [f'# Pipeline results: {config.data.name}', '', f'Workdir: `{config.workdir}`', '',
           '## Wall time', '', f'Machine: {timings.get("machine (this invocation)", "-")}', '',
           '| stage | seconds |', '|---|---|']
  lines += [f'| {k} | {v} |' for k, v in timings.items() if not isinstance(v, str)]
  lines += ['', *quality_lines] if quality_lines else []
  lines += ['', '## Samples (same noise and labels for every method; one row per class)', '',
            'Overview per w: rows are the methods below in order, one sample per class: ' +
            ', '.join(f'`overview_w{w:g}.png`' for w in config.pipeline.guidance_ws), '',
            '| method | NFE | w | mean | std | frac(abs(x)>1) | grid |', '|---|---|---|---|---|---|---|']
  lines += [f'| {e["method"]} | {e["nfe"]} | {e["w"]:g} | {e["mean"]:.3f} | {e["std"]:.3f} | {e["saturated"]:.3f} '
            f'| [{e["file"]}]({e["file"]}) |' for e in entries]
  return '\n'.join(lines) + '\n'


def _read_timings(path: str) -> dict:
  """timings.json; {} when there is none or it is unreadable (one warning; this run's times are written)."""
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
  if stage == 'teacher' and config.model.name == 'diffusers_unet':  # imported, not trained: complete at step 0
    return step is not None
  return step is not None and step >= section.num_steps


def run_pipeline(config) -> str:
  """Runs (or resumes) every stage, each followed by its quality-lost table row; then samples.

  A finished stage trained from other values of a field it depends on is refused first, in one line
  (`stages.check_fresh_stages`; --config.retrain_stale=True retrains it). Returns the results folder.
  """
  stages.check_fresh_stages(config, [('teacher', None), ('stage1', None),
                                      *(('stage2', n) for n in stages.stage2_rounds(config))])  # before any work
  results_dir = files.join(config.workdir, 'results')
  timings_path = files.join(results_dir, 'timings.json')
  timings = _read_timings(timings_path)
  run, skipped = {}, set()  # this invocation's seconds; the names of stages that were already done
  writer = make_writer(files.join(config.workdir, 'logs', 'pipeline'))
  quality = StageQuality(config, writer)
  trainings = [('teacher', 'teacher', None, stages.train_teacher, ()),
               ('stage1', 'stage1', None, stages.train_stage1, ())]
  trainings += [(f'stage2 round -> {n} steps', 'stage2', n, stages.train_stage2_round, (n,))
                for n in stages.stage2_rounds(config)]
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
  timings['machine (this invocation)'] = host_description()  # wall times compare only on the same machine
  if jax.process_index() == 0:
    files.write_json(timings_path, timings)
    summary = _summary(config, timings, entries, quality.summary_lines())
    files.write_text(files.join(results_dir, 'summary.md'), summary)
  logging.info('[pipeline] results in %s', results_dir)
  return results_dir
