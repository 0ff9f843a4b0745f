"""A small CNN digits classifier that stands in for Inception (FID / IS / accuracy) on the embedded
digits data."""

import functools
import hashlib
import json
import time
from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp

import data
from train.checkpoint import (DIGEST_KEY, CheckpointError, DamageError, check_digest, latest_step,
                              open_manager, params_digest)

NUM_CLASSES = 10
MAX_SHIFT = 1  # Random translations of up to this many pixels during training.


class DigitsClassifier(nn.Module):
  """x [B, 8, 8, 1] in [-1, 1] -> {'pool': [B, pool_dim] penultimate features, 'logits': [B,
  10]}."""

  features: Sequence[int] = (32, 64)
  pool_dim: int = 128
  dropout: float = 0.2

  @nn.compact
  def __call__(self, x, *, train: bool):
    h = x
    for i, width in enumerate(self.features):
      h = nn.relu(nn.Conv(width, (3, 3), padding='SAME')(h))  # [B, H, W, width]
      if i == 0:
        h = nn.avg_pool(h, (2, 2), strides=(2, 2))  # [B, 4, 4, width]
    h = h.reshape(h.shape[0], -1)  # [B, 4 * 4 * features[-1]]
    pool = nn.relu(nn.Dense(self.pool_dim)(h))  # [B, pool_dim]
    # [B, 10]
    logits = nn.Dense(NUM_CLASSES)(nn.Dropout(self.dropout, deterministic=not train)(pool))
    return {'pool': pool, 'logits': logits}

  def arch(self) -> dict:
    """The JSON-able description saved with a checkpoint; DigitsClassifier(**arch) rebuilds the
    model."""
    return {'features': list(self.features), 'pool_dim': self.pool_dim, 'dropout': self.dropout}


def _random_shift(key, images):
  """Translates each image [B, H, W, C] by up to MAX_SHIFT pixels, filling with background (-1)."""
  batch, height, width, channels = images.shape
  padded = jnp.pad(images, ((0, 0), (MAX_SHIFT, MAX_SHIFT), (MAX_SHIFT, MAX_SHIFT), (0, 0)),
                   constant_values=-1.0)  # [B, H + 2s, W + 2s, C]
  offsets = jax.random.randint(key, (batch, 2), 0, 2 * MAX_SHIFT + 1)  # [B, 2]
  crop = lambda image, offset: jax.lax.dynamic_slice(image, (offset[0], offset[1], 0),
                                                       (height, width, channels))
  return jax.vmap(crop)(padded, offsets)  # [B, H, W, C]


def _make_train_step(model: DigitsClassifier, optimizer, train_x, train_label, batch_size: int):
  """A jitted step(params, opt_state, key) -> (params, opt_state, loss) on an augmented random
  batch."""

  def loss_fn(params, key):
    index_key, shift_key, dropout_key = jax.random.split(key, 3)
    indices = jax.random.randint(index_key, (batch_size,), 0, train_x.shape[0])  # [B]
    images = _random_shift(shift_key, train_x[indices])  # [B, 8, 8, 1]
    logits = model.apply({'params': params}, images, train=True,
                         rngs={'dropout': dropout_key})['logits']
    return optax.softmax_cross_entropy_with_integer_labels(logits, train_label[indices]).mean()

  @jax.jit
  def step(params, opt_state, key):
    loss, grads = jax.value_and_grad(loss_fn)(params, key)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return step


def feature_fn(model: DigitsClassifier, params) -> Callable[[jax.Array], dict]:
  """A jitted images [B, 8, 8, 1] -> {'pool': [B, D], 'logits': [B, 10]} in inference mode."""
  return jax.jit(lambda images: model.apply({'params': params}, images, train=False))


def _test_accuracy(model: DigitsClassifier, params) -> float:
  test_x, test_label = data.load_arrays('digits', 'test')  # [N, 8, 8, 1], [N]
  logits = feature_fn(model, params)(test_x)['logits']  # [N, 10]
  return float(np.mean(np.argmax(np.asarray(logits), axis=-1) == test_label))


def _save(ckpt_dir: str, params, record: dict) -> None:
  """Saves params with record and their digest (checked by load_classifier)."""
  record = dict(record, **{DIGEST_KEY: {'params': params_digest(params)}})
  with open_manager(ckpt_dir, keep=1) as manager:
    manager.save(record['num_steps'], args=ocp.args.Composite(
        params=ocp.args.StandardSave(params), record=ocp.args.JsonSave(record)), force=True)
    manager.wait_until_finished()


def train_classifier(*, ckpt_dir: str, num_steps: int = 1000, batch_size: int = 128,
                     lr: float = 2e-3, seed: int = 0) -> tuple[dict, float]:
  """Trains DigitsClassifier on the digits train split and saves it; loads it instead if ckpt_dir
  has one.

  Returns (params, held-out test accuracy).
  """
  if latest_step(ckpt_dir) is not None:
    _, params, record = load_classifier(ckpt_dir)
    return params, record['accuracy']
  start = time.time()
  model = DigitsClassifier()
  train_x, train_label = (jnp.asarray(a) for a in data.load_arrays('digits', 'train'))
  init_key, key = jax.random.split(jax.random.key(seed))
  # one program
  params = jax.jit(functools.partial(model.init, train=False))(init_key, train_x[:1])['params']
  optimizer = optax.adamw(optax.cosine_decay_schedule(lr, num_steps), weight_decay=1e-4)
  opt_state = optimizer.init(params)
  step = _make_train_step(model, optimizer, train_x, train_label, batch_size)
  for step_key in jax.random.split(key, num_steps):
    params, opt_state, _ = step(params, opt_state, step_key)
  accuracy = _test_accuracy(model, params)
  record = {'accuracy': accuracy, 'num_steps': num_steps, 'arch': model.arch(),
            'train_seconds': round(time.time() - start, 2)}
  _save(ckpt_dir, params, record)
  return params, accuracy


def _read_record(ckpt_dir: str, step: int) -> dict:
  with open_manager(ckpt_dir, create=False) as manager:
    return manager.restore(step, args=ocp.args.Composite(record=ocp.args.JsonRestore()))['record']


def classifier_id(ckpt_dir: str) -> str:
  """'<step>-<hash of its record>' of the classifier in ckpt_dir (its own checkpoint layout: params
  and record, not a train state): features from another classifier get another id. CheckpointError
  when there is none."""
  step = latest_step(ckpt_dir)
  if step is None:
    raise CheckpointError(
        f'no classifier in {ckpt_dir}: --mode=fid trains one there when it is missing')
  record = json.dumps(_read_record(ckpt_dir, step), sort_keys=True)
  return f'{step}-{hashlib.sha1(record.encode()).hexdigest()[:12]}'


def load_classifier(ckpt_dir: str) -> tuple[DigitsClassifier, dict, dict]:
  """(model, params, record) of the classifier saved in ckpt_dir.

  CheckpointError when there is none, or when its params are not the bytes written (their digest
  differs; a classifier saved before digests is read unchecked).
  """
  step = latest_step(ckpt_dir)
  if step is None:
    raise CheckpointError(
        f'no classifier in {ckpt_dir}: --mode=fid trains one there when it is missing')
  record = _read_record(ckpt_dir, step)
  with open_manager(ckpt_dir, create=False) as manager:
    model = DigitsClassifier(**record['arch'])
    init = functools.partial(model.init, train=False)
    abstract = jax.eval_shape(init, jax.random.key(0), jnp.zeros((1, 8, 8, 1)))['params']
    restored = manager.restore(step,
                               args=ocp.args.Composite(params=ocp.args.StandardRestore(abstract)))
  try:
    check_digest(record, step, {'params': restored['params']})
  except DamageError as err:
    raise CheckpointError(f'the classifier in {ckpt_dir} is damaged ({err}): delete that folder '
                          'and it is trained again') from err
  return model, restored['params'], record
