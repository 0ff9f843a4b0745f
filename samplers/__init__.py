"""Samplers for the guided teacher and the distilled students, each one jittable program.

The step count is an input of the compiled program, not a constant: every step count of a checkpoint
reuses one program, and checkpoints of the same architecture (every stage-2 round) compile to the
same program, which JAX's persistent compilation cache then serves from disk.
"""

import functools

import jax
import jax.numpy as jnp

from samplers.samplers import (SAMPLERS, encode_ddim, sample_ddim, sample_ddpm, sample_stochastic,
                               stochastic_step)


@functools.lru_cache(maxsize=None)
def _sampler_program(name: str, denoise_fn, logsnr_fn, ddpm_variance: str):
  """The jitted `(params, z_init, label, guidance_w, rng, num_steps) -> x` of sampler `name`."""
  if name not in SAMPLERS:
    raise ValueError(f"unknown sampler '{name}'; choose one of: {', '.join(SAMPLERS)}")
  fn = {'ddim': sample_ddim, 'stochastic': sample_stochastic, 'ddpm': sample_ddpm}[name]

  def run(params, z_init, label, guidance_w, rng, num_steps):
    kwargs = {} if name == 'ddim' else {'rng': rng}  # DDIM is deterministic
    if name == 'ddpm':
      kwargs['variance'] = ddpm_variance
    return fn(denoise_fn, params, z_init=z_init, label=label, guidance_w=guidance_w,
              num_steps=num_steps, logsnr_fn=logsnr_fn, **kwargs)

  return jax.jit(run)


def make_sampler(name: str, denoise_fn, *, num_steps: int, logsnr_fn, ddpm_variance: str = 'small'):
  """Builds a jitted `(params, z_init, label, guidance_w, rng) -> x` for sampler `name`.

  The step count is an input of the compiled program, not a constant: every step count reuses the
  program of (name, denoise_fn, logsnr_fn, ddpm_variance).

  Args:
    name: the sampler, one of samplers.SAMPLERS ('ddim', 'stochastic', 'ddpm').
    denoise_fn: `denoise_fn(params, z_t, logsnr_t, label, guidance_w) -> (x_pred, eps_pred)`
      (models.denoiser.make_denoise_fn); hashable, the programs are cached on it.
    num_steps: N >= 1, the number of network calls.
    logsnr_fn: the schedule t -> logsnr (diffusion.get_logsnr_schedule).
    ddpm_variance: the DDPM sampler's step variance, 'small' or 'large' (diffusion.DDPM_VARIANCES);
      the other samplers ignore it (and share one program whatever it is).

  Returns:
    `sampler(params, z_init [B, ...], label [B], guidance_w [B] or scalar, rng) -> x [B, ...]`;
    DDIM is deterministic and ignores rng.

  Raises:
    ValueError: num_steps < 1, or name is not one of samplers.SAMPLERS.
  """
  if num_steps < 1:
    raise ValueError(f'sampler steps must be >= 1, got {num_steps}')
  program = _sampler_program(name, denoise_fn, logsnr_fn,
                             ddpm_variance if name == 'ddpm' else 'small')
  steps = jnp.int32(num_steps)
  return lambda params, z_init, label, guidance_w, rng: program(
      params, z_init, label, guidance_w, rng, steps)


@functools.lru_cache(maxsize=None)
def _encoder_program(denoise_fn, logsnr_fn):
  return jax.jit(lambda params, x, label, guidance_w, num_steps: encode_ddim(
      denoise_fn, params, x=x, label=label, guidance_w=guidance_w, num_steps=num_steps,
      logsnr_fn=logsnr_fn))


def make_encoder(denoise_fn, *, num_steps: int, logsnr_fn):
  """Builds a jitted `(params, x, label, guidance_w) -> z_1`: N-step DDIM encoding of data x.

  Like make_sampler, every step count reuses one compiled program of (denoise_fn, logsnr_fn).

  Args:
    denoise_fn: `denoise_fn(params, z_t, logsnr_t, label, guidance_w) -> (x_pred, eps_pred)`
      (models.denoiser.make_denoise_fn); hashable, the programs are cached on it.
    num_steps: N >= 1, the number of network calls.
    logsnr_fn: the schedule t -> logsnr (diffusion.get_logsnr_schedule).

  Returns:
    `encoder(params, x [B, ...], label [B], guidance_w [B] or scalar) -> z_1 [B, ...]`.

  Raises:
    ValueError: num_steps < 1.
  """
  if num_steps < 1:
    raise ValueError(f'encoder steps must be >= 1, got {num_steps}')
  program, steps = _encoder_program(denoise_fn, logsnr_fn), jnp.int32(num_steps)
  return lambda params, x, label, guidance_w: program(params, x, label, guidance_w, steps)
