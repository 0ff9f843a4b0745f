"""What diffusers' UNet2DModel computes, in Flax (NHWC), plus this repo's denoiser interface around
it.

`DiffusersUNet.forward(sample, timesteps, class_labels)` is UNet2DModel's forward pass for the
configurations that pixel-space checkpoints use (tests/test_diffusers.py compares it with diffusers
on random weights):
- time embedding 'positional' (sinusoids with flip_sin_to_cos and freq_shift) or 'fourier' (Gaussian
  Fourier features of log t, the output divided by t);
- resnet_time_scale_shift 'default' (the embedding added before the second norm) or 'scale_shift'
  (h * (1 + scale)
  + shift after it);
- down blocks DownBlock2D, AttnDownBlock2D, ResnetDownsampleBlock2D; up blocks UpBlock2D,
  AttnUpBlock2D, ResnetUpsampleBlock2D; mid block UNetMidBlock2D (or none); downsample_type /
  upsample_type 'conv' or 'resnet'; attention_head_dim (None: one head); class embeddings
  (num_class_embeds).
Everything else is refused by `unet_fields` in one line. Parameters are named after the PyTorch
modules (a flax module 'down_blocks.0.resnets.1' holds what the state dict keys
'down_blocks.0.resnets.1.*' hold), so the weights convert by name (models/diffusers_import.py).

`DiffusersUNet(z_t, logsnr_t, label, guidance_w)` is the repo's interface: logsnr_t becomes the
discrete timestep the network was trained at (diffusion.timestep_of_logsnr), label == num_classes is
the null label, guidance_w (a stage-1 or stage-2 student) enters through `add_guidance`, and a
learned-range variance channel is dropped.
"""
import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffusion.schedules import discrete_logsnr_table, timestep_of_logsnr
from models.checks import denoiser_inputs
from models.embeddings import GuidanceEmbedding

DOWN_BLOCKS = ('DownBlock2D', 'AttnDownBlock2D', 'ResnetDownsampleBlock2D')
UP_BLOCKS = ('UpBlock2D', 'AttnUpBlock2D', 'ResnetUpsampleBlock2D')
# UNet2DModel's constructor defaults: a config.json written by an older diffusers may lack newer
# keys.
DEFAULTS = dict(
    sample_size=None, in_channels=3, out_channels=3, center_input_sample=False,
    time_embedding_type='positional', time_embedding_dim=None, freq_shift=0, flip_sin_to_cos=True,
    down_block_types=('DownBlock2D', 'AttnDownBlock2D', 'AttnDownBlock2D', 'AttnDownBlock2D'),
    mid_block_type='UNetMidBlock2D',
    up_block_types=('AttnUpBlock2D', 'AttnUpBlock2D', 'AttnUpBlock2D', 'UpBlock2D'),
    block_out_channels=(224, 448, 672, 896), layers_per_block=2, mid_block_scale_factor=1.0,
    downsample_padding=1, downsample_type='conv', upsample_type='conv', dropout=0.0, act_fn='silu',
    attention_head_dim=8, norm_num_groups=32, attn_norm_num_groups=None, norm_eps=1e-5,
    resnet_time_scale_shift='default', add_attention=True, class_embed_type=None,
    num_class_embeds=None)
# (key, allowed values) of the options with a closed set of supported values.
_CHOICES = (('time_embedding_type', ('positional', 'fourier')),
            ('mid_block_type', ('UNetMidBlock2D', None)), ('downsample_type', ('conv', 'resnet')),
            ('upsample_type', ('conv', 'resnet')), ('act_fn', ('silu', 'swish')),
            ('resnet_time_scale_shift', ('default', 'scale_shift')), ('class_embed_type', (None,)),
            ('downsample_padding', (0, 1)))


def unet_fields(config: dict) -> dict:
  """A UNet2DModel config.json (a dict) -> DiffusersUNet's architecture fields, defaults filled in.

  Raises ValueError naming every unsupported option in one line.
  """
  if config.get('_class_name', 'UNet2DModel') != 'UNet2DModel':
    raise ValueError(
        f"config.json describes a {config['_class_name']}, not a UNet2DModel: only pixel-space "
        'UNet2DModel teachers are supported')
  fields = {key: config.get(key, default) for key, default in DEFAULTS.items()}
  # as diffusers' get_*_block
  strip = lambda name: name[len('UNetRes'):] if name.startswith('UNetRes') else name
  fields['down_block_types'] = tuple(strip(b) for b in fields['down_block_types'])
  fields['up_block_types'] = tuple(strip(b) for b in fields['up_block_types'])
  fields['block_out_channels'] = tuple(fields['block_out_channels'])
  unsupported = [
      f'{key} {fields[key]!r}' for key, allowed in _CHOICES if fields[key] not in allowed
  ]
  unsupported += [f'down block {b}' for b in fields['down_block_types'] if b not in DOWN_BLOCKS]
  unsupported += [f'up block {b}' for b in fields['up_block_types'] if b not in UP_BLOCKS]
  if not isinstance(fields['norm_num_groups'], int):
    unsupported.append(f"norm_num_groups {fields['norm_num_groups']!r}")
  if unsupported:
    raise ValueError(
        f'UNet2DModel options not supported by models/diffusers_unet.py: {", ".join(unsupported)} '
        f'(supported: down blocks {", ".join(DOWN_BLOCKS)}; up blocks {", ".join(UP_BLOCKS)}; '
        "mid block UNetMidBlock2D; 'positional' or 'fourier' time embeddings; silu)")
  levels = len(fields['block_out_channels'])
  if not len(fields['down_block_types']) == len(fields['up_block_types']) == levels:
    raise ValueError(
        f'config.json has {len(fields["down_block_types"])} down blocks, '
        f'{len(fields["up_block_types"])} up blocks and {levels} block_out_channels: '
        'they must agree')
  return fields


def timestep_embedding(timesteps, *, dim: int, flip_sin_to_cos: bool, freq_shift: float,
                       max_period=10000.):
  """diffusers' sinusoidal embedding of (possibly fractional) timesteps [B] -> [B, dim].

  Frequencies exp(-log(max_period) i / (dim / 2 - freq_shift)), i < dim / 2; sin half then cos half,
  swapped when flip_sin_to_cos; a zero column when dim is odd.
  """
  half = dim // 2
  exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
  angles = timesteps.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]  # [B, half]
  sin_cos = ((jnp.cos(angles), jnp.sin(angles)) if flip_sin_to_cos else
             (jnp.sin(angles), jnp.cos(angles)))
  emb = jnp.concatenate(sin_cos, axis=-1)
  return jnp.pad(emb, ((0, 0), (0, dim % 2)))  # [B, dim]


def add_guidance(emb, guidance_w):
  """The one place w enters an imported network: the repo's w-embedding added to the time (+ class)
  embedding.

  Must be called from a parent's @nn.compact method: it creates the top-level submodule
  'guidance_embed' (models.embeddings.GuidanceEmbedding, zero at initialisation, so a student starts
  as its teacher).
  """
  if guidance_w is None:
    return emb
  # [B, emb_dim]
  return emb + GuidanceEmbedding(emb_dim=emb.shape[-1], name='guidance_embed')(guidance_w)


def _upsample(x):
  return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)  # [B, 2H, 2W, C], nearest neighbour


def _downsample(x):
  return nn.avg_pool(x, (2, 2), strides=(2, 2))  # [B, H/2, W/2, C]


class ResnetBlock(nn.Module):
  """diffusers' ResnetBlock2D: norm -> SiLU -> (resample) -> conv -> time conditioning -> norm ->
  SiLU -> conv."""
  out_ch: int
  groups: int
  eps: float
  time_norm: str  # 'default' | 'scale_shift'
  dropout: float = 0.0
  output_scale: float = 1.0
  resample: Optional[str] = None  # 'up' | 'down' | None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, emb, *, train: bool):
    norm = lambda name: nn.GroupNorm(
        self.groups, epsilon=self.eps, use_fast_variance=False, dtype=self.dtype, name=name)
    conv = lambda size, name: nn.Conv(self.out_ch,
                                      (size, size), padding=size // 2, dtype=self.dtype, name=name)
    h = nn.silu(norm('norm1')(x))  # [B, H, W, C_in]
    if self.resample is not None:
      resample = _upsample if self.resample == 'up' else _downsample
      x, h = resample(x), resample(h)
    h = conv(3, 'conv1')(h)  # [B, H', W', out_ch]
    scales = 2 if self.time_norm == 'scale_shift' else 1
    t = nn.Dense(scales * self.out_ch, dtype=self.dtype,
                 name='time_emb_proj')(nn.silu(emb))[:, None, None, :]
    if self.time_norm == 'scale_shift':
      scale, shift = jnp.split(t, 2, axis=-1)
      h = norm('norm2')(h) * (1 + scale) + shift
    else:
      h = norm('norm2')(h + t)
    h = nn.Dropout(self.dropout, deterministic=not train)(nn.silu(h))
    h = conv(3, 'conv2')(h)
    if x.shape[-1] != self.out_ch:
      x = conv(1, 'conv_shortcut')(x)
    return (x + h) / self.output_scale  # [B, H', W', out_ch]


class AttentionBlock(nn.Module):
  """diffusers' spatial self-attention (Attention with _from_deprecated_attn_block): optional
  GroupNorm, heads of head_dim channels, softmax in float32, output projection, residual, divided by
  output_scale."""
  head_dim: int
  groups: Optional[int]  # None: no normalisation (the mid block's under 'scale_shift')
  eps: float
  output_scale: float = 1.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    batch, height, width, channels = x.shape
    heads = channels // self.head_dim
    h = x.reshape(batch, height * width, channels)  # [B, N, C]
    if self.groups is not None:
      h = nn.GroupNorm(self.groups, epsilon=self.eps, use_fast_variance=False, dtype=self.dtype,
                       name='group_norm')(h)
    split = lambda name: nn.Dense(heads * self.head_dim, dtype=self.dtype, name=name)(h).reshape(
        batch, height * width, heads, self.head_dim)  # [B, N, heads, d]
    q, k, v = split('to_q'), split('to_k'), split('to_v')
    # [B, heads, N, N]
    logits = jnp.einsum('bqhd,bkhd->bhqk', q, k) / jnp.sqrt(self.head_dim).astype(q.dtype)
    weights = nn.softmax(logits.astype(jnp.float32), axis=-1).astype(self.dtype)
    out = jnp.einsum('bhqk,bkhd->bqhd', weights, v).reshape(
        batch, height * width, heads * self.head_dim)
    out = nn.Dense(channels, dtype=self.dtype, name='to_out.0')(out)  # [B, N, C]
    return (out.reshape(x.shape) + x) / self.output_scale


class DiffusersUNet(nn.Module):
  """UNet2DModel in Flax (`forward`), and as a denoiser of this repo (`__call__`); fields as in
  config.json.

  num_train_timesteps / beta_schedule / beta_start / beta_end: the scheduler the network was trained
  with (its timesteps are fed from log-SNR). num_classes: the dataset's classes; label num_classes
  is the null label, which is the last class embedding (num_class_embeds = num_classes + 1) or, with
  `uncond` (a two-network teacher: this network conditional, `uncond` the unconditional one, its
  parameters under 'uncond'), the other network.
  """
  sample_size: Optional[int]
  in_channels: int
  out_channels: int
  center_input_sample: bool
  time_embedding_type: str
  time_embedding_dim: Optional[int]
  freq_shift: float
  flip_sin_to_cos: bool
  down_block_types: tuple[str, ...]
  mid_block_type: Optional[str]
  up_block_types: tuple[str, ...]
  block_out_channels: tuple[int, ...]
  layers_per_block: int
  mid_block_scale_factor: float
  downsample_padding: int
  downsample_type: str
  upsample_type: str
  dropout: float
  act_fn: str
  attention_head_dim: Optional[int]
  norm_num_groups: int
  attn_norm_num_groups: Optional[int]
  norm_eps: float
  resnet_time_scale_shift: str
  add_attention: bool
  class_embed_type: Optional[str]
  num_class_embeds: Optional[int]
  num_train_timesteps: int = 1000
  beta_schedule: str = 'linear'
  beta_start: float = 1e-4
  beta_end: float = 0.02
  num_classes: int = 0
  guidance_input: bool = False
  uncond: Optional['DiffusersUNet'] = None
  dtype: Any = jnp.float32

  def __call__(self, z_t, logsnr_t, label, guidance_w=None, *, train: bool):
    """The repo's denoiser interface: z_t [B, H, W, C], logsnr_t [B], label [B], guidance_w [B]? ->
    [B, H, W, C]."""
    logsnr_t, guidance_w = denoiser_inputs(
        z_t, logsnr_t, label, guidance_w, data_rank=4, guidance_input=self.guidance_input,
        model_name='DiffusersUNet')
    timesteps = self.timesteps_of(logsnr_t)  # [B]
    if self.uncond is None:
      out = self.forward(z_t, timesteps, self._class_labels(label), guidance_w, train=train)
    else:
      cond, uncond = self.guided_outputs(z_t, logsnr_t, label, train=train)
      return jnp.where((label == self.num_classes)[:, None, None, None], uncond, cond)
    return out[..., :z_t.shape[-1]].astype(jnp.float32)  # a learned-range variance channel dropped

  def guided_outputs(self, z_t, logsnr_t, label, *, train: bool = False):
    """A two-network teacher's (conditional at label, unconditional) outputs, one call of each
    network."""
    timesteps = self.timesteps_of(jnp.asarray(logsnr_t, jnp.float32))
    channels = z_t.shape[-1]
    cond = self.forward(z_t, timesteps, self._class_labels(label), train=train)[..., :channels]
    uncond = self.uncond.forward(z_t, timesteps, None, train=train)[..., :channels]
    return cond.astype(jnp.float32), uncond.astype(jnp.float32)

  def timesteps_of(self, logsnr_t):
    """logsnr_t [B] -> the network's discrete timesteps [B] in [0, T - 1] (fractional between
    them)."""
    table = discrete_logsnr_table(num_train_timesteps=self.num_train_timesteps,
                                  beta_schedule=self.beta_schedule, beta_start=self.beta_start,
                                  beta_end=self.beta_end)
    return timestep_of_logsnr(logsnr_t, table=table)

  def _class_labels(self, label):
    if self.num_class_embeds is None:
      return None
    # a conditional network of a pair never sees the null row
    return jnp.minimum(label, self.num_class_embeds - 1)

  @nn.compact
  def forward(self, sample, timesteps, class_labels=None, guidance_w=None, *, train: bool = False):
    """UNet2DModel.forward on NHWC: sample [B, H, W, C_in], timesteps [B] -> [B, H, W,
    out_channels]."""
    if self.center_input_sample:
      sample = 2 * sample - 1.0
    emb = self._embedding(timesteps, class_labels, guidance_w)  # [B, time_embed_dim]
    h = self._conv(self.block_out_channels[0], 'conv_in')(sample)
    h, skips = self._down_path(h, emb, train=train)
    if self.mid_block_type is not None:
      h = self._mid_block(h, emb, train=train)
    h = self._up_path(h, skips, emb, train=train)
    h = nn.silu(nn.GroupNorm(self.norm_num_groups, epsilon=self.norm_eps, use_fast_variance=False,
                             dtype=self.dtype, name='conv_norm_out')(h))
    out = self._conv(self.out_channels, 'conv_out')(h).astype(jnp.float32)
    if self.time_embedding_type == 'fourier':
      out = out / timesteps.astype(jnp.float32)[:, None, None, None]
    return out

  def _embedding(self, timesteps, class_labels, guidance_w):
    width = self.block_out_channels[0]
    emb_dim = self.time_embedding_dim or 4 * width
    if self.time_embedding_type == 'fourier':
      # A fixed random projection in PyTorch (requires_grad=False): a parameter here, held by
      # stop_gradient.
      weight = jax.lax.stop_gradient(
          self.param('time_proj.weight', nn.initializers.normal(16.0), (width,)))
      # [B, width]
      angles = jnp.log(timesteps.astype(jnp.float32))[:, None] * weight[None, :] * 2 * jnp.pi
      t_emb = jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)  # [B, 2 * width]
    else:
      t_emb = timestep_embedding(timesteps, dim=width, flip_sin_to_cos=self.flip_sin_to_cos,
                                 freq_shift=self.freq_shift)  # [B, width]
    emb = nn.Dense(emb_dim, dtype=self.dtype, name='time_embedding.linear_1')(t_emb)
    emb = nn.Dense(emb_dim, dtype=self.dtype, name='time_embedding.linear_2')(nn.silu(emb))
    if self.num_class_embeds is not None:
      emb = emb + nn.Embed(self.num_class_embeds, emb_dim, name='class_embedding')(class_labels)
    return add_guidance(emb.astype(jnp.float32), guidance_w)  # [B, emb_dim]

  def _conv(self, features, name, *, strides=1, padding=1):
    return nn.Conv(features, (3, 3), strides=strides, padding=padding, dtype=self.dtype, name=name)

  def _resnet(self, out_ch, name, *, output_scale=1.0, resample=None):
    return ResnetBlock(out_ch=out_ch, groups=self.norm_num_groups, eps=self.norm_eps,
                       time_norm=self.resnet_time_scale_shift, dropout=self.dropout,
                       output_scale=output_scale, resample=resample, dtype=self.dtype, name=name)

  def _attention(self, channels, name, *, groups, output_scale=1.0):
    return AttentionBlock(head_dim=self.attention_head_dim or channels, groups=groups,
                          eps=self.norm_eps, output_scale=output_scale, dtype=self.dtype, name=name)

  def _down_path(self, h, emb, *, train):
    """The down blocks; returns the bottleneck activations and every skip activation, as diffusers
    collects them."""
    skips = [h]
    for i, (block, channels) in enumerate(zip(self.down_block_types, self.block_out_channels)):
      prefix = f'down_blocks.{i}'
      for j in range(self.layers_per_block):
        h = self._resnet(channels, f'{prefix}.resnets.{j}')(h, emb, train=train)
        if block == 'AttnDownBlock2D':
          h = self._attention(channels, f'{prefix}.attentions.{j}', groups=self.norm_num_groups)(h)
        skips.append(h)
      if i == len(self.block_out_channels) - 1:
        continue  # the last level keeps its resolution
      if block == 'ResnetDownsampleBlock2D' or (block == 'AttnDownBlock2D' and
                                                self.downsample_type == 'resnet'):
        h = self._resnet(channels, f'{prefix}.downsamplers.0', resample='down')(h, emb, train=train)
      # PyTorch pads 1 each side (downsample_padding=1), or 0 left/top and 1 right/bottom (padding
      # 0)
      else:
        pad = ((1, 1), (1, 1)) if self.downsample_padding == 1 else ((0, 1), (0, 1))
        h = self._conv(channels, f'{prefix}.downsamplers.0.conv', strides=2, padding=pad)(h)
      skips.append(h)
    return h, skips

  def _mid_block(self, h, emb, *, train):
    channels, scale = self.block_out_channels[-1], self.mid_block_scale_factor
    groups = self.attn_norm_num_groups
    if groups is None and self.resnet_time_scale_shift == 'default':
      # diffusers' default: a norm in the mid attention only under 'default'
      groups = self.norm_num_groups
    h = self._resnet(channels, 'mid_block.resnets.0', output_scale=scale)(h, emb, train=train)
    if self.add_attention:
      h = self._attention(channels, 'mid_block.attentions.0', groups=groups, output_scale=scale)(h)
    return self._resnet(channels, 'mid_block.resnets.1', output_scale=scale)(h, emb, train=train)

  def _up_path(self, h, skips, emb, *, train):
    """The up blocks: layers_per_block + 1 resnets each, every one on the activations concatenated
    with a skip."""
    for i, block in enumerate(self.up_block_types):
      channels, prefix = self.block_out_channels[-1 - i], f'up_blocks.{i}'
      for j in range(self.layers_per_block + 1):
        h = jnp.concatenate([h, skips.pop()], axis=-1)  # [B, H', W', C_h + C_skip]
        h = self._resnet(channels, f'{prefix}.resnets.{j}')(h, emb, train=train)
        if block == 'AttnUpBlock2D':
          h = self._attention(channels, f'{prefix}.attentions.{j}', groups=self.norm_num_groups)(h)
      if i == len(self.block_out_channels) - 1:
        continue
      if block == 'ResnetUpsampleBlock2D' or (block == 'AttnUpBlock2D' and
                                              self.upsample_type == 'resnet'):
        h = self._resnet(channels, f'{prefix}.upsamplers.0', resample='up')(h, emb, train=train)
      else:
        h = self._conv(channels, f'{prefix}.upsamplers.0.conv')(_upsample(h))
    return h
