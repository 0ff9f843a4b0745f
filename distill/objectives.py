"""The training objectives: teacher (label dropout), stage 1 (match the guided teacher), stage 2
(halving), the encoder's halving, and the direct baseline (halving the teacher itself)."""

import jax
import jax.numpy as jnp

from diffusion import (diffusion_forward, ddim_step, predict_v, stage2_x_target, v_target_between,
                       weighted_x_loss, x_eps_from_output)


def _regress_x(
    model, params, *, x_target, z_t, logsnr_t, label, guidance_w, rng, parametrization, weighting):
  """Mean SNR-weighted error of the model's x_pred (train mode: dropout on) against a fixed
  target."""
  output = model.apply({'params': params}, z_t, logsnr_t, label, guidance_w, train=True,
                       rngs={'dropout': rng})
  x_pred = x_eps_from_output(z=z_t, output=output, logsnr=logsnr_t,
                             parametrization=parametrization)[0]
  loss = weighted_x_loss(x_pred=x_pred, x_target=jax.lax.stop_gradient(x_target), logsnr=logsnr_t,
                         weighting=weighting)
  return jnp.mean(loss), {}


def _noisy_batch(rng, x, logsnr_fn):
  """t ~ U[0, 1], eps ~ N(0, I) -> (z_t, logsnr_t)."""
  rng_t, rng_eps = jax.random.split(rng)
  logsnr_t = logsnr_fn(jax.random.uniform(rng_t, x.shape[:1]))  # [B]
  eps = jax.random.normal(rng_eps, x.shape, x.dtype)
  return diffusion_forward(x=x, eps=eps, logsnr=logsnr_t), logsnr_t


W_DISTRIBUTIONS = ('uniform', 'arcsine')


def sample_w(rng, batch_size, w_min, w_max, w_zero_fraction=0.0, w_distribution='uniform'):
  """Draws one guidance weight w in [w_min, w_max] for each row of a batch.

  Uniform, or 'arcsine' (Beta(1/2, 1/2): more mass near both ends of the range, where a student
  drifts furthest from its teacher); exactly 0 (the conditional model) for a w_zero_fraction of the
  rows.

  Args:
    rng: a JAX PRNG key.
    batch_size: B, the number of rows.
    w_min: the lower end of the range.
    w_max: the upper end of the range.
    w_zero_fraction: the probability that a row's w is 0.
    w_distribution: 'uniform' or 'arcsine' (W_DISTRIBUTIONS).

  Returns:
    w [B], float32.
  """
  def draw(key):
    if w_distribution == 'arcsine':
      return (w_min +
              (w_max - w_min) * jnp.sin(0.5 * jnp.pi * jax.random.uniform(key, (batch_size,)))**2)
    return jax.random.uniform(key, (batch_size,), minval=w_min, maxval=w_max)  # [B]

  if w_zero_fraction <= 0:
    return draw(rng)
  rng_w, rng_zero = jax.random.split(rng)
  return jnp.where(jax.random.bernoulli(rng_zero, w_zero_fraction, (batch_size,)), 0.0, draw(rng_w))


def teacher_loss_fn(model, *, logsnr_fn, parametrization, weighting, p_uncond, num_classes):
  """The teacher's denoising loss, with the label replaced by the null label w.p. p_uncond.

  Label dropout trains one network as both the conditional and the unconditional model that
  classifier-free guidance combines. Each row is noised at t ~ U[0, 1] and the network's x_pred is
  regressed on x with the SNR-weighted loss (diffusion.weighted_x_loss).

  Args:
    model: the flax network trained, applied in train mode (dropout on) without a guidance input.
    logsnr_fn: the schedule t -> logsnr (diffusion.get_logsnr_schedule).
    parametrization: what the network outputs, one of diffusion.PARAMETRIZATIONS.
    weighting: the loss weighting, one of diffusion.WEIGHTINGS.
    p_uncond: the probability that a row's label is replaced by the null label.
    num_classes: the number of classes; the null label is index num_classes.

  Returns:
    `loss_fn(params, batch, rng, frozen) -> (loss [], {})` for train.state.make_train_step, with
    batch {'x': [B, ...], 'label': [B]}; frozen is unused.
  """

  def loss_fn(params, batch, rng, frozen):
    del frozen
    x, label = batch['x'], batch['label']  # [B, ...], [B]
    rng_noise, rng_drop, rng_dropout = jax.random.split(rng, 3)
    z_t, logsnr_t = _noisy_batch(rng_noise, x, logsnr_fn)
    drop = jax.random.bernoulli(rng_drop, p_uncond, label.shape)
    label = jnp.where(drop, num_classes, label)
    return _regress_x(model, params, x_target=x, z_t=z_t, logsnr_t=logsnr_t, label=label,
                      guidance_w=None, rng=rng_dropout, parametrization=parametrization,
                      weighting=weighting)

  return loss_fn


def stage1_loss_fn(student, teacher_denoise_fn, *, logsnr_fn, parametrization, weighting, w_min,
                   w_max, w_zero_fraction: float = 0.0, w_distribution: str = 'uniform'):
  """Stage 1: the w-conditioned student matches the guided teacher's x_hat^w.

  Each row is noised at t ~ U[0, 1] and given a w in [w_min, w_max] (sample_w); the student, fed w,
  regresses the guided teacher's x_pred at that w (2 teacher calls, no gradient) with the
  SNR-weighted loss.

  Args:
    student: the flax network trained, applied in train mode (dropout on).
    teacher_denoise_fn: the teacher's `denoise_fn(params, z_t, logsnr_t, label, guidance_w) ->
      (x_pred, eps_pred)` (models.denoiser.make_denoise_fn), called without gradient; of kind
      'guided' (classifier-free guidance of the teacher).
    logsnr_fn: the schedule t -> logsnr (diffusion.get_logsnr_schedule).
    parametrization: what the network outputs, one of diffusion.PARAMETRIZATIONS.
    weighting: the loss weighting, one of diffusion.WEIGHTINGS.
    w_min: the lower end of the guidance weights drawn (sample_w).
    w_max: the upper end of the guidance weights drawn.
    w_zero_fraction: the probability that a row is trained at w = 0 (sample_w).
    w_distribution: how w is drawn, one of W_DISTRIBUTIONS (sample_w).

  Returns:
    `loss_fn(params, batch, rng, frozen) -> (loss [], {})` for train.state.make_train_step, with
    batch {'x': [B, ...], 'label': [B]} and frozen {'teacher_params': ...}.
  """

  def loss_fn(params, batch, rng, frozen):
    teacher_params = frozen['teacher_params']
    x, label = batch['x'], batch['label']
    rng_noise, rng_w, rng_dropout = jax.random.split(rng, 3)
    z_t, logsnr_t = _noisy_batch(rng_noise, x, logsnr_fn)
    guidance_w = sample_w(rng_w, x.shape[0], w_min, w_max, w_zero_fraction, w_distribution)
    x_teacher, _ = teacher_denoise_fn(teacher_params, z_t, logsnr_t, label, guidance_w)
    return _regress_x(student, params, x_target=x_teacher, z_t=z_t, logsnr_t=logsnr_t, label=label,
                      guidance_w=guidance_w, rng=rng_dropout, parametrization=parametrization,
                      weighting=weighting)

  return loss_fn


def stage2_times(rng, batch_size: int, *, student_steps, fine_grid: bool,
                 off_grid_fraction: float = 0.5):
  """Draws student times t and the teacher's two step ends t' = t - 1/(2N), t'' = t - 1/N.

  Without fine_grid, t ~ U{1/N, ..., 1} (the times the N-step DDIM sampler visits). With fine_grid,
  a fraction off_grid_fraction of the batch is drawn at the odd multiples of 1/(2N) instead, the
  times only the stochastic 2N-step sampler visits (docs/math.md#fine-grid-and-off-grid-times); 0.5
  is the uniform draw on the 1/(2N) grid. t' and t'' are clipped at 0: t = 1/(2N) clips t'' to 0.

  Args:
    rng: a JAX PRNG key.
    batch_size: B, the number of rows.
    student_steps: N, the student's step count; a Python int or a traced int32 scalar.
    fine_grid: whether to draw off-grid times as well.
    off_grid_fraction: with fine_grid, the probability that a row's t is off the 1/N grid.

  Returns:
    (t, t_mid, t_end): t, t' and t'', each [B] float32.
  """
  rng_i, rng_off = jax.random.split(rng)
  i = jax.random.randint(rng_i, (batch_size,), 1, student_steps + 1)  # [B] in 1..N
  off_grid = fine_grid & (jax.random.uniform(rng_off, (batch_size,)) < off_grid_fraction)  # [B]
  # traced N: no Python ints
  t = (2 * i - off_grid.astype(jnp.int32)).astype(jnp.float32) / (2 * student_steps)
  t_mid = jnp.maximum(t - 0.5 / student_steps, 0.0)
  t_end = jnp.maximum(t - 1.0 / student_steps, 0.0)
  return t, t_mid, t_end


def two_teacher_steps(teacher_denoise_fn, teacher_params, *, z_t, logsnr_t, logsnr_mid, logsnr_end,
                      label, guidance_w):
  """z_t -> z_t' -> z_t'': two DDIM steps of the teacher, each with its own x_pred at that time."""
  x_pred, eps_pred = teacher_denoise_fn(teacher_params, z_t, logsnr_t, label, guidance_w)
  z_mid = ddim_step(x_pred=x_pred, eps_pred=eps_pred, logsnr_s=logsnr_mid)
  x_pred, eps_pred = teacher_denoise_fn(teacher_params, z_mid, logsnr_mid, label, guidance_w)
  return ddim_step(x_pred=x_pred, eps_pred=eps_pred, logsnr_s=logsnr_end)


def _halving_regression(
    student, params, teacher_denoise_fn, teacher_params, *, x, label, guidance_w, times, rng_eps,
    rng_dropout, logsnr_fn, parametrization, weighting):
  """[H2]-[H4] at times (t, t', t''): z_t from x, two teacher DDIM steps to t'', the student
  regresses x_tilde."""
  t, t_mid, t_end = times
  logsnr_t, logsnr_mid, logsnr_end = logsnr_fn(t), logsnr_fn(t_mid), logsnr_fn(t_end)
  z_t = diffusion_forward(x=x, eps=jax.random.normal(rng_eps, x.shape, x.dtype), logsnr=logsnr_t)
  z_end = two_teacher_steps(teacher_denoise_fn, teacher_params, z_t=z_t, logsnr_t=logsnr_t,
                            logsnr_mid=logsnr_mid, logsnr_end=logsnr_end, label=label,
                            guidance_w=guidance_w)
  x_target = stage2_x_target(z_t=z_t, z_tpp=z_end, logsnr_t=logsnr_t, logsnr_tpp=logsnr_end)
  return _regress_x(student, params, x_target=x_target, z_t=z_t, logsnr_t=logsnr_t, label=label,
                    guidance_w=guidance_w, rng=rng_dropout, parametrization=parametrization,
                    weighting=weighting)


def stage2_loss_fn(student, teacher_denoise_fn, *, logsnr_fn, parametrization, weighting, w_min,
                   w_max, fine_grid: bool, off_grid_fraction: float = 0.5,
                   w_zero_fraction: float = 0.0, w_distribution: str = 'uniform'):
  """Stage 2 (halving): one student DDIM step must land where two teacher DDIM steps land.

  At times (t, t', t'') of stage2_times, z_t is made from x, the teacher takes two DDIM steps
  z_t -> z_t' -> z_t'', and the student regresses x_tilde (diffusion.stage2_x_target), the x_pred
  whose one DDIM step from t lands on z_t''. The step count is an input (frozen['student_steps']),
  not a constant, so every halving round runs the same compiled program.

  Args:
    student: the flax network trained, applied in train mode (dropout on).
    teacher_denoise_fn: the teacher's `denoise_fn(params, z_t, logsnr_t, label, guidance_w) ->
      (x_pred, eps_pred)` (models.denoiser.make_denoise_fn), called without gradient; of kind
      'w_input' (the stage-1 student or the previous round's).
    logsnr_fn: the schedule t -> logsnr (diffusion.get_logsnr_schedule).
    parametrization: what the network outputs, one of diffusion.PARAMETRIZATIONS.
    weighting: the loss weighting, one of diffusion.WEIGHTINGS.
    w_min: the lower end of the guidance weights drawn (sample_w).
    w_max: the upper end of the guidance weights drawn.
    fine_grid: draw off-grid times too (stage2_times).
    off_grid_fraction: with fine_grid, the fraction of rows off the 1/N grid (stage2_times).
    w_zero_fraction: the probability that a row is trained at w = 0 (sample_w).
    w_distribution: how w is drawn, one of W_DISTRIBUTIONS (sample_w).

  Returns:
    `loss_fn(params, batch, rng, frozen) -> (loss [], {})` for train.state.make_train_step, with
    batch {'x': [B, ...], 'label': [B]} and
    frozen {'teacher_params': ..., 'student_steps': int32 []}.
  """

  def loss_fn(params, batch, rng, frozen):
    teacher_params, student_steps = frozen['teacher_params'], frozen['student_steps']
    x, label = batch['x'], batch['label']
    rng_t, rng_eps, rng_w, rng_dropout = jax.random.split(rng, 4)
    times = stage2_times(rng_t, x.shape[0], student_steps=student_steps, fine_grid=fine_grid,
                         off_grid_fraction=off_grid_fraction)
    guidance_w = sample_w(rng_w, x.shape[0], w_min, w_max, w_zero_fraction, w_distribution)
    return _halving_regression(student, params, teacher_denoise_fn, teacher_params, x=x,
                               label=label, guidance_w=guidance_w, times=times, rng_eps=rng_eps,
                               rng_dropout=rng_dropout, logsnr_fn=logsnr_fn,
                               parametrization=parametrization, weighting=weighting)

  return loss_fn


def direct_loss_fn(
    student, teacher_denoise_fn, *, logsnr_fn, parametrization, weighting, p_uncond, num_classes):
  """The paper's direct baseline: halve the teacher itself, conditional and unconditional, no w
  input.

  As in teacher training, a label becomes the null label (num_classes) w.p. p_uncond; the target is
  two unguided DDIM steps of the teacher at that label (teacher_denoise_fn of kind 'conditional').
  Guidance is applied only at sampling time, from the student's conditional and unconditional
  predictions (2 calls a step). Times are drawn on the 1/N grid (stage2_times without fine_grid).

  Args:
    student: the flax network trained, applied in train mode (dropout on).
    teacher_denoise_fn: the teacher's `denoise_fn(params, z_t, logsnr_t, label, guidance_w) ->
      (x_pred, eps_pred)` (models.denoiser.make_denoise_fn), called without gradient; of kind
      'conditional'.
    logsnr_fn: the schedule t -> logsnr (diffusion.get_logsnr_schedule).
    parametrization: what the network outputs, one of diffusion.PARAMETRIZATIONS.
    weighting: the loss weighting, one of diffusion.WEIGHTINGS.
    p_uncond: the probability that a row's label is replaced by the null label.
    num_classes: the number of classes; the null label is index num_classes.

  Returns:
    `loss_fn(params, batch, rng, frozen) -> (loss [], {})` for train.state.make_train_step, with
    batch {'x': [B, ...], 'label': [B]} and
    frozen {'teacher_params': ..., 'student_steps': int32 []}.
  """

  def loss_fn(params, batch, rng, frozen):
    teacher_params, student_steps = frozen['teacher_params'], frozen['student_steps']
    x, label = batch['x'], batch['label']  # [B, ...], [B]
    rng_t, rng_eps, rng_drop, rng_dropout = jax.random.split(rng, 4)
    label = jnp.where(jax.random.bernoulli(rng_drop, p_uncond, label.shape), num_classes, label)
    times = stage2_times(rng_t, x.shape[0], student_steps=student_steps, fine_grid=False)
    return _halving_regression(student, params, teacher_denoise_fn, teacher_params, x=x,
                               label=label, guidance_w=None, times=times, rng_eps=rng_eps,
                               rng_dropout=rng_dropout, logsnr_fn=logsnr_fn,
                               parametrization=parametrization, weighting=weighting)

  return loss_fn


def encoder_loss_fn(student, teacher_denoise_fn, *, logsnr_fn, parametrization, w_min, w_max):
  """Encoder halving: one student DDIM step t -> t + 1/N lands where two teacher steps land.

  Times t = i/N, i in 0..N-1 (the first step starts at the data, sigma = 0), so the target is set in
  v-space, where it stays finite at t = 0 (diffusion.v_target_between); the loss is the v-MSE.

  Args:
    student: the flax network trained, applied in train mode (dropout on).
    teacher_denoise_fn: the teacher's `denoise_fn(params, z_t, logsnr_t, label, guidance_w) ->
      (x_pred, eps_pred)` (models.denoiser.make_denoise_fn), called without gradient; of kind
      'w_input'.
    logsnr_fn: the schedule t -> logsnr (diffusion.get_logsnr_schedule).
    parametrization: what the network outputs, one of diffusion.PARAMETRIZATIONS.
    w_min: the lower end of the guidance weights drawn (sample_w).
    w_max: the upper end of the guidance weights drawn.

  Returns:
    `loss_fn(params, batch, rng, frozen) -> (loss [], {})` for train.state.make_train_step, with
    batch {'x': [B, ...], 'label': [B]} and
    frozen {'teacher_params': ..., 'student_steps': int32 []}.
  """

  def loss_fn(params, batch, rng, frozen):
    teacher_params, student_steps = frozen['teacher_params'], frozen['student_steps']
    x, label = batch['x'], batch['label']
    rng_t, rng_eps, rng_w, rng_dropout = jax.random.split(rng, 4)
    i = jax.random.randint(rng_t, x.shape[:1], 0, student_steps)  # [B] in 0..N-1
    t = i.astype(jnp.float32) / student_steps
    logsnr_t, logsnr_mid, logsnr_end = (logsnr_fn(t), logsnr_fn(t + 0.5 / student_steps),
                                        logsnr_fn(t + 1.0 / student_steps))
    z_t = diffusion_forward(x=x, eps=jax.random.normal(rng_eps, x.shape, x.dtype), logsnr=logsnr_t)
    guidance_w = sample_w(rng_w, x.shape[0], w_min, w_max)
    z_end = two_teacher_steps(teacher_denoise_fn, teacher_params, z_t=z_t, logsnr_t=logsnr_t,
                              logsnr_mid=logsnr_mid, logsnr_end=logsnr_end, label=label,
                              guidance_w=guidance_w)
    v_target = v_target_between(z_t=z_t, z_s=z_end, logsnr_t=logsnr_t, logsnr_s=logsnr_end)
    output = student.apply({'params': params}, z_t, logsnr_t, label, guidance_w, train=True,
                           rngs={'dropout': rng_dropout})
    x_pred, eps_pred = x_eps_from_output(
        z=z_t, output=output, logsnr=logsnr_t, parametrization=parametrization)
    v_pred = predict_v(x=x_pred, eps=eps_pred, logsnr=logsnr_t)
    return jnp.mean(jnp.square(v_pred - jax.lax.stop_gradient(v_target))), {}

  return loss_fn
