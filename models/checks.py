"""Shape and argument checks shared by the denoisers, raising ValueError with a clear message."""

import jax.numpy as jnp


def denoiser_inputs(z_t, logsnr_t, label, guidance_w, *, data_rank, guidance_input, model_name):
  """(logsnr_t, guidance_w) as float32 arrays (guidance_w may be None), after
  check_denoiser_inputs."""
  logsnr_t = jnp.asarray(logsnr_t, jnp.float32)
  guidance_w = None if guidance_w is None else jnp.asarray(guidance_w, jnp.float32)
  check_denoiser_inputs(z_t, logsnr_t, label, guidance_w, data_rank=data_rank,
                        guidance_input=guidance_input, model_name=model_name)
  return logsnr_t, guidance_w


def check_denoiser_inputs(
    z_t, logsnr_t, label, guidance_w, *, data_rank, guidance_input, model_name):
  """Validates (z_t, logsnr_t, label, guidance_w) for a denoiser taking z_t of rank data_rank."""
  if z_t.ndim != data_rank:
    raise ValueError(f'{model_name}: z_t must have rank {data_rank}, got shape {z_t.shape}')
  batch = z_t.shape[0]
  if logsnr_t.shape != (batch,):
    raise ValueError(
        f'{model_name}: logsnr_t must have shape [B] = ({batch},), got {logsnr_t.shape}')
  if label.shape != (batch,):
    raise ValueError(f'{model_name}: label must have shape [B] = ({batch},), got {label.shape}')
  if label.dtype.kind not in 'iu':
    raise ValueError(f'{model_name}: label must be an integer array, got dtype {label.dtype}')
  if guidance_input and guidance_w is None:
    raise ValueError(f'{model_name} with guidance_input=True needs guidance_w of shape [B]')
  if not guidance_input and guidance_w is not None:
    raise ValueError(f'{model_name} with guidance_input=False takes no guidance_w; '
                     'build it with guidance_input=True to condition on w')
  if guidance_w is not None and guidance_w.shape != (batch,):
    raise ValueError(
        f'{model_name}: guidance_w must have shape [B] = ({batch},), got {guidance_w.shape}')
