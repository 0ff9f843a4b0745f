"""Fidelity per stage: every model the pipeline trains, scored against the guided teacher on the
same noise.

After stage 1 and after every stage-2 round, the new model (the student) draws
config.pipeline.quality_samples class-balanced samples per guidance weight in pipeline.quality_ws,
from the same noise and labels as
  * the reference: the guided teacher's CFG DDIM at pipeline.quality_steps (the model every student
    imitates);
  * the floor: the same teacher's CFG DDIM at pipeline.floor_steps (the teacher itself at a lower
    cost);
  * the model it was distilled from (its own teacher: stage 1 or the previous round).
Its row (eval/fidelity.py): fidelity (Frechet distance to the reference's features, 0 = the
teacher), the verdict against the floor, the distance and paired RMS to its own teacher, precision
and recall against the real data, class accuracy and the FID. Rows are kept in
WORKDIR/results/stage_quality.json: a rerun of a finished pipeline recomputes nothing, a killed one
resumes.
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
from eval import fidelity
from eval.images import quantize_uint8
from modes import fid
from modes.methods import Method
from modes.quality_report import plot_fidelity_vs_w, summary_lines
from modes.sampling import load_cached
from train import files
from train.records import checkpoint_id

RESULTS_NAME = 'stage_quality.json'
TEACHER_STAGE = 'teacher'  # the rows of the teacher's own reference and floor samplers
SCORES = ('fidelity', 'precision', 'recall', 'accuracy', 'fid')


@dataclasses.dataclass(frozen=True)
class Comparison:
  """A stage's new model (student) against the model it was distilled from (its own teacher)."""
  stage: str  # id in TensorBoard tags: 'stage1', 'stage2_8to4'
  title: str  # the summary's stage column: 'stage 1', 'stage 2: 8 -> 4'
  index: int  # TensorBoard step: 0 for stage 1, k for the k-th stage-2 round
  teacher: Method
  student: Method
  # the N-step student's stochastic sampler at 2N steps (stage-2 rounds)
  stochastic: Optional[Method] = None


def reference_method(config) -> Method:
  """The guided teacher's CFG DDIM at pipeline.quality_steps: what every fidelity is measured
  against."""
  steps = config.pipeline.quality_steps
  return Method('teacher CFG', 'ddim', steps, 2 * steps,
                stages.stage_dir(config.workdir, 'teacher'))


def floor_method(config) -> Method:
  """The guided teacher's CFG DDIM at pipeline.floor_steps: the verdict's bar."""
  steps = config.pipeline.floor_steps
  return Method('teacher CFG', 'ddim', steps, 2 * steps,
                stages.stage_dir(config.workdir, 'teacher'))


def stage1_comparison(config) -> Comparison:
  """The stage-1 student's DDIM against the guided teacher's CFG DDIM, both at
  pipeline.quality_steps."""
  steps, workdir = config.pipeline.quality_steps, config.workdir
  return Comparison('stage1', 'stage 1', 0, teacher=reference_method(config), student=Method(
      'stage 1', 'ddim', steps, steps, stages.stage_dir(workdir, 'stage1')))


def round_comparison(config, student_steps: int) -> Comparison:
  """Round 2N -> N: its teacher (stage 1 or the 2N-step student) at DDIM 2N against the N-step
  student."""
  n, workdir = student_steps, config.workdir
  if 2 * n == config.stage2.start_steps:
    teacher = Method('stage 1', 'ddim', 2 * n, 2 * n, stages.stage_dir(workdir, 'stage1'))
  else:
    teacher = Method('student', 'ddim', 2 * n, 2 * n, stages.stage_dir(workdir, 'stage2', 2 * n))
  student_dir = stages.stage_dir(workdir, 'stage2', n)
  return Comparison(f'stage2_{2 * n}to{n}', f'stage 2: {2 * n} -> {n}',
                    stages.stage2_rounds(config).index(n) + 1, teacher=teacher,
                    student=Method('student', 'ddim', n, n, student_dir),
                    stochastic=Method('student', 'stochastic', 2 * n, 2 * n, student_dir)
                    if config.stage2.fine_grid and config.pipeline.quality_stochastic else
                    None)  # the stochastic sampler needs a student trained on the 1/(2N) grid


def sample_set(loaded, method: Method, *, w: float, num_samples: int, batch_size: int, seed: int,
               clip_x: bool = False) -> np.ndarray:
  """num_samples class-balanced samples [N, ...] of a method; the noise and labels depend only on
  the seed.

  Images are clipped to [-1, 1], as they are shown and as --mode=fid scores them.
  """
  batches = []
  for b in range(num_samples // batch_size):
    z_init, label = fid.balanced_batch(
        loaded.record, batch_index=b, batch_size=batch_size, seed=seed)
    batches.append(
        loaded.sample(sampler=method.sampler, num_steps=method.steps, guidance_w=w, z_init=z_init,
                      label=label, seed=seed + b, clip_x=clip_x))  # [B, ...]
  samples = np.concatenate(batches).astype(np.float64)  # [N, ...]
  return np.clip(samples, -1.0, 1.0) if samples.ndim == 4 else samples


def extract_features(samples: np.ndarray, *, extract, batch_size: int, num_classes: int,
                     logits_are_classes: bool,
                     quantize: bool = False) -> Optional[fidelity.SampleFeatures]:
  """The extractor's view of a class-balanced sample set [N, ...] (labels i % num_classes); None if
  not finite.

  quantize (eval.quantize_uint8) rounds each batch to the 256 uint8 levels before the extractor, as
  --mode=fid.
  """
  if not np.all(np.isfinite(samples)):
    return None
  pool, logits = [], []
  for start in range(0, len(samples), batch_size):
    batch = samples[start:start + batch_size]  # [B, ...]
    out = extract(jnp.asarray(quantize_uint8(batch) if quantize else batch, jnp.float32))
    pool.append(np.asarray(out['pool'], np.float64))
    logits.append(np.asarray(out['logits'], np.float64))
  labels = np.arange(len(samples)) % num_classes  # fid.balanced_batch's labels
  return fidelity.SampleFeatures(pool=np.concatenate(pool), labels=labels,
                                 logits=np.concatenate(logits) if logits_are_classes else None)


def paired_rms(teacher_samples: np.ndarray, student_samples: np.ndarray) -> Optional[float]:
  """Root-mean-square difference of samples drawn from the same noise; None when not finite."""
  rms = float(np.sqrt(np.mean(np.square(teacher_samples - student_samples))))
  return rms if np.isfinite(rms) else None


def _read_rows(path: str) -> dict:
  """The rows of stage_quality.json by key (a row, or the teacher's list of rows); {} when there is
  none or it is unreadable (recomputed, one warning)."""
  is_row = lambda row: isinstance(row, dict)
  def read(path):
    rows = files.read_json(path)['rows']
    if not isinstance(rows, dict) or not all(
        is_row(row) or isinstance(row, list) and all(map(is_row, row)) for row in rows.values()):
      raise TypeError('not a dict of rows')
    return rows
  return files.read_cache(path, read) or {}


def _scalars(stage: str, row: dict) -> dict:
  """TensorBoard tags of a row, e.g. 'quality/stage2_8to4/w1/fidelity'; missing values are left
  out."""
  prefix = f'quality/{stage}/w{row["w"]:g}'
  names = (*SCORES, 'floor', 'stage_fidelity', 'paired_rms', 'stochastic_fidelity')
  return {f'{prefix}/{name}': row[name] for name in names if row.get(name) is not None}


class StageQuality:
  """The pipeline's per-stage fidelity rows: every sample set drawn once per run, rows persisted
  atomically."""

  def __init__(self, config, writer=None):
    self.config, self.writer = config, writer
    self.path = files.join(config.workdir, 'results', RESULTS_NAME)
    self.enabled = config.pipeline.quality_samples > 0
    if (self.enabled and config.eval.extractor == 'inception' and
        not os.path.isfile(config.eval.inception_path)):
      logging.warning(
          '[quality] no table: no Inception weights at eval.inception_path=%r (see --mode=fid)',
          config.eval.inception_path)
      self.enabled = False
    self.rows = []  # this run's rows: the teacher's, then each stage's, in order
    self.seconds = 0.0  # seconds spent here in this run
    self.computed_rows = 0  # rows this run sampled and scored (0 on a rerun that found them all)
    # key -> row, over every run of this workdir
    self._done = _read_rows(self.path) if self.enabled else {}
    self._samples, self._features, self._loaded, self._ids = {}, {}, {}, {}
    self._scorer = None  # (extract, real pool, real statistics), built when a row is first computed

  def after_stage1(self) -> None:
    self.compare(stage1_comparison(self.config))

  def after_round(self, student_steps: int) -> None:
    self.compare(round_comparison(self.config, student_steps))

  def compare(self, comparison: Comparison) -> None:
    """One row per guidance weight (after the teacher's own rows): read from stage_quality.json, or
    scored."""
    if not self.enabled:
      return
    start = time.time()
    for w in self.config.pipeline.quality_ws:
      if comparison.stage == 'stage1':
        self._append(
            TEACHER_STAGE, 0, self._cached_row(TEACHER_STAGE, float(w), self._teacher_rows))
      row = self._cached_row(comparison.stage, float(w),
                             lambda w, c=comparison: [self._stage_row(c, w)])
      self._append(comparison.stage, comparison.index, row)
    self._keep_only(comparison.student)
    seconds = time.time() - start
    self.seconds += seconds
    logging.info('[quality] %s took %.1f s', comparison.title, seconds)

  def _append(self, stage: str, index: int, rows) -> None:
    rows = rows if isinstance(rows, list) else [rows]
    self.rows += rows
    if self.writer is not None:
      for row in rows:
        self.writer.write_scalars(index,
                                  _scalars(row['stage'] if stage == TEACHER_STAGE else stage, row))

  def _cached_row(self, stage: str, w: float, compute):
    """The stored rows of (stage, w) when their key matches, else compute(w) stored after the
    call."""
    key = self._key(stage, w)
    if key not in self._done:
      start = time.time()
      rows = compute(w)
      for row in rows:
        row.update(w=w, num_samples=self.config.pipeline.quality_samples,
                   extractor=self.config.eval.extractor, seconds=round(time.time() - start, 1))
        logging.info(
            '[quality] %s w=%g: fidelity %s (floor %s: %s), precision %s, recall %s, accuracy %s, '
            'FID %s', row['title'], w,
            *(_format(row.get(k))
              for k in ('fidelity', 'floor', 'verdict', 'precision', 'recall', 'accuracy', 'fid')))
      self._done[key] = rows if stage == TEACHER_STAGE else rows[0]
      self.computed_rows += len(rows)
      if jax.process_index() == 0:
        # after every row: a killed run keeps them
        files.write_json(self.path, {'rows': self._done})
    return self._done[key]

  def _teacher_rows(self, w: float) -> list[dict]:
    """The reference (fidelity 0 by definition) and the floor, the teacher's own samplers."""
    rows = []
    for role, method in (('reference', reference_method(self.config)),
                         ('floor', floor_method(self.config))):
      scores = self._score(method, w, is_reference=role == 'reference')
      rows.append(
          dict(stage=f'teacher_{role}', title=f'teacher ({role})', role=role, student=method.label,
               student_nfe=method.nfe, **scores, floor=None, verdict=None))
    return rows

  def _stage_row(self, comparison: Comparison, w: float) -> dict:
    student, own = comparison.student, comparison.teacher
    floor = self._score(floor_method(self.config), w)['fidelity']
    scores = self._score(student, w)
    own_features, student_features = self._features_of(own, w), self._features_of(student, w)
    stage_fidelity = (fidelity.frechet_between(student_features, own_features)
                      if own_features is not None and student_features is not None else None)
    stochastic = comparison.stochastic
    return dict(
        stage=comparison.stage, title=comparison.title, student=student.label,
        student_nfe=student.nfe, teacher=own.label, teacher_nfe=own.nfe, **scores, floor=floor,
        verdict=fidelity.verdict(scores['fidelity'], floor), stage_fidelity=stage_fidelity,
        paired_rms=paired_rms(self._samples_of(own, w), self._samples_of(student, w)),
        stochastic=stochastic.label if stochastic else None,
        stochastic_fidelity=self._score(stochastic, w)['fidelity'] if stochastic else None)

  def _score(self, method: Method, w: float, is_reference: bool = False) -> dict:
    """fidelity.score of a method's set against the reference; every score None when a sample is not
    finite."""
    features, reference = (
        self._features_of(method, w), self._features_of(reference_method(self.config), w))
    if features is None or reference is None:
      return dict.fromkeys(SCORES)
    _, real_pool, real_stats = self._scorer_parts()
    return fidelity.score(features, reference=None if is_reference else reference,
                          real_pool=real_pool, real_stats=real_stats)

  def _key(self, stage: str, w: float) -> str:
    """Everything a row depends on: the checkpoints (by id), samplers, steps, w, noise and
    features."""
    c, ev = self.config, self.config.eval
    methods = [reference_method(c), floor_method(c)]
    if stage == 'stage1':
      methods.append(stage1_comparison(c).student)
    elif stage != TEACHER_STAGE:
      comparison = round_comparison(c, int(stage.split('to')[1]))
      methods += [m for m in (comparison.teacher, comparison.student,
                              comparison.stochastic) if m is not None]
    named = [f'{m.label} @ {self._checkpoint_id(m.ckpt_dir)}' for m in methods]
    self._scorer_parts()  # the extractor's id names its weights: the classifier must exist first
    return ' | '.join([stage, f'w={w:g}', *named, f'n={c.pipeline.quality_samples}',
                       f'batch={ev.batch_size}', f'seed={c.pipeline.seed}',
                       *(['clip_x'] if ev.clip_x else []),
                       *(['uint8'] if ev.quantize_uint8 else []),
                       f'{fid.extractor_id(c)} vs {ev.reference_split}[:{ev.reference_examples}]'])

  def _checkpoint_id(self, ckpt_dir: str) -> str:
    if ckpt_dir not in self._ids:
      self._ids[ckpt_dir] = checkpoint_id(ckpt_dir)
    return self._ids[ckpt_dir]

  def _samples_of(self, method: Method, w: float) -> np.ndarray:
    key = (method.ckpt_dir, method.sampler, method.steps, w)
    if key not in self._samples:
      self._samples[key] = sample_set(
          load_cached(self._loaded, method.ckpt_dir), method, w=w,
          num_samples=self.config.pipeline.quality_samples, batch_size=self.config.eval.batch_size,
          seed=self.config.pipeline.seed, clip_x=self.config.eval.clip_x)
    return self._samples[key]

  def _features_of(self, method: Method, w: float) -> Optional[fidelity.SampleFeatures]:
    key = (method.ckpt_dir, method.sampler, method.steps, w)
    if key not in self._features:
      extract, _, _ = self._scorer_parts()
      record = load_cached(self._loaded, method.ckpt_dir).record
      self._features[key] = extract_features(
          self._samples_of(method, w), extract=extract, batch_size=self.config.eval.batch_size,
          num_classes=record['num_classes'],
          logits_are_classes=self.config.eval.extractor != 'inception',
          quantize=self.config.eval.quantize_uint8)
    return self._features[key]

  def _scorer_parts(self):
    """(extract, real features, real (mu, sigma)); make_extractor trains the digits classifier if
    missing."""
    if self._scorer is None:
      config = self.config
      name, extract = fid.make_extractor(config)
      cache_dir = files.join(config.workdir, 'reference_stats')
      self._scorer = (extract, fid.reference_features(config, name, extract, cache_dir),
                      fid.reference_stats(config, name, extract, cache_dir))
    return self._scorer

  def _keep_only(self, student: Method) -> None:
    """Frees what later stages cannot use: the teacher's reference and floor, the student's DDIM
    samples."""
    teacher_dir = stages.stage_dir(self.config.workdir, 'teacher')
    wanted = lambda k: k[0] == teacher_dir or k[:2] == (student.ckpt_dir, 'ddim')
    self._samples = {k: v for k, v in self._samples.items() if wanted(k)}
    self._features = {k: v for k, v in self._features.items() if wanted(k)}
    self._loaded = {k: v for k, v in self._loaded.items() if k in (student.ckpt_dir, teacher_dir)}

  def write_plot(self, results_dir: str) -> None:
    """results/fidelity_vs_w.png, also in TensorBoard as 'quality/fidelity_vs_w'."""
    if self.rows and jax.process_index() == 0:
      image = plot_fidelity_vs_w(self.rows, files.join(results_dir, 'fidelity_vs_w.png'))
      if image is not None and self.writer is not None:
        self.writer.write_images(0, {'quality/fidelity_vs_w': image[None]})

  def summary_lines(self) -> list[str]:
    """The summary.md section (empty when the table is off)."""
    if not self.rows:
      return []
    return summary_lines(self.rows, config=self.config)


def _format(value, spec: str = '.4g') -> str:
  if value is None:
    return '-'
  return value if isinstance(value, str) else format(value, spec)
