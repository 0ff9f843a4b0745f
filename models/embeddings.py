"""Sinusoidal, noise-level, label and guidance-weight embeddings that build the conditioning vector."""
import math

import flax.linen as nn
import jax.numpy as jnp

# logsnr is mapped to a "time" in [0, 1] and scaled to the DDPM range [0, 1000].
TIME_SCALE = 1000.
# Guidance weights w in roughly [0, 4] are scaled to the same [0, 1000] range.
GUIDANCE_W_SCALE = 250.


def sinusoidal_embedding(x, *, dim, max_period=10000.):
  """Transformer-style embedding of scalars x [B] -> [B, dim] (sin half, then cos half)."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)  # [half]
  angles = x.astype(jnp.float32)[:, None] * freqs[None, :]  # [B, half]
  emb = jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)  # [B, 2 * half]
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))  # [B, dim]
  return emb


def logsnr_to_time(logsnr):
  """Cosine-schedule time t in [0, 1] with logsnr(t) = -2 log tan(pi t / 2); stable for |logsnr| <= 20."""
  return jnp.arctan(jnp.exp(-0.5 * logsnr)) / (0.5 * jnp.pi)


class NoiseLevelEmbedding(nn.Module):
  """Embeds logsnr_t [B] as sinusoids of 1000 * logsnr_to_time(logsnr_t), then Dense -> SiLU -> Dense."""
  emb_dim: int
  freq_dim: int

  @nn.compact
  def __call__(self, logsnr_t):
    time_t = TIME_SCALE * logsnr_to_time(logsnr_t)  # [B]
    h = sinusoidal_embedding(time_t, dim=self.freq_dim)  # [B, freq_dim]
    h = nn.Dense(self.emb_dim, name='dense_0')(h)
    h = nn.silu(h)
    return nn.Dense(self.emb_dim, name='dense_1')(h)  # [B, emb_dim]


class GuidanceEmbedding(nn.Module):
  """Embeds the guidance weight w [B]; the last layer is zero-initialised so at init it outputs exactly 0."""
  emb_dim: int
  freq_dim: int = 128

  @nn.compact
  def __call__(self, guidance_w):
    h = sinusoidal_embedding(GUIDANCE_W_SCALE * guidance_w, dim=self.freq_dim)  # [B, freq_dim]
    h = nn.Dense(self.emb_dim, name='dense_0')(h)
    h = nn.silu(h)
    return nn.Dense(self.emb_dim, kernel_init=nn.initializers.zeros,
                    bias_init=nn.initializers.zeros, name='dense_1')(h)  # [B, emb_dim]


def conditioning_vector(logsnr_t, label, guidance_w, *, num_classes, emb_dim, freq_dim):
  """Sum of noise-level, label and (if guidance_w is given) guidance embeddings -> [B, emb_dim].

  Must be called from a parent's @nn.compact method: it creates the parent's submodules
  'logsnr_embed', 'label_embed' and, only when guidance_w is not None, 'guidance_embed'.
  Label index num_classes is the null (unconditional) label.
  """
  emb = NoiseLevelEmbedding(emb_dim=emb_dim, freq_dim=freq_dim, name='logsnr_embed')(logsnr_t)
  emb = emb + nn.Embed(num_classes + 1, emb_dim, name='label_embed')(label)
  if guidance_w is not None:
    emb = emb + GuidanceEmbedding(emb_dim=emb_dim, freq_dim=freq_dim, name='guidance_embed')(guidance_w)
  return emb  # [B, emb_dim]
