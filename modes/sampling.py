"""Sampling from any checkpoint (teacher, stage 1, any stage-2 round) with a checked step count."""

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from diffusion import guidance_w_from_scale, schedule_of
import ml_collections

from distill.stages import HALVING_STAGES, halving_rounds, stage_dir
from eval.export import export_samples
from eval.images import save_samples_png
from modes.methods import checkpoint_method
from models.denoiser import clip_x as clip_denoised_x
from models.denoiser import make_denoise_fn
from samplers import make_encoder, make_sampler
from train import checkpoint, files, records
from train.loop import make_writer
from train.mesh import shard_rows

MAX_GRID_CLASSES = 10


class SamplingError(ValueError):
  """A sampler or step count the checkpoint was not made for."""


def allowed_steps(record: dict, sampler: str) -> Optional[list[int]]:
  """Step counts a checkpoint supports for a sampler; None means any.

  The teacher (guided, 2 calls/step) and stage 1 are continuous-time: any count, any sampler. An
  N-step stage-2 student runs DDIM at N steps and the stochastic sampler at 2N steps
  (docs/math.md#stochastic-n-step-sampler); an N-step direct-baseline student runs guided DDIM at N
  steps.
  """
  if record['stage'] in ('teacher', 'stage1'):
    return None
  n = record['sampling_steps']
  if record['stage'] == 'encoder':
    return {'encode': [n]}.get(sampler, [])
  if record['stage'] == 'direct':
    return {'ddim': [n]}.get(sampler, [])  # trained on the N-step grid only
  if sampler == 'stochastic' and not trained_on_fine_grid(record):
    # the stochastic sampler visits the odd multiples of 1/(2N), which this student never saw
    return []
  return {'ddim': [n], 'stochastic': [2 * n]}.get(sampler, [])


def trained_on_fine_grid(record: dict) -> bool:
  """Whether a stage-2 student was trained at the 1/(2N) times its stochastic 2N-step sampler
  needs."""
  return bool(record.get('config', {}).get('stage2', {}).get('fine_grid', True))


def check_steps(record: dict, sampler: str, num_steps: int, ckpt_dir: str) -> None:
  allowed = allowed_steps(record, sampler)
  if allowed is not None and num_steps not in allowed:
    have = f'{sampler} at {allowed[0]} steps' if allowed else f'no {sampler} sampler'
    raise SamplingError(
        f'{ckpt_dir} is the {record["sampling_steps"]}-step {record["stage"]} student: it supports '
        f'{have}, not {num_steps}; {_advice(record, sampler, num_steps)}')


def _advice(record: dict, sampler: str, num_steps: int) -> str:
  """Which checkpoint of the run that made `record` runs `sampler` at num_steps steps."""
  stage = record['stage']  # 'stage2', 'encoder' or 'direct'
  if 'config' not in record:
    return 'use --config.sample.checkpoint=.../stage1 or .../teacher (any step count, any sampler)'
  rounds = halving_rounds(ml_collections.ConfigDict(record['config']), stage)
  if sampler == 'encode' and num_steps in rounds:
    return f'use the encoder in .../encoder/steps_{num_steps:04d}'
  if stage == 'direct':
    found = (f'pick --config.sample.checkpoint=.../direct/steps_{num_steps:04d}'
             if num_steps in rounds else
             'this run\'s direct-baseline students sample with ddim at '
             f'{", ".join(map(str, rounds))} steps')
    return found if sampler == 'ddim' else f'they run ddim only; {found}'
  if sampler == 'ddim' and num_steps in rounds:
    return f'pick --config.sample.checkpoint=.../stage2/steps_{num_steps:04d}'
  if sampler == 'stochastic' and num_steps % 2 == 0 and num_steps // 2 in rounds:
    return f'pick --config.sample.checkpoint=.../stage2/steps_{num_steps // 2:04d}'
  if stage == 'encoder':
    return f'this run\'s encoders run at {", ".join(map(str, rounds))} steps'
  students = ', '.join(f'ddim {n} / stochastic {2 * n}' for n in rounds)
  return (
      f'this run\'s stage-2 students sample at {students} steps; for any step count '
      'and sampler use --config.sample.checkpoint=.../stage1 or .../teacher')


def default_steps(record: dict, sampler: str) -> int:
  allowed = allowed_steps(record, sampler)
  return allowed[0] if allowed else 64


class LoadedCheckpoint:
  """A checkpoint's record, params and denoiser: guided CFG for the teacher, w-input for
  students."""

  def __init__(self, ckpt_dir: str, which: str = 'ema_params'):
    """which: the params sampled, 'ema_params' (what every stage distils and samples) or 'params'
    (the raw last iterate)."""
    self.ckpt_dir = ckpt_dir
    self.record = records.read(ckpt_dir)
    model, abstract = records.build(self.record)
    self.params = checkpoint.load_params(
        ckpt_dir, abstract, check_record=records.checker(self.record, ckpt_dir), which=which)
    self.logsnr_fn = schedule_of(self.record['diffusion'])
    # teacher, direct baseline: CFG
    kind = 'guided' if not self.record['guidance_input'] else 'w_input'
    self.denoise_fn = make_denoise_fn(model, parametrization=self.record['parametrization'],
                                      kind=kind, num_classes=self.record['num_classes'])
    self.nfe_per_step = 2 if kind == 'guided' else 1
    self._samplers = {}  # (sampler, num_steps) -> jitted program, reused for every w and batch
    # the w outside the trained range already warned about (once per w, not per batch)
    self._warned_ws = set()

  def trained_w_range(self) -> Optional[tuple[float, float]]:
    """[w_min, w_max] a w-input student was distilled on (its record's config.distill); None for the
    guided teacher and direct baseline, which apply guidance at sampling time at any w."""
    distill = self.record.get('config', {}).get('distill')
    if not self.record['guidance_input'] or not distill:
      return None
    return float(distill['w_min']), float(distill['w_max'])

  def _check_w(self, guidance_w: float) -> None:
    """One warning line per w outside the trained range; sampling goes on (what the student does
    there is extrapolation, which the distillation never asked of it)."""
    w_range = self.trained_w_range()
    if w_range is None or w_range[0] <= guidance_w <= w_range[1] or guidance_w in self._warned_ws:
      return
    self._warned_ws.add(guidance_w)
    logging.warning(
        '%s was distilled for w in [%g, %g]; w=%g lies outside: its samples there extrapolate what '
        'it learned from the guided teacher (sampling anyway)', self.ckpt_dir, *w_range, guidance_w)

  def encode(self, *, num_steps: int, guidance_w: float, x, label):
    """z_1 [B, ...] from data x by N-step DDIM encoding (an encoder student, stage 1 or the
    teacher)."""
    check_steps(self.record, 'encode', num_steps, self.ckpt_dir)
    key = ('encode', num_steps)
    if key not in self._samplers:
      self._samplers[key] = make_encoder(
          self.denoise_fn, num_steps=num_steps, logsnr_fn=self.logsnr_fn)
    x, label, w = shard_rows(x, label, jnp.full(label.shape, guidance_w, jnp.float32))
    return np.asarray(self._samplers[key](self.params, x, label, w))

  def sample(self, *, sampler: str, num_steps: int, guidance_w: float, z_init, label, seed: int,
             clip_x: bool = False, ddpm_variance: str = 'small'):
    """x [B, ...] from the fixed initial noise z_init and labels; the whole loop is one jitted
    program.

    clip_x clips every step's x prediction to [-1, 1] (models.denoiser.clip_x), as the reference
    samplers do; ddpm_variance ('small' | 'large') is the DDPM sampler's step variance (ignored by
    the others).
    """
    check_steps(self.record, sampler, num_steps, self.ckpt_dir)
    self._check_w(guidance_w)
    # make_sampler gives the non-DDPM samplers one program
    key = (sampler, num_steps, clip_x, ddpm_variance)
    if key not in self._samplers:
      denoise_fn = clip_denoised_x(self.denoise_fn) if clip_x else self.denoise_fn
      self._samplers[key] = make_sampler(sampler, denoise_fn, num_steps=num_steps,
                                         logsnr_fn=self.logsnr_fn, ddpm_variance=ddpm_variance)
    run = self._samplers[key]
    w = jnp.full(label.shape, guidance_w, jnp.float32)
    z_init, label, w = shard_rows(z_init, label, w)
    return np.asarray(run(self.params, z_init, label, w, jax.random.key(seed)))


def load_cached(cache: dict, ckpt_dir: str) -> LoadedCheckpoint:
  """One LoadedCheckpoint per directory (and so one compile per sampler) across a mode's loops."""
  if ckpt_dir not in cache:
    cache[ckpt_dir] = LoadedCheckpoint(ckpt_dir)
  return cache[ckpt_dir]


def fixed_inputs(record: dict, *, per_class: int, seed: int):
  """The same noise and labels for every method: class-major order, so each grid row is one
  class."""
  num_classes = min(record['num_classes'], MAX_GRID_CLASSES)
  label = jnp.repeat(jnp.arange(num_classes, dtype=jnp.int32), per_class)  # [B]
  z_init = jax.random.normal(jax.random.key(seed), (label.shape[0], *record['x_shape']))  # [B, ...]
  return z_init, label, num_classes


def check_checkpoint_dir(ckpt_dir: str) -> None:
  """Raises SamplingError listing the rounds when ckpt_dir is a halving stage's folder (stage2/,
  encoder/, direct/) or a round that is not there beside rounds that are: one checkpoint per round,
  each a directory."""
  rounds = _rounds_in(ckpt_dir)
  if rounds:
    raise SamplingError(
        f'{ckpt_dir} holds one checkpoint per round, not one checkpoint: give one of its rounds, '
        f'--config.sample.checkpoint={files.join(ckpt_dir, rounds[0])} (rounds: '
        f'{", ".join(rounds)})')
  parent = ckpt_dir.rstrip('/').rpartition('/')[0]  # string ops: the workdir may be a remote URL
  rounds = _rounds_in(parent) if parent and not files.exists(ckpt_dir) else []
  if rounds:
    raise SamplingError(
        f'no checkpoint in {ckpt_dir}: the rounds in {parent} are {", ".join(rounds)}, e.g. '
        f'--config.sample.checkpoint={files.join(parent, rounds[0])}')


def _rounds_in(folder: str) -> list[str]:
  """The round folders (steps_NNNN) of a halving stage's folder, most steps first; [] for anything
  else."""
  if (not folder or folder.rstrip('/').rpartition('/')[2] not in HALVING_STAGES or
      not files.is_dir(folder)):
    return []
  return sorted((name for name in files.listdir(folder) if name.startswith('steps_')), reverse=True)


def run_sample(config) -> str:
  """--mode=sample: writes a titled PNG grid (one row per class) and an .npz of samples; returns the
  PNG path.

  With sample.export_samples the samples are also written for guided-diffusion's evaluator and EDM's
  fid.py (eval/export.py).
  """
  ckpt_dir = config.sample.checkpoint or stage_dir(config.workdir, 'teacher')
  check_checkpoint_dir(ckpt_dir)
  loaded = LoadedCheckpoint(ckpt_dir)
  sampler = config.sample.sampler
  num_steps = config.sample.num_steps or default_steps(loaded.record, sampler)
  z_init, label, num_rows = fixed_inputs(
      loaded.record, per_class=config.sample.per_class, seed=config.sample.seed)
  scale = config.sample.get('guidance_scale')
  guidance_w = config.sample.guidance_w if scale is None else guidance_w_from_scale(scale)
  samples = loaded.sample(sampler=sampler, num_steps=num_steps, guidance_w=guidance_w,
                          z_init=z_init, label=label, seed=config.sample.seed,
                          clip_x=config.sample.clip_x, ddpm_variance=config.sample.ddpm_variance)
  out_dir = config.sample.out_dir or files.join(config.workdir, 'samples')
  method = checkpoint_method(loaded.record, ckpt_dir, sampler=sampler, steps=num_steps)
  name = method.file_stem(guidance_w)  # the pipeline's grids are named alike
  png = files.join(out_dir, name + '.png')
  if jax.process_index() == 0:
    grid = save_samples_png(png, samples, np.asarray(label), num_rows=num_rows,
                            title=method.title(guidance_w))
    files.write_npz(files.join(out_dir, name + '.npz'), samples=samples, labels=np.asarray(label))
    if config.sample.export_samples:
      logging.info('samples for the standard evaluators: %s', ', '.join(
          export_samples(files.join(out_dir, name), samples, np.asarray(label))))
    writer = make_writer(files.join(config.workdir, 'logs', 'sample'))
    writer.write_images(num_steps, {name: grid[None]})
    writer.close()
  logging.info('wrote %s (%s)', png, method.description)
  return png
