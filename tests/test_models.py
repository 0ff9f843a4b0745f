"""Fast tests for the denoiser networks: shapes, parameter counts, zero-init w path, dropout,
checks, jit."""
import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from models import build_model, count_params, init_params
from models.embeddings import GuidanceEmbedding, logsnr_to_time, sinusoidal_embedding
from models.mlp import MLPDenoiser
from models.unet import UNet

NUM_CLASSES = 3
BATCH = 2
IMAGE_SHAPE = (8, 8, 3)
VECTOR_SHAPE = (2,)


def tiny_unet(**overrides):
  kwargs = dict(num_classes=NUM_CLASSES, ch=8, ch_mult=(1, 2), num_res_blocks=1,
                attn_resolutions=(4,), num_groups=4)
  return UNet(**{**kwargs, **overrides})


def tiny_mlp(**overrides):
  return MLPDenoiser(**{**dict(num_classes=NUM_CLASSES, hidden=16, num_layers=2), **overrides})


MODELS_AND_SHAPES = [(tiny_unet, IMAGE_SHAPE), (tiny_mlp, VECTOR_SHAPE)]
THREE_LEVEL_UNET = dict(ch=8, ch_mult=(1, 2, 2), num_res_blocks=2, attn_resolutions=(8, 2))


def dummy_inputs(x_shape, seed=0, guidance_w=None):
  keys = jax.random.split(jax.random.PRNGKey(seed), 2)
  z_t = jax.random.normal(keys[0], (BATCH, *x_shape))  # [B, ...]
  logsnr_t = jax.random.uniform(keys[1], (BATCH,), minval=-20., maxval=20.)  # [B]
  label = jnp.arange(BATCH, dtype=jnp.int32) % NUM_CLASSES  # [B]
  w = None if guidance_w is None else jnp.full((BATCH,), guidance_w, jnp.float32)
  return z_t, logsnr_t, label, w


def apply_fn(model, params, inputs, **kwargs):
  return model.apply({'params': params}, *inputs, **kwargs)


# ---------------------------------------------------------------- embeddings


def test_sinusoidal_embedding_values():
  emb = sinusoidal_embedding(jnp.array([0., 1.]), dim=6)  # [2, 6]
  assert emb.shape == (2, 6)
  np.testing.assert_allclose(emb[0], [0, 0, 0, 1, 1, 1], atol=1e-7)
  freqs = np.exp(-np.log(10000.) * np.arange(3) / 3)
  np.testing.assert_allclose(emb[1], np.concatenate([np.sin(freqs), np.cos(freqs)]), rtol=1e-6)
  assert sinusoidal_embedding(jnp.zeros(4), dim=7).shape == (4, 7)


def test_logsnr_to_time_range_and_stability():
  logsnr = jnp.linspace(-20., 20., 101)
  time = logsnr_to_time(logsnr)
  assert bool(jnp.all(jnp.isfinite(time)))
  assert bool(jnp.all((time > 0.) & (time < 1.)))
  assert bool(jnp.all(jnp.diff(time) < 0.))  # higher logsnr = cleaner = earlier time
  np.testing.assert_allclose(logsnr_to_time(jnp.array(0.)), 0.5, rtol=1e-6)
  # float32 result matches the float64 inverse of the cosine schedule logsnr(t) = -2 log tan(pi t /
  # 2).
  reference = np.arctan(np.exp(-0.5 * np.asarray(logsnr, np.float64))) / (np.pi / 2)
  np.testing.assert_allclose(time, reference, rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------- shapes


@pytest.mark.parametrize('make_model,x_shape', MODELS_AND_SHAPES)
@pytest.mark.parametrize('guidance_input', [False, True])
def test_output_shape(make_model, x_shape, guidance_input):
  model = make_model(guidance_input=guidance_input)
  params = init_params(model, rng=jax.random.PRNGKey(0), x_shape=x_shape,
                       guidance_input=guidance_input)
  inputs = dummy_inputs(x_shape, guidance_w=2. if guidance_input else None)
  out = apply_fn(model, params, inputs, train=False)
  assert out.shape == (BATCH, *x_shape)
  assert bool(jnp.all(jnp.isfinite(out)))


def test_unet_three_levels_with_attention_shape():
  model = tiny_unet(**THREE_LEVEL_UNET, num_heads=2)
  x_shape = (8, 12, 3)  # non-square
  params = init_params(model, rng=jax.random.PRNGKey(0), x_shape=x_shape, guidance_input=False)
  assert 'down_0_attn_0' in params and 'up_2_attn_0' in params
  # jitted: one compile of a network whose shapes no other test shares, not one per operation
  out = jax.jit(functools.partial(apply_fn, model, train=False))(params, dummy_inputs(x_shape))
  assert out.shape == (BATCH, *x_shape)


# ---------------------------------------------------------------- parameter counts


def dense_count(n_in, n_out):
  return n_in * n_out + n_out


def conv_count(c_in, c_out, kernel=3):
  return kernel * kernel * c_in * c_out + c_out


def resblock_count(c_in, c_out, emb_dim):
  skip = conv_count(c_in, c_out, kernel=1) if c_in != c_out else 0
  return (2 * c_in + conv_count(c_in, c_out) + dense_count(emb_dim, c_out) + 2 * c_out
          + conv_count(c_out, c_out) + skip)


def attn_count(channels):
  return 2 * channels + 4 * dense_count(channels, channels)


def expected_unet_count(*, ch, ch_mult, num_res_blocks, attn_resolutions, image_size, data_ch):
  """Independent channel bookkeeping of the DDPM U-Net (no guidance path)."""
  emb_dim = 4 * ch
  total = dense_count(ch, emb_dim) + dense_count(emb_dim, emb_dim) + (NUM_CLASSES + 1) * emb_dim
  total += conv_count(data_ch, ch)
  skip_chs, c, res = [ch], ch, image_size
  for level, mult in enumerate(ch_mult):
    for _ in range(num_res_blocks):
      total += resblock_count(c, ch * mult, emb_dim)
      c = ch * mult
      total += attn_count(c) if res in attn_resolutions else 0
      skip_chs.append(c)
    if level != len(ch_mult) - 1:
      total += conv_count(c, c)
      skip_chs.append(c)
      res //= 2
  total += 2 * resblock_count(c, c, emb_dim) + attn_count(c)
  for level in reversed(range(len(ch_mult))):
    for _ in range(num_res_blocks + 1):
      total += resblock_count(c + skip_chs.pop(), ch * ch_mult[level], emb_dim)
      c = ch * ch_mult[level]
      total += attn_count(c) if res in attn_resolutions else 0
    if level != 0:
      total += conv_count(c, c)
      res *= 2
  return total + 2 * c + conv_count(c, data_ch)


def expected_mlp_count(*, hidden, num_layers, data_dim):
  conditioning = 2 * dense_count(hidden, hidden) + (NUM_CLASSES + 1) * hidden
  block = 2 * hidden + 3 * dense_count(hidden, hidden)
  return (conditioning + dense_count(data_dim, hidden) + num_layers * block + 2 * hidden
          + dense_count(hidden, data_dim))


@pytest.mark.parametrize('config', [
    dict(ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,)),
    THREE_LEVEL_UNET,
])
def test_unet_param_count(config):
  model = tiny_unet(**config)
  params = init_params(model, rng=jax.random.PRNGKey(0), x_shape=IMAGE_SHAPE, guidance_input=False)
  leaf_total = sum(np.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(params))
  assert count_params(params) == leaf_total
  assert count_params(params) == expected_unet_count(**config, image_size=8, data_ch=3)
  # Spot check one ResBlock with a channel-changing skip: 8 -> 16 channels, emb dim 32.
  assert count_params(params['down_1_res_0']) == resblock_count(8, 16, 32)
  assert 'skip' in params['down_1_res_0'] and 'skip' not in params['down_0_res_0']


def test_mlp_param_count():
  model = tiny_mlp(hidden=16, num_layers=2)
  params = init_params(model, rng=jax.random.PRNGKey(0), x_shape=VECTOR_SHAPE, guidance_input=False)
  assert count_params(params) == expected_mlp_count(hidden=16, num_layers=2, data_dim=2)
  guided = init_params(tiny_mlp(guidance_input=True), rng=jax.random.PRNGKey(0),
                       x_shape=VECTOR_SHAPE, guidance_input=True)
  assert count_params(guided) - count_params(params) == 2 * dense_count(16, 16)


# ---------------------------------------------------------------- zero-initialised guidance path


@pytest.mark.parametrize('make_model,x_shape', MODELS_AND_SHAPES)
def test_guidance_path_is_zero_at_init(make_model, x_shape):
  base_model, guided_model = make_model(), make_model(guidance_input=True)
  base_params = init_params(base_model, rng=jax.random.PRNGKey(1), x_shape=x_shape,
                            guidance_input=False)
  guided_init = init_params(guided_model, rng=jax.random.PRNGKey(2), x_shape=x_shape,
                            guidance_input=True)
  shared_keys = set(guided_init) - {'guidance_embed'}
  assert shared_keys == set(base_params)
  param_shapes = functools.partial(jax.tree_util.tree_map, jnp.shape)
  for key in shared_keys:  # identical param trees apart from 'guidance_embed'
    assert param_shapes(guided_init[key]) == param_shapes(base_params[key])
  # Stage-1 style: copy the teacher's params into the student by key.
  student_params = {**base_params, 'guidance_embed': guided_init['guidance_embed']}
  base_inputs = dummy_inputs(x_shape)
  base_out = apply_fn(base_model, base_params, base_inputs, train=False)
  for w in [0., 1., 4.]:
    out = apply_fn(guided_model, student_params, dummy_inputs(x_shape, guidance_w=w), train=False)
    np.testing.assert_array_equal(out, base_out)
  # Once the zero-initialised last layer is perturbed, w must change the output.
  last_layer = student_params['guidance_embed']['dense_1']
  random_kernel = jax.random.normal(jax.random.PRNGKey(3), last_layer['kernel'].shape)
  perturbed = {**student_params, 'guidance_embed': {
      **student_params['guidance_embed'], 'dense_1': {**last_layer, 'kernel': random_kernel}}}
  out_w0 = apply_fn(guided_model, perturbed, dummy_inputs(x_shape, guidance_w=0.), train=False)
  out_w4 = apply_fn(guided_model, perturbed, dummy_inputs(x_shape, guidance_w=4.), train=False)
  assert float(jnp.max(jnp.abs(out_w0 - out_w4))) > 1e-4


def test_guidance_gains_start_at_one_and_scale_channels_once_trained():
  """distill.guidance_gains: the student starts as its teacher at every w (gains exactly 1), one
  gain layer per residual block under 'guidance_embed', and once a gain layer moves, w changes the
  output."""
  base_model, gained = tiny_unet(), tiny_unet(guidance_input=True, guidance_gains=True)
  base_params = init_params(base_model, rng=jax.random.PRNGKey(1), x_shape=IMAGE_SHAPE,
                            guidance_input=False)
  init = init_params(gained, rng=jax.random.PRNGKey(2), x_shape=IMAGE_SHAPE, guidance_input=True)
  assert set(init) - set(base_params) == {'guidance_embed'}
  gain_layers = sorted(k for k in init['guidance_embed'] if k.startswith('gain_'))
  assert len(gain_layers) == 2 + 2 + 4  # down, mid and up residual blocks
  student_params = {**base_params, 'guidance_embed': init['guidance_embed']}
  base_out = apply_fn(base_model, base_params, dummy_inputs(IMAGE_SHAPE), train=False)
  for w in [0., 1., 4.]:
    out = apply_fn(gained, student_params, dummy_inputs(IMAGE_SHAPE, guidance_w=w), train=False)
    np.testing.assert_array_equal(out, base_out)
  layer = student_params['guidance_embed']['gain_2']  # the first mid block's
  moved = {**student_params, 'guidance_embed': {**student_params['guidance_embed'], 'gain_2': {
      **layer, 'kernel': jax.random.normal(jax.random.PRNGKey(3), layer['kernel'].shape)}}}
  out_w0 = apply_fn(gained, moved, dummy_inputs(IMAGE_SHAPE, guidance_w=0.), train=False)
  out_w4 = apply_fn(gained, moved, dummy_inputs(IMAGE_SHAPE, guidance_w=4.), train=False)
  assert float(jnp.max(jnp.abs(out_w0 - out_w4))) > 1e-4


def test_guidance_context_starts_as_the_teacher_and_makes_the_gains_depend_on_the_label():
  """distill.guidance_context: the w-embedding's hidden layer also sees the conditioning vector; at
  init the student is its teacher at every w, and once a gain layer moves, w's effect differs from
  class to class."""
  base_model = tiny_unet()
  student = tiny_unet(guidance_input=True, guidance_gains=True, guidance_context=True)
  base_params = init_params(base_model, rng=jax.random.PRNGKey(1), x_shape=IMAGE_SHAPE,
                            guidance_input=False)
  init = init_params(student, rng=jax.random.PRNGKey(2), x_shape=IMAGE_SHAPE, guidance_input=True)
  assert 'dense_context' in init['guidance_embed']
  student_params = {**base_params, 'guidance_embed': init['guidance_embed']}
  base_out = apply_fn(base_model, base_params, dummy_inputs(IMAGE_SHAPE), train=False)
  for w in [0., 4.]:
    np.testing.assert_array_equal(
        apply_fn(student, student_params, dummy_inputs(IMAGE_SHAPE, guidance_w=w), train=False),
        base_out)
  embed = GuidanceEmbedding(emb_dim=16, freq_dim=8, gain_channels=(4,), use_context=True)
  # two labels' vectors
  w, contexts = jnp.full((2,), 2.0), jax.random.normal(jax.random.PRNGKey(3), (2, 16))
  params = embed.init(jax.random.PRNGKey(4), w, None, contexts,
                      method=GuidanceEmbedding.everything)['params']
  params['gain_0']['kernel'] = jax.random.normal(
      jax.random.PRNGKey(5), params['gain_0']['kernel'].shape)
  gains = embed.apply({'params': params}, w, contexts, method=GuidanceEmbedding.gains)[0]  # [2, 4]
  # same w, other conditioning: other gains
  assert float(jnp.max(jnp.abs(gains[0] - gains[1]))) > 1e-3


def test_guidance_output_is_zero_at_init_and_exactly_linear_in_w():
  """distill.guidance_output: out = a + w b with b a zero-initialised convolution under
  'guidance_embed'."""
  base_model, linear = tiny_unet(), tiny_unet(guidance_input=True, guidance_output=True)
  base_params = init_params(base_model, rng=jax.random.PRNGKey(1), x_shape=IMAGE_SHAPE,
                            guidance_input=False)
  init = init_params(linear, rng=jax.random.PRNGKey(2), x_shape=IMAGE_SHAPE, guidance_input=True)
  assert set(init) - set(base_params) == {'guidance_embed'}
  student_params = {**base_params, 'guidance_embed': init['guidance_embed']}
  base_out = apply_fn(base_model, base_params, dummy_inputs(IMAGE_SHAPE), train=False)
  np.testing.assert_array_equal(
      apply_fn(linear, student_params, dummy_inputs(IMAGE_SHAPE, guidance_w=4.), train=False),
      base_out)
  head = student_params['guidance_embed']['output']
  moved = {**student_params, 'guidance_embed': {**student_params['guidance_embed'], 'output': {
      **head, 'kernel': jax.random.normal(jax.random.PRNGKey(3), head['kernel'].shape)}}}
  out = {w: apply_fn(linear, moved, dummy_inputs(IMAGE_SHAPE, guidance_w=w),
                     train=False) for w in (0., 1., 4.)}
  np.testing.assert_array_equal(out[0.], base_out)  # w = 0: the teacher's function
  assert float(jnp.max(jnp.abs(out[1.] - out[0.]))) > 1e-3
  np.testing.assert_allclose(out[4.] - out[0.], 4 * (out[1.] - out[0.]), rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- labels, dropout, jit


@pytest.mark.parametrize('make_model,x_shape', MODELS_AND_SHAPES)
def test_null_label_accepted(make_model, x_shape):
  model = make_model()
  params = init_params(model, rng=jax.random.PRNGKey(0), x_shape=x_shape, guidance_input=False)
  z_t, logsnr_t, _, _ = dummy_inputs(x_shape)
  null_out = model.apply({'params': params}, z_t, logsnr_t,
                         jnp.full((BATCH,), NUM_CLASSES, jnp.int32), train=False)
  class0_out = model.apply(
      {'params': params}, z_t, logsnr_t, jnp.zeros((BATCH,), jnp.int32), train=False)
  assert params['label_embed']['embedding'].shape[0] == NUM_CLASSES + 1
  assert bool(jnp.all(jnp.isfinite(null_out)))
  assert float(jnp.max(jnp.abs(null_out - class0_out))) > 1e-6


@pytest.mark.parametrize('make_model,x_shape', MODELS_AND_SHAPES)
def test_dropout_only_in_train_mode(make_model, x_shape):
  model = make_model(dropout=0.5)
  params = init_params(model, rng=jax.random.PRNGKey(0), x_shape=x_shape, guidance_input=False)
  inputs = dummy_inputs(x_shape)
  train_outs = [apply_fn(model, params, inputs, train=True,
                         rngs={'dropout': jax.random.PRNGKey(seed)})
                for seed in (0, 1)]
  assert float(jnp.max(jnp.abs(train_outs[0] - train_outs[1]))) > 1e-6
  eval_outs = [apply_fn(model, params, inputs, train=False,
                        rngs={'dropout': jax.random.PRNGKey(seed)})
               for seed in (0, 1)]
  np.testing.assert_array_equal(eval_outs[0], eval_outs[1])
  np.testing.assert_array_equal(eval_outs[0], apply_fn(model, params, inputs, train=False))


@pytest.mark.parametrize('make_model,x_shape', MODELS_AND_SHAPES)
def test_jit_matches_eager(make_model, x_shape):
  model = make_model(guidance_input=True)
  params = init_params(model, rng=jax.random.PRNGKey(0), x_shape=x_shape, guidance_input=True)
  inputs = dummy_inputs(x_shape, guidance_w=1.5)
  jitted = jax.jit(functools.partial(model.apply, train=False))
  np.testing.assert_allclose(jitted({'params': params}, *inputs),
                             apply_fn(model, params, inputs, train=False), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- input checks


@pytest.mark.parametrize('make_model,x_shape', MODELS_AND_SHAPES)
def test_invalid_inputs_raise(make_model, x_shape):
  model = make_model()
  params = init_params(model, rng=jax.random.PRNGKey(0), x_shape=x_shape, guidance_input=False)
  z_t, logsnr_t, label, _ = dummy_inputs(x_shape)
  call = functools.partial(model.apply, {'params': params}, train=False)
  with pytest.raises(ValueError, match='z_t must have rank'):
    call(z_t[0], logsnr_t, label)
  with pytest.raises(ValueError, match='logsnr_t must have shape'):
    call(z_t, logsnr_t[:, None], label)
  with pytest.raises(ValueError, match='label must have shape'):
    call(z_t, logsnr_t, label[:1])
  with pytest.raises(ValueError, match='integer'):
    call(z_t, logsnr_t, label.astype(jnp.float32))
  with pytest.raises(ValueError, match='guidance_input=False'):
    call(z_t, logsnr_t, label, jnp.ones((BATCH,)))
  guided = make_model(guidance_input=True)
  with pytest.raises(ValueError, match='needs guidance_w'):
    guided.init(jax.random.PRNGKey(0), z_t, logsnr_t, label, train=False)
  with pytest.raises(ValueError, match='guidance_w must have shape'):
    guided.init(jax.random.PRNGKey(0), z_t, logsnr_t, label, jnp.ones((BATCH, 1)), train=False)


def test_unet_image_size_not_divisible_raises():
  model = tiny_unet(ch_mult=(1, 2, 2))
  with pytest.raises(ValueError, match=r'image size 10x8 .* downsampling factor 4'):
    init_params(model, rng=jax.random.PRNGKey(0), x_shape=(10, 8, 3), guidance_input=False)


def test_unet_groupnorm_mismatch_raises():
  with pytest.raises(ValueError, match='num_groups'):
    init_params(tiny_unet(ch=6), rng=jax.random.PRNGKey(0), x_shape=IMAGE_SHAPE,
                guidance_input=False)


# ---------------------------------------------------------------- build_model


def test_build_model_from_config():
  unet_config = ml_collections.ConfigDict(dict(name='unet', ch=8, ch_mult=[1, 2], num_res_blocks=1,
                                               attn_resolutions=[4], dropout=0.1, num_groups=4))
  unet = build_model(unet_config, num_classes=NUM_CLASSES, guidance_input=True)
  assert isinstance(unet, UNet) and unet.ch_mult == (1, 2) and unet.attn_resolutions == (4,)
  assert unet.guidance_input and unet.num_classes == NUM_CLASSES
  mlp_config = ml_collections.ConfigDict(dict(name='mlp', hidden=16, num_layers=2, dropout=0.))
  mlp = build_model(mlp_config, num_classes=NUM_CLASSES, guidance_input=False)
  assert isinstance(mlp, MLPDenoiser) and mlp.hidden == 16 and not mlp.guidance_input
  params = init_params(mlp, rng=jax.random.PRNGKey(0), x_shape=VECTOR_SHAPE, guidance_input=False)
  assert count_params(params) == expected_mlp_count(hidden=16, num_layers=2, data_dim=2)


def test_build_model_unknown_name():
  with pytest.raises(ValueError, match=r"^unknown model.name 'x'; choose one of: mlp, unet, "
                                       r"ref_unet, diffusers_unet$"):
    build_model(ml_collections.ConfigDict(dict(name='x')), num_classes=NUM_CLASSES,
                guidance_input=False)


def test_equal_networks_and_schedules_share_one_denoiser_and_sampler_program():
  """Checkpoints of one architecture (every stage-2 round) reuse one jitted sampler: compiled once
  per shape."""
  from diffusion import get_logsnr_schedule  # pylint: disable=g-import-not-at-top
  from models.denoiser import make_denoise_fn  # pylint: disable=g-import-not-at-top
  from samplers import make_sampler  # pylint: disable=g-import-not-at-top
  from samplers import _sampler_program  # pylint: disable=g-import-not-at-top
  make = lambda model, kind='w_input': make_denoise_fn(model, parametrization='v', kind=kind,
                                                       num_classes=3)
  net = functools.partial(MLPDenoiser, num_classes=3, guidance_input=True)
  first, second = net(hidden=16), net(hidden=16)
  assert first is not second and make(first) is make(second)
  assert make(first) is not make(net(hidden=32))
  assert make(first) is not make(first, kind='conditional')
  logsnr_fn = get_logsnr_schedule('cosine', logsnr_min=-20.0, logsnr_max=20.0)
  # as read from two records
  assert get_logsnr_schedule('cosine', logsnr_min=-20, logsnr_max=20) is logsnr_fn
  params = [init_params(m, rng=jax.random.key(i), x_shape=(2,),
                        guidance_input=True) for i, m in enumerate((first, second))]
  z_init, label, w = jnp.ones((4, 2)), jnp.arange(4, dtype=jnp.int32) % 3, jnp.ones((4,))
  outputs = [make_sampler('ddim', make(m), num_steps=n,
                          logsnr_fn=logsnr_fn)(p, z_init, label, w, jax.random.key(0))
             for m, p, n in ((first, params[0], 4), (second, params[1], 2))]
  assert not np.allclose(outputs[0], outputs[1])  # different params and step counts, one program
  assert _sampler_program('ddim', make(first), logsnr_fn, 'small')._cache_size() == 1
