"""Distillation tests: stage-1 initialisation, the stage-2 target with a real model, toy-2D
quality."""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import tiny
from data.toy2d import TOY2D_COVS, TOY2D_MEANS
from diffusion import ddim_step, get_logsnr_schedule
from distill import objectives, stages
from train import records
from eval.toy_metrics import (gaussian_mixture_log_posterior, per_class_moment_errors,
                              sliced_wasserstein)
from models import build_model, init_params
from models.denoiser import make_denoise_fn
from modes.sampling import LoadedCheckpoint, allowed_steps

LOGSNR_FN = get_logsnr_schedule('cosine', logsnr_min=-20.0, logsnr_max=20.0)
MLP = ml_collections.ConfigDict(dict(name='mlp', hidden=32, num_layers=2, dropout=0.0))


def _model_and_params(guidance_input, seed):
  model = build_model(MLP, num_classes=4, guidance_input=guidance_input)
  return model, init_params(model, rng=jax.random.key(seed), x_shape=(2,),
                            guidance_input=guidance_input)


def test_stage1_student_starts_as_the_teachers_conditional_model():
  teacher, teacher_params = _model_and_params(False, 0)
  student, fresh = _model_and_params(True, 1)
  student_params = stages.stage1_init_params(teacher_params, fresh)
  z, logsnr = jax.random.normal(jax.random.key(2), (8, 2)), jnp.linspace(-5, 5, 8)
  label = jnp.arange(8, dtype=jnp.int32) % 4
  conditional = teacher.apply({'params': teacher_params}, z, logsnr, label, train=False)
  for w in (0.0, 1.0, 4.0):
    out = student.apply(
        {'params': student_params}, z, logsnr, label, jnp.full((8,), w), train=False)
    np.testing.assert_array_equal(out, conditional)


def test_fresh_guidance_embed_is_the_full_initialisations_w_embedding():
  record = dict(model=dict(MLP), num_classes=4, guidance_input=True, x_shape=[2])
  student, abstract = records.build(record)
  full = init_params(student, rng=jax.random.key(5), x_shape=(2,), guidance_input=True)
  embed = stages.fresh_guidance_embed(abstract, seed=5)
  jax.tree.map(np.testing.assert_array_equal, embed, full['guidance_embed'])
  assert (not np.any(np.asarray(embed['dense_1']['kernel'])) and
          not np.any(np.asarray(embed['dense_1']['bias'])))
  assert np.std(np.asarray(embed['dense_0']['kernel'])) > 0.01  # randomly initialised, not zeros


@pytest.mark.parametrize('guidance_context', [False, True])
def test_fresh_guidance_embed_with_gains_is_the_full_initialisations(guidance_context):
  record = dict(
      model=dict(name='unet', ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,),
                 dropout=0.0, num_groups=4, guidance_gains=True, guidance_context=guidance_context),
      num_classes=4, guidance_input=True, x_shape=[8, 8, 1])
  student, abstract = records.build(record)
  full = init_params(student, rng=jax.random.key(5), x_shape=(8, 8, 1), guidance_input=True)
  embed = stages.fresh_guidance_embed(abstract, seed=5)
  # dense_0, dense_1, a gain layer per residual block (and the context's layer)
  assert len(embed) == 2 + 8 + guidance_context
  jax.tree.map(np.testing.assert_array_equal, embed, full['guidance_embed'])


def test_fresh_params_are_the_op_by_op_init_as_one_program():
  record = dict(model=dict(MLP), num_classes=4, guidance_input=False, x_shape=[2])
  model, _ = records.build(record)
  eager = init_params(model, rng=jax.random.key(7), x_shape=(2,), guidance_input=False)
  # XLA fuses differently
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
               stages.fresh_params(model, record, seed=7), eager)


def test_every_round_of_the_direct_baseline_trains_its_own_network(monkeypatch):
  """The first round distils the teacher itself, yet its student is the direct record's network
  (with distill.dropout), as in every later round: not the teacher's network and dropout."""
  config = tiny.get_config()
  config.model.dropout, config.distill.dropout = 0.3, 0.0
  students = []
  monkeypatch.setattr(stages.objectives, 'direct_loss_fn',
                      lambda student, *args, **kwargs: students.append(student))
  for steps in stages.halving_rounds(config, 'direct'):  # 4 -> 2, then 2 -> 1
    stages.halving_job(config, steps, 'direct', teacher_params={})
  assert [student.dropout for student in students] == [0.0, 0.0]


def test_stage2_target_with_a_real_teacher_network():
  model, params = _model_and_params(True, 3)
  denoise_fn = make_denoise_fn(model, parametrization='v', kind='w_input', num_classes=4)
  t, t_mid, t_end = objectives.stage2_times(jax.random.key(4), 64, student_steps=4, fine_grid=True)
  np.testing.assert_allclose(t - t_mid, np.where(t >= 0.125, 0.125, t), atol=1e-6)
  assert set(np.round(np.asarray(t) * 8).astype(int)) <= set(range(1, 9))
  z_t = jax.random.normal(jax.random.key(5), (64, 2))
  label, w = jnp.arange(64, dtype=jnp.int32) % 4, jnp.full((64,), 2.0)
  logsnrs = [LOGSNR_FN(u) for u in (t, t_mid, t_end)]
  z_end = objectives.two_teacher_steps(
      denoise_fn, params, z_t=z_t, logsnr_t=logsnrs[0], logsnr_mid=logsnrs[1],
      logsnr_end=logsnrs[2], label=label, guidance_w=w)
  from diffusion import stage2_x_target, predict_eps_from_x  # pylint: disable=g-import-not-at-top
  x_tilde = stage2_x_target(z_t=z_t, z_tpp=z_end, logsnr_t=logsnrs[0], logsnr_tpp=logsnrs[2])
  eps = predict_eps_from_x(z=z_t, x=x_tilde, logsnr=logsnrs[0])
  np.testing.assert_allclose(
      ddim_step(x_pred=x_tilde, eps_pred=eps, logsnr_s=logsnrs[2]), z_end, atol=2e-4)


@pytest.mark.parametrize('fraction', [0.0, 0.25, 1.0])
def test_stage2_times_off_grid_fraction(fraction):
  """Off-grid times (odd multiples of 1/(2N)) make up off_grid_fraction of the batch; the rest lie
  on 1/N."""
  t, _, _ = objectives.stage2_times(jax.random.key(1), 4000, student_steps=4, fine_grid=True,
                                    off_grid_fraction=fraction)
  index = np.round(np.asarray(t) * 8).astype(int)  # [B] in 1..8
  np.testing.assert_allclose(np.asarray(t) * 8, index, atol=1e-5)
  assert index.min() >= 1 and index.max() <= 8
  assert abs(np.mean(index % 2 == 1) - fraction) < 0.03
  t_coarse, _, _ = objectives.stage2_times(
      jax.random.key(1), 4000, student_steps=4, fine_grid=False, off_grid_fraction=fraction)
  assert set(np.round(np.asarray(t_coarse) * 8).astype(int)) == {2, 4, 6, 8}


@pytest.mark.parametrize('fraction', [0.0, 0.2])
def test_guidance_w_draw_puts_w_zero_fraction_at_exactly_zero(fraction):
  guidance_w = np.asarray(objectives.sample_w(jax.random.key(3), 20000, 1.0, 4.0, fraction))
  at_zero = guidance_w == 0.0
  assert abs(at_zero.mean() - fraction) < 0.01
  rest = guidance_w[~at_zero]
  # U[1, 4] elsewhere
  assert rest.min() >= 1.0 and rest.max() <= 4.0 and abs(rest.mean() - 2.5) < 0.03
  if fraction == 0.0:  # the default draws exactly what earlier versions drew: old runs reproduce
    np.testing.assert_array_equal(
        guidance_w, jax.random.uniform(jax.random.key(3), (20000,), minval=1.0, maxval=4.0))


@functools.cache
def _loaded(ckpt_dir) -> LoadedCheckpoint:
  """One per checkpoint for the whole module: each sampler program compiles once, not per call."""
  return LoadedCheckpoint(ckpt_dir)


@functools.cache  # the 256-step references recur from test to test
def _guided_samples(ckpt_dir, *, sampler, steps, w, n_per_class=512, seed=7):
  loaded = _loaded(ckpt_dir)
  label = jnp.repeat(jnp.arange(4, dtype=jnp.int32), n_per_class)
  z_init = jax.random.normal(jax.random.key(seed), (label.shape[0], 2))
  return loaded.sample(sampler=sampler, num_steps=steps, guidance_w=w, z_init=z_init, label=label,
                       seed=seed), label


def test_toy_teacher_matches_the_data_and_guidance_tightens_classes(toy_run):
  teacher_dir = stages.stage_dir(toy_run.workdir, 'teacher')
  # seed 11: the 256-step reference at w = 0 the other toy tests measure against
  samples, label = _guided_samples(teacher_dir, sampler='ddim', steps=256, w=0.0, seed=11)
  mean_err, cov_err = per_class_moment_errors(samples, label, TOY2D_MEANS, TOY2D_COVS)
  assert mean_err < 0.1 and cov_err < 0.03, (mean_err, cov_err)
  guided, _ = _guided_samples(teacher_dir, sampler='ddim', steps=256, w=4.0, seed=11)
  # Guidance samples p(x|c) p(c|x)^w: away from the other classes, i.e. further along the class-mean
  # direction (the blobs sit around the origin), with a class posterior that does not drop.
  posterior_w0, posterior_w4 = (
      _mean_class_posterior(samples, label), _mean_class_posterior(guided, label))
  assert posterior_w4 >= posterior_w0, (posterior_w0, posterior_w4)
  assert _along_class_direction(guided, label) > _along_class_direction(samples, label) + 0.05


def _along_class_direction(x, label):
  directions = TOY2D_MEANS / np.linalg.norm(TOY2D_MEANS, axis=1, keepdims=True)
  return float(np.mean(np.sum(np.asarray(x) * directions[np.asarray(label)], axis=1)))


def _mean_class_posterior(x, label):
  """Mean of p(label | x) under the true toy mixture (equal class priors)."""
  posterior = np.exp(gaussian_mixture_log_posterior(x, TOY2D_MEANS, TOY2D_COVS))
  return float(np.mean(posterior[np.arange(len(label)), np.asarray(label)]))


def test_toy_student_at_4_steps_beats_teacher_ddim_at_4_steps(toy_run):
  teacher_dir = stages.stage_dir(toy_run.workdir, 'teacher')
  student_dir = stages.stage_dir(toy_run.workdir, 'stage2', 4)
  for w in (0.0, 2.0):
    reference, _ = _guided_samples(teacher_dir, sampler='ddim', steps=256, w=w, seed=11)
    teacher_4, _ = _guided_samples(teacher_dir, sampler='ddim', steps=4, w=w)
    student_4, _ = _guided_samples(student_dir, sampler='ddim', steps=4, w=w)
    d_teacher = sliced_wasserstein(teacher_4, reference)
    d_student = sliced_wasserstein(student_4, reference)
    assert d_student < 0.7 * d_teacher, (w, d_student, d_teacher)


def test_toy_direct_baseline_at_4_steps_beats_teacher_ddim_at_4_steps_and_samples_with_guidance(
    toy_run):
  """The direct baseline (the teacher itself halved 16 -> 8 -> 4) runs guided DDIM at its own step
  count, 2 calls a step; at w = 0 (its conditional model, which it was distilled as) its 4 steps
  beat the teacher's 4."""
  teacher_dir = stages.stage_dir(toy_run.workdir, 'teacher')
  direct_dir = stages.stage_dir(toy_run.workdir, 'direct', 4)
  loaded = _loaded(direct_dir)
  assert loaded.record['guidance_input'] is False and loaded.nfe_per_step == 2
  assert (allowed_steps(loaded.record, 'ddim') == [4] and
          allowed_steps(loaded.record, 'stochastic') == [])
  reference, _ = _guided_samples(teacher_dir, sampler='ddim', steps=256, w=0.0, seed=11)
  teacher_4, _ = _guided_samples(teacher_dir, sampler='ddim', steps=4, w=0.0)
  direct_4, _ = _guided_samples(direct_dir, sampler='ddim', steps=4, w=0.0)
  d_teacher, d_direct = (
      sliced_wasserstein(teacher_4, reference), sliced_wasserstein(direct_4, reference))
  assert d_direct < 0.7 * d_teacher, (d_direct, d_teacher)
  # guidance at sampling time: cond and uncond predictions combined, as for the teacher
  for w in (0.0, 2.0):
    guided, _ = _guided_samples(direct_dir, sampler='ddim', steps=4, w=w)
    assert np.all(np.isfinite(guided))
  assert not np.allclose(_guided_samples(direct_dir, sampler='ddim', steps=4, w=2.0)[0], direct_4)
