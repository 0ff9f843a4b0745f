"""The three trainings of the method, chained through checkpoints: teacher -> stage 1 -> stage-2
rounds."""

import dataclasses
import time
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from flax.core.scope import LazyRng

import data
from diffusion import schedule_of
from distill import objectives
from models import count_params, diffusers_import, init_params
from models.denoiser import make_denoise_fn
from models.embeddings import GuidanceEmbedding
from train import checkpoint, files, records
from train.loop import ShardedStep, make_writer, per_host_batch_size, run_training
from train.state import TrainState

GUIDANCE_EMBED_KEY = 'guidance_embed'  # the only stage-1 parameters not copied from the teacher
# Progressive halving of the decoder (sampler, from stage 1), of the encoder (from stage 1), and the
# paper's direct baseline: the teacher itself halved, conditional and unconditional, sampled with
# guidance (2 calls a step).
HALVING_STAGES = ('stage2', 'encoder', 'direct')


def logsnr_schedule(config):
  return schedule_of(config.diffusion)


def stage_dir(workdir: str, stage: str, sampling_steps: Optional[int] = None) -> str:
  """teacher -> WORKDIR/teacher, stage1 -> WORKDIR/stage1, stage2 -> WORKDIR/stage2/steps_0064
  (encoder and direct alike)."""
  if stage in HALVING_STAGES:
    return files.join(workdir, stage, f'steps_{sampling_steps:04d}')
  return files.join(workdir, stage)


def fresh_params(model, record: dict, *, seed: int):
  """A record's model randomly initialised by one compiled program.

  Op by op, every initializer compiles on its own for each parameter shape; as one program they
  compile once (benchmarks/README.md).
  """
  x_shape, guidance_input = tuple(record['x_shape']), record['guidance_input']
  # A plain jax.jit (no compiler_options of its own): a budget estimate traces this under
  # jax.eval_shape, which refuses a jit with compiler options; the CPU's are set once per process
  # (train.mesh).
  init = jax.jit(
      lambda rng: init_params(model, rng=rng, x_shape=x_shape, guidance_input=guidance_input))
  return init(jax.random.key(seed))


def fresh_guidance_embed(abstract_params, *, seed: int):
  """The w-embedding of a student initialised with jax.random.key(seed), without initialising the
  rest.

  Same values as the 'guidance_embed' entry of init_params(student, rng=jax.random.key(seed), ...):
  flax derives a submodule's keys from the root key and its path, and a LazyRng carries that path.
  Stage 1 takes every other parameter from the teacher, so initialising them would only cost time
  (op by op, each initializer compiles).
  """
  abstract = abstract_params[GUIDANCE_EMBED_KEY]
  kernel = abstract['dense_0']['kernel']  # [freq_dim, emb_dim]
  gain_channels = tuple(abstract[f'gain_{i}']['kernel'].shape[1] for i in range(len(abstract))
                        if f'gain_{i}' in abstract)
  output = abstract.get('output', {}).get('kernel')  # [3, 3, features, C]
  use_context = 'dense_context' in abstract
  embed = GuidanceEmbedding(
      emb_dim=kernel.shape[1], freq_dim=kernel.shape[0], gain_channels=gain_channels,
      output_channels=0 if output is None else output.shape[-1], use_context=use_context)
  features = None if output is None else jnp.zeros((2, 4, 4, output.shape[2]), jnp.float32)
  context = jnp.zeros((2, kernel.shape[1]), jnp.float32) if use_context else None
  rng = LazyRng.create(jax.random.key(seed), GUIDANCE_EMBED_KEY)  # the key path of the submodule
  params = embed.init({'params': rng}, jnp.zeros((2,), jnp.float32), features, context,
                      method=GuidanceEmbedding.everything)['params']
  if jax.tree.map(jnp.shape, params) != jax.tree.map(
      jnp.shape, abstract_params[GUIDANCE_EMBED_KEY]):
    raise ValueError('the model\'s w-embedding is not models.embeddings.GuidanceEmbedding')
  return params


def _batches(config, section, seed_offset: int):
  def make_batches(start_step):
    return data.make_train_iterator(config.data,
                                    per_host_batch_size=per_host_batch_size(section.batch_size),
                                    seed=config.seed * 1000 + seed_offset, start_step=start_step)
  return make_batches


def _write_config(ckpt_dir: str, config) -> None:
  """Saves the config beside the checkpoints once; never overwrites an existing one."""
  files.makedirs(ckpt_dir)
  path = files.join(ckpt_dir, 'config.json')
  if not files.exists(path) and jax.process_index() == 0:
    files.write_text(path, config.to_json_best_effort(indent=2))


def _loss_kwargs(config):
  return dict(logsnr_fn=logsnr_schedule(config), parametrization=config.diffusion.parametrization,
              weighting=config.diffusion.loss_weighting)


def stage1_weighting(config) -> str:
  """Stage 1's loss weighting: stage1.loss_weighting, or the diffusion's when empty."""
  return config.stage1.get('loss_weighting') or config.diffusion.loss_weighting


@dataclasses.dataclass(frozen=True)
class TrainingJob:
  """One training run of the method: what train.loop.run_training needs, built from the config."""
  title: str
  record: dict  # records.make(): stage, sampling steps, model; it names the checkpoint directory
  section: ml_collections.ConfigDict  # the optimizer section (config.train, config.stage1, ...)
  loss_fn: Callable  # (params, batch, rng, frozen) -> (loss, aux)
  params: Any  # initial params of the trained model
  seed_offset: int  # seeds the data order and the train rng of this job
  # the teacher's params (+ student_steps): an argument of every step, never trained
  frozen: Any = None

  def ckpt_dir(self, workdir: str) -> str:
    return stage_dir(workdir, self.record['stage'], self.record['sampling_steps'])


def _set_aside_or_refuse_stale(config, job: TrainingJob, ckpt_dir: str) -> None:
  """A finished stage trained from other config values (`records.check_fresh`), or a student of
  another teacher (`records.check_same_teacher`), is refused; with retrain_stale (or, for a changed
  teacher, distill.redistill) it is moved to <ckpt_dir>.stale and trained again."""
  stage = job.record['stage']
  changed = records.stale_field(ckpt_dir, config, stage)
  other_teacher = records.is_stale(ckpt_dir, job.record)
  if (config.retrain_stale and
      (changed or other_teacher)) or (config.distill.redistill and other_teacher):
    aside = checkpoint.set_aside(ckpt_dir, f'{ckpt_dir}.stale')
    why = (f'trained with {changed[0]}={changed[1]!r}'
           if changed else 'distilled from an older teacher')
    logging.warning('[%s] %s: moved %s to %s, training it again', job.title, why, ckpt_dir, aside)
    _write_config(ckpt_dir, config)
    return
  # first: a changed teacher explains changed teacher fields
  records.check_same_teacher(ckpt_dir, job.record)
  records.check_fresh(ckpt_dir, config, stage, fix=RETRAIN_FIX)


RETRAIN_FIX = 'pass --config.retrain_stale=True to set it aside and train it again'


def check_fresh_stages(config, stages_and_steps) -> None:
  """Refuses, before anything runs, the first finished stage of config.workdir among (stage,
  sampling steps) that was trained from other values of a field it depends on
  (`records.check_fresh`); with retrain_stale, none."""
  if config.retrain_stale:
    return
  for stage, sampling_steps in stages_and_steps:
    records.check_fresh(stage_dir(config.workdir, stage, sampling_steps), config, stage,
                        fix=RETRAIN_FIX)


def _train(config, job: TrainingJob,
           sharded_step: Optional[ShardedStep] = None) -> tuple[str, dict]:
  """Runs (or resumes, or skips) a job; returns its checkpoint directory and its last logged
  scalars.

  sharded_step: the compiled step several jobs share (halving_step), else None (one of the job's
  own).
  """
  ckpt_dir = job.ckpt_dir(config.workdir)
  # first: every process then sees the directory before a manager opens it
  _write_config(ckpt_dir, config)
  _set_aside_or_refuse_stale(config, job, ckpt_dir)
  _, scalars = run_training(
      title=job.title, loss_fn=job.loss_fn, params=job.params, section=job.section,
      ckpt_dir=ckpt_dir, record=job.record, seed=config.seed + job.seed_offset,
      make_batches=_batches(config, job.section, job.seed_offset), frozen=job.frozen,
      logdir=log_dir(config, ckpt_dir), sharded_step=sharded_step, profile=config.profile)
  return ckpt_dir, scalars


def log_dir(config, ckpt_dir: str) -> str:
  """WORKDIR/logs/<the checkpoint directory relative to WORKDIR>: one TensorBoard run per stage or
  round."""
  return files.join(config.workdir, 'logs', files.relative(ckpt_dir, config.workdir))


def teacher_job(config) -> TrainingJob:
  """The class-conditional teacher with label dropout (one network, conditional and
  unconditional)."""
  record = records.make(config, stage='teacher')
  model, _ = records.build(record)
  params = fresh_params(model, record, seed=config.seed)
  loss_fn = objectives.teacher_loss_fn(model, p_uncond=config.train.p_uncond,
                                       num_classes=record['num_classes'], **_loss_kwargs(config))
  return TrainingJob('teacher', record, config.train, loss_fn, params, seed_offset=0)


def train_teacher(config) -> str:
  """Trains the teacher, or imports it when the config names a diffusers folder (model.name
  'diffusers_unet')."""
  if config.model.name == 'diffusers_unet':
    return import_teacher(config)
  return _train(config, teacher_job(config))[0]


def import_teacher(config) -> str:
  """An imported teacher's folder(s) as WORKDIR/teacher: its weights converted
  (models/diffusers_import.py) and saved as a complete checkpoint at step 0 (train_steps 0), which
  every later stage reads as a trained teacher.

  A directory already holding it is kept; one holding another teacher (other weights) is refused.
  """
  record = dict(records.make(config, stage='teacher'), train_steps=0)
  ckpt_dir = stage_dir(config.workdir, 'teacher')
  _, abstract = records.build(record)
  if checkpoint.latest_step(ckpt_dir) is not None:
    records.check_compatible(records.read(ckpt_dir), record, ckpt_dir)
    logging.info('[teacher] already imported from %s in %s', config.model.folder, ckpt_dir)
    return ckpt_dir
  params = diffusers_import.load_params(config.model, abstract)
  _write_config(ckpt_dir, config)
  state = TrainState(step=jnp.zeros((), jnp.int32), params={}, ema_params=params, opt_state={},
                     rng=jax.random.key_data(jax.random.key(config.seed)),
                     num_skipped=jnp.zeros((), jnp.int32),
                     consecutive_skipped=jnp.zeros((), jnp.int32))
  with checkpoint.open_manager(ckpt_dir) as manager:
    checkpoint.save(manager, state, record)
    manager.wait_until_finished()
  logging.info('[teacher] imported %s (%d parameters) into %s', config.model.folder,
               count_params(params), ckpt_dir)
  return ckpt_dir


def load_stage_params(config, stage: str, sampling_steps: Optional[int] = None):
  """(model, EMA params, record) of a finished stage of this run, checked against the config:
  refused when it is incomplete, or when it was trained from other values of the fields it depends
  on (`records.check_fresh`).

  The record gains 'provenance' {'dir', 'step', 'params_sha1'}: what a student distilled from it
  records as its teacher. An incomplete stage is refused unless
  config.distill.allow_incomplete_teacher.
  """
  record = records.make(config, stage=stage, sampling_steps=sampling_steps)
  model, abstract = records.build(record)
  ckpt_dir = stage_dir(config.workdir, stage, sampling_steps)
  step = records.check_complete(ckpt_dir, allow_incomplete=config.distill.allow_incomplete_teacher)
  records.check_fresh(ckpt_dir, config, stage, fix=f'rerun --mode={stage} with '
                      '--config.retrain_stale=True to train it again')
  params = checkpoint.load_params(ckpt_dir, abstract,
                                  check_record=records.checker(record, ckpt_dir))
  provenance = dict(dir=files.relative(ckpt_dir, config.workdir), step=step,
                    params_sha1=checkpoint.params_digest(params))
  return model, params, dict(record, provenance=provenance)


def _teacher_of(config, stage: str, sampling_steps: Optional[int], teacher_params):
  """(model, params, record) of a job's teacher: loaded from this run, or the given params (a dry
  run's)."""
  if teacher_params is None:
    return load_stage_params(config, stage, sampling_steps)
  record = records.make(config, stage=stage, sampling_steps=sampling_steps)
  return records.build(record)[0], teacher_params, dict(record, provenance=None)


def _student_record(config, teacher_record: dict, *, stage: str,
                    sampling_steps: Optional[int] = None) -> dict:
  """A student's record: records.make's plus 'teacher', the provenance of the checkpoint it is
  distilled from."""
  return dict(records.make(config, stage=stage, sampling_steps=sampling_steps),
              teacher=teacher_record['provenance'])


def stage1_init_params(teacher_params, student_params):
  """Student params: every shared entry copied from the teacher, only the w-embedding kept fresh.

  A two-network teacher's student is its conditional network: the unconditional one
  (diffusers_import.UNCOND_KEY) is left out."""
  missing = set(teacher_params) - set(student_params) - {diffusers_import.UNCOND_KEY}
  if missing:
    raise checkpoint.CheckpointError(f'teacher has parameters the student lacks: {sorted(missing)}')
  return {
      k: (student_params[k] if k == GUIDANCE_EMBED_KEY else teacher_params[k])
      for k in student_params
  }


def stage1_job(config, teacher_params=None) -> TrainingJob:
  """Stage 1: a w-conditioned student matching the guided teacher for w ~ U[w_min, w_max].

  teacher_params: None loads the trained teacher of config.workdir (a dry run passes fresh ones).
  """
  teacher, teacher_params, teacher_record = _teacher_of(config, 'teacher', None, teacher_params)
  record = _student_record(config, teacher_record, stage='stage1')
  student, abstract = records.build(record)
  fresh = dict(
      abstract, **{GUIDANCE_EMBED_KEY: fresh_guidance_embed(abstract, seed=config.seed + 1)})
  teacher_denoise = make_denoise_fn(teacher, parametrization=config.diffusion.parametrization,
                                    kind='guided', num_classes=teacher_record['num_classes'])
  loss_fn = objectives.stage1_loss_fn(
      student, teacher_denoise, w_min=config.distill.w_min, w_max=config.distill.w_max,
      w_zero_fraction=config.distill.w_zero_fraction, w_distribution=config.distill.w_distribution,
      **dict(_loss_kwargs(config), weighting=stage1_weighting(config)))
  return TrainingJob('stage1', record, config.stage1, loss_fn,
                     stage1_init_params(teacher_params, fresh), seed_offset=1,
                     frozen={'teacher_params': teacher_params})


def train_stage1(config) -> str:
  return _train(config, stage1_job(config))[0]


def halving_rounds(config, stage: str = 'stage2') -> list[int]:
  """The student step counts of every round: start_steps/2, ..., final_steps."""
  steps, rounds = config[stage].start_steps // 2, []
  while steps >= config[stage].final_steps:
    rounds.append(steps)
    steps //= 2
  return rounds


def stage2_rounds(config) -> list[int]:
  return halving_rounds(config, 'stage2')


def halving_teacher_stage(stage: str) -> str:
  """The stage whose model a halving stage's first round distils: the teacher itself for 'direct',
  else stage 1."""
  return 'teacher' if stage == 'direct' else 'stage1'


def _halving_loss_fn(config, stage: str, student, teacher, num_classes: int):
  """A halving round's loss: the student network (the stage's own: its record's dropout) trained on
  the teacher network's denoiser of the stage's kind."""
  teacher_denoise = make_denoise_fn(teacher, parametrization=config.diffusion.parametrization,
                                    kind='conditional' if stage == 'direct' else 'w_input',
                                    num_classes=num_classes)
  if stage == 'direct':
    return objectives.direct_loss_fn(student, teacher_denoise, p_uncond=config.train.p_uncond,
                                     num_classes=data.dataset_info(config.data).num_classes,
                                     **_loss_kwargs(config))
  kwargs = dict(w_min=config.distill.w_min, w_max=config.distill.w_max,
                logsnr_fn=logsnr_schedule(config), parametrization=config.diffusion.parametrization)
  if stage == 'stage2':
    return objectives.stage2_loss_fn(student, teacher_denoise, fine_grid=config.stage2.fine_grid,
                                     off_grid_fraction=config.stage2.off_grid_fraction,
                                     w_zero_fraction=config.distill.w_zero_fraction,
                                     w_distribution=config.distill.w_distribution,
                                     weighting=config.diffusion.loss_weighting, **kwargs)
  return objectives.encoder_loss_fn(student, teacher_denoise, **kwargs)


def halving_job(config, student_steps: int, stage: str = 'stage2',
                teacher_params=None) -> TrainingJob:
  """One halving round: the 2N-step teacher (stage 1 or the previous round) -> an N-step student.

  stage 'stage2' distills the sampler (t -> t - 1/N), 'encoder' the DDIM encoder (t -> t + 1/N),
  'direct' the teacher's own conditional / unconditional sampler (t -> t - 1/N, no w input;
  objectives.direct_loss_fn). teacher_params: None loads the teacher of config.workdir (a dry run
  passes fresh ones).
  """
  teacher_steps = 2 * student_steps
  if teacher_steps == config[stage].start_steps:
    teacher, teacher_params, teacher_record = _teacher_of(
        config, halving_teacher_stage(stage), None, teacher_params)
  else:
    teacher, teacher_params, teacher_record = _teacher_of(
        config, stage, teacher_steps, teacher_params)
  record = _student_record(config, teacher_record, stage=stage, sampling_steps=student_steps)
  student, _ = records.build(record)
  offset = {'stage2': 100, 'encoder': 10_000, 'direct': 20_000}[stage] + student_steps
  return TrainingJob(
      f'{stage} {teacher_steps}->{student_steps} steps', record, config[stage],
      _halving_loss_fn(config, stage, student, teacher, record['num_classes']), teacher_params,
      seed_offset=offset,
      frozen={'teacher_params': teacher_params, 'student_steps': np.int32(student_steps)})


def halving_step(config, stage: str = 'stage2') -> ShardedStep:
  """The train step of every round of a halving stage: pass it to each train_halving_round.

  Rounds differ only in the teacher's params and the student's step count, inputs of the step (its
  frozen argument), not constants of its program: one traced and compiled step serves them all.
  Every round trains the stage's own network; its loss holds the first round's teacher network, and
  a later round's teacher (the stage's network) differs from it at most in the dropout rate, which a
  teacher (applied with train=False) never uses. Built from the config alone: nothing is loaded,
  nothing traced before the first step.
  """
  teacher_record = records.make(config, stage=halving_teacher_stage(stage))
  teacher, _ = records.build(teacher_record)
  student, _ = records.build(records.make(config, stage=stage))
  loss_fn = _halving_loss_fn(config, stage, student, teacher, teacher_record['num_classes'])
  return ShardedStep(loss_fn, config[stage])


def train_halving_round(config, student_steps: int, stage: str = 'stage2',
                        sharded_step: Optional[ShardedStep] = None) -> str:
  """Trains one round; logs/<stage>/rounds gets its last logged loss, steps/s and wall time (step =
  round k).

  sharded_step: halving_step(config, stage), shared by the rounds of one process; None compiles this
  round's own.
  """
  start = time.time()
  ckpt_dir, scalars = _train(config, halving_job(config, student_steps, stage), sharded_step)
  if scalars:  # empty when the round was already trained
    writer = make_writer(files.join(config.workdir, 'logs', stage, 'rounds'))
    usage = {k: scalars[k] for k in ('examples_per_sec', 'model_flops_per_sec',
                                     'mfu') if k in scalars}
    writer.write_scalars(halving_rounds(config, stage).index(student_steps) + 1, {
        'final_loss': scalars['loss'], 'steps_per_sec': scalars['steps_per_sec'],
        'seconds': time.time() - start, 'student_steps': student_steps, **usage})
    writer.close()
  return ckpt_dir


def train_stage2_round(config, student_steps: int,
                       sharded_step: Optional[ShardedStep] = None) -> str:
  return train_halving_round(config, student_steps, 'stage2', sharded_step)


def train_halving(config, stage: str = 'stage2') -> list[str]:
  """Every halving round in order; finished rounds are skipped, a killed round resumes."""
  rounds = halving_rounds(config, stage)
  step, dirs = halving_step(config, stage), []
  for i, student_steps in enumerate(rounds):
    logging.info('[%s] round %d/%d: %d -> %d steps', stage, i + 1, len(rounds), 2 * student_steps,
                 student_steps)
    dirs.append(train_halving_round(config, student_steps, stage, step))
  return dirs


def train_stage2(config) -> list[str]:
  return train_halving(config, 'stage2')


def train_encoder(config) -> list[str]:
  return train_halving(config, 'encoder')


def train_direct(config) -> list[str]:
  """The direct baseline: the teacher progressively halved as it was trained (no stage 1, no w
  input)."""
  return train_halving(config, 'direct')
