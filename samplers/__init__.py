"""Samplers for the guided teacher and the distilled students, each one jittable program."""

import jax

from samplers.samplers import SAMPLERS, encode_ddim, sample_ddim, sample_ddpm, sample_stochastic, stochastic_step


def make_sampler(name: str, denoise_fn, *, num_steps: int, logsnr_fn):
  """A jitted `(params, z_init, label, guidance_w, rng) -> x` for sampler `name` at `num_steps` steps."""
  if name == 'ddim':
    def run(params, z_init, label, guidance_w, rng):
      del rng  # deterministic
      return sample_ddim(denoise_fn, params, z_init=z_init, label=label, guidance_w=guidance_w,
                         num_steps=num_steps, logsnr_fn=logsnr_fn)
  elif name in ('stochastic', 'ddpm'):
    fn = sample_stochastic if name == 'stochastic' else sample_ddpm
    def run(params, z_init, label, guidance_w, rng):
      return fn(denoise_fn, params, z_init=z_init, label=label, guidance_w=guidance_w,
                num_steps=num_steps, logsnr_fn=logsnr_fn, rng=rng)
  else:
    raise ValueError(f"unknown sampler '{name}'; choose one of: {', '.join(SAMPLERS)}")
  if num_steps < 1:
    raise ValueError(f'sampler steps must be >= 1, got {num_steps}')
  return jax.jit(run)


def make_encoder(denoise_fn, *, num_steps: int, logsnr_fn):
  """A jitted `(params, x, label, guidance_w) -> z_1`: N-step DDIM encoding of data x."""
  if num_steps < 1:
    raise ValueError(f'encoder steps must be >= 1, got {num_steps}')
  return jax.jit(lambda params, x, label, guidance_w: encode_ddim(
      denoise_fn, params, x=x, label=label, guidance_w=guidance_w, num_steps=num_steps, logsnr_fn=logsnr_fn))
