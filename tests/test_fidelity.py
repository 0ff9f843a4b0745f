"""Tests of the fidelity instrument: precision / recall, and a verdict that sees a student guided
differently.

The verdict is tested with constructed students: the exact guided denoiser of the toy mixture,
sampled at another w, must score worse than the teacher's own few-step sampler at the teacher's w.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from data.toy2d import TOY2D_COVS, TOY2D_MEANS
from diffusion import alpha_sigma, guided_prediction, predict_eps_from_x
from eval import fidelity
from eval.metrics import knn_radii, precision_recall
from eval.toy_metrics import toy2d_features
from samplers.samplers import sample_ddim
from tests.exact_denoisers import LOGSNR_FN

NUM_SAMPLES = 2000


def test_knn_radii_are_distances_to_the_kth_other_point():
  points = np.array([[0.0], [1.0], [3.0], [6.0]])
  np.testing.assert_allclose(knn_radii(points, k=1), [1.0, 1.0, 2.0, 3.0])
  np.testing.assert_allclose(knn_radii(points, k=2), [3.0, 2.0, 3.0, 5.0])
  # chunking changes nothing
  np.testing.assert_allclose(knn_radii(points, k=2, chunk=3), [3.0, 2.0, 3.0, 5.0])


def test_precision_recall_of_two_draws_of_one_distribution_are_high_and_symmetric():
  rng = np.random.default_rng(0)
  real, fake = rng.standard_normal((NUM_SAMPLES, 4)), rng.standard_normal((NUM_SAMPLES, 4))
  precision, recall = precision_recall(real, fake)
  assert precision > 0.8 and recall > 0.8
  assert abs(precision - recall) < 0.05


def test_a_collapsed_generator_keeps_precision_and_loses_recall():
  rng = np.random.default_rng(1)
  real = rng.standard_normal((NUM_SAMPLES, 4))
  collapsed = 0.2 * rng.standard_normal((NUM_SAMPLES, 4))  # every sample near the mode
  precision, recall = precision_recall(real, collapsed)
  assert precision > 0.95 and recall < 0.3


def test_an_off_manifold_generator_loses_precision_and_recall():
  rng = np.random.default_rng(2)
  real = rng.standard_normal((NUM_SAMPLES, 4))
  precision, recall = precision_recall(real, rng.standard_normal((NUM_SAMPLES, 4)) + 4.0)
  assert precision < 0.05 and recall < 0.05


def _mixture_x(z_t, logsnr_t, label):
  """Exact E[x | z_t, c] of the toy mixture's class c (label < 4), or E[x | z_t] (label 4, the null
  label)."""
  means, covs = jnp.asarray(TOY2D_MEANS, jnp.float32), jnp.asarray(TOY2D_COVS, jnp.float32)
  alpha, sigma = (a[:, None, None, None] for a in alpha_sigma(logsnr_t))  # [B, 1, 1, 1]
  marginal_cov = alpha**2 * covs[None] + sigma**2 * jnp.eye(2)  # [B, C, 2, 2]
  diff = z_t[:, None, :] - alpha[..., 0] * means[None]  # [B, C, 2]
  solved = jnp.linalg.solve(marginal_cov, diff[..., None])[..., 0]  # [B, C, 2]
  x_per_class = means[None] + alpha[..., 0] * jnp.einsum('cij,bcj->bci', covs, solved)  # [B, C, 2]
  # [B, C]
  log_lik = -0.5 * (jnp.einsum('bci,bci->bc', diff, solved) + jnp.linalg.slogdet(marginal_cov)[1])
  posterior = jax.nn.softmax(log_lik, axis=-1)  # [B, C]
  unconditional = jnp.einsum('bc,bci->bi', posterior, x_per_class)  # [B, 2]
  one_hot = jax.nn.one_hot(jnp.minimum(label, 3), 4)  # [B, C]
  conditional = jnp.einsum('bc,bci->bi', one_hot, x_per_class)
  return jnp.where((label == 4)[:, None], unconditional, conditional)


def _guided_mixture(params, z_t, logsnr_t, label, guidance_w):
  """The exact CFG teacher of the toy mixture: (1 + w) E[x | z, c] - w E[x | z]."""
  del params
  x_pred = guided_prediction(cond=_mixture_x(z_t, logsnr_t, label),
                             uncond=_mixture_x(z_t, logsnr_t, jnp.full_like(label, 4)),
                             guidance_w=guidance_w)
  return x_pred, predict_eps_from_x(z=z_t, x=x_pred, logsnr=logsnr_t)


@functools.partial(jax.jit, static_argnums=1)
def _exact_ddim(guidance_w, num_steps: int):
  label = jnp.arange(NUM_SAMPLES) % 4  # [N]
  z_init = jax.random.normal(jax.random.key(0), (NUM_SAMPLES, 2), jnp.float32)
  w = jnp.full((NUM_SAMPLES,), guidance_w, jnp.float32)
  return sample_ddim(_guided_mixture, None, z_init=z_init, label=label, guidance_w=w,
                     num_steps=num_steps, logsnr_fn=LOGSNR_FN), label


def _features(guidance_w: float, num_steps: int) -> fidelity.SampleFeatures:
  """DDIM samples of the exact CFG teacher from one fixed noise draw and labels, as toy2d
  features."""
  x, label = _exact_ddim(guidance_w, num_steps)
  out = toy2d_features(np.asarray(x))
  return fidelity.SampleFeatures(pool=out['pool'], logits=out['logits'], labels=np.asarray(label))


@pytest.fixture(scope='module')
def toy_sets():
  sets = {(w, n): _features(w, n) for w, n in (
      (1.0, 64), (1.0, 16), (1.0, 8), (0.5, 64), (1.5, 64))}
  real = toy2d_features(np.asarray(TOY2D_MEANS)[np.arange(NUM_SAMPLES) % 4]
                        + np.random.default_rng(3).standard_normal((NUM_SAMPLES, 2)) * 0.2)
  return sets, real['pool']


def test_the_verdict_fails_students_more_or_less_guided_than_their_teacher(toy_sets):
  sets, real_pool = toy_sets
  reference = sets[(1.0, 64)]
  real_stats = (real_pool.mean(0), np.cov(real_pool, rowvar=False))
  score = lambda key: fidelity.score(
      sets[key], reference=reference, real_pool=real_pool, real_stats=real_stats)
  floor = score((1.0, 8))['fidelity']  # the teacher's own 8-step sampler
  assert floor > 0
  # the teacher, fewer steps
  assert fidelity.verdict(score((1.0, 16))['fidelity'], floor) == fidelity.FAITHFUL
  for other_w in (0.5, 1.5):  # a student less or more guided than its teacher, sampled exactly
    assert fidelity.verdict(score((other_w, 64))['fidelity'], floor) == fidelity.DRIFTED
  assert score((1.0, 64))['fidelity'] == pytest.approx(0.0, abs=1e-9)


def test_more_guidance_lowers_recall(toy_sets):
  """The signature of guidance leaking into a student, in the scores the tables show next to
  fidelity."""
  sets, real_pool = toy_sets
  real_stats = (real_pool.mean(0), np.cov(real_pool, rowvar=False))
  less, more = (fidelity.score(sets[(w, 64)], reference=None, real_pool=real_pool,
                               real_stats=real_stats) for w in (0.5, 1.5))
  assert more['accuracy'] >= less['accuracy']  # the toy classes barely overlap: both near 1
  assert more['recall'] < less['recall'] - 0.05


def test_verdict_is_missing_without_a_floor():
  assert fidelity.verdict(0.1, None) is None
  assert fidelity.verdict(None, 0.1) is None
  assert fidelity.verdict(0.1, 0.1) == fidelity.FAITHFUL


def test_guidance_response_is_one_for_the_teacher_and_w_ratio_for_another_w():
  rng = np.random.default_rng(0)
  cond, uncond = rng.normal(size=(16, 8, 8, 1)), rng.normal(size=(16, 8, 8, 1))  # [B, H, W, C]
  guided = lambda w: np.asarray(guided_prediction(cond=cond, uncond=uncond, guidance_w=w))
  response = functools.partial(fidelity.guidance_response, x_teacher=guided(4.0),
                               x_conditional=cond)
  assert response(x_student=guided(4.0)) == pytest.approx(1.0)
  assert response(x_student=cond) == pytest.approx(0.0)
  # a student guided at 3 where asked for 4
  assert response(x_student=guided(3.0)) == pytest.approx(0.75)
  noise = rng.normal(size=cond.shape)
  noise -= (
      np.sum(noise * (guided(4.0) - cond)) / np.sum((guided(4.0) - cond)**2) * (guided(4.0) - cond))
  # an error orthogonal to guidance
  assert response(x_student=guided(4.0) + noise) == pytest.approx(1.0)


def test_guidance_error_is_zero_for_the_teacher_one_for_the_conditional_and_scales_with_w():
  rng = np.random.default_rng(1)
  cond, uncond = rng.normal(size=(16, 8, 8, 1)), rng.normal(size=(16, 8, 8, 1))  # [B, H, W, C]
  guided = lambda w: np.asarray(guided_prediction(cond=cond, uncond=uncond, guidance_w=w))
  error = functools.partial(fidelity.guidance_error, x_teacher=guided(4.0), x_conditional=cond)
  assert error(x_student=guided(4.0)) == pytest.approx(0.0)
  assert error(x_student=cond) == pytest.approx(1.0)
  # a quarter of the guidance term missing
  assert error(x_student=guided(3.0)) == pytest.approx(0.25)
  assert error(x_student=guided(5.0)) == pytest.approx(0.25)  # or too much of it
