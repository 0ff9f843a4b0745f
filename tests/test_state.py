"""The packed train state: params, EMA and Adam's moments as one vector each, the same update as per
array."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import tiny_config
from train.state import (ParamLayout, create_train_state, learning_rate_schedule, make_optimizer,
                         make_train_step, pack_state, unpack_state)

_PARAMS = {'conv': {'kernel': jnp.arange(24, dtype=jnp.float32).reshape(2, 3, 4) / 10,
                    'bias': jnp.array([0.5, -1.0])},
           # a scalar leaf too
           'embed': {'table': jnp.linspace(-1, 1, 6).reshape(3, 2)}, 'scale': jnp.array(2.0)}


def test_pack_then_unpack_gives_back_every_array_exactly():
  layout = ParamLayout.of(_PARAMS)
  vector = layout.pack(_PARAMS)
  assert vector.shape == (layout.size,) == (24 + 2 + 6 + 1,)
  jax.tree.map(np.testing.assert_array_equal, layout.unpack(vector), _PARAMS)
  bf16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), _PARAMS)  # each array keeps its own dtype
  back = ParamLayout.of(bf16).unpack(ParamLayout.of(bf16).pack(bf16))
  assert all(leaf.dtype == jnp.bfloat16 for leaf in jax.tree.leaves(back))
  jax.tree.map(np.testing.assert_array_equal, back, bf16)


def test_per_top_key_fills_each_arrays_entries_with_its_keys_value():
  layout = ParamLayout.of(_PARAMS)
  scales = layout.unpack(layout.per_top_key({'embed': 10.0}))
  np.testing.assert_array_equal(scales['embed']['table'], np.full((3, 2), 10.0))
  np.testing.assert_array_equal(scales['conv']['kernel'], np.ones((2, 3, 4)))
  assert float(scales['scale']) == 1.0


def test_an_unpacked_state_has_the_per_array_structure_checkpoints_hold():
  """Checkpoints hold unpacked states: the optimizer state of an unpacked state is tx.init of the
  params tree (checkpoints written before the packed step restore into it), and packing it again is
  exact."""
  tx = make_optimizer(tiny_config('/tmp/unused').train)
  state = create_train_state(_PARAMS, tx, seed=0)
  unpacked = unpack_state(state)
  assert jax.tree.structure(unpacked.opt_state) == jax.tree.structure(tx.init(_PARAMS))
  assert (unpacked.layout is None and
          jax.tree.structure(unpacked.params) == jax.tree.structure(_PARAMS))
  repacked = pack_state(unpacked)
  assert repacked.layout == state.layout
  jax.tree.map(np.testing.assert_array_equal, repacked, state)


def _per_array_step(loss_fn, tx, ema_decay, state, batch):
  """The update written per array (as this repo's step was before it packed the state): a
  reference."""
  grads = jax.grad(lambda p: loss_fn(p, batch, None, None)[0])(state['params'])
  updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
  params = optax.apply_updates(state['params'], updates)
  decay = min(ema_decay, (1.0 + state['step']) / (10.0 + state['step']))
  ema = optax.incremental_update(params, state['ema'], 1.0 - decay)
  return {'params': params, 'ema': ema, 'opt_state': opt_state, 'step': state['step'] + 1}


@pytest.mark.parametrize('packed', [True, False])
def test_the_packed_step_is_the_per_array_update(packed):
  """AdamW with weight decay, global-norm clipping (active: the gradient norm is above 1) and the
  EMA warm-up, three steps: the step (packed, or on params trees) and the per-array reference agree
  on params, EMA and Adam's moments."""
  section = tiny_config('/tmp/unused').train
  section.update(warmup_steps=0, weight_decay=0.1, grad_clip=1.0)
  tx = make_optimizer(section)
  loss_fn = lambda p, batch, rng, frozen: (
      sum(jnp.sum(jnp.square(leaf - batch)) for leaf in jax.tree.leaves(p)), {})
  step = jax.jit(
      make_train_step(loss_fn, tx, ema_decay=0.9, lr_schedule=learning_rate_schedule(section)))
  state = create_train_state(_PARAMS, tx, seed=0, packed=packed)
  reference = {'params': _PARAMS, 'ema': _PARAMS, 'opt_state': tx.init(_PARAMS), 'step': 0}
  for batch in (jnp.float32(0.3), jnp.float32(-2.0), jnp.float32(1.0)):
    state, metrics = step(state, batch, None)
    reference = _per_array_step(loss_fn, tx, 0.9, reference, batch)
    assert float(metrics['grad_norm']) > 1.0  # clipping acts
  unpacked = unpack_state(state) if packed else state
  close = lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-6, atol=1e-7)
  jax.tree.map(close, unpacked.params, reference['params'])
  jax.tree.map(close, unpacked.ema_params, reference['ema'])
  jax.tree.map(close, unpacked.opt_state, reference['opt_state'])
  moved = jax.tree.map(
      lambda new, old: float(jnp.max(jnp.abs(new - old))), unpacked.params, _PARAMS)
  assert min(jax.tree.leaves(moved)) > 1e-3  # every array was updated
