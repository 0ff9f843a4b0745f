"""The U-Net of the reference progressive-distillation code, conditioned on logsnr, class label and
optionally w.

Architecture of google-research `diffusion_distillation/unet.py` (an Improved-DDPM U-Net), with the
fields of its published configs (`config/cifar_base.py`, `config/imagenet64_base.py`):
  * residual blocks GroupNorm -> SiLU -> [resample] -> Conv3x3 -> GroupNorm * (1 + scale) + shift ->
    SiLU -> Dropout -> Conv3x3 (zero-initialised), where (scale, shift) = Dense(SiLU(emb)) is a FiLM
    of the embedding; the skip is the (resampled) input, through a Dense over channels when the
    channel count changes;
  * multi-head self-attention (num_heads heads, or heads of head_dim channels) with a
    zero-initialised output projection;
  * with resblock_resample, down/upsampling by residual blocks that average-pool / nearest-neighbour
    upsample inside (otherwise a stride-2 conv / nearest-neighbour + conv, as the reference offers
    too);
  * a zero-initialised output conv, so an untrained model outputs exactly 0.

Differences from the reference, kept on purpose:
  * noise-level embedding: this repo's NoiseLevelEmbedding, sinusoids of 1000 * t with t =
    arctan(exp(-logsnr/2)) / (pi/2) (the reference's 'inv_cos' input) through Dense -> SiLU -> Dense
    of the same shapes; its frequencies are exp(-ln(1e4) i / (ch/2)) where the reference divides by
    (ch/2 - 1), and logsnr is not clipped to [-20, 20] (this repo's schedules stay within it);
  * the embedding width is 4 * ch (the reference's emb_ch, 4 * ch in both published configs);
  * label embedding: nn.Embed with num_classes + 1 rows (the last is the null label of
    classifier-free guidance) instead of a Dense on one_hot(label) (num_classes * E weights + E
    bias: the same parameter count); the model is always class-conditional (the published CIFAR-10
    base model is unconditional and has no label embedding);
  * with guidance_input=True an extra w-embedding (the top-level key 'guidance_embed', last layer
    zero) is added;
  * one output of the input's channels (parametrization from diffusion.parametrization), not the
    reference's 2 * C of its 'both' mean type (the published ImageNet 64 model);
  * mixed precision: `dtype` is the compute dtype of convolutions, dense layers and attention
    matmuls; params stay float32, GroupNorm statistics and the softmax are float32, the embeddings
    are float32 and the output is cast to float32 (the reference computes in float32).
"""
from typing import Any, Optional

import flax.linen as nn
import jax.numpy as jnp

from models.checks import denoiser_inputs
from models.embeddings import conditioning_vector

zeros = nn.initializers.zeros


def nearest_neighbour_upsample(x):
  """[B, H, W, C] -> [B, 2H, 2W, C] by repeating every pixel 2x2."""
  return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


def average_pool_downsample(x):
  """[B, H, W, C] -> [B, H/2, W/2, C] by averaging every 2x2 patch."""
  return nn.avg_pool(x, (2, 2), strides=(2, 2))


RESAMPLERS = {'up': nearest_neighbour_upsample, 'down': average_pool_downsample}


class RefResBlock(nn.Module):
  """Residual block with FiLM conditioning (scale, shift) from the embedding; optionally resamples
  by 2."""
  out_ch: int
  num_groups: int
  dropout: float
  resample: Optional[str] = None  # None, 'up' or 'down'
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, emb, *, train):
    norm = lambda name: nn.GroupNorm(num_groups=self.num_groups, dtype=self.dtype, name=name)
    h = nn.silu(norm('norm_0')(x))  # [B, H, W, C_in]
    if self.resample is not None:
      h, x = RESAMPLERS[self.resample](h), RESAMPLERS[self.resample](x)  # [B, H', W', C_in]
    h = nn.Conv(self.out_ch, (3, 3), dtype=self.dtype, name='conv_0')(h)  # [B, H', W', out_ch]
    # [B, 2 * out_ch]
    film = nn.Dense(2 * self.out_ch, dtype=self.dtype, name='emb_proj')(nn.silu(emb))
    scale, shift = jnp.split(film[:, None, None, :], 2, axis=-1)  # [B, 1, 1, out_ch] each
    h = norm('norm_1')(h) * (1 + scale) + shift
    h = nn.Dropout(self.dropout, deterministic=not train)(nn.silu(h))
    h = nn.Conv(self.out_ch, (3, 3), kernel_init=zeros, dtype=self.dtype, name='conv_1')(h)
    if x.shape[-1] != self.out_ch:
      # a 1x1 conv, as the reference's nin_shortcut
      x = nn.Dense(self.out_ch, dtype=self.dtype, name='skip')(x)
    return x + h  # [B, H', W', out_ch]


def attention_heads(channels, *, num_heads, head_dim):
  """(heads, channels per head): head_dim > 0 gives heads of head_dim channels, otherwise num_heads
  heads."""
  heads = channels // head_dim if head_dim > 0 else num_heads
  if heads < 1 or channels % heads:
    raise ValueError(f'RefUNet attention: {channels} channels do not split into heads '
                     f'(num_heads={num_heads}, head_dim={head_dim})')
  return heads, channels // heads


class RefAttnBlock(nn.Module):
  """GroupNorm + multi-head self-attention over the H*W positions, zero-initialised output,
  residual."""
  num_heads: int
  head_dim: int  # > 0 overrides num_heads
  num_groups: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    batch, height, width, channels = x.shape
    heads, head_dim = attention_heads(channels, num_heads=self.num_heads, head_dim=self.head_dim)
    h = nn.GroupNorm(num_groups=self.num_groups, dtype=self.dtype, name='norm')(x)
    h = h.reshape(batch, height * width, channels)  # [B, N, C]
    project = lambda name: nn.DenseGeneral((heads, head_dim), dtype=self.dtype, name=name)
    q, k, v = project('query')(h), project('key')(h), project('value')(h)  # [B, N, heads, d] each
    # [B, heads, N, N]
    logits = jnp.einsum('bqhd,bkhd->bhqk', q, k) / jnp.sqrt(head_dim).astype(q.dtype)
    # softmax in float32
    weights = nn.softmax(logits.astype(jnp.float32), axis=-1).astype(self.dtype)
    out = jnp.einsum('bhqk,bkhd->bqhd', weights, v)  # [B, N, heads, d]
    out = nn.DenseGeneral(channels, axis=(-2, -1), kernel_init=zeros, dtype=self.dtype,
                          name='proj_out')(out)
    return x + out.reshape(batch, height, width, channels)  # [B, H, W, C]


class RefUNet(nn.Module):
  """Reference PD U-Net mapping (z_t [B, H, W, C], logsnr_t [B], label [B], guidance_w [B]?) to [B,
  H, W, C].

  label == num_classes is the null label used for classifier-free guidance. With guidance_input=True
  the only extra parameters are under the top-level key 'guidance_embed'.
  """
  num_classes: int
  ch: int = 64
  ch_mult: tuple[int, ...] = (1, 2)
  num_res_blocks: int = 2
  attn_resolutions: tuple[int, ...] = ()
  dropout: float = 0.0
  num_groups: int = 32  # the reference's GroupNorm default
  num_heads: int = 1
  # > 0: heads of head_dim channels (the published ImageNet 64 config: 64), num_heads ignored
  head_dim: int = 0
  resblock_resample: bool = True  # down/upsample with residual blocks (both published configs)
  guidance_input: bool = False
  dtype: Any = jnp.float32  # compute dtype (see the module docstring)

  @nn.compact
  def __call__(self, z_t, logsnr_t, label, guidance_w=None, *, train: bool):
    logsnr_t, guidance_w = denoiser_inputs(z_t, logsnr_t, label, guidance_w, data_rank=4,
                                           guidance_input=self.guidance_input, model_name='RefUNet')
    self._check_config(z_t.shape)
    emb = conditioning_vector(logsnr_t, label, guidance_w, num_classes=self.num_classes,
                              emb_dim=4 * self.ch, freq_dim=self.ch)  # [B, 4 * ch]
    h = nn.Conv(self.ch, (3, 3), dtype=self.dtype, name='conv_in')(z_t)  # [B, H, W, ch]
    h, skips = self._down_path(h, emb, train=train)
    mid_ch = self.ch * self.ch_mult[-1]
    h = self._res_block(mid_ch, 'mid_res_0')(h, emb, train=train)  # [B, H', W', mid_ch]
    h = self._attn_block('mid_attn')(h)
    h = self._res_block(mid_ch, 'mid_res_1')(h, emb, train=train)
    h = self._up_path(h, skips, emb, train=train)  # [B, H, W, ch * ch_mult[0]]
    h = nn.silu(nn.GroupNorm(num_groups=self.num_groups, dtype=self.dtype, name='norm_out')(h))
    # [B, H, W, C]
    out = nn.Conv(z_t.shape[-1], (3, 3), kernel_init=zeros, dtype=self.dtype, name='conv_out')(h)
    return out.astype(jnp.float32)

  def _check_config(self, z_shape):
    factor = 2**(len(self.ch_mult) - 1)
    height, width = z_shape[1], z_shape[2]
    if height % factor or width % factor:
      raise ValueError(
          f'RefUNet: image size {height}x{width} is not divisible by the downsampling factor '
          f'{factor} (2**(len(ch_mult)-1) with ch_mult={self.ch_mult}); use fewer ch_mult levels')
    for mult in self.ch_mult:
      if (self.ch * mult) % self.num_groups:
        raise ValueError(f'RefUNet: channel count ch*mult = {self.ch * mult} is not divisible by '
                         f'num_groups={self.num_groups}; change ch, ch_mult or num_groups')

  def _res_block(self, out_ch, name, resample=None):
    return RefResBlock(out_ch=out_ch, num_groups=self.num_groups, dropout=self.dropout,
                       resample=resample, dtype=self.dtype, name=name)

  def _attn_block(self, name):
    return RefAttnBlock(num_heads=self.num_heads, head_dim=self.head_dim,
                        num_groups=self.num_groups, dtype=self.dtype, name=name)

  def _down_path(self, h, emb, *, train):
    """Encoder; returns the bottleneck activations and the list of skip activations."""
    skips = [h]
    for level, mult in enumerate(self.ch_mult):
      for block in range(self.num_res_blocks):
        h = self._res_block(self.ch * mult, f'down_{level}_res_{block}')(h, emb, train=train)
        if h.shape[1] in self.attn_resolutions:
          h = self._attn_block(f'down_{level}_attn_{block}')(h)
        skips.append(h)
      if level != len(self.ch_mult) - 1:
        # [B, H/2, W/2, C]
        h = self._downsample(h, emb, name=f'down_{level}_downsample', train=train)
        skips.append(h)
    return h, skips

  def _up_path(self, h, skips, emb, *, train):
    """Decoder; consumes the skip activations (concatenated on channels) in reverse order."""
    for level in reversed(range(len(self.ch_mult))):
      for block in range(self.num_res_blocks + 1):
        h = jnp.concatenate([h, skips.pop()], axis=-1)  # [B, H', W', C_h + C_skip]
        h = self._res_block(self.ch * self.ch_mult[level],
                            f'up_{level}_res_{block}')(h, emb, train=train)
        if h.shape[1] in self.attn_resolutions:
          h = self._attn_block(f'up_{level}_attn_{block}')(h)
      if level != 0:
        h = self._upsample(h, emb, name=f'up_{level}_upsample', train=train)  # [B, 2H, 2W, C]
    return h

  def _downsample(self, h, emb, *, name, train):
    """[B, H, W, C] -> [B, H/2, W/2, C]: a resampling residual block, or a stride-2 3x3 conv."""
    if self.resblock_resample:
      return self._res_block(h.shape[-1], name, resample='down')(h, emb, train=train)
    return nn.Conv(h.shape[-1], (3, 3), strides=(2, 2), dtype=self.dtype, name=name)(h)

  def _upsample(self, h, emb, *, name, train):
    """[B, H, W, C] -> [B, 2H, 2W, C]: a resampling residual block, or nearest-neighbour + 3x3
    conv."""
    if self.resblock_resample:
      return self._res_block(h.shape[-1], name, resample='up')(h, emb, train=train)
    return nn.Conv(h.shape[-1], (3, 3), dtype=self.dtype, name=name)(nearest_neighbour_upsample(h))
