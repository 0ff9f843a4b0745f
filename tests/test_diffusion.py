"""Property tests of the diffusion math: schedule, parametrizations, losses, guidance, DDIM,
targets."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion import (alpha_sigma, ddim_step, ddpm_large_variance, ddpm_posterior,
                       ddpm_small_variance, diffusion_forward, discrete_logsnr,
                       discrete_logsnr_table, get_logsnr_schedule, guided_prediction, loss_weight,
                       predict_eps_from_v, timestep_of_logsnr, predict_eps_from_x, predict_v,
                       predict_x_from_eps, predict_x_from_v, renoise, stage2_x_target,
                       weighted_x_loss, x_eps_from_output)

LOGSNR_FN = get_logsnr_schedule('cosine', logsnr_min=-20.0, logsnr_max=20.0)


def _normal(seed, shape):
  return jax.random.normal(jax.random.key(seed), shape)


@pytest.mark.parametrize('name', ['cosine', 'linear'])
def test_schedule_endpoints_and_monotone(name):
  fn = get_logsnr_schedule(name, logsnr_min=-20.0, logsnr_max=20.0)
  t = jnp.linspace(0.0, 1.0, 10001)
  logsnr = fn(t)
  assert np.all(np.isfinite(logsnr))
  np.testing.assert_allclose(fn(0.0), 20.0, atol=2e-3)  # float32 tan near pi/2
  np.testing.assert_allclose(fn(1.0), -20.0, atol=2e-3)
  assert np.all(np.diff(np.asarray(logsnr)) < 0)
  # clipped outside [0, 1]
  np.testing.assert_allclose(fn(jnp.array([-0.5, 1.5])), [20.0, -20.0], atol=2e-3)


def test_cosine_matches_unclipped_formula_inside():
  t = jnp.linspace(0.05, 0.95, 19)
  np.testing.assert_allclose(
      LOGSNR_FN(t), -2 * np.log(np.tan(np.pi * np.asarray(t) / 2)), atol=2e-3)


def test_schedule_rejects_bad_input():
  with pytest.raises(ValueError, match='unknown diffusion.schedule'):
    get_logsnr_schedule('nope', logsnr_min=-1.0, logsnr_max=1.0)
  with pytest.raises(ValueError, match='logsnr_min < logsnr_max'):
    get_logsnr_schedule('cosine', logsnr_min=1.0, logsnr_max=-1.0)


@pytest.mark.parametrize('beta_schedule', ['linear', 'scaled_linear', 'squaredcos_cap_v2'])
def test_discrete_schedule_hits_every_timestep_and_feeds_back_the_timestep_of_its_time(
    beta_schedule):
  """t = (tau + 1) / T has the log-SNR of timestep tau, log(abar / (1 - abar)); the fed timestep of
  logsnr(t) is T t - 1 on [1/T, 1] (fractional between timesteps), clipped to [0, T - 1] outside the
  trained range."""
  steps = 1000
  table = discrete_logsnr_table(num_train_timesteps=steps, beta_schedule=beta_schedule,
                                beta_start=1e-4, beta_end=0.02)
  abar = np.cumprod(1.0 - np.linspace(1e-4, 0.02, steps)) if beta_schedule == 'linear' else None
  if abar is not None:
    # the closed form, in float64
    np.testing.assert_allclose(table, np.log(abar / (1 - abar)), atol=1e-3)
  assert np.all(np.diff(table) < 0)
  fn = get_logsnr_schedule('discrete', logsnr_min=-20.0, logsnr_max=20.0, num_train_timesteps=steps,
                           beta_schedule=beta_schedule, beta_start=1e-4, beta_end=0.02)
  tau = jnp.array([0, 1, 37, 500, 998, 999])
  # (tau + 1) / T in float32 is off by ~1e-4 of a timestep: up to 5e-4 where the log-SNR falls 7 a
  # timestep.
  np.testing.assert_allclose(fn((tau + 1) / steps), table[np.asarray(tau)], rtol=1e-5, atol=2e-3)
  np.testing.assert_allclose(fn(0.0), 20.0)  # clean data, above timestep 0
  t = jnp.linspace(1.0 / steps, 1.0, 4001)
  logsnr = fn(t)
  assert np.all(np.diff(np.asarray(logsnr)) < 0)
  np.testing.assert_allclose(timestep_of_logsnr(logsnr, table=table), steps * t - 1, atol=2e-3)
  np.testing.assert_allclose(timestep_of_logsnr(jnp.array([30.0, 15.0, -40.0]), table=table),
                             [0, 0, steps - 1])
  np.testing.assert_allclose(discrete_logsnr(jnp.array([-1.0, 2.0]), table=table, logsnr_max=20.0),
                             [20.0, table[-1]], rtol=1e-6)  # t clipped to [0, 1]


def test_alpha_sigma_variance_preserving():
  logsnr = jnp.linspace(-20.0, 20.0, 101)
  alpha, sigma = alpha_sigma(logsnr)
  np.testing.assert_allclose(alpha**2 + sigma**2, 1.0, atol=1e-6)
  inner = np.abs(logsnr) < 10
  np.testing.assert_allclose(np.log(alpha**2 / sigma**2)[inner], logsnr[inner], atol=1e-3)


def test_parametrization_round_trips():
  x, eps = _normal(0, (4, 8, 8, 1)), _normal(1, (4, 8, 8, 1))
  logsnr = jnp.array([-5.0, -1.0, 0.5, 4.0])
  z = diffusion_forward(x=x, eps=eps, logsnr=logsnr)
  v = predict_v(x=x, eps=eps, logsnr=logsnr)
  np.testing.assert_allclose(predict_x_from_v(z=z, v=v, logsnr=logsnr), x, atol=1e-5)
  np.testing.assert_allclose(predict_eps_from_v(z=z, v=v, logsnr=logsnr), eps, atol=1e-5)
  np.testing.assert_allclose(predict_x_from_eps(z=z, eps=eps, logsnr=logsnr), x, atol=1e-3)
  np.testing.assert_allclose(predict_eps_from_x(z=z, x=x, logsnr=logsnr), eps, atol=1e-3)
  for name, output in (('v', v), ('x', x), ('eps', eps)):
    x_pred, eps_pred = x_eps_from_output(z=z, output=output, logsnr=logsnr, parametrization=name)
    np.testing.assert_allclose(x_pred, x, atol=1e-3)
    np.testing.assert_allclose(eps_pred, eps, atol=1e-3)


def test_loss_weightings_match_their_definitions():
  x, eps = _normal(0, (6, 5)), _normal(1, (6, 5))
  logsnr = jnp.linspace(-4.0, 4.0, 6)
  z = diffusion_forward(x=x, eps=eps, logsnr=logsnr)
  v_pred = predict_v(x=x, eps=eps, logsnr=logsnr) + 0.3 * _normal(2, (6, 5))
  x_pred = predict_x_from_v(z=z, v=v_pred, logsnr=logsnr)
  eps_pred = predict_eps_from_v(z=z, v=v_pred, logsnr=logsnr)
  mse = lambda a, b: jnp.mean(jnp.square(a - b), axis=1)
  truncated = weighted_x_loss(x_pred=x_pred, x_target=x, logsnr=logsnr, weighting='truncated_snr')
  np.testing.assert_allclose(truncated, jnp.maximum(mse(x_pred, x), mse(eps_pred, eps)), rtol=1e-4)
  plus_one = weighted_x_loss(x_pred=x_pred, x_target=x, logsnr=logsnr, weighting='snr_plus_one')
  np.testing.assert_allclose(
      plus_one, mse(v_pred, predict_v(x=x, eps=eps, logsnr=logsnr)), rtol=1e-4)
  with pytest.raises(ValueError, match='unknown loss weighting'):
    loss_weight(logsnr, 'nope')


def test_guidance_at_zero_is_conditional_and_linear():
  cond, uncond = _normal(0, (3, 4)), _normal(1, (3, 4))
  np.testing.assert_allclose(guided_prediction(cond=cond, uncond=uncond, guidance_w=0.0), cond)
  w = jnp.array([0.0, 1.0, 4.0])
  expected = (1 + w[:, None]) * cond - w[:, None] * uncond
  np.testing.assert_allclose(
      guided_prediction(cond=cond, uncond=uncond, guidance_w=w), expected, rtol=1e-6)


def test_ddim_step_exact_for_point_mass_in_both_directions():
  x0 = _normal(0, (4, 3))
  eps = _normal(1, (4, 3))
  for t, s in ((1.0, 0.3), (0.7, 0.2), (0.2, 0.9), (0.0, 0.5)):  # sampling and encoding
    logsnr_t, logsnr_s = jnp.full((4,), LOGSNR_FN(t)), jnp.full((4,), LOGSNR_FN(s))
    z_t = diffusion_forward(x=x0, eps=eps, logsnr=logsnr_t)
    z_s = ddim_step(x_pred=x0, eps_pred=eps, logsnr_s=logsnr_s)
    np.testing.assert_allclose(z_s, diffusion_forward(x=x0, eps=eps, logsnr=logsnr_s), atol=1e-5)
    if t > 0:  # eps recovered from z_t by the point-mass denoiser
      eps_from_z = predict_eps_from_x(z=z_t, x=x0, logsnr=logsnr_t)
      np.testing.assert_allclose(
          ddim_step(x_pred=x0, eps_pred=eps_from_z, logsnr_s=logsnr_s), z_s, atol=1e-4)


def _teacher_denoiser(z, logsnr):
  """Some nonlinear 'teacher' x_pred that changes along the path."""
  return jnp.tanh(1.5 * z) + 0.1 * logsnr[:, None]


def test_stage2_target_lands_on_two_teacher_steps():
  z_t = _normal(0, (5, 4))
  for t, n in ((1.0, 4), (0.5, 2), (0.25, 8)):
    logsnr_t, logsnr_mid, logsnr_end = (
        jnp.full((5,), LOGSNR_FN(u)) for u in (t, t - 0.5 / n, t - 1.0 / n))
    x1 = _teacher_denoiser(z_t, logsnr_t)
    z_mid = ddim_step(x_pred=x1, eps_pred=predict_eps_from_x(z=z_t, x=x1, logsnr=logsnr_t),
                      logsnr_s=logsnr_mid)
    x2 = _teacher_denoiser(z_mid, logsnr_mid)
    z_end = ddim_step(x_pred=x2, eps_pred=predict_eps_from_x(z=z_mid, x=x2, logsnr=logsnr_mid),
                      logsnr_s=logsnr_end)
    x_tilde = stage2_x_target(z_t=z_t, z_tpp=z_end, logsnr_t=logsnr_t, logsnr_tpp=logsnr_end)
    one_step = ddim_step(x_pred=x_tilde,
                         eps_pred=predict_eps_from_x(z=z_t, x=x_tilde, logsnr=logsnr_t),
                         logsnr_s=logsnr_end)
    np.testing.assert_allclose(one_step, z_end, atol=1e-4)
    # the target is not just the teacher's first x_pred
    assert not np.allclose(x_tilde, x1, atol=1e-2)


def test_stage2_target_is_the_point_mass_itself():
  x0, z_t = _normal(0, (5, 4)), _normal(1, (5, 4))
  logsnr_t, logsnr_mid, logsnr_end = (jnp.full((5,), LOGSNR_FN(u)) for u in (0.75, 0.625, 0.5))
  z_mid = ddim_step(x_pred=x0, eps_pred=predict_eps_from_x(z=z_t, x=x0, logsnr=logsnr_t),
                    logsnr_s=logsnr_mid)
  z_end = ddim_step(x_pred=x0, eps_pred=predict_eps_from_x(z=z_mid, x=x0, logsnr=logsnr_mid),
                    logsnr_s=logsnr_end)
  x_tilde = stage2_x_target(z_t=z_t, z_tpp=z_end, logsnr_t=logsnr_t, logsnr_tpp=logsnr_end)
  np.testing.assert_allclose(x_tilde, x0, atol=1e-4)


@pytest.mark.parametrize('logsnr_t', [-6.0, 0.0, 3.0])
def test_posterior_and_renoise_stds_stay_accurate_for_close_times(logsnr_t):
  """float32 std of q(z_s | z_t, x) and of q(z_u | z_s) for logsnr gaps of 1e-5: relative error <=
  1e-4 against float64 closed forms (the difference form sigma_t^2 - alpha_ts^2 sigma_s^2 loses
  ~1e-2 here)."""
  gap = 1e-5
  lt, ls = np.float64(logsnr_t), np.float64(logsnr_t) + gap  # s is just less noisy than t
  sigmoid = lambda v: 1.0 / (1.0 + np.exp(-v))
  want_posterior = np.sqrt(sigmoid(-ls) * -np.expm1(lt - ls))  # sigma_s^2 (1 - SNR_t / SNR_s)
  want_renoise = np.sqrt(sigmoid(-lt) * -np.expm1(lt - ls))  # sigma_t^2 (1 - SNR_t / SNR_s)
  as32 = lambda v: jnp.full((1,), v, jnp.float32)
  _, std = ddpm_posterior(z_t=jnp.zeros((1, 1)), x_pred=jnp.zeros((1, 1)), logsnr_t=as32(lt),
                          logsnr_s=as32(ls))
  noise_only = renoise(
      z_s=jnp.zeros((1, 1)), logsnr_s=as32(ls), logsnr_u=as32(lt), noise=jnp.ones((1, 1)))
  # float32 rounds the logsnr inputs themselves: compare with the closed form at the rounded gap
  rounded_gap = float(np.float32(ls)) - float(np.float32(lt))
  scale = np.sqrt(-np.expm1(-rounded_gap) / -np.expm1(-gap))
  np.testing.assert_allclose(float(std[0, 0]), want_posterior * scale, rtol=1e-4)
  np.testing.assert_allclose(float(noise_only[0, 0]), want_renoise * scale, rtol=1e-4)


def test_ddpm_posterior_and_renoise_preserve_the_marginals():
  """Monte Carlo: z_t ~ q(z_t|x0) then z_s ~ q(z_s|z_t, x0) has the marginal q(z_s|x0); same for
  renoise."""
  n, x0 = 200_000, 0.7
  logsnr_t, logsnr_s = jnp.full((n,), LOGSNR_FN(0.8)), jnp.full((n,), LOGSNR_FN(0.4))
  x = jnp.full((n, 1), x0)
  z_t = diffusion_forward(x=x, eps=_normal(0, (n, 1)), logsnr=logsnr_t)
  mean, std = ddpm_posterior(z_t=z_t, x_pred=x, logsnr_t=logsnr_t, logsnr_s=logsnr_s)
  z_s = mean + std * _normal(1, (n, 1))
  alpha_s, sigma_s = alpha_sigma(LOGSNR_FN(0.4))
  np.testing.assert_allclose([z_s.mean(), z_s.std()], [alpha_s * x0, sigma_s], atol=5e-3)
  z_u = renoise(z_s=z_s, logsnr_s=logsnr_s, logsnr_u=logsnr_t, noise=_normal(2, (n, 1)))
  alpha_t, sigma_t = alpha_sigma(LOGSNR_FN(0.8))
  np.testing.assert_allclose([z_u.mean(), z_u.std()], [alpha_t * x0, sigma_t], atol=5e-3)


def test_ddpm_large_variance_is_at_least_the_small_one_for_every_s_before_t():
  t = jnp.linspace(0.0, 1.0, 41)
  s_grid, t_grid = (a.ravel() for a in jnp.meshgrid(t, t))
  earlier = s_grid < t_grid
  logsnr_s, logsnr_t = LOGSNR_FN(s_grid[earlier]), LOGSNR_FN(t_grid[earlier])  # [P] each, s < t
  small = ddpm_small_variance(logsnr_t=logsnr_t, logsnr_s=logsnr_s)
  large = ddpm_large_variance(logsnr_t=logsnr_t, logsnr_s=logsnr_s)
  assert np.all(np.asarray(small) >= 0) and np.all(np.asarray(large) >= np.asarray(small))
  # a variance-preserving step never adds more than unit variance
  assert np.all(np.asarray(large) <= 1.0)


@pytest.mark.parametrize('logsnr_t, logsnr_s, small, large', [
    # SNR_t = 1, SNR_s = 3: sigma_t^2 = 1/2, sigma_s^2 = 1/4, 1 - SNR_t / SNR_s = 2/3
    (0.0, np.log(3.0), 2 / 3 * 1 / 4, 2 / 3 * 1 / 2),
    # SNR_t = 1/3, SNR_s = 3: sigma_t^2 = 3/4, sigma_s^2 = 1/4, 1 - SNR_t / SNR_s = 8/9; large = 1 -
    # alpha_t^2/alpha_s^2
    (-np.log(3.0), np.log(3.0), 8 / 9 * 1 / 4, 1 - (1 / 4) / (3 / 4)),
])
def test_ddpm_variances_match_hand_computed_closed_forms(logsnr_t, logsnr_s, small, large):
  as_batch = lambda v: jnp.full((1,), v, jnp.float32)
  kwargs = dict(logsnr_t=as_batch(logsnr_t), logsnr_s=as_batch(logsnr_s))
  np.testing.assert_allclose(ddpm_small_variance(**kwargs), [small], rtol=1e-5)
  np.testing.assert_allclose(ddpm_large_variance(**kwargs), [large], rtol=1e-5)
  z_t, x_pred = jnp.full((1, 2), 0.3), jnp.full((1, 2), -0.6)
  mean_small, std_small = ddpm_posterior(z_t=z_t, x_pred=x_pred, **kwargs)
  mean_large, std_large = ddpm_posterior(z_t=z_t, x_pred=x_pred, variance='large', **kwargs)
  np.testing.assert_allclose(mean_large, mean_small)  # the choice changes the noise only
  np.testing.assert_allclose(std_small, np.sqrt(small), rtol=1e-5)
  np.testing.assert_allclose(std_large, np.sqrt(large), rtol=1e-5)
  with pytest.raises(ValueError,
                     match="unknown DDPM variance 'medium'; choose one of: small, large"):
    ddpm_posterior(z_t=z_t, x_pred=x_pred, variance='medium', **kwargs)
