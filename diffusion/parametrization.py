"""The forward process and conversions between x, eps and v predictions, all in log-SNR form."""

import jax.numpy as jnp

from diffusion.schedules import alpha_sigma


def expand_like(per_example, target):
  """Reshapes a per-example array so it broadcasts against a batch.

  Args:
    per_example: per-example values [B] (e.g. a log-SNR), or a scalar.
    target: the batch [B, ...], e.g. [B, H, W, C].

  Returns:
    per_example as float32 [B, 1, ..., 1], with as many dimensions as target.
  """
  per_example = jnp.asarray(per_example, jnp.float32)
  return per_example.reshape(per_example.shape + (1,) * (target.ndim - per_example.ndim))


def _alpha_sigma_like(logsnr, target):
  alpha, sigma = alpha_sigma(logsnr)
  return expand_like(alpha, target), expand_like(sigma, target)


def diffusion_forward(*, x, eps, logsnr):
  """The forward process: z_t = alpha_t x + sigma_t eps.

  Args:
    x: clean data [B, ...], e.g. [B, H, W, C].
    eps: Gaussian noise, the shape of x.
    logsnr: the log-SNR [B] of t (or a scalar).

  Returns:
    z_t, the shape of x.
  """
  alpha, sigma = _alpha_sigma_like(logsnr, x)
  return alpha * x + sigma * eps


def predict_v(*, x, eps, logsnr):
  """The v of clean data and noise: v = alpha eps - sigma x.

  Args:
    x: clean data [B, ...], e.g. [B, H, W, C].
    eps: the noise, the shape of x.
    logsnr: the log-SNR [B] (or a scalar).

  Returns:
    v, the shape of x.
  """
  alpha, sigma = _alpha_sigma_like(logsnr, x)
  return alpha * eps - sigma * x


def predict_x_from_v(*, z, v, logsnr):
  """Clean data from a v prediction: x = alpha z - sigma v.

  Args:
    z: the noisy input z_t [B, ...], e.g. [B, H, W, C].
    v: the v prediction, the shape of z.
    logsnr: the log-SNR [B] of z (or a scalar).

  Returns:
    x, the shape of z.
  """
  alpha, sigma = _alpha_sigma_like(logsnr, z)
  return alpha * z - sigma * v


def predict_eps_from_v(*, z, v, logsnr):
  """Noise from a v prediction: eps = sigma z + alpha v.

  Args:
    z: the noisy input z_t [B, ...], e.g. [B, H, W, C].
    v: the v prediction, the shape of z.
    logsnr: the log-SNR [B] of z (or a scalar).

  Returns:
    eps, the shape of z.
  """
  alpha, sigma = _alpha_sigma_like(logsnr, z)
  return sigma * z + alpha * v


def predict_x_from_eps(*, z, eps, logsnr):
  """Clean data from an eps prediction: x = (z - sigma eps) / alpha.

  Unstable where alpha -> 0 (why v is the default).

  Args:
    z: the noisy input z_t [B, ...], e.g. [B, H, W, C].
    eps: the eps prediction, the shape of z.
    logsnr: the log-SNR [B] of z (or a scalar).

  Returns:
    x, the shape of z.
  """
  alpha, sigma = _alpha_sigma_like(logsnr, z)
  return (z - sigma * eps) / alpha


def predict_eps_from_x(*, z, x, logsnr):
  """Noise from an x prediction: eps = (z - alpha x) / sigma.

  Unstable where sigma -> 0.

  Args:
    z: the noisy input z_t [B, ...], e.g. [B, H, W, C].
    x: the x prediction, the shape of z.
    logsnr: the log-SNR [B] of z (or a scalar).

  Returns:
    eps, the shape of z.
  """
  alpha, sigma = _alpha_sigma_like(logsnr, z)
  return (z - alpha * x) / sigma


def x_eps_from_output(*, z, output, logsnr, parametrization: str):
  """Turns a raw network output into (x_pred, eps_pred) for 'v', 'x' or 'eps' parametrization.

  Args:
    z: the network's input z_t [B, ...], e.g. [B, H, W, C].
    output: the network's raw output, the shape of z.
    logsnr: the log-SNR [B] of z.
    parametrization: what the network predicts, one of PARAMETRIZATIONS.

  Returns:
    (x_pred, eps_pred), each the shape of z.

  Raises:
    ValueError: parametrization is not one of PARAMETRIZATIONS.
  """
  if parametrization == 'v':
    return (predict_x_from_v(z=z, v=output, logsnr=logsnr),
            predict_eps_from_v(z=z, v=output, logsnr=logsnr))
  if parametrization == 'x':
    return output, predict_eps_from_x(z=z, x=output, logsnr=logsnr)
  if parametrization == 'eps':
    return predict_x_from_eps(z=z, eps=output, logsnr=logsnr), output
  raise ValueError(
      f"unknown diffusion.parametrization '{parametrization}'; choose one of: eps, v, x")


PARAMETRIZATIONS = ('eps', 'v', 'x')
