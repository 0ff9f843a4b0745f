"""Sampler tests with exact denoisers: point-mass exactness, Gaussian convergence, the stochastic
sampler."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion import alpha_sigma, ddim_step, predict_eps_from_x, renoise
from samplers import make_sampler, sample_ddim, sample_stochastic, stochastic_step

from exact_denoisers import LOGSNR_FN, MU, STD, X0, gaussian, point_mass, with_eps


def _run(name, denoise_fn, z_init, num_steps, seed=0, **kwargs):
  label = jnp.zeros(z_init.shape[:1], jnp.int32)
  run = make_sampler(name, denoise_fn, num_steps=num_steps, logsnr_fn=LOGSNR_FN, **kwargs)
  return run(None, z_init, label, jnp.zeros(label.shape), jax.random.key(seed))


@pytest.mark.parametrize('name', ['ddim', 'stochastic', 'ddpm'])
@pytest.mark.parametrize('num_steps', [1, 2, 7])
def test_point_mass_is_exact_for_every_sampler(name, num_steps):
  z_init = jax.random.normal(jax.random.key(1), (16, 3))
  np.testing.assert_allclose(_run(name, point_mass, z_init, num_steps),
                             jnp.broadcast_to(X0, (16, 3)), atol=1e-5)


def test_ddim_converges_to_the_exact_ode_map_for_gaussian_data():
  z_1 = jax.random.normal(jax.random.key(2), (4096, 2))
  alpha_1, sigma_1 = alpha_sigma(LOGSNR_FN(1.0))
  # ODE keeps z standardised
  exact = MU + STD * (z_1 - alpha_1 * MU) / jnp.sqrt(alpha_1**2 * STD**2 + sigma_1**2)
  errors = [
      float(jnp.max(jnp.abs(_run('ddim', gaussian, z_1, n) - exact))) for n in (1, 4, 16, 64, 256)
  ]
  ratios = [a / b for a, b in zip(errors, errors[1:])]
  assert all(r > 3.0 for r in ratios), errors  # first order: 4x the steps, ~1/4 the error
  assert errors[-1] < 0.02, errors
  x = _run('ddim', gaussian, z_1, 256)
  np.testing.assert_allclose([x.mean(), x.std()], [MU, STD], atol=0.03)


def test_stochastic_step_without_noise_is_the_deterministic_double_step():
  denoise_fn = with_eps(lambda z, logsnr: jnp.tanh(z) * 0.8)  # any nonlinear model
  z_t = jax.random.normal(jax.random.key(3), (5, 3))
  num_steps, t = 8, 5 / 8
  z_next, x_pred = stochastic_step(denoise_fn, None, z_t=z_t, t=t, num_steps=num_steps, label=None,
                                   guidance_w=None, logsnr_fn=LOGSNR_FN, noise=jnp.zeros_like(z_t))
  logsnr = lambda u: jnp.full((5,), LOGSNR_FN(u))
  z_two_back = ddim_step(x_pred=x_pred,
                         eps_pred=predict_eps_from_x(z=z_t, x=x_pred, logsnr=logsnr(t)),
                         logsnr_s=logsnr(t - 2 / num_steps))
  alpha_u, _ = alpha_sigma(LOGSNR_FN(t - 1 / num_steps))
  alpha_s, _ = alpha_sigma(LOGSNR_FN(t - 2 / num_steps))
  np.testing.assert_allclose(z_next, (alpha_u / alpha_s) * z_two_back, atol=1e-5)
  noisy, _ = stochastic_step(denoise_fn, None, z_t=z_t, t=t, num_steps=num_steps, label=None,
                             guidance_w=None, logsnr_fn=LOGSNR_FN, noise=jnp.ones_like(z_t))
  expected = renoise(z_s=z_two_back, logsnr_s=logsnr(t - 2 / num_steps),
                     logsnr_u=logsnr(t - 1 / num_steps), noise=jnp.ones_like(z_t))
  np.testing.assert_allclose(noisy, expected, atol=1e-5)


def test_stochastic_last_step_is_deterministic():
  """The output is x_pred at t = 1/N with no noise after it: a denoiser predicting a constant gives
  exactly that constant whatever the noise, while a z-dependent one takes another path with other
  noise."""
  z_init = jax.random.normal(jax.random.key(4), (64, 2))
  constant = with_eps(lambda z, logsnr: jnp.full_like(z, 0.3))
  for seed in (0, 1):
    np.testing.assert_allclose(_run('stochastic', constant, z_init, 4, seed=seed), 0.3, atol=1e-5)
  varying = with_eps(lambda z, logsnr: jnp.tanh(z))
  out_a, out_b = _run('stochastic', varying, z_init, 4,
                      seed=0), _run('stochastic', varying, z_init, 4, seed=1)
  assert not np.allclose(out_a, out_b)
  assert np.all(np.abs(out_a) < 1.0)  # a tanh output: x_pred itself, not x_pred plus noise


@pytest.mark.parametrize(
    'name, sampler', [('ddim', sample_ddim), ('stochastic', sample_stochastic)])
def test_sampler_makes_exactly_n_network_calls(name, sampler):
  calls = []

  def counting(params, z_t, logsnr_t, label, guidance_w):
    jax.debug.callback(lambda: calls.append(1))
    return point_mass(params, z_t, logsnr_t, label, guidance_w)

  kwargs = dict(rng=jax.random.key(0)) if name == 'stochastic' else {}
  z_init = jnp.zeros((2, 3))
  out = jax.jit(lambda z: sampler(
      counting, None, z_init=z, label=jnp.zeros(2, jnp.int32), guidance_w=0.0, num_steps=6,
      logsnr_fn=LOGSNR_FN, **kwargs))(z_init)
  jax.block_until_ready(out)
  jax.effects_barrier()
  assert len(calls) == 6


def test_make_sampler_rejects_bad_input():
  with pytest.raises(ValueError, match='unknown sampler'):
    make_sampler('euler', point_mass, num_steps=4, logsnr_fn=LOGSNR_FN)
  with pytest.raises(ValueError, match='steps must be >= 1'):
    make_sampler('ddim', point_mass, num_steps=0, logsnr_fn=LOGSNR_FN)


def test_the_stochastic_sampler_is_refused_for_a_student_not_trained_on_the_fine_grid(tmp_path):
  from conftest import tiny_config  # pylint: disable=g-import-not-at-top
  from train import records  # pylint: disable=g-import-not-at-top
  from modes import sampling  # pylint: disable=g-import-not-at-top
  from modes.methods import list_methods  # pylint: disable=g-import-not-at-top
  config = tiny_config(tmp_path)
  record = records.make(config, stage='stage2', sampling_steps=2)
  assert sampling.allowed_steps(record, 'stochastic') == [4]
  config.stage2.fine_grid = False
  record = records.make(config, stage='stage2', sampling_steps=2)
  assert (sampling.allowed_steps(record, 'stochastic') == [] and
          sampling.allowed_steps(record, 'ddim') == [2])
  with pytest.raises(sampling.SamplingError, match='no stochastic sampler'):
    sampling.check_steps(record, 'stochastic', 4, 'stage2/steps_0002')
  assert {m.sampler for m in list_methods(config, teacher_steps=())} == {'ddim'}


def test_clip_x_clips_the_x_prediction_and_keeps_z_consistent():
  from diffusion import diffusion_forward  # pylint: disable=g-import-not-at-top
  from models.denoiser import clip_x  # pylint: disable=g-import-not-at-top

  def overshooting(params, z_t, logsnr_t, label, guidance_w):
    del params, label, guidance_w
    x_pred = 3.0 * jnp.ones_like(z_t)
    return x_pred, jnp.zeros_like(z_t)

  z_t, logsnr_t = jnp.full((2, 3), 0.5), jnp.array([0.0, 2.0])
  x_pred, eps_pred = clip_x(overshooting)(None, z_t, logsnr_t, None, None)
  np.testing.assert_allclose(x_pred, 1.0)
  np.testing.assert_allclose(
      diffusion_forward(x=x_pred, eps=eps_pred, logsnr=logsnr_t), z_t, atol=1e-6)
  # one wrapper per denoiser: one compiled sampler
  assert clip_x(overshooting) is clip_x(overshooting)
  inside = lambda params, z, s, l, w: (0.5 * jnp.ones_like(z), 0.1 * jnp.ones_like(z))
  x_in, _ = clip_x(inside)(None, z_t, logsnr_t, None, None)
  np.testing.assert_allclose(x_in, 0.5)


def test_ddpm_with_large_variance_is_exact_on_a_point_mass_and_finite_on_a_tiny_model():
  from models import init_params  # pylint: disable=g-import-not-at-top
  from models.denoiser import make_denoise_fn  # pylint: disable=g-import-not-at-top
  from models.mlp import MLPDenoiser  # pylint: disable=g-import-not-at-top
  z_init = jax.random.normal(jax.random.key(5), (16, 3))  # [B, D]
  np.testing.assert_allclose(_run('ddpm', point_mass, z_init, 4, ddpm_variance='large'),
                             jnp.broadcast_to(X0, (16, 3)), atol=1e-5)
  model = MLPDenoiser(num_classes=2, hidden=16, num_layers=1)
  params = init_params(model, rng=jax.random.key(6), x_shape=(3,), guidance_input=False)
  denoise_fn = make_denoise_fn(model, parametrization='v', kind='guided', num_classes=2)
  label, w = jnp.arange(16, dtype=jnp.int32) % 2, jnp.full((16,), 1.0)
  outputs = {variance: make_sampler('ddpm', denoise_fn, num_steps=8, logsnr_fn=LOGSNR_FN,
                                    ddpm_variance=variance)(
      # [B, D] each
      params, z_init, label, w, jax.random.key(7)) for variance in ('small', 'large')}
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in outputs.values())
  assert not np.allclose(outputs['small'], outputs['large'])  # the variance reaches the sampler
