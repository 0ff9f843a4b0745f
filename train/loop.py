"""The one training loop every stage shares: sharded jit step, resume, Orbax saves, progress, scalars."""

import contextlib
import signal
import threading
import time
from typing import Callable, Iterator, Optional

import jax
from absl import logging
from jax.sharding import NamedSharding, PartitionSpec

from train import checkpoint
from train.mesh import data_mesh
from train.state import TrainState, create_train_state, learning_rate_schedule, make_optimizer, make_train_step


class Preempted(Exception):
  """Training stopped on SIGTERM after saving a checkpoint; the same command resumes from it."""

  def __init__(self, title: str, step: int, ckpt_dir: str):
    super().__init__(f'[{title}] SIGTERM: saved step {step} in {ckpt_dir}; run the same command to resume')
    self.step, self.ckpt_dir = step, ckpt_dir


def per_host_batch_size(global_batch_size: int) -> int:
  if global_batch_size % jax.device_count():
    raise ValueError(f'batch_size {global_batch_size} does not divide over {jax.device_count()} devices: '
                     f'use a multiple of {jax.device_count()}')
  return global_batch_size // jax.process_count()


def format_seconds(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  return f'{seconds // 3600:d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}'


def _make_writer(logdir: Optional[str]):
  """Scalars to TensorBoard files in logdir; only process 0 writes (and imports TensorFlow)."""
  if logdir is None or jax.process_index() > 0:
    return None
  from clu import metric_writers  # pylint: disable=g-import-not-at-top  (imports TensorFlow)
  return metric_writers.create_default_writer(logdir)


def _finish(manager, writer) -> None:
  """Waits for pending checkpoint writes and flushes the scalars."""
  manager.wait_until_finished()
  if writer is not None:
    writer.flush()


@contextlib.contextmanager
def watch_preemption(manager):
  """Yields preempted(step) -> bool, True from the step at which every process saves and stops.

  One process: a SIGTERM handler sets a flag (the previous handler is back afterwards). Under
  jax.distributed, JAX's preemption service catches SIGTERM and picks a step all processes reach.
  """
  if jax.distributed.is_initialized():
    yield manager.reached_preemption
    return
  if threading.current_thread() is not threading.main_thread():  # signal handlers live in the main thread
    yield lambda step: False
    return
  received = []
  previous = signal.signal(signal.SIGTERM, lambda signum, frame: received.append(signum))
  try:
    yield lambda step: bool(received)
  finally:
    signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


class NonFiniteError(ValueError):
  """More than max_nonfinite_steps consecutive updates had a non-finite loss or gradient."""


def run_training(*, title: str, loss_fn: Callable, params, section, ckpt_dir: str, record: dict,
                 make_batches: Callable[[int], Iterator[dict]], seed: int, frozen=None,
                 logdir: Optional[str] = None) -> TrainState:
  """Trains `params` on loss_fn for section.num_steps steps, resuming from ckpt_dir if it holds a run.

  make_batches(start_step) yields per-host batches {'x', 'label'}; `frozen` (teacher params) is
  passed to every step but never optimised or saved. Returns the final state. On SIGTERM it saves the
  step just done and raises Preempted.
  """
  mesh = data_mesh()
  replicated = NamedSharding(mesh, PartitionSpec())
  batch_sharding = NamedSharding(mesh, PartitionSpec('data'))
  per_host_batch_size(section.batch_size)  # validates divisibility
  tx = make_optimizer(section)
  state = jax.device_put(create_train_state(params, tx, seed=seed), replicated)
  record = dict(record, train_steps=section.num_steps)
  with checkpoint.open_manager(ckpt_dir, keep=section.keep_checkpoints) as manager:
    if manager.latest_step() is not None:
      state = checkpoint.restore_state(manager, state, record, ckpt_dir)
      logging.info('[%s] resuming from step %d in %s', title, int(state.step), ckpt_dir)
    start = int(jax.device_get(state.step))
    if start >= section.num_steps:
      logging.info('[%s] already trained (%d steps in %s); skipping', title, start, ckpt_dir)
      return state
    step_fn = jax.jit(
        make_train_step(loss_fn, tx, ema_decay=section.ema_decay, lr_schedule=learning_rate_schedule(section)),
        in_shardings=(replicated, batch_sharding, replicated), out_shardings=(replicated, replicated),
        donate_argnums=(0,))
    frozen = None if frozen is None else jax.device_put(frozen, replicated)
    block_each_step = jax.default_backend() == 'cpu' and jax.device_count() > 1  # CPU collectives
    writer = _make_writer(logdir)
    batches = make_batches(start)
    summed, count, t_log = None, 0, time.time()
    t_start = t_log
    with watch_preemption(manager) as preempted:
      for step in range(start, section.num_steps):
        local = next(batches)
        batch = {k: jax.make_array_from_process_local_data(batch_sharding, v) for k, v in local.items()}
        state, metrics = step_fn(state, batch, frozen)
        if block_each_step:
          jax.block_until_ready(state)
        summed = metrics if summed is None else jax.tree.map(lambda a, b: a + b, summed, metrics)
        count += 1
        done = step + 1
        if done % section.log_every == 0 or done == section.num_steps:
          scalars = {k: float(v) / count for k, v in jax.device_get(summed).items()}
          for key in ('num_skipped', 'consecutive_skipped'):  # counters: the last value, not the mean
            scalars[key] = float(jax.device_get(metrics[key]))
          now = time.time()
          scalars['steps_per_sec'] = count / max(now - t_log, 1e-9)
          eta = (section.num_steps - done) * (now - t_start) / max(done - start, 1)
          logging.info('[%s] step %d/%d loss %.4f %.1f steps/s ETA %s', title, done, section.num_steps,
                       scalars['loss'], scalars['steps_per_sec'], format_seconds(eta))
          if writer is not None:
            writer.write_scalars(done, scalars)
          summed, count, t_log = None, 0, now
          if scalars['consecutive_skipped'] >= section.max_nonfinite_steps:  # checked at log steps only
            _finish(manager, writer)
            raise NonFiniteError(f'[{title}] {int(scalars["consecutive_skipped"])} non-finite steps in a row at step '
                                 f'{done}: stopped, the last checkpoint (step {manager.latest_step()}) is kept; '
                                 'lower the learning rate or check the data')
        saved = done % section.checkpoint_every == 0 or done == section.num_steps
        if saved:
          checkpoint.save(manager, state, record)
        if preempted(done):
          if not saved:
            checkpoint.save(manager, state, record)
          _finish(manager, writer)
          logging.info('[%s] preempted: saved step %d in %s', title, done, ckpt_dir)
          raise Preempted(title, done, ckpt_dir)
    _finish(manager, writer)
  return state
