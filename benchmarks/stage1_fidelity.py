"""Prints the fidelity of stage-1 students to their guided teacher across w: the stage-1 ablation
table.

Every workdir must hold a stage-1 checkpoint distilled from the same teacher (e.g. the teacher of
one run copied into each ablation's workdir, then `--mode=stage1` with the ablation's overrides).
The teacher's reference (CFG DDIM at pipeline.quality_steps) and floor (CFG DDIM at
pipeline.floor_steps) are sampled once, from the first workdir's teacher; each stage 1 is sampled
from the same noise and labels at pipeline.quality_steps and scored as the pipeline's fidelity table
scores it (modes/stage_quality.py, eval/fidelity.py).

  python benchmarks/stage1_fidelity.py --config=configs/digits_teacher.py --workdirs=runs/a,runs/b

--student_steps=4 adds a row for the 4-step stage-2 student (DDIM 4) of every workdir that has one.
--raw_teacher adds a last row, "teacher raw params": the first workdir's teacher sampled with its
raw params (its last iterate) instead of the EMA that the students distil and the reference is
sampled from: a copy of the teacher that its own training noise moved.

A second table, the guidance response of every stage 1 (eval.fidelity.guidance_response): on 512
training images noised at t = 0.3, 0.5 and 0.7 (where guidance shapes the sample), how much of the
teacher's guided move away from its conditional prediction the student makes at each w > 0 (1: all
of it; below 1 at large w: a flattened response to w), and at w = 0 the RMS of the student's
prediction against the conditional one. A third, the guidance error (eval.fidelity.guidance_error):
the student's error over the size of the teacher's guidance term, with --raw_teacher the teacher's
raw params as a row again. --predictions_only prints these two tables alone (no sampling).
"""

import os
import sys
import time

import jax
import jax.numpy as jnp

from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pylint: disable=g-import-not-at-top,wrong-import-position
import data
from diffusion import diffusion_forward
from distill import stages
from eval import fidelity
from modes import fid
from modes.methods import Method
from modes.sampling import LoadedCheckpoint, load_cached
from modes.stage_quality import extract_features, floor_method, reference_method, sample_set
from train import files
from train.mesh import configure_cpu_compiler

_CONFIG = config_flags.DEFINE_config_file(
    'config', 'configs/digits_teacher.py', 'the pipeline config')
_WORKDIRS = flags.DEFINE_list('workdirs', [],
                              'workdirs with a stage-1 checkpoint of the same teacher')
_STUDENT_STEPS = flags.DEFINE_integer('student_steps', 0,
                                      'also score the stage-2 student of this many steps')
_RAW_TEACHER = flags.DEFINE_bool('raw_teacher', False, 'add a row for the first workdir\'s teacher '
                                  'sampled with its raw params (its last iterate) to every table')
_PREDICTIONS_ONLY = flags.DEFINE_bool(
    'predictions_only', False, 'only the guidance response and error tables '
    '(no sampling)')


_LOADED = {}


def _features(config, ckpt_dir: str, method: Method, w: float, extract):
  loaded = load_cached(_LOADED, ckpt_dir)
  samples = sample_set(loaded, method, w=w, num_samples=config.pipeline.quality_samples,
                       batch_size=config.eval.batch_size, seed=config.pipeline.seed,
                       clip_x=config.eval.clip_x)
  return extract_features(samples, extract=extract, batch_size=config.eval.batch_size,
                          num_classes=loaded.record['num_classes'],
                          logits_are_classes=config.eval.extractor != 'inception',
                          quantize=config.eval.quantize_uint8)


def _teacher_sets(config, ws, extract, real_pool, real_stats) -> dict:
  """{w: the teacher's reference features}; prints the reference's and the floor's recall and class
  accuracy at the first w and the floor's fidelity at every w."""
  teacher_dir = stages.stage_dir(config.workdir, 'teacher')
  references, floors = {}, {}
  for w in ws:
    references[w] = _features(config, teacher_dir, reference_method(config), w, extract)
    floors[w] = _features(config, teacher_dir, floor_method(config), w, extract)
  for steps, features, reference in (
      (config.pipeline.quality_steps, references[ws[0]], None),
      (config.pipeline.floor_steps, floors[ws[0]], references[ws[0]])):
    scores = fidelity.score(features, reference=reference, real_pool=real_pool,
                            real_stats=real_stats)
    print(
        f'teacher CFG ddim {steps} at w = {ws[0]:g}: recall {scores["recall"]:.3f}, class accuracy '
        f'{scores["accuracy"]:.3f}')
  print(f'floor (teacher CFG ddim {config.pipeline.floor_steps}): ' +
        ' '.join(f'{fidelity.frechet_between(floors[w], references[w]):.4f}' for w in ws))
  return references


def _models(config, workdir: str) -> list[tuple[str, Method]]:
  """Stage 1 at pipeline.quality_steps and, with --student_steps=N, the N-step student where there
  is one."""
  steps, n = config.pipeline.quality_steps, _STUDENT_STEPS.value
  models = [('stage 1', Method('stage 1', 'ddim', steps, steps,
                               stages.stage_dir(workdir, 'stage1')))]
  student_dir = stages.stage_dir(workdir, 'stage2', n) if n else ''
  if student_dir and files.exists(student_dir):
    models.append((f'student {n}', Method('student', 'ddim', n, n, student_dir)))
  return models


RESPONSE_TIMES = (0.3, 0.5, 0.7)


# a _LOADED key suffix: the teacher's raw params (its last iterate, not the EMA students distil)
RAW = '#params'


def _raw_teacher(workdir: str) -> str:
  """The _LOADED key of workdir's teacher sampled with its raw params: how far a copy of the teacher
  a few hundred updates from its EMA is, the scale of what the teacher's own training leaves
  undetermined."""
  teacher_dir = stages.stage_dir(workdir, 'teacher')
  if teacher_dir + RAW not in _LOADED:
    _LOADED[teacher_dir + RAW] = LoadedCheckpoint(teacher_dir, which='params')
  return teacher_dir + RAW


def _prediction_rows(config, workdir: str, ws,
                     raw: bool = False) -> tuple[list[float], list[float]]:
  """(guidance response, guidance error) at each w of workdir's stage 1 (of its teacher's raw params
  if raw), on training images noised at RESPONSE_TIMES; at w = 0 the response row holds the RMS to
  the conditional prediction and the error row the RMS error over the RMS of the teacher's guidance
  term at w = 1."""
  teacher = load_cached(_LOADED, stages.stage_dir(workdir, 'teacher'))
  student = _LOADED[_raw_teacher(workdir)] if raw else load_cached(
      _LOADED, stages.stage_dir(workdir, 'stage1'))
  batch = next(
      data.make_train_iterator(config.data, per_host_batch_size=512, seed=123, start_step=0))
  x, label = jnp.asarray(batch['x']), jnp.asarray(batch['label'])  # [B, H, W, C], [B]
  predictions = {w: ([], [], []) for w in (*ws, 1.0)}  # w -> (student, teacher, conditional) per t
  for i, t in enumerate(RESPONSE_TIMES):
    logsnr = teacher.logsnr_fn(jnp.full(label.shape, t))  # [B]
    z_t = diffusion_forward(x=x, eps=jax.random.normal(jax.random.key(i), x.shape), logsnr=logsnr)
    conditional = teacher.denoise_fn(teacher.params, z_t, logsnr, label, jnp.zeros(label.shape))[0]
    for w, stores in predictions.items():
      w_b = jnp.full(label.shape, w)
      for store, model in zip(stores, (student, teacher)):
        store.append(model.denoise_fn(model.params, z_t, logsnr, label, w_b)[0])
      stores[2].append(conditional)
  joined = {w: [jnp.concatenate(p) for p in stores] for w, stores in predictions.items()}
  response, error = [], []
  for w in ws:
    x_student, x_teacher, x_cond = joined[w]
    if w == 0:
      response.append(float(jnp.sqrt(jnp.mean((x_student - x_cond) ** 2))))
      # the guidance term at w = 1
      guidance_1 = float(jnp.sqrt(jnp.mean((joined[1.0][1] - x_cond) ** 2)))
      error.append(float(jnp.sqrt(jnp.mean((x_student - x_teacher) ** 2))) / guidance_1)
    else:
      response.append(fidelity.guidance_response(
          x_student=x_student, x_teacher=x_teacher, x_conditional=x_cond))
      error.append(
          fidelity.guidance_error(x_student=x_student, x_teacher=x_teacher, x_conditional=x_cond))
  return response, error


def main(argv):
  del argv
  configure_cpu_compiler()  # as main.py: before a backend starts
  config = _CONFIG.value
  config.workdir = _WORKDIRS.value[0]
  ws = [float(w) for w in config.pipeline.quality_ws]
  if not _PREDICTIONS_ONLY.value:
    _fidelity_table(config, ws)
  _prediction_tables(config, ws)


def _fidelity_table(config, ws):
  name, extract = fid.make_extractor(config)
  cache_dir = files.join(config.workdir, 'reference_stats')
  real_pool = fid.reference_features(config, name, extract, cache_dir)
  real_stats = fid.reference_stats(config, name, extract, cache_dir)
  references = _teacher_sets(config, ws, extract, real_pool, real_stats)
  print('| workdir | model | ' + ' | '.join(f'w = {w:g}' for w in ws) +
        f' | max / w = 1 | recall w = {ws[0]:g} '
        f'| class acc. w = {ws[0]:g} | seconds |')
  rows = [
      (os.path.basename(w.rstrip('/')), *m) for w in _WORKDIRS.value for m in _models(config, w)
  ]
  if _RAW_TEACHER.value:
    steps = config.pipeline.quality_steps
    rows.append(('teacher raw params', f'CFG ddim {steps}',
                 Method('teacher', 'ddim', steps, 2 * steps, _raw_teacher(config.workdir))))
  for name, model, method in rows:
    start = time.time()
    scores = {w: fidelity.score(_features(config, method.ckpt_dir, method, w, extract),
                                reference=references[w], real_pool=real_pool,
                                real_stats=real_stats) for w in ws}
    values = [scores[w]['fidelity'] for w in ws]
    ratio = max(values) / scores[1.0]['fidelity'] if 1.0 in scores else float('nan')
    print(f'| {name} | {model} | ' + ' | '.join(f'{v:.4f}' for v in values) +
          f' | {ratio:.2f} | {scores[ws[0]]["recall"]:.3f} | {scores[ws[0]]["accuracy"]:.3f} '
          f'| {time.time() - start:.0f} |', flush=True)


def _prediction_tables(config, ws):
  rows = [(os.path.basename(w.rstrip('/')),
           _prediction_rows(config, w, ws)) for w in _WORKDIRS.value]
  if _RAW_TEACHER.value:
    rows.append(('teacher raw params', _prediction_rows(config, _WORKDIRS.value[0], ws, raw=True)))
  header = '| workdir | ' + ' | '.join(f'w = {w:g}' for w in ws) + ' |'
  print(
      f'\nguidance response at t = {RESPONSE_TIMES} (w = 0: RMS to the conditional '
      f'prediction)\n{header}')
  for name, (response, _) in rows:
    print(f'| {name} | ' + ' | '.join(f'{v:.3f}' for v in response) + ' |')
  print(
      f'\nguidance error at t = {RESPONSE_TIMES}: RMS error / RMS of the teacher\'s guidance '
      f'term (w = 0: over the term at w = 1)\n{header}')
  for name, (_, error) in rows:
    print(f'| {name} | ' + ' | '.join(f'{v:.3f}' for v in error) + ' |', flush=True)


if __name__ == '__main__':
  app.run(main)
