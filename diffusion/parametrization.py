"""The forward process and conversions between x, eps and v predictions, all in log-SNR form."""

import jax.numpy as jnp

from diffusion.schedules import alpha_sigma


def expand_like(per_example, target):
  """Reshapes a per-example array [B] so it broadcasts against target [B, ...]."""
  per_example = jnp.asarray(per_example, jnp.float32)
  return per_example.reshape(per_example.shape + (1,) * (target.ndim - per_example.ndim))


def _alpha_sigma_like(logsnr, target):
  alpha, sigma = alpha_sigma(logsnr)
  return expand_like(alpha, target), expand_like(sigma, target)


def diffusion_forward(*, x, eps, logsnr):
  """z_t = alpha_t x + sigma_t eps."""
  alpha, sigma = _alpha_sigma_like(logsnr, x)
  return alpha * x + sigma * eps


def predict_v(*, x, eps, logsnr):
  """v = alpha eps - sigma x."""
  alpha, sigma = _alpha_sigma_like(logsnr, x)
  return alpha * eps - sigma * x


def predict_x_from_v(*, z, v, logsnr):
  """x = alpha z - sigma v."""
  alpha, sigma = _alpha_sigma_like(logsnr, z)
  return alpha * z - sigma * v


def predict_eps_from_v(*, z, v, logsnr):
  """eps = sigma z + alpha v."""
  alpha, sigma = _alpha_sigma_like(logsnr, z)
  return sigma * z + alpha * v


def predict_x_from_eps(*, z, eps, logsnr):
  """x = (z - sigma eps) / alpha; unstable where alpha -> 0 (why v is the default)."""
  alpha, sigma = _alpha_sigma_like(logsnr, z)
  return (z - sigma * eps) / alpha


def predict_eps_from_x(*, z, x, logsnr):
  """eps = (z - alpha x) / sigma; unstable where sigma -> 0."""
  alpha, sigma = _alpha_sigma_like(logsnr, z)
  return (z - alpha * x) / sigma


def x_eps_from_output(*, z, output, logsnr, parametrization: str):
  """Turns a raw network output into (x_pred, eps_pred) for 'v', 'x' or 'eps' parametrization."""
  if parametrization == 'v':
    return (predict_x_from_v(z=z, v=output, logsnr=logsnr),
            predict_eps_from_v(z=z, v=output, logsnr=logsnr))
  if parametrization == 'x':
    return output, predict_eps_from_x(z=z, x=output, logsnr=logsnr)
  if parametrization == 'eps':
    return predict_x_from_eps(z=z, eps=output, logsnr=logsnr), output
  raise ValueError(f"unknown diffusion.parametrization '{parametrization}'; choose one of: eps, v, x")


PARAMETRIZATIONS = ('eps', 'v', 'x')
