"""Train state, optimizer and the pure, data-parallel train step shared by every stage."""

from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class TrainState:
  step: jnp.ndarray  # int32 []
  params: Any
  ema_params: Any  # equals params when ema_decay == 0 (no EMA, as in distillation rounds)
  opt_state: Any
  rng: jnp.ndarray  # uint32 [2], raw key data so Orbax can save it
  num_skipped: jnp.ndarray  # int32 []: updates skipped for a non-finite loss or gradient
  consecutive_skipped: jnp.ndarray  # int32 []: length of the current run of skipped updates


def learning_rate_schedule(section) -> optax.Schedule:
  """Linear warmup to section.lr, then constant or linear decay to 0 at section.num_steps."""
  warmup = optax.linear_schedule(0.0, section.lr, max(section.warmup_steps, 1))
  if section.lr_decay == 'constant':
    after = optax.constant_schedule(section.lr)
  elif section.lr_decay == 'linear':
    after = optax.linear_schedule(section.lr, 0.0, max(section.num_steps - section.warmup_steps, 1))
  else:
    raise ValueError(f"unknown lr_decay '{section.lr_decay}'; choose one of: constant, linear")
  return optax.join_schedules([warmup, after], [section.warmup_steps])


def make_optimizer(section) -> optax.GradientTransformation:
  """Adam(W) with global-norm clipping, the settings of the progressive distillation configs.

  section.lr_scales (optional) maps top-level parameter keys to a factor on the learning rate, e.g.
  {'guidance_embed': 10.0}: stage 1's fresh w-embedding learns faster than the backbone copied from the teacher.
  """
  schedule = learning_rate_schedule(section)
  adamw = lambda scale: optax.adamw(lambda count: scale * schedule(count), b1=0.9, b2=0.999,
                                    weight_decay=section.weight_decay)
  scales = {key: scale for key, scale in (section.get('lr_scales') or {}).items() if scale != 1.0}
  if scales:
    label_tree = lambda params: {key: jax.tree.map(lambda _, k=key: k if k in scales else '', value)
                                 for key, value in params.items()}
    update = optax.multi_transform({'': adamw(1.0), **{k: adamw(v) for k, v in scales.items()}}, label_tree)
  else:
    update = adamw(1.0)
  parts = [optax.clip_by_global_norm(section.grad_clip)] if section.grad_clip > 0 else []
  return optax.chain(*parts, update)


def create_train_state(params, tx: optax.GradientTransformation, *, seed: int) -> TrainState:
  params = jax.tree.map(lambda x: jnp.array(x, copy=True), params)  # own buffers: the state is donated
  ema_params = jax.tree.map(lambda x: jnp.array(x, copy=True), params)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, ema_params=ema_params,
                    opt_state=tx.init(params), rng=jax.random.key_data(jax.random.key(seed)),
                    num_skipped=jnp.zeros((), jnp.int32), consecutive_skipped=jnp.zeros((), jnp.int32))


def _tree_select(pred, on_true, on_false):
  return jax.tree.map(lambda a, b: jnp.where(pred, a, b), on_true, on_false)


LossFn = Callable[..., tuple[jnp.ndarray, dict]]


def make_train_step(loss_fn: LossFn, tx: optax.GradientTransformation, *, ema_decay: float,
                    lr_schedule: optax.Schedule):
  """Builds the pure `train_step(state, batch, frozen) -> (state, metrics)`.

  loss_fn(params, batch, rng, frozen) -> (loss, aux metrics). `frozen` holds the teacher's params
  (or None): an argument under stop_gradient, never in the optimizer state or the checkpoint.
  A non-finite loss or gradient leaves params, EMA and optimizer state untouched and is counted.
  """

  def train_step(state: TrainState, batch, frozen):
    rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    frozen = jax.lax.stop_gradient(frozen)
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch, rng, frozen)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    # EMA with the usual warm-up: decay min(ema_decay, (1 + step) / (10 + step)), so short runs are not
    # dominated by their initial parameters.
    decay = jnp.minimum(ema_decay, (1.0 + state.step) / (10.0 + state.step))
    ema_params = params if ema_decay == 0 else optax.incremental_update(params, state.ema_params, 1.0 - decay)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    new_state = state.replace(
        step=state.step + 1,
        params=_tree_select(finite, params, state.params),
        ema_params=_tree_select(finite, ema_params, state.ema_params),
        opt_state=_tree_select(finite, opt_state, state.opt_state),
        num_skipped=state.num_skipped + (~finite).astype(jnp.int32),
        consecutive_skipped=jnp.where(finite, 0, state.consecutive_skipped + 1))
    metrics = {'loss': loss, 'grad_norm': grad_norm, 'lr': lr_schedule(state.step),
               'num_skipped': new_state.num_skipped, 'consecutive_skipped': new_state.consecutive_skipped, **aux}
    return new_state, metrics

  return train_step
