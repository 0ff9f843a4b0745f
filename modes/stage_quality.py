"""Quality lost per stage: each model the pipeline trains, scored against its own teacher on the same noise.

Right after stage 1 and after every stage-2 round, the new model (the student) and the model it was distilled
from (the teacher) are sampled from the same class-balanced noise and labels, config.pipeline.quality_samples
per guidance weight. Both get an FID against the real data's cached reference statistics, and the paired
samples an RMS difference (same noise, so it is the distillation error itself). Rows are kept in
WORKDIR/results/stage_quality.json: a rerun of a finished pipeline recomputes nothing, a killed one resumes.
"""

import dataclasses
import os
import time
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from distill import stages
from eval import metrics
from eval.images import quantize_uint8
from modes import fid
from modes.methods import Method
from modes.sampling import load_cached
from train import files
from train.records import checkpoint_id

RESULTS_NAME = 'stage_quality.json'


@dataclasses.dataclass(frozen=True)
class Comparison:
  """A stage's new model (student) against the model it was distilled from (teacher)."""
  stage: str  # id in TensorBoard tags: 'stage1', 'stage2_8to4'
  title: str  # the summary's stage column: 'stage 1', 'stage 2: 8 -> 4'
  index: int  # TensorBoard step: 0 for stage 1, k for the k-th stage-2 round
  teacher: Method
  student: Method
  stochastic: Optional[Method] = None  # the N-step student's stochastic sampler at 2N steps (stage-2 rounds)


def stage1_comparison(config) -> Comparison:
  """The guided teacher's CFG DDIM against the stage-1 student's DDIM, both at pipeline.quality_steps."""
  steps, workdir = config.pipeline.quality_steps, config.workdir
  return Comparison('stage1', 'stage 1', 0,
                    teacher=Method('teacher CFG', 'ddim', steps, 2 * steps, stages.stage_dir(workdir, 'teacher')),
                    student=Method('stage 1', 'ddim', steps, steps, stages.stage_dir(workdir, 'stage1')))


def round_comparison(config, student_steps: int) -> Comparison:
  """Round 2N -> N: its teacher (stage 1 or the 2N-step student) at DDIM 2N against the N-step student."""
  n, workdir = student_steps, config.workdir
  if 2 * n == config.stage2.start_steps:
    teacher = Method('stage 1', 'ddim', 2 * n, 2 * n, stages.stage_dir(workdir, 'stage1'))
  else:
    teacher = Method('student', 'ddim', 2 * n, 2 * n, stages.stage_dir(workdir, 'stage2', 2 * n))
  student_dir = stages.stage_dir(workdir, 'stage2', n)
  return Comparison(f'stage2_{2 * n}to{n}', f'stage 2: {2 * n} -> {n}', stages.stage2_rounds(config).index(n) + 1,
                    teacher=teacher, student=Method('student', 'ddim', n, n, student_dir),
                    stochastic=Method('student', 'stochastic', 2 * n, 2 * n, student_dir) if config.stage2.fine_grid
                    else None)  # the stochastic sampler needs a student trained on the 1/(2N) grid


def sample_set(loaded, method: Method, *, w: float, num_samples: int, batch_size: int, seed: int,
               clip_x: bool = False) -> np.ndarray:
  """num_samples class-balanced samples [N, ...] of a method; the noise and labels depend only on the seed.

  Images are clipped to [-1, 1], as they are shown and as --mode=fid scores them.
  """
  batches = []
  for b in range(num_samples // batch_size):
    z_init, label = fid.balanced_batch(loaded.record, batch_index=b, batch_size=batch_size, seed=seed)
    batches.append(loaded.sample(sampler=method.sampler, num_steps=method.steps, guidance_w=w, z_init=z_init,
                                 label=label, seed=seed + b, clip_x=clip_x))  # [B, ...]
  samples = np.concatenate(batches).astype(np.float64)  # [N, ...]
  return np.clip(samples, -1.0, 1.0) if samples.ndim == 4 else samples


def frechet_to_reference(samples: np.ndarray, *, extract, reference, batch_size: int,
                         quantize: bool = False) -> Optional[float]:
  """FID of samples [N, ...] against reference (mu, sigma); None when a sample is not finite.

  quantize (eval.quantize_uint8) rounds each batch to the 256 uint8 levels before the extractor, as --mode=fid.
  """
  if not np.all(np.isfinite(samples)):
    return None
  stats = None
  for start in range(0, len(samples), batch_size):
    batch = samples[start:start + batch_size]  # [B, ...]
    batch = quantize_uint8(batch) if quantize else batch
    features = np.asarray(extract(jnp.asarray(batch, jnp.float32))['pool'])  # [B, D]
    stats = stats or metrics.FeatureStats(features.shape[1])
    stats.update(features)
  return metrics.frechet_distance(stats.mean(), stats.cov(), *reference)


def paired_rms(teacher_samples: np.ndarray, student_samples: np.ndarray) -> Optional[float]:
  """Root-mean-square difference of samples drawn from the same noise; None when not finite."""
  rms = float(np.sqrt(np.mean(np.square(teacher_samples - student_samples))))
  return rms if np.isfinite(rms) else None


def fid_ratio(teacher_fid: Optional[float], student_fid: Optional[float]) -> Optional[float]:
  """student FID / teacher FID; None when either is missing or the teacher's is 0."""
  if teacher_fid is None or student_fid is None or teacher_fid <= 0:
    return None
  return student_fid / teacher_fid


def _read_rows(path: str) -> dict:
  """The rows of stage_quality.json by key; {} when there is none or it is unreadable (recomputed, one warning)."""
  def read(path):
    rows = files.read_json(path)['rows']
    if not isinstance(rows, dict) or not all(isinstance(row, dict) for row in rows.values()):
      raise TypeError('not a dict of rows')
    return rows
  return files.read_cache(path, read) or {}


def _scalars(comparison: Comparison, row: dict) -> dict:
  """TensorBoard tags of a row, e.g. 'quality/stage2_8to4/w1/ratio'; missing values are left out."""
  prefix = f'quality/{comparison.stage}/w{row["w"]:g}'
  names = ('ratio', 'teacher_fid', 'student_fid', 'paired_rms', 'stochastic_fid')
  return {f'{prefix}/{name}': row[name] for name in names if row[name] is not None}


class StageQuality:
  """The pipeline's per-stage comparisons: every sample set drawn once per run, rows persisted atomically."""

  def __init__(self, config, writer=None):
    self.config, self.writer = config, writer
    self.path = files.join(config.workdir, 'results', RESULTS_NAME)
    self.enabled = config.pipeline.quality_samples > 0
    if self.enabled and config.eval.extractor == 'inception' and not os.path.isfile(config.eval.inception_path):
      logging.warning('[quality] no table: no Inception weights at eval.inception_path=%r (see --mode=fid)',
                      config.eval.inception_path)
      self.enabled = False
    self.rows, self.seconds = [], 0.0  # this run's rows in stage order; seconds spent here in this run
    self.computed_rows = 0  # rows this run sampled and scored (0 on a rerun that found them all)
    self._done = _read_rows(self.path) if self.enabled else {}  # key -> row, over every run of this workdir
    self._samples, self._fids, self._loaded, self._ids = {}, {}, {}, {}
    self._scorer = None  # (extract, reference statistics), built when a row is first computed

  def after_stage1(self) -> None:
    self.compare(stage1_comparison(self.config))

  def after_round(self, student_steps: int) -> None:
    self.compare(round_comparison(self.config, student_steps))

  def compare(self, comparison: Comparison) -> None:
    """One row per guidance weight: read from stage_quality.json, or sampled, scored and saved."""
    if not self.enabled:
      return
    start = time.time()
    for w in self.config.pipeline.guidance_ws:
      row = self._row(comparison, float(w))
      self.rows.append(row)
      if self.writer is not None:
        self.writer.write_scalars(comparison.index, _scalars(comparison, row))
    self._keep_only(comparison.student)
    seconds = time.time() - start
    self.seconds += seconds
    logging.info('[quality] %s took %.1f s', comparison.title, seconds)

  def _row(self, comparison: Comparison, w: float) -> dict:
    key = self._key(comparison, w)
    if key in self._done:
      return self._done[key]
    start = time.time()
    teacher, student = self._samples_of(comparison.teacher, w), self._samples_of(comparison.student, w)
    teacher_fid, student_fid = self._fid_of(comparison.teacher, w), self._fid_of(comparison.student, w)
    stochastic = comparison.stochastic
    row = dict(stage=comparison.stage, title=comparison.title, w=w, teacher=comparison.teacher.label,
               teacher_nfe=comparison.teacher.nfe, teacher_fid=teacher_fid, student=comparison.student.label,
               student_fid=student_fid, ratio=fid_ratio(teacher_fid, student_fid),
               paired_rms=paired_rms(teacher, student), stochastic=stochastic.label if stochastic else None,
               stochastic_fid=self._fid_of(stochastic, w) if stochastic else None,
               num_samples=self.config.pipeline.quality_samples, extractor=self.config.eval.extractor,
               seconds=round(time.time() - start, 1))
    self._done[key] = row
    self.computed_rows += 1
    if jax.process_index() == 0:
      files.write_json(self.path, {'rows': self._done})  # after every row: a killed run keeps them
    logging.info('[quality] %s w=%g: teacher FID %s, student FID %s, ratio %s, paired RMS %s (%.1f s)',
                 comparison.title, w, *(_format(row[k]) for k in ('teacher_fid', 'student_fid', 'ratio',
                                                                   'paired_rms')), row['seconds'])
    return row

  def _key(self, comparison: Comparison, w: float) -> str:
    """Everything a row depends on: the checkpoints (by id), samplers, steps, w, noise and features."""
    c, ev = self.config, self.config.eval
    methods = (comparison.teacher, comparison.student, comparison.stochastic)
    named = [f'{m.label} @ {self._checkpoint_id(m.ckpt_dir)}' for m in methods if m is not None]
    self._features()  # the extractor's id names its weights: the classifier must exist first
    return ' | '.join([comparison.stage, f'w={w:g}', *named, f'n={c.pipeline.quality_samples}',
                       f'batch={ev.batch_size}', f'seed={c.pipeline.seed}', *(['clip_x'] if ev.clip_x else []),
                       *(['uint8'] if ev.quantize_uint8 else []),
                       f'{fid.extractor_id(c)} vs {ev.reference_split}[:{ev.reference_examples}]'])

  def _checkpoint_id(self, ckpt_dir: str) -> str:
    if ckpt_dir not in self._ids:
      self._ids[ckpt_dir] = checkpoint_id(ckpt_dir)
    return self._ids[ckpt_dir]

  def _samples_of(self, method: Method, w: float) -> np.ndarray:
    key = (method.ckpt_dir, method.sampler, method.steps, w)
    if key not in self._samples:
      self._samples[key] = sample_set(load_cached(self._loaded, method.ckpt_dir), method, w=w,
                                      num_samples=self.config.pipeline.quality_samples,
                                      batch_size=self.config.eval.batch_size, seed=self.config.pipeline.seed,
                                      clip_x=self.config.eval.clip_x)
    return self._samples[key]

  def _fid_of(self, method: Method, w: float) -> Optional[float]:
    key = (method.ckpt_dir, method.sampler, method.steps, w)
    if key not in self._fids:
      extract, reference = self._features()
      self._fids[key] = frechet_to_reference(self._samples_of(method, w), extract=extract, reference=reference,
                                             batch_size=self.config.eval.batch_size,
                                             quantize=self.config.eval.quantize_uint8)
    return self._fids[key]

  def _features(self):
    """(extract, reference statistics); make_extractor trains the digits classifier if it is not cached."""
    if self._scorer is None:
      config = self.config
      name, extract = fid.make_extractor(config)
      reference = fid.reference_stats(config, name, extract, files.join(config.workdir, 'reference_stats'))
      self._scorer = (extract, reference)
    return self._scorer

  def _keep_only(self, student: Method) -> None:
    """Frees what later stages cannot use: only the student's DDIM samples are the next round's teacher."""
    self._samples = {k: v for k, v in self._samples.items() if k[:2] == (student.ckpt_dir, 'ddim')}
    self._loaded = {k: v for k, v in self._loaded.items() if k == student.ckpt_dir}

  def summary_lines(self) -> list[str]:
    """The summary.md section (empty when the table is off)."""
    if not self.rows:
      return []
    return summary_lines(self.rows, num_samples=self.config.pipeline.quality_samples,
                         extractor=self.config.eval.extractor)


def _format(value: Optional[float], spec: str = '.4g') -> str:
  return '-' if value is None else format(value, spec)


def summary_lines(rows: list[dict], *, num_samples: int, extractor: str) -> list[str]:
  """'## Quality lost per stage': one table per w, one row per stage."""
  lines = ['## Quality lost per stage', '',
           f'Each stage\'s new model (student) against the model it was distilled from (teacher), both sampled from '
           f'the same noise and labels ({num_samples} class-balanced samples per cell; FID on {extractor} features '
           f'against the real data). The ratio is student FID / teacher FID: 1 means the stage lost nothing, 2 '
           'means the stage doubled the FID. Paired RMS is the root-mean-square difference between teacher and '
           'student samples from the same noise (the distillation error itself).']
  for w in sorted({row['w'] for row in rows}):
    lines += ['', f'### w = {w:g}', '',
              '| stage | teacher (method, steps, NFE) | teacher FID | student (steps) | student FID | ratio '
              '| paired RMS | stochastic 2N FID |', '|---|---|---|---|---|---|---|---|']
    for row in (r for r in rows if r['w'] == w):
      stochastic = f'{_format(row["stochastic_fid"])} ({row["stochastic"]})' if row['stochastic'] else '-'
      lines.append(f'| {row["title"]} | {row["teacher"]} (NFE {row["teacher_nfe"]}) | {_format(row["teacher_fid"])} '
                   f'| {row["student"]} | {_format(row["student_fid"])} | {_format(row["ratio"], ".3f")} '
                   f'| {_format(row["paired_rms"])} | {stochastic} |')
  return lines
