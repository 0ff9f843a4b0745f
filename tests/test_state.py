"""The train state and step: the update of params, EMA and Adam's moments against a reference
written per array."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from conftest import tiny_config
from train.state import (create_train_state, learning_rate_schedule, make_optimizer,
                         make_train_step)

_PARAMS = {'conv': {'kernel': jnp.arange(24, dtype=jnp.float32).reshape(2, 3, 4) / 10,
                    'bias': jnp.array([0.5, -1.0])},
           # a scalar leaf too
           'embed': {'table': jnp.linspace(-1, 1, 6).reshape(3, 2)}, 'scale': jnp.array(2.0)}


def test_a_new_state_holds_copies_with_the_structure_checkpoints_hold():
  """Params and EMA are buffers of their own (the step donates the state, the caller's params stay
  live) and the optimizer state is tx.init of the params tree."""
  tx = make_optimizer(tiny_config('/tmp/unused').train)
  state = create_train_state(_PARAMS, tx, seed=0)
  assert jax.tree.structure(state.opt_state) == jax.tree.structure(tx.init(_PARAMS))
  assert jax.tree.structure(state.params) == jax.tree.structure(_PARAMS)
  jax.tree.map(np.testing.assert_array_equal, state.params, _PARAMS)
  jax.tree.map(np.testing.assert_array_equal, state.ema_params, _PARAMS)
  jax.block_until_ready(jax.jit(lambda s: s, donate_argnums=0)(state))  # as a train step does
  jax.tree.map(np.asarray, _PARAMS)  # still readable: not donated with the state


def _per_array_step(loss_fn, tx, ema_decay, state, batch):
  """The update written out per array, without the step's non-finite guard: a reference."""
  grads = jax.grad(lambda p: loss_fn(p, batch, None, None)[0])(state['params'])
  updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
  params = optax.apply_updates(state['params'], updates)
  decay = min(ema_decay, (1.0 + state['step']) / (10.0 + state['step']))
  ema = optax.incremental_update(params, state['ema'], 1.0 - decay)
  return {'params': params, 'ema': ema, 'opt_state': opt_state, 'step': state['step'] + 1}


def test_the_step_is_the_per_array_update():
  """AdamW with weight decay, global-norm clipping (active: the gradient norm is above 1) and the
  EMA warm-up, three steps: the step and the per-array reference agree on params, EMA and Adam's
  moments."""
  section = tiny_config('/tmp/unused').train
  section.update(warmup_steps=0, weight_decay=0.1, grad_clip=1.0)
  tx = make_optimizer(section)
  loss_fn = lambda p, batch, rng, frozen: (
      sum(jnp.sum(jnp.square(leaf - batch)) for leaf in jax.tree.leaves(p)), {})
  step = jax.jit(
      make_train_step(loss_fn, tx, ema_decay=0.9, lr_schedule=learning_rate_schedule(section)))
  state = create_train_state(_PARAMS, tx, seed=0)
  reference = {'params': _PARAMS, 'ema': _PARAMS, 'opt_state': tx.init(_PARAMS), 'step': 0}
  for batch in (jnp.float32(0.3), jnp.float32(-2.0), jnp.float32(1.0)):
    state, metrics = step(state, batch, None)
    reference = _per_array_step(loss_fn, tx, 0.9, reference, batch)
    assert float(metrics['grad_norm']) > 1.0  # clipping acts
  close = lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-6, atol=1e-7)
  jax.tree.map(close, state.params, reference['params'])
  jax.tree.map(close, state.ema_params, reference['ema'])
  jax.tree.map(close, state.opt_state, reference['opt_state'])
  moved = jax.tree.map(
      lambda new, old: float(jnp.max(jnp.abs(new - old))), state.params, _PARAMS)
  assert min(jax.tree.leaves(moved)) > 1e-3  # every array was updated
