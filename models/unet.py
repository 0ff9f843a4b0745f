"""DDPM / progressive-distillation style U-Net conditioned on logsnr, class label and optionally w.

Mixed precision: `dtype` is the compute dtype of convolutions, dense layers and attention matmuls
(bfloat16 on TPUs and recent GPUs); parameters stay float32, GroupNorm statistics and the softmax
are computed in float32, the embeddings of logsnr, label and w are float32, and the output is
float32 for the diffusion math and loss.
"""
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from models.checks import denoiser_inputs
from models.embeddings import GUIDANCE_W_SCALE, conditioning_and_gains


class ResBlock(nn.Module):
  """GroupNorm -> SiLU -> Conv -> +Dense(emb) -> GroupNorm -> SiLU -> Dropout -> Conv, plus a
  skip."""
  out_ch: int
  num_groups: int
  dropout: float
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, emb, *, train, gain=None):
    """gain [B, out_ch] (optional): multiplies the second normalised activations
    (GuidanceEmbedding.gains)."""
    norm = lambda name: nn.GroupNorm(num_groups=self.num_groups, dtype=self.dtype, name=name)
    conv = lambda features, size, name: nn.Conv(features, size, dtype=self.dtype, name=name)
    h = nn.silu(norm('norm_0')(x))  # [B, H, W, C_in]
    h = conv(self.out_ch, (3, 3), 'conv_0')(h)  # [B, H, W, out_ch]
    h = h + nn.Dense(self.out_ch, dtype=self.dtype, name='emb_proj')(nn.silu(emb))[:, None, None, :]
    h = norm('norm_1')(h)
    if gain is not None:
      h = h * gain[:, None, None, :].astype(h.dtype)
    h = nn.silu(h)
    h = nn.Dropout(self.dropout, deterministic=not train)(h)
    h = conv(self.out_ch, (3, 3), 'conv_1')(h)
    if x.shape[-1] != self.out_ch:
      x = conv(self.out_ch, (1, 1), 'skip')(x)
    return x + h  # [B, H, W, out_ch]


class AttnBlock(nn.Module):
  """GroupNorm + multi-head self-attention over the H*W positions, with a residual connection."""
  num_heads: int
  num_groups: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    batch, height, width, channels = x.shape
    if channels % self.num_heads:
      raise ValueError(
          f'AttnBlock: channels {channels} not divisible by num_heads {self.num_heads}')
    head_dim = channels // self.num_heads
    dense = lambda name: nn.Dense(channels, dtype=self.dtype, name=name)
    h = nn.GroupNorm(num_groups=self.num_groups, dtype=self.dtype, name='norm')(x)
    h = h.reshape(batch, height * width, channels)  # [B, N, C]
    qkv_shape = (batch, height * width, self.num_heads, head_dim)
    q = dense('query')(h).reshape(qkv_shape)  # [B, N, heads, d]
    k = dense('key')(h).reshape(qkv_shape)
    v = dense('value')(h).reshape(qkv_shape)
    # [B, heads, N, N]
    logits = jnp.einsum('bqhd,bkhd->bhqk', q, k) / jnp.sqrt(head_dim).astype(q.dtype)
    # softmax in float32
    weights = nn.softmax(logits.astype(jnp.float32), axis=-1).astype(self.dtype)
    # [B, N, C]
    out = jnp.einsum('bhqk,bkhd->bqhd', weights, v).reshape(batch, height * width, channels)
    out = dense('proj_out')(out)
    return x + out.reshape(batch, height, width, channels)


class Downsample(nn.Module):
  """Halves H and W with a stride-2 3x3 convolution."""
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    # [B, H/2, W/2, C]
    return nn.Conv(x.shape[-1], (3, 3), strides=(2, 2), dtype=self.dtype, name='conv')(x)


class Upsample(nn.Module):
  """Doubles H and W by nearest-neighbour repetition followed by a 3x3 convolution."""
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)  # [B, 2H, 2W, C]
    return nn.Conv(x.shape[-1], (3, 3), dtype=self.dtype, name='conv')(x)


class UNet(nn.Module):
  """U-Net mapping (z_t [B, H, W, C], logsnr_t [B], label [B], guidance_w [B]?) to an output like
  z_t.

  label == num_classes is the null label used for classifier-free guidance. With guidance_input=True
  the only extra parameters are under the top-level key 'guidance_embed'; with guidance_gains too, w
  also scales every residual block's normalised activations channel by channel
  (GuidanceEmbedding.gains); with guidance_output, the output gains a term linear in w
  (GuidanceEmbedding.guidance_term); with guidance_context, the w-embedding and gains also see the
  noise level and label (GuidanceEmbedding.use_context).
  """
  num_classes: int
  ch: int = 64
  ch_mult: tuple[int, ...] = (1, 2)
  num_res_blocks: int = 2
  attn_resolutions: tuple[int, ...] = ()
  dropout: float = 0.0
  num_groups: int = 8
  guidance_input: bool = False
  guidance_gains: bool = False
  guidance_output: bool = False
  guidance_context: bool = False
  guidance_w_scale: float = GUIDANCE_W_SCALE
  num_heads: int = 1
  dtype: Any = jnp.float32  # compute dtype (see the module docstring)

  @nn.compact
  def __call__(self, z_t, logsnr_t, label, guidance_w=None, *, train: bool):
    logsnr_t, guidance_w = denoiser_inputs(z_t, logsnr_t, label, guidance_w, data_rank=4,
                                           guidance_input=self.guidance_input, model_name='UNet')
    self._check_config(z_t.shape)
    blocks = self._res_block_channels()
    emb, gains, guidance = conditioning_and_gains(
        logsnr_t, label, guidance_w, num_classes=self.num_classes, emb_dim=4 * self.ch,
        freq_dim=self.ch, gain_channels=tuple(blocks.values()) if self.guidance_gains else (),
        output_channels=z_t.shape[-1] if self.guidance_output else 0, w_scale=self.guidance_w_scale,
        guidance_context=self.guidance_context)
    gains = dict(zip(blocks, gains))  # block name -> [B, C], empty without guidance gains
    h = nn.Conv(self.ch, (3, 3), dtype=self.dtype, name='conv_in')(z_t)  # [B, H, W, ch]
    h, skips = self._down_path(h, emb, gains, train=train)
    h = self._res_block(blocks['mid_res_0'], 'mid_res_0')(
        h, emb, train=train, gain=gains.get('mid_res_0'))
    h = self._attn_block('mid_attn')(h)
    h = self._res_block(blocks['mid_res_1'], 'mid_res_1')(
        h, emb, train=train, gain=gains.get('mid_res_1'))
    h = self._up_path(h, skips, emb, gains, train=train)
    h = nn.silu(nn.GroupNorm(num_groups=self.num_groups, dtype=self.dtype, name='norm_out')(h))
    out = nn.Conv(z_t.shape[-1], (3, 3), dtype=self.dtype, name='conv_out')(h)  # [B, H, W, C]
    if guidance is not None and self.guidance_output:
      out = out + guidance.guidance_term(h, guidance_w).astype(out.dtype)  # a + w b
    return out.astype(jnp.float32)

  def _check_config(self, z_shape):
    factor = 2**(len(self.ch_mult) - 1)
    height, width = z_shape[1], z_shape[2]
    if height % factor or width % factor:
      raise ValueError(
          f'UNet: image size {height}x{width} is not divisible by the downsampling factor {factor} '
          f'(2**(len(ch_mult)-1) with ch_mult={self.ch_mult}); use fewer ch_mult '
          f'levels or pad/resize the images to a multiple of {factor}')
    for mult in self.ch_mult:
      if (self.ch * mult) % self.num_groups:
        raise ValueError(f'UNet: channel count ch*mult = {self.ch * mult} is not divisible by '
                         f'num_groups={self.num_groups}; change ch, ch_mult or num_groups')

  def _res_block(self, out_ch, name):
    return ResBlock(out_ch=out_ch, num_groups=self.num_groups, dropout=self.dropout,
                    dtype=self.dtype, name=name)

  def _attn_block(self, name):
    return AttnBlock(
        num_heads=self.num_heads, num_groups=self.num_groups, dtype=self.dtype, name=name)

  def _res_block_channels(self) -> dict:
    """{name: output channels} of every residual block, in the order the forward pass calls them."""
    blocks = {}
    for level, mult in enumerate(self.ch_mult):
      blocks.update({f'down_{level}_res_{b}': self.ch * mult for b in range(self.num_res_blocks)})
    blocks.update({'mid_res_0': self.ch * self.ch_mult[-1],
                   'mid_res_1': self.ch * self.ch_mult[-1]})
    for level in reversed(range(len(self.ch_mult))):
      blocks.update({
          f'up_{level}_res_{b}': self.ch * self.ch_mult[level]
          for b in range(self.num_res_blocks + 1)
      })
    return blocks

  def _down_path(self, h, emb, gains, *, train):
    """Encoder; returns the bottleneck activations and the list of skip activations."""
    skips = [h]
    for level, mult in enumerate(self.ch_mult):
      for block in range(self.num_res_blocks):
        name = f'down_{level}_res_{block}'
        h = self._res_block(self.ch * mult, name)(h, emb, train=train, gain=gains.get(name))
        if h.shape[1] in self.attn_resolutions:
          h = self._attn_block(f'down_{level}_attn_{block}')(h)
        skips.append(h)
      if level != len(self.ch_mult) - 1:
        h = Downsample(dtype=self.dtype, name=f'down_{level}_downsample')(h)
        skips.append(h)
    return h, skips

  def _up_path(self, h, skips, emb, gains, *, train):
    """Decoder; consumes the skip activations (concatenated on channels) in reverse order."""
    for level in reversed(range(len(self.ch_mult))):
      for block in range(self.num_res_blocks + 1):
        h = jnp.concatenate([h, skips.pop()], axis=-1)  # [B, H', W', C_h + C_skip]
        name = f'up_{level}_res_{block}'
        h = self._res_block(self.ch * self.ch_mult[level], name)(
            h, emb, train=train, gain=gains.get(name))
        if h.shape[1] in self.attn_resolutions:
          h = self._attn_block(f'up_{level}_attn_{block}')(h)
      if level != 0:
        h = Upsample(dtype=self.dtype, name=f'up_{level}_upsample')(h)
    return h
