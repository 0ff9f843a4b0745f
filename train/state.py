"""Train state, optimizer and the pure, data-parallel train step shared by every stage."""

import dataclasses
import math
from typing import Any, Callable, Optional

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax


@dataclasses.dataclass(frozen=True)
class ParamLayout:
  """Where each array of a params tree sits in one vector [N]; hashable, so it is static under jit.

  The train step keeps params, EMA and Adam's moments as such vectors: its update is a handful of
  large element-wise ops instead of several small ones per parameter array (the reference U-Net has
  455 arrays).
  """
  treedef: Any
  shapes: tuple[tuple[int, ...], ...]
  dtypes: tuple[str, ...]
  # each array's top-level key ('guidance_embed', ...): per-key learning rates
  top_keys: tuple[str, ...]

  @classmethod
  def of(cls, params) -> 'ParamLayout':
    paths_and_leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    return cls(
        treedef=treedef, shapes=tuple(tuple(leaf.shape) for _, leaf in paths_and_leaves),
        dtypes=tuple(str(leaf.dtype) for _, leaf in paths_and_leaves),
        top_keys=tuple(str(getattr(path[0], 'key', path[0])) for path, _ in paths_and_leaves))

  @property
  def size(self) -> int:
    return sum(math.prod(shape) for shape in self.shapes)

  def matches(self, tree) -> bool:
    """Whether tree is a params tree of this layout (a dict of the same structure)."""
    return isinstance(tree, dict) and jax.tree.structure(tree) == self.treedef

  def pack(self, tree) -> jnp.ndarray:
    """params tree -> [N] in the arrays' common dtype."""
    dtype = jnp.result_type(*self.dtypes)
    return jnp.concatenate(
        [jnp.ravel(leaf).astype(dtype) for leaf in self.treedef.flatten_up_to(tree)])

  def unpack(self, vector: jnp.ndarray):
    """[N] -> params tree (slices of the vector, reshaped, in each array's own dtype)."""
    ends = np.cumsum([math.prod(shape) for shape in self.shapes])
    pieces = jnp.split(vector, ends[:-1])
    return self.treedef.unflatten([
        piece.reshape(shape).astype(dtype)
        for piece, shape, dtype in zip(pieces, self.shapes, self.dtypes)
    ])

  def per_top_key(self, values: dict, default: float = 1.0) -> jnp.ndarray:
    """[N]: values[k] at every entry of an array under top-level key k, default elsewhere."""
    return jnp.concatenate([jnp.full(math.prod(shape), values.get(key, default), jnp.float32)
                            for shape, key in zip(self.shapes, self.top_keys)])


@flax.struct.dataclass
class TrainState:
  """What a train step updates. Packed (the train step's form, `layout` set): params, ema_params and
  the optimizer's per-parameter moments are vectors [N] laid out by `layout`. Unpacked
  (`unpack_state`, layout None, the form of checkpoints and of every reader): params trees."""
  step: jnp.ndarray  # int32 []
  params: Any
  ema_params: Any  # equals params when ema_decay == 0 (no EMA, as in distillation rounds)
  opt_state: Any
  rng: jnp.ndarray  # uint32 [2], raw key data so Orbax can save it
  num_skipped: jnp.ndarray  # int32 []: updates skipped for a non-finite loss or gradient
  consecutive_skipped: jnp.ndarray  # int32 []: length of the current run of skipped updates
  layout: Optional[ParamLayout] = flax.struct.field(pytree_node=False, default=None)


def pack_state(state: TrainState) -> TrainState:
  """Unpacked -> packed: params, EMA and every params-shaped tree in the optimizer state become
  vectors [N]."""
  layout = ParamLayout.of(state.params)
  pack = lambda tree: layout.pack(tree) if layout.matches(tree) else tree
  return state.replace(params=layout.pack(state.params),
                       ema_params=layout.pack(state.ema_params),
                       opt_state=jax.tree.map(pack, state.opt_state, is_leaf=layout.matches),
                       layout=layout)


def unpack_state(state: TrainState) -> TrainState:
  """Packed -> unpacked (params trees), the form a checkpoint holds; jit it to run as one
  program."""
  layout = state.layout
  unpack = lambda x: layout.unpack(x) if getattr(x, 'shape', None) == (layout.size,) else x
  return state.replace(params=layout.unpack(state.params),
                       ema_params=layout.unpack(state.ema_params),
                       opt_state=jax.tree.map(unpack, state.opt_state), layout=None)


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


def create_train_state(params, tx: optax.GradientTransformation, *, seed: int,
                       packed: bool = True) -> TrainState:
  """A TrainState at step 0, its EMA equal to params.

  Params and EMA get their own buffers, since the train step donates the state.

  Args:
    params: the initial params tree.
    tx: the optimizer (make_optimizer), initialised on the params in the state's form.
    seed: the seed of the state's PRNG key, from which each step's key is folded.
    packed: the packed form (`layout` set, params and ema_params vectors [N]); False keeps the
      params trees (the form `benchmarks/state_form.py` compares it with).

  Returns:
    The TrainState.
  """
  copy = lambda tree: jax.tree.map(lambda x: jnp.array(x, copy=True), tree)
  layout = ParamLayout.of(params) if packed else None
  params = layout.pack(params) if packed else copy(params)  # the caller's arrays stay live
  return TrainState(step=jnp.zeros((), jnp.int32),
                    params=params,
                    ema_params=copy(params),
                    opt_state=tx.init(params),
                    rng=jax.random.key_data(jax.random.key(seed)),
                    num_skipped=jnp.zeros((), jnp.int32),
                    consecutive_skipped=jnp.zeros((), jnp.int32),
                    layout=layout)


def _tree_select(pred, on_true, on_false):
  return jax.tree.map(lambda a, b: jnp.where(pred, a, b), on_true, on_false)


def _scale_updates(updates, layout: Optional[ParamLayout], scales: dict):
  """updates x scales[k] for the arrays under top-level key k, in the state's form."""
  if layout is not None:
    return updates * layout.per_top_key(scales)
  return {key: jax.tree.map(lambda u, f=scales.get(key, 1.0): u * f, tree)
          for key, tree in updates.items()}


LossFn = Callable[..., tuple[jnp.ndarray, dict]]


def make_train_step(loss_fn: LossFn, tx: optax.GradientTransformation, *, ema_decay: float,
                    lr_schedule: optax.Schedule, lr_scales: Optional[dict] = None):
  """Builds the pure `train_step(state, batch, frozen) -> (state, metrics)` on a packed state (or
  on an unpacked one: `create_train_state(packed=False)`).

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
    layout = state.layout
    rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    frozen = jax.lax.stop_gradient(frozen)
    as_tree = layout.unpack if layout is not None else lambda params: params
    tree_loss = lambda params: loss_fn(as_tree(params), batch, rng, frozen)
    (loss, aux), grads = jax.value_and_grad(tree_loss, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    if lr_scales:
      updates = _scale_updates(updates, layout, lr_scales)
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
