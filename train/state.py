"""Train state, optimizer and the pure, data-parallel train step shared by every stage."""

from typing import Any, Callable, Optional

import flax
import jax
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class TrainState:
  """What a train step updates; the form checkpoints hold and every reader of a state expects:
  params, ema_params and the optimizer's moments are trees of the model's params."""
  step: jnp.ndarray  # int32 []
  params: Any
  ema_params: Any  # equals params when ema_decay == 0 (no EMA, as in distillation rounds)
  opt_state: Any
  rng: jnp.ndarray  # uint32 [2], raw key data so Orbax can save it
  num_skipped: jnp.ndarray  # int32 []: updates skipped for a non-finite loss or gradient
  consecutive_skipped: jnp.ndarray  # int32 []: length of the current run of skipped updates


def learning_rate_schedule(section) -> optax.Schedule:
  """Linear warmup to section.lr, then constant or linear decay to 0 at section.num_steps.

  Args:
    section: a training config section with lr, warmup_steps, num_steps and lr_decay ('constant' or
      'linear').

  Returns:
    The optax schedule, step -> learning rate.

  Raises:
    ValueError: section.lr_decay is neither 'constant' nor 'linear'.
  """
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

  The per-key factors of section.lr_scales are applied by the train step (`lr_scales`).

  Args:
    section: a training config section: the fields of learning_rate_schedule, weight_decay, and
      grad_clip (the global-norm limit; 0 or less: no clipping).

  Returns:
    The optax optimizer.

  Raises:
    ValueError: section.lr_decay is unknown (learning_rate_schedule).
  """
  adamw = optax.adamw(learning_rate_schedule(section), b1=0.9, b2=0.999,
                      weight_decay=section.weight_decay)
  parts = [optax.clip_by_global_norm(section.grad_clip)] if section.grad_clip > 0 else []
  return optax.chain(*parts, adamw)


def lr_scales(section) -> dict:
  """section.lr_scales (optional) without its 1.0 entries: top-level parameter keys -> a factor on
  the learning rate, e.g. {'guidance_embed': 10.0}: stage 1's fresh w-embedding learns faster than
  the backbone copied from the teacher."""
  return {key: scale for key, scale in (section.get('lr_scales') or {}).items() if scale != 1.0}


def create_train_state(params, tx: optax.GradientTransformation, *, seed: int) -> TrainState:
  """A TrainState at step 0, its EMA equal to params.

  Params and EMA get buffers of their own, since the train step donates the state (the caller's
  arrays stay live).

  Args:
    params: the initial params tree.
    tx: the optimizer (make_optimizer).
    seed: the seed of the state's PRNG key, from which each step's key is folded.

  Returns:
    The TrainState.
  """
  copy = lambda tree: jax.tree.map(lambda x: jnp.array(x, copy=True), tree)
  return TrainState(step=jnp.zeros((), jnp.int32),
                    params=copy(params),
                    ema_params=copy(params),
                    opt_state=tx.init(params),
                    rng=jax.random.key_data(jax.random.key(seed)),
                    num_skipped=jnp.zeros((), jnp.int32),
                    consecutive_skipped=jnp.zeros((), jnp.int32))


def _tree_select(pred, on_true, on_false):
  return jax.tree.map(lambda a, b: jnp.where(pred, a, b), on_true, on_false)


def _scale_updates(updates, scales: dict):
  """updates x scales[k] for the arrays under top-level key k."""
  return {key: jax.tree.map(lambda u, f=scales.get(key, 1.0): u * f, tree)
          for key, tree in updates.items()}


LossFn = Callable[..., tuple[jnp.ndarray, dict]]


def make_train_step(loss_fn: LossFn, tx: optax.GradientTransformation, *, ema_decay: float,
                    lr_schedule: optax.Schedule, lr_scales: Optional[dict] = None):
  """Builds the pure `train_step(state, batch, frozen) -> (state, metrics)`.

  `frozen` holds the teacher's params (or None): an argument under stop_gradient, never in the
  optimizer state or the checkpoint. A non-finite loss or gradient leaves params, EMA and optimizer
  state untouched and is counted.

  Args:
    loss_fn: `loss_fn(params, batch, rng, frozen) -> (loss, aux metrics)`; it sees the params tree
      (distill.objectives).
    tx: the optimizer (make_optimizer).
    ema_decay: the EMA decay, warmed up as min(ema_decay, (1 + step) / (10 + step)); 0: no EMA, the
      EMA equals params.
    lr_schedule: the learning-rate schedule (learning_rate_schedule), reported as metrics['lr'].
    lr_scales: {top-level key: factor} (see `lr_scales`), multiplies the update of those keys'
      arrays.

  Returns:
    `train_step(state, batch, frozen) -> (state, metrics)`; metrics holds loss, grad_norm, lr,
    num_skipped, consecutive_skipped and loss_fn's aux metrics.
  """

  def train_step(state: TrainState, batch, frozen):
    rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    frozen = jax.lax.stop_gradient(frozen)
    (loss, aux), grads = jax.value_and_grad(
        lambda params: loss_fn(params, batch, rng, frozen), has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    if lr_scales:
      updates = _scale_updates(updates, lr_scales)
    params = optax.apply_updates(state.params, updates)
    # EMA with the usual warm-up: decay min(ema_decay, (1 + step) / (10 + step)), so short runs are
    # not dominated by their initial parameters.
    decay = jnp.minimum(ema_decay, (1.0 + state.step) / (10.0 + state.step))
    ema_params = params if ema_decay == 0 else optax.incremental_update(
        params, state.ema_params, 1.0 - decay)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    new_state = state.replace(
        step=state.step + 1,
        params=_tree_select(finite, params, state.params),
        ema_params=_tree_select(finite, ema_params, state.ema_params),
        opt_state=_tree_select(finite, opt_state, state.opt_state),
        num_skipped=state.num_skipped + (~finite).astype(jnp.int32),
        consecutive_skipped=jnp.where(finite, 0, state.consecutive_skipped + 1))
    metrics = {
        'loss': loss,
        'grad_norm': grad_norm,
        'lr': lr_schedule(state.step),
        'num_skipped': new_state.num_skipped,
        'consecutive_skipped': new_state.consecutive_skipped,
        **aux
    }
    return new_state, metrics

  return train_step
