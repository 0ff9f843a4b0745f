"""Denoiser networks: build_model from a config, plus parameter initialisation and counting."""
import flax.linen as nn
import jax
import jax.numpy as jnp
from clu import parameter_overview

from models.diffusers_import import build_network as build_diffusers_network
from models.embeddings import GUIDANCE_W_SCALE
from models.mlp import MLPDenoiser
from models.ref_unet import RefUNet
from models.unet import UNet

# 'diffusers_unet': an imported diffusers UNet2DModel teacher and its students
# (models/diffusers_import.py).
MODEL_NAMES = ('mlp', 'unet', 'ref_unet', 'diffusers_unet')
COMPUTE_DTYPES = ('float32', 'bfloat16')


def compute_dtype(model_config):
  """model.dtype, the dtype networks compute in (parameters stay float32); float32 when the field is
  absent."""
  return jnp.dtype(model_config.get('dtype', 'float32'))


def _unet_fields(model_config) -> dict:
  """The fields UNet and RefUNet share, from model_config."""
  return dict(ch=model_config.ch, ch_mult=tuple(model_config.ch_mult),
              num_res_blocks=model_config.num_res_blocks,
              attn_resolutions=tuple(model_config.attn_resolutions), dropout=model_config.dropout,
              num_groups=model_config.num_groups, num_heads=model_config.get('num_heads', 1))


def build_model(model_config, *, num_classes: int, guidance_input: bool) -> nn.Module:
  """Builds a UNet, RefUNet, MLPDenoiser or DiffusersUNet from a model config.

  Args:
    model_config: the model section (a ConfigDict); its `name`, one of MODEL_NAMES, picks the
      network, its other fields configure it (`dtype`, optional: the dtype it computes in,
      compute_dtype).
    num_classes: the number of classes; label num_classes is the null label.
    guidance_input: whether the network takes a guidance weight w as input (a w-conditioned
      student).

  Returns:
    The flax module, called as
    `model.apply({'params': params}, z_t, logsnr_t, label, guidance_w, train=...)`.

  Raises:
    ValueError: model_config.name is not one of MODEL_NAMES.
  """
  if model_config.name == 'diffusers_unet':
    return build_diffusers_network(model_config, num_classes=num_classes,
                                   guidance_input=guidance_input, dtype=compute_dtype(model_config))
  if model_config.name == 'unet':
    return UNet(**_unet_fields(model_config), num_classes=num_classes,
                guidance_input=guidance_input,
                guidance_gains=model_config.get('guidance_gains', False),
                guidance_output=model_config.get('guidance_output', False),
                guidance_context=model_config.get('guidance_context', False),
                guidance_w_scale=model_config.get('guidance_w_scale', GUIDANCE_W_SCALE),
                dtype=compute_dtype(model_config))
  if model_config.name == 'ref_unet':
    return RefUNet(**_unet_fields(model_config), head_dim=model_config.get('head_dim', 0),
                   resblock_resample=model_config.get('resblock_resample', True),
                   num_classes=num_classes, guidance_input=guidance_input,
                   dtype=compute_dtype(model_config))
  if model_config.name == 'mlp':
    return MLPDenoiser(
        num_classes=num_classes,
        hidden=model_config.hidden,
        num_layers=model_config.num_layers,
        dropout=model_config.dropout,
        guidance_input=guidance_input,
        dtype=compute_dtype(model_config))
  raise ValueError(
      f"unknown model.name '{model_config.name}'; choose one of: {', '.join(MODEL_NAMES)}")


def init_params(model: nn.Module, *, rng, x_shape, guidance_input: bool):
  """Initialises a network's parameters, tracing it on a batch of 2.

  lazy_init traces the forward pass on shapes only and runs just the initializers: the same values
  as model.init on a dummy batch, without computing the network.

  Args:
    model: the flax module (build_model).
    rng: the JAX PRNG key of the initializers.
    x_shape: one example's shape, e.g. (H, W, C) or (D,).
    guidance_input: whether the network takes a guidance weight w (as it was built).

  Returns:
    The params tree.
  """
  batch = 2
  z_t = jax.ShapeDtypeStruct((batch, *x_shape), jnp.float32)
  logsnr_t = jax.ShapeDtypeStruct((batch,), jnp.float32)
  label = jax.ShapeDtypeStruct((batch,), jnp.int32)
  guidance_w = jax.ShapeDtypeStruct((batch,), jnp.float32) if guidance_input else None
  variables = model.lazy_init({'params': rng}, z_t, logsnr_t, label, guidance_w, train=False)
  return variables['params']


def count_params(params) -> int:
  """Total number of scalar parameters in a params tree (arrays or shape-only ShapeDtypeStructs)."""
  return parameter_overview.count_parameters(params)
