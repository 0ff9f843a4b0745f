"""Log-SNR noise schedules; convention: t=0 -> logsnr_max (clean data), t=1 -> logsnr_min (pure noise)."""

import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp

LogsnrSchedule = Callable[[jnp.ndarray], jnp.ndarray]


def cosine_logsnr(t, *, logsnr_min: float = -20.0, logsnr_max: float = 20.0):
  """logsnr(t) = -2 log tan(a t + b), with a, b chosen so that t in [0, 1] maps onto [max, min].

  Writing the clipping into the affine map keeps tan's argument inside (0, pi/2), so the result is
  finite and monotone over the whole of [0, 1] in float32 (no tan past pi/2).
  """
  b = math.atan(math.exp(-0.5 * logsnr_max))
  a = math.atan(math.exp(-0.5 * logsnr_min)) - b
  t = jnp.clip(jnp.asarray(t, jnp.float32), 0.0, 1.0)
  return -2.0 * jnp.log(jnp.tan(a * t + b))


def linear_logsnr(t, *, logsnr_min: float = -20.0, logsnr_max: float = 20.0):
  """logsnr linear in t; a simple reference schedule for tests and ablations."""
  t = jnp.clip(jnp.asarray(t, jnp.float32), 0.0, 1.0)
  return logsnr_max + (logsnr_min - logsnr_max) * t


SCHEDULES = {'cosine': cosine_logsnr, 'linear': linear_logsnr}


@functools.lru_cache(maxsize=None)
def get_logsnr_schedule(name: str, *, logsnr_min: float, logsnr_max: float) -> LogsnrSchedule:
  """Returns t -> logsnr for a registered schedule; the bounds are clipping limits of logsnr.

  Cached: equal arguments give the same function, so the programs jitted over it (samplers) are shared.
  """
  if name not in SCHEDULES:
    raise ValueError(f"unknown diffusion.schedule '{name}'; choose one of: {', '.join(sorted(SCHEDULES))}")
  if not logsnr_min < logsnr_max:
    raise ValueError(f'need diffusion.logsnr_min < logsnr_max, got {logsnr_min} >= {logsnr_max}')
  fn = SCHEDULES[name]
  return lambda t: fn(t, logsnr_min=logsnr_min, logsnr_max=logsnr_max)


def alpha_sigma(logsnr):
  """alpha^2 = sigmoid(logsnr), sigma^2 = sigmoid(-logsnr): the variance-preserving pair."""
  logsnr = jnp.asarray(logsnr, jnp.float32)
  return jnp.sqrt(jax.nn.sigmoid(logsnr)), jnp.sqrt(jax.nn.sigmoid(-logsnr))
