"""Exact denoisers for property tests: point-mass data and Gaussian data x ~ N(MU, STD^2 I)."""

import jax.numpy as jnp

from diffusion import alpha_sigma, get_logsnr_schedule, predict_eps_from_x

LOGSNR_FN = get_logsnr_schedule('cosine', logsnr_min=-20.0, logsnr_max=20.0)
X0 = jnp.array([[0.5, -0.25, 1.0]])
MU, STD = 0.3, 0.5


def with_eps(x_fn):
  """A denoise_fn(params, z_t, logsnr_t, label, guidance_w) -> (x, eps) from x_fn(z_t, logsnr_t)."""
  def denoise_fn(params, z_t, logsnr_t, label, guidance_w):
    del params, label, guidance_w
    x_pred = x_fn(z_t, logsnr_t)
    return x_pred, predict_eps_from_x(z=z_t, x=x_pred, logsnr=logsnr_t)
  return denoise_fn


def gaussian_x(z, logsnr):
  """E[x | z_t] for x ~ N(MU, STD^2 I): MU + alpha STD^2 (z - alpha MU) / (alpha^2 STD^2 +
  sigma^2)."""
  alpha, sigma = (a[:, None] for a in alpha_sigma(logsnr))
  return MU + alpha * STD**2 * (z - alpha * MU) / (alpha**2 * STD**2 + sigma**2)


point_mass = with_eps(lambda z, logsnr: jnp.broadcast_to(X0, z.shape))
gaussian = with_eps(gaussian_x)
