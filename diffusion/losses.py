"""SNR-weighted denoising losses: omega(logsnr) * ||x_pred - x_target||^2."""

import jax.numpy as jnp

WEIGHTINGS = ('truncated_snr', 'snr_plus_one', 'constant')


def loss_weight(logsnr, weighting: str):
  """The loss weight omega(logsnr) of a weighting.

  'truncated_snr' = max(SNR, 1), 'snr_plus_one' = 1 + SNR, 'constant' = 1 (the plain x-space error:
  every noise level counts as much as its error in the prediction of x).

  Args:
    logsnr: the log-SNR, any shape (e.g. [B]).
    weighting: one of WEIGHTINGS.

  Returns:
    omega, float32, the shape of logsnr.

  Raises:
    ValueError: weighting is not one of WEIGHTINGS.
  """
  snr = jnp.exp(jnp.asarray(logsnr, jnp.float32))
  if weighting == 'truncated_snr':
    return jnp.maximum(snr, 1.0)
  if weighting == 'snr_plus_one':
    return 1.0 + snr
  if weighting == 'constant':
    return jnp.ones_like(snr)
  raise ValueError(f"unknown loss weighting '{weighting}'; choose one of: {', '.join(WEIGHTINGS)}")


def weighted_x_loss(*, x_pred, x_target, logsnr, weighting: str):
  """Per-example loss: omega(logsnr) times the mean over pixels of (x_pred - x_target)^2.

  Args:
    x_pred: the predicted clean data [B, ...], e.g. [B, H, W, C].
    x_target: the target, the shape of x_pred.
    logsnr: the log-SNR [B] at which x_pred was predicted.
    weighting: one of WEIGHTINGS (loss_weight).

  Returns:
    The loss [B].

  Raises:
    ValueError: weighting is not one of WEIGHTINGS.
  """
  sq_err = jnp.square(x_pred - x_target)  # [B, ...]
  mse = jnp.mean(sq_err.reshape(sq_err.shape[0], -1), axis=1)  # [B]
  return loss_weight(logsnr, weighting) * mse
