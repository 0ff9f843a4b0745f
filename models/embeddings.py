"""Sinusoidal, noise-level, label and guidance-weight embeddings that build the conditioning
vector."""
import math

import flax.linen as nn
import jax.numpy as jnp

# logsnr is mapped to a "time" in [0, 1] and scaled to the DDPM range [0, 1000].
TIME_SCALE = 1000.
# Guidance weights w in roughly [0, 4] are scaled to the same [0, 1000] range.
GUIDANCE_W_SCALE = 250.
# The UNet students' options for how w enters (config.distill fields of these names, model fields of
# the record).
GUIDANCE_OPTIONS = ('guidance_gains', 'guidance_output', 'guidance_context')


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
  """Cosine-schedule time t in [0, 1] with logsnr(t) = -2 log tan(pi t / 2); stable for |logsnr| <=
  20."""
  return jnp.arctan(jnp.exp(-0.5 * logsnr)) / (0.5 * jnp.pi)


class NoiseLevelEmbedding(nn.Module):
  """Embeds logsnr_t [B] as sinusoids of 1000 * logsnr_to_time(logsnr_t), then Dense -> SiLU ->
  Dense."""
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
  """Embeds the guidance weight w [B]; the last layer is zero-initialised so at init it outputs
  exactly 0.

  With gain_channels (one entry per residual block), `gains` also maps w to per-channel gains of
  those blocks' normalised activations, 1 at initialisation: guidance scales the class-dependent
  part of the prediction with w, and an additive embedding alone reaches a product with the features
  only through later nonlinearities.
  """
  emb_dim: int
  freq_dim: int = 128
  gain_channels: tuple[int, ...] = ()
  output_channels: int = 0
  w_scale: float = GUIDANCE_W_SCALE  # sinusoids of w_scale * w
  # The hidden layer also sees the conditioning vector (noise level + label): the embedding and the
  # gains can then differ by class and noise level, as the guidance term (1 + w) x_cond - w x_uncond
  # does.
  use_context: bool = False

  def setup(self):
    self.dense_0 = nn.Dense(self.emb_dim)
    if self.use_context:
      self.dense_context = nn.Dense(self.emb_dim)
    self.dense_1 = nn.Dense(self.emb_dim, kernel_init=nn.initializers.zeros,
                            bias_init=nn.initializers.zeros)
    self.gain = [nn.Dense(channels, kernel_init=nn.initializers.zeros,
                          bias_init=nn.initializers.zeros) for channels in self.gain_channels]
    if self.output_channels:
      self.output = nn.Conv(self.output_channels, (3, 3), kernel_init=nn.initializers.zeros,
                            bias_init=nn.initializers.zeros)

  def _hidden(self, guidance_w, context):
    # [B, emb_dim]
    h = self.dense_0(sinusoidal_embedding(self.w_scale * guidance_w, dim=self.freq_dim))
    if self.use_context:
      h = h + self.dense_context(nn.silu(context))
    return nn.silu(h)  # [B, emb_dim]

  def __call__(self, guidance_w, context=None):
    """The embedding [B, emb_dim] of w (and of context [B, emb_dim], the conditioning vector, if
    use_context)."""
    return self.dense_1(self._hidden(guidance_w, context))  # [B, emb_dim]

  def gains(self, guidance_w, context=None) -> tuple:
    """One [B, channels] gain per entry of gain_channels, each exactly 1 at initialisation."""
    hidden = self._hidden(guidance_w, context)
    return tuple(1.0 + layer(hidden) for layer in self.gain)

  def guidance_term(self, features, guidance_w):
    """w * b(features) [B, H, W, output_channels]: the part of the output that is linear in w (zero
    at initialisation). The guided teacher's prediction is exactly linear in w, (1 + w) x_cond - w
    x_uncond; this term lets the student represent it as a + w b instead of learning the scaling
    through the embedding."""
    return guidance_w[:, None, None, None] * self.output(features)

  def everything(self, guidance_w, features=None, context=None):
    """(embedding, gains, guidance term or None): touches every parameter (what init must call)."""
    term = self.guidance_term(features, guidance_w) if self.output_channels else None
    return self(guidance_w, context), self.gains(guidance_w, context), term


def conditioning_and_gains(logsnr_t, label, guidance_w, *, num_classes, emb_dim, freq_dim,
                           gain_channels=(), output_channels=0, w_scale=GUIDANCE_W_SCALE,
                           guidance_context=False):
  """(conditioning vector [B, emb_dim], per-block gains, guidance module): conditioning_vector's
  sum, and when guidance_w is given and gain_channels is not empty, GuidanceEmbedding.gains (an
  empty tuple otherwise); the GuidanceEmbedding (None without guidance_w), whose guidance_term the
  network adds to its output when output_channels is set.

  Must be called from a parent's @nn.compact method: it creates the parent's submodules
  'logsnr_embed', 'label_embed' and, only when guidance_w is not None, 'guidance_embed'.
  Label index num_classes is the null (unconditional) label.
  """
  emb = NoiseLevelEmbedding(emb_dim=emb_dim, freq_dim=freq_dim, name='logsnr_embed')(logsnr_t)
  emb = emb + nn.Embed(num_classes + 1, emb_dim, name='label_embed')(label)
  if guidance_w is None:
    return emb, (), None
  embed = GuidanceEmbedding(emb_dim=emb_dim, freq_dim=freq_dim, gain_channels=tuple(gain_channels),
                            output_channels=output_channels, w_scale=w_scale,
                            use_context=guidance_context, name='guidance_embed')
  context = emb if guidance_context else None
  # [B, emb_dim], ([B, C_i], ...)
  return emb + embed(guidance_w, context), embed.gains(guidance_w, context), embed


def conditioning_vector(logsnr_t, label, guidance_w, *, num_classes, emb_dim, freq_dim):
  """Sum of noise-level, label and (if guidance_w is given) guidance embeddings -> [B, emb_dim].

  Must be called from a parent's @nn.compact method (see conditioning_and_gains).
  """
  return conditioning_and_gains(logsnr_t, label, guidance_w, num_classes=num_classes,
                                emb_dim=emb_dim, freq_dim=freq_dim)[0]
