"""Mixed precision (model.dtype = 'bfloat16'): float32 params and outputs, bf16 compute, close to
float32."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import randomise_zero_leaves, tiny_config
from diffusion import get_logsnr_schedule
from distill import stages
from models import init_params
from models.denoiser import make_denoise_fn
from models.unet import UNet
from samplers import SAMPLERS, make_sampler
from train import writers

IMAGE_SHAPE = (8, 8, 1)


def _unet(dtype, **overrides):
  kwargs = dict(num_classes=3, ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,),
                num_groups=4, guidance_input=True, dtype=dtype)
  return UNet(**{**kwargs, **overrides})


def _inputs(batch=8):
  keys = jax.random.split(jax.random.key(0), 2)
  z_t = jax.random.normal(keys[0], (batch, *IMAGE_SHAPE))  # [B, H, W, C]
  logsnr_t = jax.random.uniform(keys[1], (batch,), minval=-10., maxval=10.)  # [B]
  label = jnp.arange(batch, dtype=jnp.int32) % 3  # [B]
  return z_t, logsnr_t, label, jnp.full((batch,), 2.0)


def _trained_like_params(model):
  """Init params with the zero-initialised layers given random values, so every path carries
  signal."""
  return randomise_zero_leaves(
      init_params(model, rng=jax.random.key(1), x_shape=IMAGE_SHAPE, guidance_input=True), seed=2)


def test_bf16_forward_is_within_2_percent_of_float32_on_the_same_params():
  params = _trained_like_params(_unet(jnp.float32))
  apply = lambda dtype: jax.jit(
      lambda p, *args: _unet(dtype).apply({'params': p}, *args, train=False))
  out32 = apply(jnp.float32)(params, *_inputs())
  out16 = apply(jnp.bfloat16)(params, *_inputs())
  # diffusion math and loss stay float32
  assert out16.dtype == jnp.float32 and out32.dtype == jnp.float32
  assert jax.tree.all(jax.tree.map(lambda x: x.dtype == jnp.float32, params))
  error = float(
      jnp.sqrt(jnp.mean(jnp.square(out16 - out32))) / jnp.sqrt(jnp.mean(jnp.square(out32))))
  # bf16 really computes (not 0) and stays close (a 3-significant-digit type)
  assert 1e-5 < error < 0.02, error


@pytest.mark.parametrize('sampler', SAMPLERS)
def test_every_sampler_runs_in_bf16(sampler):
  # one level without attention: the sampler's loop is under test, the network's bf16 paths are the
  # forward test's
  model = _unet(jnp.bfloat16, ch_mult=(1,), attn_resolutions=())
  params = _trained_like_params(model)
  denoise_fn = make_denoise_fn(model, parametrization='v', kind='w_input', num_classes=3)
  logsnr_fn = get_logsnr_schedule('cosine', logsnr_min=-20.0, logsnr_max=20.0)
  run = make_sampler(sampler, denoise_fn, num_steps=4, logsnr_fn=logsnr_fn)
  z_init, _, label, _ = _inputs()
  x = run(params, z_init, label, jnp.float32(1.0), jax.random.key(3))
  assert x.dtype == jnp.float32 and x.shape == z_init.shape and bool(jnp.all(jnp.isfinite(x)))


def test_bf16_training_is_finite_learns_and_its_checkpoints_load_under_float32(tmp_path):
  config = tiny_config(tmp_path, train=80, stage1=10)
  config.model.dtype = 'bfloat16'
  config.train.update(log_every=10, checkpoint_every=40)
  stages.train_teacher(config)
  losses = [
      row['loss']
      for row in writers.read_jsonl(str(tmp_path / 'logs' / 'teacher' / writers.JSONL_NAME))
      if 'loss' in row
  ]
  assert len(losses) == 8 and np.all(np.isfinite(losses)), losses
  assert np.mean(losses[-2:]) < 0.8 * np.mean(losses[:2]), losses
  config.model.dtype = 'float32'  # the same checkpoint, another compute dtype
  _, params, _ = stages.load_stage_params(config, 'teacher')
  assert jax.tree.all(jax.tree.map(lambda x: x.dtype == jnp.float32, params))
  stages.train_stage1(config)  # distils from the bf16-trained teacher under float32
