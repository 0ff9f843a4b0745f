"""Fast tests for models/ref_unet.py: the paper-scale parameter counts equal the reference
network's, shapes, the zero-initialised layers and w path, bf16 against float32, the config checks
(seconds; shapes only at scale)."""
import functools
import importlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from conftest import randomise_zero_leaves
from distill import stages
from train import records
from models import build_model, count_params, init_params
from models.embeddings import GuidanceEmbedding
from models.ref_unet import RefUNet
from modes.validation import ConfigError, validate_config

NUM_CLASSES = 3
BATCH = 4
IMAGE_SHAPE = (8, 8, 3)


def tiny_ref_unet(**overrides):
  kwargs = dict(num_classes=NUM_CLASSES, ch=16, ch_mult=(1, 2), num_res_blocks=1,
                attn_resolutions=(4,), num_groups=4, head_dim=8)  # 2 heads at 16 channels, 4 at 32
  return RefUNet(**{**kwargs, **overrides})


def dummy_inputs(*, guidance_w=None, seed=0):
  keys = jax.random.split(jax.random.key(seed), 2)
  z_t = jax.random.normal(keys[0], (BATCH, *IMAGE_SHAPE))  # [B, H, W, C]
  logsnr_t = jax.random.uniform(keys[1], (BATCH,), minval=-20., maxval=20.)  # [B]
  label = jnp.arange(BATCH, dtype=jnp.int32) % (NUM_CLASSES + 1)  # [B], includes the null label
  w = None if guidance_w is None else jnp.full((BATCH,), guidance_w, jnp.float32)
  return z_t, logsnr_t, label, w


@functools.lru_cache(maxsize=None)
def tiny_params(*, guidance_input, resblock_resample=True):
  """Init params of tiny_ref_unet, made once per variant (initialising is the slow part of these
  tests)."""
  model = tiny_ref_unet(guidance_input=guidance_input, resblock_resample=resblock_resample)
  return init_params(model, rng=jax.random.key(0), x_shape=IMAGE_SHAPE,
                     guidance_input=guidance_input)


def forward(model, params, inputs, *, train=False, rngs=None):
  """model.apply jitted: one compile of the whole network, faster here than op-by-op dispatch."""
  return jax.jit(lambda p, x, rng: model.apply({'params': p}, *x, train=train, rngs=rng))(
      params, inputs, rngs)


# ------------------------------------------------- the reference network's parameter count, derived
# by hand


def reference_unet_param_count(*, ch, emb_ch, ch_mult, num_res_blocks, attn_resolutions,
                               resblock_resample, num_classes, image_size, in_ch, out_ch):
  """Sums the parameter shapes of google-research diffusion_distillation/unet.py's UNet, layer by
  layer."""
  dense = lambda n_in, n_out: n_in * n_out + n_out  # nn.Dense / DenseGeneral: kernel + bias
  conv3 = lambda c_in, c_out: 9 * c_in * c_out + c_out  # 3x3 nn.Conv: kernel + bias
  norm = lambda c: 2 * c  # GroupNorm: scale + bias

  def resnet_block(c_in, c_out):
    # norm1(C_in), conv1 3x3, temb_proj Dense(emb_ch -> 2 * out_ch) giving (scale, shift),
    # norm2(out_ch), conv2 3x3; nin_shortcut Dense(C_in -> out_ch) only when C_in != out_ch.
    # Resampling adds no parameters.
    shortcut = dense(c_in, c_out) if c_in != c_out else 0
    return (norm(c_in) + conv3(c_in, c_out) + dense(emb_ch, 2 * c_out) + norm(c_out) +
            conv3(c_out, c_out) + shortcut)

  def attn_block(c):
    # norm; q, k, v DenseGeneral(C -> heads x head_dim = C); proj_out DenseGeneral(heads x head_dim
    # -> C). The head split only reshapes these kernels: the count does not depend on it.
    return norm(c) + 4 * dense(c, c)

  resample = (lambda c: resnet_block(c, c)) if resblock_resample else (lambda c: conv3(c, c))
  # dense0, dense1 on the ch-wide sinusoidal logsnr embedding
  total = dense(ch, emb_ch) + dense(emb_ch, emb_ch)
  # class_emb on one_hot(y), class-conditional only
  total += dense(num_classes, emb_ch) if num_classes > 1 else 0
  total += conv3(in_ch, ch)  # conv_in
  skip_chs, c, res = [ch], ch, image_size
  for level, mult in enumerate(ch_mult):  # down_{level}.block_{i}, .attn_{i}, .downsample
    for _ in range(num_res_blocks):
      total += (resnet_block(c, ch * mult) +
                (attn_block(ch * mult) if res in attn_resolutions else 0))
      c = ch * mult
      skip_chs.append(c)
    if level != len(ch_mult) - 1:
      total += resample(c)
      skip_chs.append(c)
      res //= 2
  total += 2 * resnet_block(c, c) + attn_block(c)  # mid.block_1, mid.attn_1, mid.block_2
  # up_{level}.block_{i} on [h, skip] concatenated, .upsample
  for level in reversed(range(len(ch_mult))):
    for _ in range(num_res_blocks + 1):
      total += resnet_block(c + skip_chs.pop(), ch * ch_mult[level])
      c = ch * ch_mult[level]
      total += attn_block(c) if res in attn_resolutions else 0
    if level != 0:
      total += resample(c)
      res *= 2
  return total + norm(c) + conv3(c, out_ch)  # norm_out, conv_out


# The published architectures (config/cifar_base.py, config/imagenet64_base.py).
REFERENCE_CIFAR10 = dict(ch=256, emb_ch=1024, ch_mult=(1, 1, 1), num_res_blocks=3,
                         attn_resolutions=(8, 16), resblock_resample=True, image_size=32, in_ch=3)
REFERENCE_IMAGENET64 = dict(
    ch=192, emb_ch=768, ch_mult=(1, 2, 3, 4), num_res_blocks=3, attn_resolutions=(8, 16, 32),
    resblock_resample=True, image_size=64, in_ch=3)


def paper_scale_params(config_name):
  config = importlib.import_module(f'configs.{config_name}').get_config()
  _, abstract = records.build(records.make(config, stage='teacher'))  # jax.eval_shape
  return config, abstract


def test_cifar10_teacher_has_the_reference_parameter_count():
  config, abstract = paper_scale_params('cifar10_teacher')
  assert config.model.name == 'ref_unet'
  # The guided teacher is class-conditional: the reference network with its class_emb for CIFAR-10's
  # 10 classes (Dense(10 -> 1024) = our 11-row label embedding, the 11th the null label) and the
  # published x output (3).
  reference = reference_unet_param_count(**REFERENCE_CIFAR10, num_classes=10, out_ch=3)
  assert count_params(abstract) == reference == 60_015_363
  # The published base model itself is unconditional (num_classes=1): no class embedding.
  assert (reference -
          reference_unet_param_count(**REFERENCE_CIFAR10, num_classes=1, out_ch=3) == 11 * 1024)
  assert abstract['mid_attn']['query']['kernel'].shape == (256, 1, 256)  # num_heads=1


def test_imagenet64_teacher_has_the_reference_parameter_count():
  config, abstract = paper_scale_params('imagenet64_teacher')
  assert config.model.name == 'ref_unet'
  # One v output of 3 channels; the published 'both' mean type has out_ch = 6 (x and eps), 9 * 192 *
  # 3 + 3 more parameters in conv_out.
  reference = reference_unet_param_count(**REFERENCE_IMAGENET64, num_classes=1000, out_ch=3)
  assert count_params(abstract) == reference == 295_900_035
  published = reference_unet_param_count(**REFERENCE_IMAGENET64, num_classes=1000, out_ch=6)
  assert published - reference == 9 * 192 * 3 + 3
  # head_dim=64: 12 heads of 64
  assert abstract['mid_attn']['query']['kernel'].shape == (768, 12, 64)
  assert abstract['down_1_attn_0']['query']['kernel'].shape == (384, 6, 64)  # 32x32: 6 heads of 64
  assert 'down_0_attn_0' not in abstract  # none at 64x64


@pytest.mark.parametrize('resblock_resample', [True, False])
def test_tiny_param_count_matches_the_reference_bookkeeping(resblock_resample):
  model = tiny_ref_unet(resblock_resample=resblock_resample)
  abstract = jax.eval_shape(lambda: init_params(model, rng=jax.random.key(0), x_shape=IMAGE_SHAPE,
                                                guidance_input=False))
  expected = reference_unet_param_count(ch=16, emb_ch=64, ch_mult=(1, 2), num_res_blocks=1,
                                        attn_resolutions=(4,), resblock_resample=resblock_resample,
                                        num_classes=NUM_CLASSES, image_size=8, in_ch=3, out_ch=3)
  assert count_params(abstract) == expected


# ------------------------------------------------------------------------------ forward, init,
# precision


@pytest.mark.parametrize('resblock_resample', [True, False])
@pytest.mark.parametrize('guidance_input', [False, True])
def test_output_shape_and_dtype(guidance_input, resblock_resample):
  model = tiny_ref_unet(guidance_input=guidance_input, resblock_resample=resblock_resample)
  params = tiny_params(guidance_input=guidance_input, resblock_resample=resblock_resample)
  inputs = dummy_inputs(guidance_w=1.5 if guidance_input else None)
  out = forward(model, params, inputs, train=True, rngs={'dropout': jax.random.key(1)})
  assert out.shape == (BATCH, *IMAGE_SHAPE) and out.dtype == jnp.float32
  assert bool(jnp.all(jnp.isfinite(out)))


def test_zero_initialised_layers_are_zero_at_init():
  params = tiny_params(guidance_input=True)
  blocks = [name for name in params if '_res_' in name or name.endswith('sample')]
  attentions = [name for name in params if name.endswith('attn') or '_attn_' in name]
  # 2 down, 2 mid, 4 up residual blocks, 2 resamplers
  assert len(blocks) == 10 and len(attentions) == 4
  zero_layers = ([params[name]['conv_1'] for name in blocks] +
                 [params[name]['proj_out'] for name in attentions] +
                 [params['conv_out'], params['guidance_embed']['dense_1']])
  for layer in zero_layers:
    assert not np.any(np.asarray(layer['kernel'])) and not np.any(np.asarray(layer['bias']))
  # default init
  for layer in (params['conv_in'], params['mid_res_0']['conv_0'], params['mid_attn']['query']):
    assert np.any(np.asarray(layer['kernel']))


def test_guidance_path_is_exactly_zero_at_init():
  teacher_params = randomise_zero_leaves(tiny_params(guidance_input=False))  # a "trained" teacher
  fresh = tiny_params(guidance_input=True)
  assert set(fresh) - set(teacher_params) == {'guidance_embed'}
  student_params = stages.stage1_init_params(teacher_params, fresh)  # what stage 1 starts from
  teacher_out = forward(tiny_ref_unet(), teacher_params, dummy_inputs())
  assert float(jnp.std(teacher_out)) > 0.1  # a network that computes something
  student = jax.jit(lambda inputs: tiny_ref_unet(guidance_input=True).apply(
      {'params': student_params}, *inputs, train=False))
  outs = [student(dummy_inputs(guidance_w=w)) for w in (0.0, 1.0, 4.0)]
  for out in outs:  # w changes nothing, bit for bit
    np.testing.assert_array_equal(out, outs[0])
  # The teacher's function: equal up to float32 rounding (XLA compiles the two graphs differently).
  np.testing.assert_allclose(outs[0], teacher_out, rtol=0, atol=1e-5)
  w_embedding = GuidanceEmbedding(emb_dim=4 * 16, freq_dim=16).apply(
      {'params': fresh['guidance_embed']}, jnp.array([0.0, 1.0, 4.0]))  # [3, emb_dim]
  # what the student adds to the teacher's embedding
  np.testing.assert_array_equal(w_embedding, 0.0)


def test_bf16_forward_is_within_2_percent_of_float32_on_the_same_params():
  params = randomise_zero_leaves(tiny_params(guidance_input=True))
  inputs = dummy_inputs(guidance_w=2.0)
  out32 = forward(tiny_ref_unet(guidance_input=True), params, inputs)
  out16 = forward(tiny_ref_unet(guidance_input=True, dtype=jnp.bfloat16), params, inputs)
  assert out16.dtype == jnp.float32 and out32.dtype == jnp.float32
  assert jax.tree.all(jax.tree.map(lambda x: x.dtype == jnp.float32, params))
  error = float(
      jnp.sqrt(jnp.mean(jnp.square(out16 - out32))) / jnp.sqrt(jnp.mean(jnp.square(out32))))
  assert 1e-5 < error < 0.02, error


# ------------------------------------------------------------------------------ config and build


def test_build_model_reads_the_ref_unet_fields():
  model_config = ml_collections.ConfigDict(
      dict(name='ref_unet', ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,),
           dropout=0.0, num_groups=4, head_dim=8, resblock_resample=False, dtype='bfloat16'))
  model = build_model(model_config, num_classes=NUM_CLASSES, guidance_input=True)
  assert isinstance(model, RefUNet) and model.head_dim == 8 and model.num_heads == 1
  assert model.resblock_resample is False and model.dtype == jnp.bfloat16 and model.guidance_input


@pytest.mark.parametrize('overrides,message', [
    (dict(head_dim=12), 'head_dim=12'),
    (dict(num_heads=5), 'num_heads=5'),
    (dict(head_dim=-1), 'head_dim must be >= 0'),
    (dict(ch=24, num_groups=8, head_dim=16), 'model.ch=24 channels do not split'),
])
def test_validation_rejects_bad_ref_unet_fields(overrides, message):
  config = importlib.import_module('configs.digits_teacher').get_config()
  config.model.update({**dict(name='ref_unet', ch=16, num_groups=4), **overrides})
  with pytest.raises(ConfigError, match=message):
    validate_config(config)


def test_validation_refuses_ref_unet_on_vector_data():
  config = importlib.import_module('configs.tiny').get_config()
  config.model.name = 'ref_unet'
  with pytest.raises(ConfigError, match="model.name 'ref_unet' needs image data"):
    validate_config(config)
