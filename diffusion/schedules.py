"""Log-SNR noise schedules; convention: t=0 -> logsnr_max (clean data), t=1 -> logsnr_min (pure
noise)."""

import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

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


# The beta schedules of diffusers' discrete-time schedulers (DDPMScheduler, DDIMScheduler, ...) that
# 'discrete' reads.
BETA_SCHEDULES = ('linear', 'scaled_linear', 'squaredcos_cap_v2')
# The fields of a diffusion section that describe a discrete schedule (config.diffusion, a record's
# 'diffusion').
DISCRETE_FIELDS = ('num_train_timesteps', 'beta_schedule', 'beta_start', 'beta_end')


@functools.lru_cache(maxsize=None)
def discrete_logsnr_table(*, num_train_timesteps: int, beta_schedule: str, beta_start: float,
                          beta_end: float) -> np.ndarray:
  """The log-SNR of the discrete timesteps 0..T-1 of a diffusers scheduler.

  Each entry is log(abar / (1 - abar)), decreasing with the timestep. abar (alphas_cumprod) is
  computed as diffusers computes it: betas in float32 (the cosine schedule 'squaredcos_cap_v2' from
  abar(s) = cos((s + 0.008) / 1.008 * pi / 2)^2, each beta capped at 0.999), then the running
  product of 1 - beta in float32. Cached per argument set.

  Args:
    num_train_timesteps: T, the number of discrete timesteps.
    beta_schedule: one of BETA_SCHEDULES.
    beta_start: the first beta of 'linear' and 'scaled_linear'.
    beta_end: the last beta of 'linear' and 'scaled_linear'.

  Returns:
    The table [T], read-only: the log-SNR of timesteps 0..T-1, decreasing.

  Raises:
    ValueError: beta_schedule is not one of BETA_SCHEDULES.
  """
  steps = num_train_timesteps
  if beta_schedule == 'linear':
    betas = np.linspace(beta_start, beta_end, steps).astype(np.float32)
  elif beta_schedule == 'scaled_linear':
    betas = np.linspace(beta_start**0.5, beta_end**0.5, steps).astype(np.float32) ** 2
  elif beta_schedule == 'squaredcos_cap_v2':
    abar = lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
    betas = np.array(
        [min(1 - abar((i + 1) / steps) / abar(i / steps), 0.999) for i in range(steps)], np.float32)
  else:
    raise ValueError(
        f"unknown beta_schedule '{beta_schedule}'; choose one of: {', '.join(BETA_SCHEDULES)}")
  abar = np.cumprod(np.float32(1) - betas, dtype=np.float32).astype(np.float64)  # [T]
  table = np.log(abar) - np.log1p(-abar)
  table.setflags(write=False)
  return table


def discrete_logsnr(t, *, table: np.ndarray, logsnr_max: float):
  """Maps continuous time t in [0, 1] to log-SNR on a discrete schedule's table.

  t = (tau + 1) / T is timestep tau. The map is linear in log-SNR between the timesteps;
  t in [0, 1/T] runs from logsnr_max (t = 0, clean data) to timestep 0. With this map the N-step
  samplers (t = i / N) visit the timesteps T i / N - 1, which are those of diffusers'
  DDIMScheduler with timestep_spacing='trailing' whenever N divides T.

  Args:
    t: time, any shape (e.g. [B] or a scalar); clipped to [0, 1].
    table: the log-SNR [T] of timesteps 0..T-1 (discrete_logsnr_table).
    logsnr_max: the log-SNR at t = 0 (clean data).

  Returns:
    The log-SNR, float32, the shape of t.
  """
  steps = table.shape[0]
  # [T + 1]
  nodes = jnp.concatenate([jnp.array([logsnr_max], jnp.float32), jnp.asarray(table, jnp.float32)])
  t = jnp.clip(jnp.asarray(t, jnp.float32), 0.0, 1.0)
  return jnp.interp(steps * t, jnp.arange(steps + 1, dtype=jnp.float32), nodes)


def timestep_of_logsnr(logsnr, *, table: np.ndarray):
  """The discrete timestep tau in [0, T - 1], possibly fractional, whose log-SNR is logsnr.

  The inverse of discrete_logsnr on t in [1/T, 1] (linear between timesteps); clipped to [0, T - 1]
  outside the trained range. Imported networks (models/diffusers_unet.py) are fed this timestep.

  Args:
    logsnr: the log-SNR, any shape (e.g. [B]).
    table: the log-SNR [T] of timesteps 0..T-1, decreasing (discrete_logsnr_table).

  Returns:
    The timestep tau, float32, the shape of logsnr.
  """
  decreasing = jnp.asarray(table, jnp.float32)  # [T], log-SNR falls with the timestep
  steps = decreasing.shape[0]
  return jnp.interp(-jnp.asarray(logsnr, jnp.float32), -decreasing,
                    jnp.arange(steps, dtype=jnp.float32))


SCHEDULES = {'cosine': cosine_logsnr, 'linear': linear_logsnr, 'discrete': discrete_logsnr}


@functools.lru_cache(maxsize=None)
def get_logsnr_schedule(
    name: str, *, logsnr_min: float, logsnr_max: float, **discrete) -> LogsnrSchedule:
  """Returns the t -> logsnr function of a registered schedule.

  The bounds are clipping limits of logsnr. 'discrete' takes DISCRETE_FIELDS as keywords
  (discrete_logsnr_table); its minimum is the table's last entry and logsnr_min is unused. Cached:
  equal arguments give the same function, so the programs jitted over it (samplers) are shared.

  Args:
    name: the schedule, a key of SCHEDULES ('cosine', 'linear', 'discrete').
    logsnr_min: the lower clipping limit of logsnr (pure noise, t = 1); unused by 'discrete'.
    logsnr_max: the upper clipping limit of logsnr (clean data, t = 0).
    **discrete: for 'discrete' only, the DISCRETE_FIELDS (num_train_timesteps, beta_schedule,
      beta_start, beta_end).

  Returns:
    The schedule: t (any shape, in [0, 1]) -> float32 log-SNR of the same shape.

  Raises:
    ValueError: an unknown name, logsnr_min >= logsnr_max, or for 'discrete' an unknown
      beta_schedule or a logsnr_max not above the log-SNR of timestep 0.
  """
  if name not in SCHEDULES:
    raise ValueError(
        f"unknown diffusion.schedule '{name}'; choose one of: {', '.join(sorted(SCHEDULES))}")
  if not logsnr_min < logsnr_max:
    raise ValueError(f'need diffusion.logsnr_min < logsnr_max, got {logsnr_min} >= {logsnr_max}')
  if name == 'discrete':
    table = discrete_logsnr_table(**discrete)
    if not table[0] < logsnr_max:
      raise ValueError(
          f'need diffusion.logsnr_max > the log-SNR of timestep 0 ({table[0]:.3f}), '
          f'got {logsnr_max}')
    return lambda t: discrete_logsnr(t, table=table, logsnr_max=logsnr_max)
  fn = SCHEDULES[name]
  return lambda t: fn(t, logsnr_min=logsnr_min, logsnr_max=logsnr_max)


def schedule_of(diffusion) -> LogsnrSchedule:
  """The t -> logsnr schedule a diffusion section describes.

  Args:
    diffusion: config.diffusion, or a record's 'diffusion' dict: its schedule, logsnr_min and
      logsnr_max, and for schedule 'discrete' the DISCRETE_FIELDS.

  Returns:
    The schedule of get_logsnr_schedule (cached: equal sections give the same function).

  Raises:
    ValueError: the section's values are refused by get_logsnr_schedule.
  """
  discrete = {
      key: diffusion[key] for key in DISCRETE_FIELDS
  } if diffusion['schedule'] == 'discrete' else {}
  return get_logsnr_schedule(diffusion['schedule'], logsnr_min=diffusion['logsnr_min'],
                             logsnr_max=diffusion['logsnr_max'], **discrete)


def alpha_sigma(logsnr):
  """The variance-preserving pair: alpha^2 = sigmoid(logsnr), sigma^2 = sigmoid(-logsnr).

  Args:
    logsnr: the log-SNR, any shape (e.g. [B]).

  Returns:
    (alpha, sigma), float32, each the shape of logsnr.
  """
  logsnr = jnp.asarray(logsnr, jnp.float32)
  return jnp.sqrt(jax.nn.sigmoid(logsnr)), jnp.sqrt(jax.nn.sigmoid(-logsnr))
