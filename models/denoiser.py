"""The one wrapper that turns a network's raw output into (x_pred, eps_pred), with or without
guidance.

Teacher, students and samplers all use these `denoise_fn(params, z_t, logsnr_t, label, guidance_w)`:
- 'guided': classifier-free guidance of a conditional network, one batched call on (label, null)
  pairs (2 NFE); a two-network teacher (a DiffusersUNet with an `uncond` network) calls each network
  once (its `guided_outputs`);
- 'w_input': a w-conditioned student, guidance_w goes into the network (1 NFE);
- 'conditional': the network at its label, guidance_w ignored (1 NFE, same as guided at w = 0).
"""

import functools

import jax.numpy as jnp

from diffusion import guided_prediction, predict_eps_from_x, x_eps_from_output

DENOISER_KINDS = ('guided', 'w_input', 'conditional')


def _pairs(a, b):
  """[B, ...], [B, ...] -> [2B, ...] interleaved (a_0, b_0, a_1, b_1, ...): each example's two rows
  stay next to each other, so a batch split over devices needs no data movement for the guided
  call."""
  return jnp.stack([a, b], axis=1).reshape(2 * a.shape[0], *a.shape[1:])


@functools.lru_cache(maxsize=None)
def make_denoise_fn(model, *, parametrization: str, kind: str, num_classes: int):
  """Builds the denoise_fn that turns a network's raw output into (x_pred, eps_pred).

  Cached: equal networks (flax modules compare by their fields) get the same function, so the
  checkpoints of one architecture (stage 1 and every stage-2 round) share their jitted sampler
  programs within a process.

  Args:
    model: the flax network, applied in eval mode (dropout off).
    parametrization: what the network outputs, one of diffusion.PARAMETRIZATIONS.
    kind: one of DENOISER_KINDS: 'guided' (classifier-free guidance of a conditional network,
      2 NFE), 'w_input' (a w-conditioned student, guidance_w goes into the network, 1 NFE) or
      'conditional' (the network at its label, guidance_w ignored, 1 NFE).
    num_classes: the number of classes; the unconditional call's null label is index num_classes.

  Returns:
    `denoise_fn(params, z_t, logsnr_t, label, guidance_w) -> (x_pred, eps_pred)` on z_t [B, ...],
    logsnr_t [B], label [B] and guidance_w [B] (a scalar is broadcast); x_pred, eps_pred [B, ...].

  Raises:
    ValueError: kind is not one of DENOISER_KINDS.
  """
  if kind not in DENOISER_KINDS:
    raise ValueError(f"unknown denoiser kind '{kind}'; choose one of: {', '.join(DENOISER_KINDS)}")

  def network(params, z_t, logsnr_t, label, guidance_w=None):
    return model.apply({'params': params}, z_t, logsnr_t, label, guidance_w, train=False)

  def denoise_fn(params, z_t, logsnr_t, label, guidance_w):
    if kind == 'w_input':
      output = network(params, z_t, logsnr_t, label, jnp.broadcast_to(guidance_w, label.shape))
    elif kind == 'conditional':
      output = network(params, z_t, logsnr_t, label)
    elif getattr(model, 'uncond', None) is not None:  # two networks: conditional and unconditional
      cond, uncond = model.apply({'params': params}, z_t, logsnr_t, label, method='guided_outputs')
      output = guided_prediction(cond=cond, uncond=uncond, guidance_w=guidance_w)
    else:
      both = network(params, _pairs(z_t, z_t), _pairs(logsnr_t, logsnr_t),
                     _pairs(label, jnp.full_like(label, num_classes)))  # [2B, ...]: rows 2i, 2i + 1
      both = both.reshape(label.shape[0], 2, *both.shape[1:])  # [B, 2, ...]
      cond, uncond = both[:, 0], both[:, 1]
      output = guided_prediction(cond=cond, uncond=uncond, guidance_w=guidance_w)
    return x_eps_from_output(z=z_t, output=output, logsnr=logsnr_t, parametrization=parametrization)

  return denoise_fn


@functools.lru_cache(maxsize=None)  # one wrapper per denoiser: its sampler programs compile once
def clip_x(denoise_fn):
  """Wraps a denoise_fn so that x_pred is clipped to [-1, 1].

  eps_pred is recomputed from the clipped x (z_t unchanged). The reference implementation's sampling
  default ('clip_x'); the data lies in [-1, 1].

  Args:
    denoise_fn: `denoise_fn(params, z_t, logsnr_t, label, guidance_w) -> (x_pred, eps_pred)`
      (make_denoise_fn).

  Returns:
    A denoise_fn of the same signature, returning (clipped x_pred, eps_pred from it), each [B, ...].
  """

  def clipped(params, z_t, logsnr_t, label, guidance_w):
    x_pred, _ = denoise_fn(params, z_t, logsnr_t, label, guidance_w)
    x_pred = jnp.clip(x_pred, -1.0, 1.0)
    return x_pred, predict_eps_from_x(z=z_t, x=x_pred, logsnr=logsnr_t)

  return clipped
