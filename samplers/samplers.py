"""Samplers as single jittable programs: DDIM, the paper's stochastic N-step sampler, DDPM
ancestral.

Every sampler takes `denoise_fn(params, z_t, logsnr_t, label, guidance_w) -> (x_pred, eps_pred)`
(see models/denoiser.py), runs its whole loop inside one `lax.fori_loop`, and returns x at t = 0.
Time grid: t_i = i / N for i = N .. 0; the last step returns the model's x_pred.
"""

import jax
import jax.numpy as jnp

from diffusion import ddim_step, ddpm_posterior, renoise


def _batch_logsnr(logsnr_fn, t, batch_size):
  return jnp.full((batch_size,), logsnr_fn(t), jnp.float32)  # [B]


def sample_ddim(denoise_fn, params, *, z_init, label, guidance_w, num_steps: int, logsnr_fn):
  """Deterministic N-step DDIM from z_1 = z_init to x.

  N network calls on the grid t_i = i / N; the last step returns the model's x_pred.

  Args:
    denoise_fn: `denoise_fn(params, z_t, logsnr_t, label, guidance_w) -> (x_pred, eps_pred)`
      (models.denoiser.make_denoise_fn).
    params: the parameters denoise_fn takes.
    z_init: the noise z_1 [B, ...] the sampler starts from, e.g. [B, H, W, C].
    label: the class labels [B], int32.
    guidance_w: the guidance weight w, [B] or a scalar (a denoiser without guidance ignores it).
    num_steps: N, the number of steps; a Python int or a traced int32 scalar.
    logsnr_fn: the schedule t -> logsnr (diffusion.get_logsnr_schedule).

  Returns:
    x [B, ...], the shape of z_init.
  """
  batch = z_init.shape[0]

  def body(i, z_t):
    t = (num_steps - i) / num_steps
    s = (num_steps - i - 1) / num_steps
    x_pred, eps_pred = denoise_fn(
        params, z_t, _batch_logsnr(logsnr_fn, t, batch), label, guidance_w)
    z_s = ddim_step(x_pred=x_pred, eps_pred=eps_pred, logsnr_s=_batch_logsnr(logsnr_fn, s, batch))
    return jnp.where(i == num_steps - 1, x_pred, z_s)

  return jax.lax.fori_loop(0, num_steps, body, z_init)


def stochastic_step(
    denoise_fn, params, *, z_t, t, num_steps: int, label, guidance_w, logsnr_fn, noise):
  """One step of the paper's stochastic sampler from t: DDIM to t - 2/N, then re-noise to t - 1/N.

  The DDIM target time is clipped at 0 (the step from t = 2/N lands on x_pred); callers return
  x_pred at the last step t = 1/N instead of re-noising.

  Args:
    denoise_fn: `denoise_fn(params, z_t, logsnr_t, label, guidance_w) -> (x_pred, eps_pred)`
      (models.denoiser.make_denoise_fn).
    params: the parameters denoise_fn takes.
    z_t: the latent [B, ...] at time t, e.g. [B, H, W, C].
    t: the current time, a scalar on the 1/N grid.
    num_steps: N, the number of steps of the sampler.
    label: the class labels [B], int32.
    guidance_w: the guidance weight w, [B] or a scalar (a denoiser without guidance ignores it).
    logsnr_fn: the schedule t -> logsnr (diffusion.get_logsnr_schedule).
    noise: the re-noising noise, the shape of z_t (standard Gaussian; zeros give the mean).

  Returns:
    (z_next, x_pred): the latent at t - 1/N and the model's x_pred at t, each the shape of z_t.
  """
  batch = z_t.shape[0]
  t_two_back = jnp.maximum(t - 2.0 / num_steps, 0.0)
  t_one_back = t - 1.0 / num_steps
  x_pred, eps_pred = denoise_fn(params, z_t, _batch_logsnr(logsnr_fn, t, batch), label, guidance_w)
  logsnr_two_back = _batch_logsnr(logsnr_fn, t_two_back, batch)
  z_two_back = ddim_step(x_pred=x_pred, eps_pred=eps_pred, logsnr_s=logsnr_two_back)
  z_one_back = renoise(z_s=z_two_back, logsnr_s=logsnr_two_back,
                       logsnr_u=_batch_logsnr(logsnr_fn, t_one_back, batch), noise=noise)
  return z_one_back, x_pred


def sample_stochastic(denoise_fn, params, *, z_init, label, guidance_w, num_steps: int, logsnr_fn,
                      rng, noise_scale: float = 1.0):
  """The paper's stochastic N-step sampler: N network calls, each with a step size of 2/N.

  Each step is a DDIM step two grid points back followed by re-noising one point forward
  (stochastic_step). The model must be the one distilled for step size 2/N (the N/2-step student),
  trained on the 1/N grid.

  Args:
    denoise_fn: `denoise_fn(params, z_t, logsnr_t, label, guidance_w) -> (x_pred, eps_pred)`
      (models.denoiser.make_denoise_fn).
    params: the parameters denoise_fn takes.
    z_init: the noise z_1 [B, ...] the sampler starts from, e.g. [B, H, W, C].
    label: the class labels [B], int32.
    guidance_w: the guidance weight w, [B] or a scalar (a denoiser without guidance ignores it).
    num_steps: N, the number of steps; a Python int or a traced int32 scalar.
    logsnr_fn: the schedule t -> logsnr (diffusion.get_logsnr_schedule).
    rng: a JAX PRNG key for the re-noising; step i uses fold_in(rng, i).
    noise_scale: a factor on the re-noising noise; 0 turns the backward re-noising into its
      deterministic mean (for tests).

  Returns:
    x [B, ...], the shape of z_init.
  """

  def body(i, z_t):
    t = (num_steps - i) / num_steps
    noise = noise_scale * jax.random.normal(jax.random.fold_in(rng, i), z_t.shape, z_t.dtype)
    z_next, x_pred = stochastic_step(
        denoise_fn, params, z_t=z_t, t=t, num_steps=num_steps, label=label, guidance_w=guidance_w,
        logsnr_fn=logsnr_fn, noise=noise)
    return jnp.where(i == num_steps - 1, x_pred, z_next)

  return jax.lax.fori_loop(0, num_steps, body, z_init)


def sample_ddpm(denoise_fn, params, *, z_init, label, guidance_w, num_steps: int, logsnr_fn, rng,
                variance: str = 'small'):
  """DDPM ancestral sampling on the N-step grid.

  Each step draws z_s ~ N(mean of q(z_s | z_t, x = x_pred), variance) (diffusion.ddpm_posterior);
  the last step returns the model's x_pred.

  Args:
    denoise_fn: `denoise_fn(params, z_t, logsnr_t, label, guidance_w) -> (x_pred, eps_pred)`
      (models.denoiser.make_denoise_fn).
    params: the parameters denoise_fn takes.
    z_init: the noise z_1 [B, ...] the sampler starts from, e.g. [B, H, W, C].
    label: the class labels [B], int32.
    guidance_w: the guidance weight w, [B] or a scalar (a denoiser without guidance ignores it).
    num_steps: N, the number of steps; a Python int or a traced int32 scalar.
    logsnr_fn: the schedule t -> logsnr (diffusion.get_logsnr_schedule).
    rng: a JAX PRNG key; step i uses fold_in(rng, i).
    variance: 'small' (the posterior's, sigma_{t|s}^2 sigma_s^2 / sigma_t^2) or 'large'
      (sigma_{t|s}^2), a key of diffusion.DDPM_VARIANCES.

  Returns:
    x [B, ...], the shape of z_init.

  Raises:
    ValueError: variance is not a key of diffusion.DDPM_VARIANCES.
  """
  batch = z_init.shape[0]

  def body(i, z_t):
    t = (num_steps - i) / num_steps
    s = (num_steps - i - 1) / num_steps
    logsnr_t = _batch_logsnr(logsnr_fn, t, batch)
    x_pred, _ = denoise_fn(params, z_t, logsnr_t, label, guidance_w)
    mean, std = ddpm_posterior(z_t=z_t, x_pred=x_pred, logsnr_t=logsnr_t,
                               logsnr_s=_batch_logsnr(logsnr_fn, s, batch), variance=variance)
    z_s = mean + std * jax.random.normal(jax.random.fold_in(rng, i), z_t.shape, z_t.dtype)
    return jnp.where(i == num_steps - 1, x_pred, z_s)

  return jax.lax.fori_loop(0, num_steps, body, z_init)


def encode_ddim(denoise_fn, params, *, x, label, guidance_w, num_steps: int, logsnr_fn):
  """Deterministic N-step DDIM encoder: the same update run from t = 0 (data) up to t = 1 (noise).

  Args:
    denoise_fn: `denoise_fn(params, z_t, logsnr_t, label, guidance_w) -> (x_pred, eps_pred)`
      (models.denoiser.make_denoise_fn).
    params: the parameters denoise_fn takes.
    x: the data [B, ...] to encode, e.g. [B, H, W, C].
    label: the class labels [B], int32.
    guidance_w: the guidance weight w, [B] or a scalar (a denoiser without guidance ignores it).
    num_steps: N, the number of steps; a Python int or a traced int32 scalar.
    logsnr_fn: the schedule t -> logsnr (diffusion.get_logsnr_schedule).

  Returns:
    z_1 [B, ...], the shape of x.
  """
  batch = x.shape[0]

  def body(i, z_t):
    t, s = i / num_steps, (i + 1) / num_steps
    x_pred, eps_pred = denoise_fn(
        params, z_t, _batch_logsnr(logsnr_fn, t, batch), label, guidance_w)
    return ddim_step(x_pred=x_pred, eps_pred=eps_pred, logsnr_s=_batch_logsnr(logsnr_fn, s, batch))

  z_0 = ddim_step(x_pred=x, eps_pred=jnp.zeros_like(x),
                  logsnr_s=_batch_logsnr(logsnr_fn, 0.0, batch))
  return jax.lax.fori_loop(0, num_steps, body, z_0)


SAMPLERS = ('ddim', 'stochastic', 'ddpm')
