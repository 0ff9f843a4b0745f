"""Residual MLP denoiser for vector data (2-D toy sets), conditioned like the U-Net."""
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from models.checks import denoiser_inputs
from models.embeddings import conditioning_vector


class ResidualMLPBlock(nn.Module):
  """h + Dense(Dropout(SiLU(Dense(SiLU(LayerNorm(h))) + Dense(SiLU(emb)))))."""
  hidden: int
  dropout: float
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, h, emb, *, train):
    dense = lambda name: nn.Dense(self.hidden, dtype=self.dtype, name=name)
    y = nn.silu(nn.LayerNorm(dtype=self.dtype, name='norm')(h))  # [B, hidden]
    y = dense('dense_0')(y)
    y = y + dense('emb_proj')(nn.silu(emb))
    y = nn.silu(y)
    y = nn.Dropout(self.dropout, deterministic=not train)(y)
    return h + dense('dense_1')(y)  # [B, hidden]


class MLPDenoiser(nn.Module):
  """Maps (z_t [B, D], logsnr_t [B], label [B], guidance_w [B]?) to an output [B, D].

  label == num_classes is the null label. With guidance_input=True the only extra parameters are
  under the top-level key 'guidance_embed'.
  """
  num_classes: int
  hidden: int = 128
  num_layers: int = 3
  dropout: float = 0.0
  guidance_input: bool = False
  # compute dtype of the dense layers; parameters, embeddings and output stay float32
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, z_t, logsnr_t, label, guidance_w=None, *, train: bool):
    logsnr_t, guidance_w = denoiser_inputs(
        z_t, logsnr_t, label, guidance_w, data_rank=2, guidance_input=self.guidance_input,
        model_name='MLPDenoiser')
    emb = conditioning_vector(logsnr_t, label, guidance_w, num_classes=self.num_classes,
                              emb_dim=self.hidden, freq_dim=self.hidden)  # [B, hidden]
    h = nn.Dense(self.hidden, dtype=self.dtype, name='dense_in')(z_t)  # [B, hidden]
    for layer in range(self.num_layers):
      h = ResidualMLPBlock(hidden=self.hidden, dropout=self.dropout, dtype=self.dtype,
                           name=f'block_{layer}')(h, emb, train=train)
    h = nn.silu(nn.LayerNorm(dtype=self.dtype, name='norm_out')(h))
    # [B, D]
    return nn.Dense(z_t.shape[-1], dtype=self.dtype, name='dense_out')(h).astype(jnp.float32)
