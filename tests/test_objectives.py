"""Property tests of the assembled training objectives, the embedding scales, the training schedules
and the toy metrics: the rows docs/math.md listed under "Untested equations" (G1, G2 batched, W2,
W5, H4, C3, R1, R2, M5). Each test fails if the coefficient or the wiring it names is changed.

The objectives are run through their real loss functions with stand-in networks (`_Spy`) or exact
denoisers (tests/exact_denoisers.py). Everything that calls a network runs as one jitted program per
test (values such as p_uncond, w_min / w_max or a student's offset are traced inputs, not
constants), so the file stays fast on a busy CPU.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from scipy.special import logsumexp
from scipy.stats import multivariate_normal

import exact_denoisers
from data.toy2d import TOY2D_COVS, TOY2D_MEANS
from diffusion import (PARAMETRIZATIONS, ddim_step, get_logsnr_schedule, guided_prediction,
                       predict_eps_from_x, predict_v, stage2_x_target, v_target_between,
                       x_eps_from_output)
from distill import objectives, stages
from eval.toy_metrics import (gaussian_mixture_log_posterior, per_class_moment_errors,
                              sliced_wasserstein)
from models import build_model, init_params
from models.denoiser import make_denoise_fn
from models.embeddings import logsnr_to_time
from train.state import (
    create_train_state, learning_rate_schedule, make_train_step, pack_state, unpack_state)

LOGSNR_FN = get_logsnr_schedule('cosine', logsnr_min=-20.0, logsnr_max=20.0)
NUM_CLASSES = 4
MLP = ml_collections.ConfigDict(dict(name='mlp', hidden=32, num_layers=2, dropout=0.0))


@functools.lru_cache(maxsize=None)
def _model_and_params(guidance_input, seed):
  model = build_model(MLP, num_classes=NUM_CLASSES, guidance_input=guidance_input)
  return model, init_params(model, rng=jax.random.key(seed), x_shape=(2,),
                            guidance_input=guidance_input)


def _batch(size, seed=0):
  x = np.random.default_rng(seed).standard_normal((size, 2)).astype(np.float32)
  return {'x': jnp.asarray(x), 'label': jnp.arange(size, dtype=jnp.int32) % NUM_CLASSES}


def _alpha_sigma(logsnr):
  """[S3] in float64 numpy: alpha = sqrt(sigmoid(lambda)), sigma = sqrt(sigmoid(-lambda))."""
  logsnr = np.asarray(logsnr, np.float64)
  return np.sqrt(1 / (1 + np.exp(-logsnr))), np.sqrt(1 / (1 + np.exp(logsnr)))


def _truncated_snr(logsnr):
  """[L2] in float64 numpy: max(exp(lambda), 1)."""
  return np.maximum(np.exp(np.asarray(logsnr, np.float64)), 1.0)


class _Spy:
  """A stand-in network with the `model.apply` signature the objectives use. It returns
  output_fn(params, z_t, logsnr_t, label, guidance_w) and appends each call's inputs to self.calls
  (and its train flag to self.train) while it is traced; _jit_loss hands the recorded arrays
  back."""

  def __init__(self, output_fn):
    self.output_fn, self.calls, self.train = output_fn, [], []

  def apply(self, variables, z_t, logsnr_t, label, guidance_w=None, *, train, rngs=None):
    del rngs
    self.train.append(train)
    self.calls.append(dict(z_t=z_t, logsnr_t=logsnr_t, label=label, guidance_w=guidance_w))
    return self.output_fn(variables['params'], z_t, logsnr_t, label, guidance_w)


def _spy_denoise_fn(denoise_fn, calls):
  """denoise_fn that appends (logsnr_t, label, guidance_w) of each (teacher) call to calls."""

  def spied(params, z_t, logsnr_t, label, guidance_w):
    calls.append(dict(logsnr_t=logsnr_t, label=label, guidance_w=guidance_w))
    return denoise_fn(params, z_t, logsnr_t, label, guidance_w)

  return spied


def _jit_loss(make_loss_fn, *records):
  """jit of (hyper, params, batch, rng, frozen) -> (loss, [list(r) for r in records]): the loss of
  make_loss_fn(hyper) and whatever the spies recorded while it was traced, as concrete arrays. hyper
  holds the objective's numeric settings as traced values, so one compiled program serves every
  setting."""

  def run(hyper, params, batch, rng, frozen):
    for record in records:
      record.clear()
    loss, _ = make_loss_fn(hyper)(params, batch, rng, frozen)
    return loss, [list(record) for record in records]

  return jax.jit(run)


# -----------------------------------------------------------------------------------------------
# [G1]

_G1_BATCH_SIZE = 4000


@functools.lru_cache(maxsize=None)
def _teacher_program():
  """The real teacher_loss_fn, p_uncond traced, with a spy network that predicts x (the batch's) +
  offset."""
  batch = _batch(_G1_BATCH_SIZE, seed=2)
  spy = _Spy(lambda params, z_t, logsnr_t, label, w: batch['x'] + params['offset'])
  make = lambda hyper: objectives.teacher_loss_fn(
      spy, logsnr_fn=LOGSNR_FN, parametrization='x', weighting='truncated_snr',
      p_uncond=hyper['p_uncond'], num_classes=NUM_CLASSES)
  program = _jit_loss(make, spy.calls)

  def run(p_uncond, offset=0.0):
    loss, [(call,)] = program(
        {'p_uncond': p_uncond}, {'offset': offset}, batch, jax.random.key(1), None)
    return float(loss), jax.tree.map(np.asarray, call)

  return run, batch, spy


@pytest.mark.parametrize('p_uncond', [0.0, 0.5, 1.0])
def test_teacher_label_dropout_replaces_a_fraction_p_uncond_of_labels_by_null(p_uncond):
  """[G1]: each label becomes the null label (num_classes) with probability p_uncond: none at 0, all
  at 1, a binomial fraction at 0.5; the other labels are passed unchanged, and the teacher gets no
  w."""
  run, batch, spy = _teacher_program()
  _, call = run(p_uncond)
  assert call['guidance_w'] is None and spy.train == [True]
  label, original = call['label'], np.asarray(batch['label'])
  dropped = label == NUM_CLASSES
  np.testing.assert_array_equal(label[~dropped], original[~dropped])
  # 4 binomial standard deviations
  tolerance = 4 * np.sqrt(p_uncond * (1 - p_uncond) / _G1_BATCH_SIZE)
  assert abs(dropped.mean() - p_uncond) <= tolerance, dropped.mean()
  if p_uncond == 0.5:
    # drawn per row, not per batch
    assert 0 < dropped[:1000].sum() < 1000 and 0 < dropped[-1000:].sum() < 1000


def test_teacher_loss_regresses_the_clean_data_with_the_snr_weight():
  """[G1] with [F1], [L1]: z_t = alpha_t x + sigma_t eps with t ~ U[0, 1], and the target is x
  itself with the weight omega(lambda_t): a network predicting x has loss 0, one predicting x +
  delta exactly mean(omega(lambda_t)) delta^2."""
  run, batch, _ = _teacher_program()
  delta = 0.1
  loss, call = run(0.1, 0.0)
  assert loss < 1e-12, loss
  loss, call = run(0.1, delta)
  logsnr_t = call['logsnr_t']
  np.testing.assert_allclose(loss, np.mean(_truncated_snr(logsnr_t)) * delta**2, rtol=1e-5)
  # [S4] inverts the schedule
  time = np.arctan(np.exp(-0.5 * logsnr_t.astype(np.float64))) / (0.5 * np.pi)
  assert abs(time.mean() - 0.5) < 0.02 and time.min() < 0.01 and time.max() > 0.99  # t ~ U[0, 1]
  alpha, sigma = _alpha_sigma(logsnr_t)
  eps = (call['z_t'] - alpha[:, None] * np.asarray(batch['x'])) / sigma[:, None]
  assert abs(eps.mean()) < 0.05 and abs(eps.std() - 1.0) < 0.05  # eps ~ N(0, I)


# -----------------------------------------------------------------------------------------------
# [G2]


def test_batched_guided_call_equals_guided_prediction_of_two_separate_calls():
  """[G2] batched: for each parametrisation, the one interleaved (c, null) call of
  make_denoise_fn('guided') equals guided_prediction of a conditional call and a null-label call,
  then converted to (x, eps). w varies across the batch, so a row mix-up shows; at w = 0 it is the
  'conditional' denoiser."""
  model, params = _model_and_params(False, 0)
  batch_size = 12
  z_t = jax.random.normal(jax.random.key(1), (batch_size, 2))
  logsnr_t = jnp.linspace(-8.0, 8.0, batch_size)
  label = jnp.arange(batch_size, dtype=jnp.int32) % NUM_CLASSES

  @jax.jit
  def run(params, w):
    cond = model.apply({'params': params}, z_t, logsnr_t, label, train=False)
    uncond = model.apply(
        {'params': params}, z_t, logsnr_t, jnp.full_like(label, NUM_CLASSES), train=False)
    out = {}
    for parametrization in PARAMETRIZATIONS:
      denoiser = lambda kind, p=parametrization: make_denoise_fn(model, parametrization=p,
                                                                 kind=kind, num_classes=NUM_CLASSES)
      guided_output = guided_prediction(cond=cond, uncond=uncond, guidance_w=w)
      out[parametrization] = dict(
          batched=denoiser('guided')(params, z_t, logsnr_t, label, w),
          separate=x_eps_from_output(z=z_t, output=guided_output, logsnr=logsnr_t,
                                     parametrization=parametrization),
          conditional=denoiser('conditional')(params, z_t, logsnr_t, label, w))
    return cond, uncond, out

  for w in (np.zeros(batch_size), np.full(batch_size, 0.5), np.full(batch_size, 3.0),
            np.linspace(0, 4, batch_size)):
    cond, uncond, out = jax.tree.map(np.asarray, run(params, jnp.asarray(w, jnp.float32)))
    assert np.max(np.abs(cond - uncond)) > 0.05  # the null label matters, so guidance is visible
    for parametrization, result in out.items():
      for batched, separate in zip(result['batched'], result['separate']):
        np.testing.assert_allclose(batched, separate, rtol=1e-4, atol=1e-4, err_msg=parametrization)
      if not w.any():
        for batched, conditional in zip(result['batched'], result['conditional']):
          np.testing.assert_allclose(batched, conditional, rtol=1e-4, atol=1e-4,
                                     err_msg=parametrization)
      else:  # guided and conditional differ by far more than the tolerance
        assert np.max(np.abs(result['batched'][1] - result['conditional'][1])) > 0.05


# -----------------------------------------------------------------------------------------------
# [W2]


def _sinusoid_reference(y, dim):
  """[W1] written out in float64: sin(y f_k), then cos(y f_k), f_k = exp(-ln(10000) k / (dim /
  2))."""
  half = dim // 2
  freqs = np.exp(-np.log(10000.0) * np.arange(half) / half)
  angles = np.asarray(y, np.float64)[:, None] * freqs[None, :]
  return np.concatenate([np.sin(angles), np.cos(angles)], axis=-1)


def test_embedding_sinusoids_use_1000_t_for_the_noise_level_and_250_w_for_the_guidance_weight():
  """[W2] scales: inside the w-conditioned network, the first Dense layer of the noise-level
  embedding gets sinusoid(1000 t(lambda)) with t(lambda) = atan(exp(-lambda / 2)) / (pi / 2) [S4],
  and the first Dense layer of the guidance embedding gets sinusoid(250 w). The lowest frequency is
  1, so its sin/cos pair pins the argument itself: (sin 500, cos 500) at lambda = 0 (t = 1/2) and
  (sin 250 w, cos 250 w)."""
  model, params = _model_and_params(True, 0)
  logsnr_t = jnp.array([-10.0, -2.0, 0.0, 1.5, 7.0])
  guidance_w = jnp.array([0.0, 0.4, 1.0, 2.3, 4.0])
  inputs = (jnp.zeros((5, 2)), logsnr_t, jnp.zeros(5, jnp.int32), guidance_w)

  @jax.jit
  def first_layer_inputs(params):
    seen = {}

    def interceptor(next_fun, args, kwargs, context):
      module = context.module
      if (context.method_name == '__call__' and module.name == 'dense_0' and
          module.parent is not None and module.parent.name in ('logsnr_embed', 'guidance_embed')):
        seen[module.parent.name] = args[0]
      return next_fun(*args, **kwargs)

    with nn.intercept_methods(interceptor):
      model.apply({'params': params}, *inputs, train=False)
    return seen

  seen = jax.tree.map(np.asarray, first_layer_inputs(params))
  assert set(seen) == {'logsnr_embed', 'guidance_embed'}
  dim, w = MLP.hidden, np.asarray(guidance_w, np.float64)
  time = np.arctan(np.exp(-0.5 * np.asarray(logsnr_t, np.float64))) / (0.5 * np.pi)
  np.testing.assert_allclose(
      seen['logsnr_embed'], _sinusoid_reference(1000.0 * time, dim), atol=5e-4)
  np.testing.assert_allclose(seen['guidance_embed'], _sinusoid_reference(250.0 * w, dim), atol=5e-4)
  np.testing.assert_allclose(seen['logsnr_embed'][2, [0, dim // 2]],
                             [np.sin(500.0), np.cos(500.0)], atol=1e-4)
  np.testing.assert_allclose(seen['guidance_embed'][:, 0], np.sin(250.0 * w), atol=2e-4)
  np.testing.assert_allclose(seen['guidance_embed'][:, dim // 2], np.cos(250.0 * w), atol=2e-4)


# -----------------------------------------------------------------------------------------------
# [W5]


def _stage1_program(student, teacher, *records):
  """The real stage1_loss_fn with the guided teacher; w_min and w_max traced."""
  teacher_denoise = make_denoise_fn(teacher, parametrization='v', kind='guided',
                                    num_classes=NUM_CLASSES)
  make = lambda hyper: objectives.stage1_loss_fn(student, teacher_denoise, logsnr_fn=LOGSNR_FN,
                                                 parametrization='v', weighting='truncated_snr',
                                                 w_min=hyper['w_min'], w_max=hyper['w_max'])
  program = _jit_loss(make, *records)
  batch = _batch(128, seed=5)

  def run(params, teacher_params, w_min, w_max):
    loss, calls = program({'w_min': w_min, 'w_max': w_max}, params, batch, jax.random.key(4),
                          {'teacher_params': teacher_params})
    return float(loss), jax.tree.map(np.asarray, calls)

  return run


def test_stage1_student_initialised_from_the_teacher_has_zero_loss_at_w_0_only():
  """[W5] with [W3]: the initial student (teacher's params, zero w-embedding) is the teacher's
  conditional model for every w, and the guided teacher at w = 0 is the conditional model, so the
  loss is 0 at w = 0; at w = 2 the target is the guided x_hat_2, which differs from the conditional
  prediction, so the loss is clearly positive. A target taken at a w other than the student's breaks
  the first claim, one ignoring w the second."""
  teacher, teacher_params = _model_and_params(False, 0)
  student, fresh = _model_and_params(True, 1)
  student_params = stages.stage1_init_params(teacher_params, fresh)
  run = _stage1_program(student, teacher)
  at_zero, _ = run(student_params, teacher_params, 0.0, 0.0)
  at_two, _ = run(student_params, teacher_params, 2.0, 2.0)
  assert at_zero < 1e-9, at_zero
  assert at_two > 1e-4, at_two


def test_stage1_target_is_the_guided_teacher_at_the_w_the_student_sees():
  """[W5]: a student whose output at (z_t, c, w) is exactly the guided teacher's output at the same
  (c, w) has zero loss for w ~ U[0, 4] (a different w per row); the same student fed w + 0.5, or the
  next class's label, does not: the target is the guided teacher at the student's own c and w."""
  teacher, teacher_params = _model_and_params(False, 0)

  def guided_output(params, z_t, logsnr_t, label, w):
    label = (label + params['label_shift']) % NUM_CLASSES
    cond = teacher.apply({'params': teacher_params}, z_t, logsnr_t, label, train=False)
    uncond = teacher.apply({'params': teacher_params}, z_t, logsnr_t,
                           jnp.full_like(label, NUM_CLASSES), train=False)
    return guided_prediction(cond=cond, uncond=uncond, guidance_w=w + params['w_shift'])

  student = _Spy(guided_output)
  run = _stage1_program(student, teacher, student.calls)
  shifts = lambda w_shift, label_shift: {
      'w_shift': jnp.float32(w_shift), 'label_shift': jnp.int32(label_shift)}
  exact, [[call]] = run(shifts(0.0, 0), teacher_params, 0.0, 4.0)
  assert call['guidance_w'].std() > 0.5 and student.train == [True]  # w ~ U[0, 4], one per row
  wrong_w, _ = run(shifts(0.5, 0), teacher_params, 0.0, 4.0)
  wrong_label, _ = run(shifts(0.0, 1), teacher_params, 0.0, 4.0)
  assert exact < 1e-6 * min(wrong_w, wrong_label), (exact, wrong_w, wrong_label)
  assert min(wrong_w, wrong_label) > 1e-5, (wrong_w, wrong_label)


# ------------------------------------------------------------------------------------------ [H4],
# [C3]


def _point_mass_output(parametrization):
  """The raw output of the exact point-mass denoiser x_hat = X0, plus params['offset'] in the output
  space."""

  def output_fn(params, z_t, logsnr_t, label, w):
    del label, w
    x0 = jnp.broadcast_to(exact_denoisers.X0, z_t.shape)
    if parametrization == 'x':
      return x0 + params['offset']
    eps = predict_eps_from_x(z=z_t, x=x0, logsnr=logsnr_t)
    return predict_v(x=x0, eps=eps, logsnr=logsnr_t) + params['offset']

  return output_fn


def _point_mass_program(loss_kind, parametrization, fine_grid=True, p_uncond=0.0):
  """The real stage2_loss_fn / encoder_loss_fn / direct_loss_fn: point-mass teacher (spied),
  point-mass student (spied) whose raw output is offset by params['offset']; student_steps is traced
  (in frozen), as in training."""
  x0 = exact_denoisers.X0
  batch = {'x': jnp.broadcast_to(x0, (256, x0.shape[1])),
           'label': jnp.arange(256, dtype=jnp.int32) % NUM_CLASSES}
  student, teacher_calls = _Spy(_point_mass_output(parametrization)), []
  teacher = _spy_denoise_fn(exact_denoisers.point_mass, teacher_calls)
  if loss_kind == 'stage2':
    loss_fn = objectives.stage2_loss_fn(student, teacher, logsnr_fn=LOGSNR_FN,
                                        parametrization=parametrization, weighting='truncated_snr',
                                        w_min=0.0, w_max=4.0, fine_grid=fine_grid)
  elif loss_kind == 'direct':
    loss_fn = objectives.direct_loss_fn(student, teacher, logsnr_fn=LOGSNR_FN,
                                        parametrization=parametrization, weighting='truncated_snr',
                                        p_uncond=p_uncond, num_classes=NUM_CLASSES)
  else:
    loss_fn = objectives.encoder_loss_fn(student, teacher, logsnr_fn=LOGSNR_FN,
                                         parametrization=parametrization, w_min=0.0, w_max=4.0)
  program = _jit_loss(lambda hyper: loss_fn, student.calls, teacher_calls)

  def run(student_steps, offset):
    frozen = {'teacher_params': None, 'student_steps': jnp.int32(student_steps)}
    loss, ([call], teacher_calls) = program(
        {}, {'offset': jnp.float32(offset)}, batch, jax.random.key(6), frozen)
    call, teacher_calls = jax.tree.map(np.asarray, (call, teacher_calls))
    # two teacher steps, both at the student's label and w, the first from t
    assert len(teacher_calls) == 2
    for teacher_call in teacher_calls:
      np.testing.assert_array_equal(teacher_call['label'], call['label'])
      np.testing.assert_array_equal(teacher_call['guidance_w'], call['guidance_w'])
    np.testing.assert_array_equal(teacher_calls[0]['logsnr_t'], call['logsnr_t'])
    return float(loss), call

  return run


@pytest.mark.parametrize('parametrization,fine_grid', [('x', False), ('x', True), ('v', True)])
def test_stage2_loss_is_zero_for_a_student_equal_to_a_point_mass_teacher(
    parametrization, fine_grid):
  """[H4]: for point-mass data the exact denoiser x_hat = X0 is constant along every path, so DDIM
  is exact and one student step of 1/N lands where two teacher steps of 1/(2N) land: x_tilde = X0
  [H3], and a student equal to the teacher has zero loss, for every N. A student whose raw output is
  off by delta has the x error e = delta ('x') or e = -sigma_t delta ('v', x = alpha z - sigma v),
  and its loss is exactly mean(omega(lambda_t) e^2): the target is X0 and the weight is taken at the
  student's own time t."""
  run = _point_mass_program('stage2', parametrization, fine_grid)
  delta = 0.05
  for student_steps in (1, 4):
    exact, _ = run(student_steps, 0.0)
    assert exact < 1e-8, (student_steps, exact)
    loss, call = run(student_steps, delta)
    logsnr_t = call['logsnr_t']
    x_error = delta if parametrization == 'x' else _alpha_sigma(logsnr_t)[1] * delta
    np.testing.assert_allclose(loss, np.mean(_truncated_snr(logsnr_t) * x_error**2), rtol=1e-3)


@pytest.mark.parametrize('p_uncond', [0.0, 0.5, 1.0])
def test_direct_loss_halves_the_teacher_at_the_label_or_the_null_label_on_the_n_step_grid(p_uncond):
  """[H4] for the direct baseline: the student is the teacher's own network (no w input), trained as
  the teacher was, so a label becomes the null label with probability p_uncond, and both teacher
  steps and the student see that label and no w; its times are those of the N-step sampler only. A
  student equal to the point-mass teacher has loss 0 for every N, one whose v is off by delta
  exactly mean(omega(lambda_t) (sigma_t delta)^2)."""
  run = _point_mass_program('direct', 'v', p_uncond=p_uncond)
  delta = 0.05
  for student_steps in (1, 4):
    exact, call = run(student_steps, 0.0)
    assert exact < 1e-8, (student_steps, exact)
    assert call['guidance_w'] is None
    dropped = np.asarray(call['label']) == NUM_CLASSES
    assert dropped.mean() == p_uncond if p_uncond in (0.0, 1.0) else 0.3 < dropped.mean() < 0.7
    # integers 1..N: the N-step grid
    steps_to_go = np.asarray(logsnr_to_time(call['logsnr_t'])) * student_steps
    np.testing.assert_allclose(steps_to_go, np.round(steps_to_go), atol=1e-3)
    assert set(np.round(steps_to_go).astype(int)) == set(range(1, student_steps + 1))
    loss, call = run(student_steps, delta)
    x_error = _alpha_sigma(call['logsnr_t'])[1] * delta
    np.testing.assert_allclose(
        loss, np.mean(_truncated_snr(call['logsnr_t']) * x_error**2), rtol=1e-3)


def test_encoder_loss_is_zero_for_a_student_equal_to_a_point_mass_teacher():
  """[C3]: for point-mass data DDIM encoding is exact too (x_hat = X0 and eps_hat do not change
  along the path), so two teacher steps t -> t + 1/(2N) -> t + 1/N land where one student step
  lands, v_tilde is the student's own v [C2] and the loss is 0, including the rows at t = 0 where
  sigma_t ~ exp(-10). An offset delta in the student's v costs exactly delta^2: the loss is the
  unweighted v-MSE."""
  run = _point_mass_program('encoder', 'v')
  delta = 0.1
  for student_steps in (1, 4):
    exact, call = run(student_steps, 0.0)
    assert np.max(call['logsnr_t']) == pytest.approx(20.0)  # t = 0 is in the batch
    assert exact < 1e-6, (student_steps, exact)
    loss, _ = run(student_steps, delta)
    np.testing.assert_allclose(loss, delta**2, rtol=1e-3)


def _two_step_output(loss_kind):
  """The raw output of a student that is exactly the two-teacher-step map of the Gaussian exact
  denoiser: it recovers its time t from logsnr_t (on the 1/(2N) grid for stage 2, the 1/N grid for
  the encoder), runs two DDIM steps of the teacher to t -/+ 1/(2N) and t -/+ 1/N
  (params['end_shift'] / N moves the second end) and returns the x target [H3] (stage 2) or the v
  target [C2] (encoder) of that landing point."""

  def output_fn(params, z_t, logsnr_t, label, w):
    n = params['student_steps'].astype(jnp.float32)
    grid = 2 * n if loss_kind == 'stage2' else n
    t = jnp.round(logsnr_to_time(logsnr_t) * grid) / grid
    sign = -1.0 if loss_kind == 'stage2' else 1.0
    t_mid = jnp.clip(t + sign * 0.5 / n, 0.0, 1.0)
    t_end = jnp.clip(t + sign * (1.0 + params['end_shift']) / n, 0.0, 1.0)
    z = z_t
    for u, s in ((logsnr_t, LOGSNR_FN(t_mid)), (LOGSNR_FN(t_mid), LOGSNR_FN(t_end))):
      x_pred, eps_pred = exact_denoisers.gaussian(None, z, u, label, w)
      z = ddim_step(x_pred=x_pred, eps_pred=eps_pred, logsnr_s=s)
    if loss_kind == 'stage2':
      return stage2_x_target(z_t=z_t, z_tpp=z, logsnr_t=logsnr_t, logsnr_tpp=LOGSNR_FN(t_end))
    return v_target_between(z_t=z_t, z_s=z, logsnr_t=logsnr_t, logsnr_s=LOGSNR_FN(t_end))

  return output_fn


@pytest.mark.parametrize('loss_kind', ['stage2', 'encoder'])
def test_halving_losses_step_the_teacher_from_t_to_the_next_student_time(loss_kind):
  """[H1], [H2], [H4] and [C1], [C3] wired together: with Gaussian data the exact denoiser changes
  along the path, so DDIM is not exact and the target depends on where the two teacher steps go. A
  student equal to the map 'two teacher steps t -> t -/+ 1/(2N) -> t -/+ 1/N, then the x target
  (stage 2, t - ...) or the v target (encoder, t + ...)' has zero loss for every N; the same student
  with its second step ending at t -/+ 1/(2N) instead (so one teacher step in all) does not. So the
  loss functions take their times as the equations give them and land the teacher where the student
  step lands."""
  parametrization = 'x' if loss_kind == 'stage2' else 'v'
  student = _Spy(_two_step_output(loss_kind))
  if loss_kind == 'stage2':
    loss_fn = objectives.stage2_loss_fn(student, exact_denoisers.gaussian, logsnr_fn=LOGSNR_FN,
                                        parametrization='x', weighting='truncated_snr', w_min=0.0,
                                        w_max=4.0, fine_grid=True)
  else:
    loss_fn = objectives.encoder_loss_fn(student, exact_denoisers.gaussian, logsnr_fn=LOGSNR_FN,
                                         parametrization='v', w_min=0.0, w_max=4.0)
  program = _jit_loss(lambda hyper: loss_fn)
  x = exact_denoisers.MU + exact_denoisers.STD * _batch(256, seed=9)['x']
  batch = {'x': x, 'label': jnp.arange(256, dtype=jnp.int32) % NUM_CLASSES}
  for student_steps in (1, 4):
    frozen = {'teacher_params': None, 'student_steps': jnp.int32(student_steps)}
    losses = [float(program({}, {'student_steps': jnp.int32(student_steps),
                                 'end_shift': jnp.float32(shift)},
                            batch, jax.random.key(10), frozen)[0]) for shift in (0.0, -0.5)]
    assert (losses[0] < 1e-6 * losses[1] and
            losses[1] > 1e-4), (parametrization, student_steps, losses)


# -----------------------------------------------------------------------------------------------
# [R1]


def _schedule_values(steps, **fields):
  section = ml_collections.ConfigDict(
      dict(lr=2.0, warmup_steps=10, lr_decay='constant', num_steps=50))
  section.update(fields)
  return np.asarray(learning_rate_schedule(section)(jnp.asarray(steps)))


def test_learning_rate_warms_up_linearly_then_stays_constant_or_decays_linearly_to_zero():
  """[R1]: lr * step / warmup_steps during the warm-up; then lr ('constant') or
  lr * (num_steps - step) / (num_steps - warmup_steps), 0 from num_steps on ('linear'); without
  warm-up (the distillation rounds) lr at step 0."""
  lr, warmup, num_steps = 2.0, 10, 50
  steps = np.arange(num_steps + 11)
  warm = lr * steps / warmup
  constant = np.where(steps < warmup, warm, lr)
  linear = np.where(steps < warmup, warm,
                    lr * np.clip((num_steps - steps) / (num_steps - warmup), 0.0, None))
  np.testing.assert_allclose(
      _schedule_values(steps, lr_decay='constant'), constant, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(
      _schedule_values(steps, lr_decay='linear'), linear, rtol=1e-6, atol=1e-6)
  no_warmup = lr * np.clip(1 - steps / num_steps, 0.0, None)
  np.testing.assert_allclose(_schedule_values(steps, lr_decay='linear', warmup_steps=0), no_warmup,
                             rtol=1e-6, atol=1e-6)


def test_learning_rate_schedule_rejects_an_unknown_decay():
  with pytest.raises(ValueError, match='cosine'):
    _schedule_values([0], lr_decay='cosine')


# -----------------------------------------------------------------------------------------------
# [R2]

_R2_LR = 0.1
_R2_TX = optax.sgd(_R2_LR)


@functools.lru_cache(maxsize=None)
def _train_step(ema_decay):
  """The real train_step with loss sum(p^2) and plain SGD."""
  loss_fn = lambda p, batch, rng, frozen: (sum(jnp.sum(leaf**2) for leaf in jax.tree.leaves(p)), {})
  return jax.jit(make_train_step(loss_fn, _R2_TX, ema_decay=ema_decay,
                                 lr_schedule=optax.constant_schedule(_R2_LR)))


def _one_step(ema_decay, step):
  """One train_step at `step`, from a state whose EMA differs from its params (so the old EMA, not
  the old params, must enter the update). Returns (old EMA, new params, new EMA) as numpy trees."""
  params = {'a': jnp.array([1.0, -2.0, 0.5]), 'b': {'c': jnp.array(3.0)}}
  ema_old = jax.tree.map(lambda p: p + 1.0, params)
  state = unpack_state(create_train_state(params, _R2_TX, seed=0)).replace(
      step=jnp.int32(step), ema_params=ema_old)
  new_state = unpack_state(_train_step(ema_decay)(pack_state(state), None, None)[0])
  assert int(new_state.step) == step + 1
  params_new = jax.tree.map(lambda p: np.asarray(p) * (1 - 2 * _R2_LR), params)  # SGD on sum(p^2)
  jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), new_state.params, params_new)
  return (
      jax.tree.map(np.asarray, ema_old), params_new, jax.tree.map(np.asarray, new_state.ema_params))


@pytest.mark.parametrize('ema_decay,step,decay', [
    (0.999, 0, 1 / 10),  # warm-up: (1 + 0) / (10 + 0)
    (0.999, 50, 51 / 60),  # warm-up: (1 + 50) / (10 + 50)
    (0.999, 100000, 0.999),  # capped at ema_decay
    (0.5, 50, 0.5),  # capped at ema_decay during the warm-up too
])
def test_ema_uses_the_warm_up_decay_min_of_ema_decay_and_1_plus_step_over_10_plus_step(
    ema_decay, step, decay):
  """[R2]: theta_ema <- d theta_ema + (1 - d) theta_new with d = min(ema_decay, (1 + step) / (10 +
  step))."""
  ema_old, params_new, ema_new = _one_step(ema_decay, step)
  expected = jax.tree.map(lambda e, p: decay * e + (1 - decay) * p, ema_old, params_new)
  jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), ema_new, expected)


def test_ema_decay_zero_makes_the_ema_the_params():
  """[R2] with ema_decay = 0 (the distillation rounds): no EMA, ema_params are the new params."""
  _, params_new, ema_new = _one_step(0.0, 5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), ema_new, params_new)


# -----------------------------------------------------------------------------------------------
# [M5]


def test_sliced_wasserstein_is_zero_for_identical_sets_symmetric_and_measures_a_shift():
  """[M5] sliced W1: 0 between a set and itself; symmetric; in 1-D (directions +-1) a shift s costs
  exactly |s| and scaling a set x by 2 costs exactly mean |x| (the quantile coupling pairs x_i with
  2 x_i); in 2-D a shift s costs the mean of |s . theta| over the unit directions, about 2|s|/pi, so
  it grows linearly with the shift. (Small sets: the metric sorts every projection, seconds for
  thousands of points.)"""
  rng = np.random.default_rng(0)
  a, b = rng.standard_normal((500, 2)), rng.standard_normal((400, 2)) * 0.5 + 0.3
  assert sliced_wasserstein(a, a) == pytest.approx(0.0, abs=1e-12)
  assert sliced_wasserstein(a, b) > 0.1
  assert sliced_wasserstein(a, b) == pytest.approx(sliced_wasserstein(b, a), rel=1e-9)
  line = rng.standard_normal((500, 1))
  for shift in (0.25, 1.0, 3.0):
    assert sliced_wasserstein(line, line + shift) == pytest.approx(shift, rel=1e-9)
  assert sliced_wasserstein(line, 2 * line) == pytest.approx(np.mean(np.abs(line)), rel=1e-9)
  shifts = (0.1, 0.5, 2.0)
  distances = [sliced_wasserstein(a, a + np.array([s, -s])) for s in shifts]
  for s, distance in zip(shifts, distances):
    assert distance == pytest.approx(2 * np.hypot(s, s) / np.pi, rel=0.08)
    assert distance / s == pytest.approx(distances[0] / shifts[0], rel=1e-6)


def _samples_with_exact_moments(means, covs, per_class, seed=0):
  """Per class, points whose sample mean and (n - 1)-normalised sample covariance are exactly
  means[c], covs[c]."""
  rng = np.random.default_rng(seed)
  samples, labels = [], []
  for c, (mean, cov) in enumerate(zip(means, covs)):
    noise = rng.standard_normal((per_class, len(mean)))
    noise -= noise.mean(axis=0)
    noise = noise @ np.linalg.inv(np.linalg.cholesky(np.cov(noise.T))).T  # sample covariance I
    samples.append(mean + noise @ np.linalg.cholesky(cov).T)
    labels.append(np.full(per_class, c))
  return np.concatenate(samples), np.concatenate(labels)


def test_per_class_moment_errors_are_zero_for_matching_moments_and_read_off_a_shift_and_a_scale():
  """[M5] moments: 0 for samples with exactly the class moments; shifting one class by s gives a
  mean error max|s| and no covariance error; scaling one class's spread by k gives the covariance
  error (k^2 - 1) max|cov entry| and no mean error."""
  means, covs = np.asarray(TOY2D_MEANS, np.float64), np.asarray(TOY2D_COVS, np.float64)
  samples, labels = _samples_with_exact_moments(means, covs, per_class=300)
  mean_err, cov_err = per_class_moment_errors(samples, labels, means, covs)
  assert mean_err < 1e-10 and cov_err < 1e-10
  shifted = samples + np.where(labels[:, None] == 2, np.array([0.3, -0.1]), 0.0)
  mean_err, cov_err = per_class_moment_errors(shifted, labels, means, covs)
  assert mean_err == pytest.approx(0.3, rel=1e-9) and cov_err < 1e-10
  k = 1.5
  scaled = np.where(labels[:, None] == 1, means[1] + k * (samples - means[1]), samples)
  mean_err, cov_err = per_class_moment_errors(scaled, labels, means, covs)
  assert mean_err < 1e-10
  assert cov_err == pytest.approx((k**2 - 1) * np.max(np.abs(covs[1])), rel=1e-9)


def test_gaussian_mixture_log_posterior_is_bayes_rule_with_equal_priors():
  """[M5] posterior: log p(c | x) = log N(x; mu_c, S_c) - logsumexp_c' log N(x; mu_c', S_c') (equal
  priors), so each row normalises, the own class has posterior ~1 at its mean, and a point midway
  between two classes with the same covariance has posterior 1/2 each."""
  means, covs = np.asarray(TOY2D_MEANS, np.float64), np.asarray(TOY2D_COVS, np.float64)
  x = np.random.default_rng(0).standard_normal((64, 2)) * 1.2
  log_post = gaussian_mixture_log_posterior(x, means, covs)
  log_lik = np.stack([multivariate_normal(m, c).logpdf(x) for m, c in zip(means, covs)], axis=1)
  np.testing.assert_allclose(
      log_post, log_lik - logsumexp(log_lik, axis=1, keepdims=True), atol=1e-9)
  np.testing.assert_allclose(logsumexp(log_post, axis=1), 0.0, atol=1e-12)
  np.testing.assert_allclose(
      np.diag(gaussian_mixture_log_posterior(means, means, covs)), 0.0, atol=1e-6)
  midway = gaussian_mixture_log_posterior(np.zeros((1, 2)), means[:2], np.stack([covs[0], covs[0]]))
  np.testing.assert_allclose(midway, np.log(0.5), atol=1e-12)
