"""Sampler updates and distillation targets: guidance, DDIM (both directions), DDPM, stage-2
target."""

import jax.numpy as jnp

from diffusion.parametrization import expand_like
from diffusion.schedules import alpha_sigma


def guided_prediction(*, cond, uncond, guidance_w):
  """Classifier-free guidance: (1 + w) * cond - w * uncond.

  Works on any linear prediction (x, eps or v).

  Args:
    cond: the conditional prediction [B, ...], e.g. [B, H, W, C].
    uncond: the unconditional prediction, the shape of cond.
    guidance_w: the guidance weight w, [B] or a scalar.

  Returns:
    The guided prediction, the shape of cond.
  """
  w = expand_like(jnp.broadcast_to(guidance_w, cond.shape[:1]), cond)
  return (1.0 + w) * cond - w * uncond


def guidance_w_from_scale(guidance_scale):
  """Converts diffusers' guidance_scale s into this paper's guidance weight w = s - 1.

  uncond + s (cond - uncond) = (1 + w) cond - w uncond.

  Args:
    guidance_scale: s, a scalar or an array (e.g. [B]).

  Returns:
    w, the shape of guidance_scale.
  """
  return guidance_scale - 1.0


def ddim_step(*, x_pred, eps_pred, logsnr_s):
  """One DDIM step to time s: z_s = alpha_s x_pred + sigma_s eps_pred.

  s < t samples, s > t encodes (same update).

  Args:
    x_pred: the predicted clean data [B, ...] at the current time t, e.g. [B, H, W, C].
    eps_pred: the predicted noise, the shape of x_pred.
    logsnr_s: the log-SNR [B] of the target time s (or a scalar).

  Returns:
    z_s, the shape of x_pred.
  """
  alpha_s, sigma_s = alpha_sigma(logsnr_s)
  return expand_like(alpha_s, x_pred) * x_pred + expand_like(sigma_s, x_pred) * eps_pred


def ddpm_small_variance(*, logsnr_t, logsnr_s):
  """The variance of the posterior q(z_s | z_t, x), s < t: DDPM's 'small' variance.

  sigma_{t|s}^2 sigma_s^2 / sigma_t^2 = sigma_s^2 (1 - SNR_t / SNR_s).

  Args:
    logsnr_t: the log-SNR [B] of the current time t (or a scalar).
    logsnr_s: the log-SNR [B] of the earlier time s < t (or a scalar).

  Returns:
    The variance, >= 0, the broadcast shape of logsnr_t and logsnr_s.
  """
  _, sigma_s = alpha_sigma(logsnr_s)
  # sigma_{t|s}^2 / sigma_t^2 = 1 - exp(logsnr_t - logsnr_s), as expm1: no cancellation when s is
  # close to t.
  return jnp.maximum(-jnp.expm1(logsnr_t - logsnr_s) * sigma_s**2, 0.0)


def ddpm_large_variance(*, logsnr_t, logsnr_s):
  """The variance of the forward transition q(z_t | z_s), s < t: DDPM's 'large' variance.

  sigma_{t|s}^2 = sigma_t^2 (1 - SNR_t / SNR_s), never below the 'small' one (ddpm_small_variance).

  Args:
    logsnr_t: the log-SNR [B] of the current time t (or a scalar).
    logsnr_s: the log-SNR [B] of the earlier time s < t (or a scalar).

  Returns:
    The variance, >= 0, the broadcast shape of logsnr_t and logsnr_s.
  """
  _, sigma_t = alpha_sigma(logsnr_t)
  return jnp.maximum(-jnp.expm1(logsnr_t - logsnr_s) * sigma_t**2, 0.0)


DDPM_VARIANCES = {'small': ddpm_small_variance, 'large': ddpm_large_variance}


def ddpm_posterior(*, z_t, x_pred, logsnr_t, logsnr_s, variance: str = 'small'):
  """Mean and std of the DDPM ancestral step z_t -> z_s, s < t.

  The mean is that of q(z_s | z_t, x = x_pred); the variance is DDPM_VARIANCES[variance] ('small':
  that posterior's own, 'large': the forward sigma_{t|s}^2).

  Args:
    z_t: the current latent [B, ...], e.g. [B, H, W, C].
    x_pred: the predicted clean data, the shape of z_t.
    logsnr_t: the log-SNR [B] of t.
    logsnr_s: the log-SNR [B] of s < t.
    variance: 'small' or 'large', a key of DDPM_VARIANCES.

  Returns:
    (mean, std): mean the shape of z_t, std [B, 1, ..., 1] (broadcasts against z_t).

  Raises:
    ValueError: variance is not a key of DDPM_VARIANCES.
  """
  if variance not in DDPM_VARIANCES:
    raise ValueError(
        f"unknown DDPM variance '{variance}'; choose one of: {', '.join(DDPM_VARIANCES)}")
  alpha_t, sigma_t = alpha_sigma(logsnr_t)
  alpha_s, sigma_s = alpha_sigma(logsnr_s)
  alpha_ts = alpha_t / alpha_s
  var_ratio = -jnp.expm1(logsnr_t - logsnr_s)  # sigma_{t|s}^2 / sigma_t^2 = 1 - SNR_t / SNR_s
  coef_z = alpha_ts * sigma_s**2 / sigma_t**2
  coef_x = alpha_s * var_ratio
  std = jnp.sqrt(DDPM_VARIANCES[variance](logsnr_t=logsnr_t, logsnr_s=logsnr_s))
  mean = expand_like(coef_z, z_t) * z_t + expand_like(coef_x, z_t) * x_pred
  return mean, expand_like(std, z_t)


def renoise(*, z_s, logsnr_s, logsnr_u, noise):
  """Samples the forward transition q(z_u | z_s) from s to a noisier time u > s.

  z_u = alpha_{u|s} z_s + sigma_{u|s} noise.

  Args:
    z_s: the latent [B, ...] at time s, e.g. [B, H, W, C].
    logsnr_s: the log-SNR [B] of s.
    logsnr_u: the log-SNR [B] of u > s.
    noise: standard Gaussian noise, the shape of z_s.

  Returns:
    z_u, the shape of z_s.
  """
  alpha_s, sigma_s = alpha_sigma(logsnr_s)
  alpha_u, sigma_u = alpha_sigma(logsnr_u)
  alpha_us = alpha_u / alpha_s
  # sigma_{u|s}^2 = sigma_u^2 - alpha_{u|s}^2 sigma_s^2 = -sigma_u^2 expm1(logsnr_u - logsnr_s),
  # without cancellation.
  sigma_us = jnp.sqrt(jnp.maximum(-sigma_u**2 * jnp.expm1(logsnr_u - logsnr_s), 0.0))
  return expand_like(alpha_us, z_s) * z_s + expand_like(sigma_us, z_s) * noise


def stage2_x_target(*, z_t, z_tpp, logsnr_t, logsnr_tpp):
  """The x_tilde such that one DDIM step z_t -> t'' with x_pred = x_tilde lands exactly on z_tpp.

  x_tilde = (z_t'' - (sigma_t''/sigma_t) z_t) / (alpha_t'' - (sigma_t''/sigma_t) alpha_t).

  Args:
    z_t: the latent [B, ...] at time t, e.g. [B, H, W, C].
    z_tpp: the latent z_t'' at the earlier time t'' < t, the shape of z_t.
    logsnr_t: the log-SNR [B] of t.
    logsnr_tpp: the log-SNR [B] of t''.

  Returns:
    x_tilde, the shape of z_t.
  """
  alpha_t, sigma_t = alpha_sigma(logsnr_t)
  alpha_tpp, sigma_tpp = alpha_sigma(logsnr_tpp)
  ratio = expand_like(sigma_tpp / sigma_t, z_t)
  denom = expand_like(alpha_tpp, z_t) - ratio * expand_like(alpha_t, z_t)
  return (z_tpp - ratio * z_t) / denom


def v_target_between(*, z_t, z_s, logsnr_t, logsnr_s):
  """The v that makes one DDIM step z_t -> s land exactly on z_s, for s < t or s > t.

  With alpha = cos(phi), sigma = sin(phi), solving z_t = alpha_t x + sigma_t eps,
  z_s = alpha_s x + sigma_s eps for (x, eps) and forming v = alpha_t eps - sigma_t x gives
    v = (z_s - cos(phi_s - phi_t) z_t) / sin(phi_s - phi_t),
  which is well defined at t = 0 (sigma_t = 0), unlike the x target: the encoder's first step.

  Args:
    z_t: the latent [B, ...] at time t, e.g. [B, H, W, C].
    z_s: the latent at time s != t, the shape of z_t.
    logsnr_t: the log-SNR [B] of t.
    logsnr_s: the log-SNR [B] of s.

  Returns:
    v, the shape of z_t.
  """
  alpha_t, sigma_t = alpha_sigma(logsnr_t)
  alpha_s, sigma_s = alpha_sigma(logsnr_s)
  cos_delta = expand_like(alpha_t * alpha_s + sigma_t * sigma_s, z_t)
  sin_delta = expand_like(alpha_t * sigma_s - alpha_s * sigma_t, z_t)
  return (z_s - cos_delta * z_t) / sin_delta
