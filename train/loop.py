"""The one training loop every stage shares (`run_training`: restore -> loop {step, log, checkpoint}
-> finish) and its data-parallel jitted step."""

import contextlib
import dataclasses
import signal
import threading
import time
from typing import Any, Callable, Iterator, Optional

import jax
import jax.numpy as jnp
from absl import logging
from jax.sharding import NamedSharding, PartitionSpec

from train import checkpoint, records
from train import profile as profile_lib
from train.errors import (NonFiniteError, Preempted, config_section, out_of_memory_as_error,
                          peer_loss_as_error)
from train.mesh import data_mesh
from train.state import (TrainState, create_train_state, learning_rate_schedule, lr_scales,
                         make_optimizer, make_train_step, pack_state, unpack_state)


def per_host_batch_size(global_batch_size: int) -> int:
  if global_batch_size % jax.device_count():
    raise ValueError(
        f'batch_size {global_batch_size} does not divide over {jax.device_count()} devices: '
        f'use a multiple of {jax.device_count()}')
  return global_batch_size // jax.process_count()


def format_seconds(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  return f'{seconds // 3600:d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}'


def make_writer(logdir: Optional[str], *, config: Optional[dict] = None):
  """TensorBoard + metrics.jsonl in logdir (process 0), or None without a logdir; with a config (a
  nested dict), its fields are written first as hparams."""
  if logdir is None:
    return None
  from train import writers  # pylint: disable=g-import-not-at-top
  writer = writers.create_writer(logdir)
  if config is not None:
    writer.write_hparams(writers.config_hparams(config))
  return writer


def _finish(manager, writer, *, failed: bool) -> None:
  """Waits for pending checkpoint writes and flushes the scalars. After a failure, a further error
  here (the same full disk, say) is a warning: the first error is the one the run reports."""
  for step in (manager.wait_until_finished,
               *((writer.flush, writer.close) if writer is not None else ())):
    try:
      step()
    except Exception as err:  # pylint: disable=broad-except
      if not failed:
        raise
      logging.warning('after the error, %s failed too: %s', step.__qualname__,
                      checkpoint.first_line(err))


@contextlib.contextmanager
def watch_preemption(manager):
  """Yields preempted(step) -> the signal number (0: none) from the step at which every process
  saves and stops.

  One process: SIGTERM and Ctrl-C (SIGINT) handlers set a flag (the previous handlers are back
  afterwards); a second Ctrl-C interrupts at once. Under jax.distributed, JAX's preemption service
  catches SIGTERM and picks a step all processes reach.
  """
  if jax.distributed.is_initialized():
    yield lambda step: signal.SIGTERM if manager.reached_preemption(step) else 0
    return
  # signal handlers live in the main thread
  if threading.current_thread() is not threading.main_thread():
    yield lambda step: 0
    return
  received = []

  def handler(signum, frame):
    del frame
    received.append(signum)
    if signum == signal.SIGINT:
      signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C stops at once

  previous = {signum: signal.signal(signum, handler) for signum in (signal.SIGTERM, signal.SIGINT)}
  try:
    yield lambda step: received[0] if received else 0
  finally:
    for signum, handler_before in previous.items():
      signal.signal(signum, signal.SIG_DFL if handler_before is None else handler_before)


class ShardedStep:
  """The jitted, data-parallel train step of one section: state replicated, batch split along
  'data'.

  The step's state is packed (`train.state.TrainState`); `unpack` gives the params trees that
  checkpoints hold and every reader of a state expects, `pack` takes them back.
  """

  def __init__(self, loss_fn: Callable, section):
    per_host_batch_size(section.batch_size)  # validates divisibility
    self.section = section
    mesh = data_mesh()
    self.replicated = NamedSharding(mesh, PartitionSpec())
    self.batch_sharding = NamedSharding(mesh, PartitionSpec('data'))
    self.tx = make_optimizer(section)
    step = make_train_step(loss_fn, self.tx, ema_decay=section.ema_decay,
                           lr_schedule=learning_rate_schedule(section),
                           lr_scales=lr_scales(section))
    self.step_fn = jax.jit(step,
                           in_shardings=(self.replicated, self.batch_sharding, self.replicated),
                           out_shardings=(self.replicated, self.replicated), donate_argnums=(0,))
    self.pack = jax.jit(pack_state, out_shardings=self.replicated)
    self.unpack = jax.jit(unpack_state, out_shardings=self.replicated)

  def init_state(self, params, *, seed: int) -> TrainState:
    """The packed state at step 0."""
    return jax.device_put(create_train_state(params, self.tx, seed=seed), self.replicated)

  def global_batch(self, local: dict) -> dict:
    """This process's rows {'x', 'label'} -> global arrays sharded over every device."""
    return {
        k: jax.make_array_from_process_local_data(self.batch_sharding, v) for k, v in local.items()
    }

  def put_frozen(self, frozen):
    return None if frozen is None else jax.device_put(frozen, self.replicated)


def _sharded_step(loss_fn: Callable, section, sharded_step: Optional[ShardedStep]) -> ShardedStep:
  """sharded_step when given (refused if built for other optimizer settings: its optimizer and
  schedule would train this run), else a new ShardedStep of loss_fn."""
  if sharded_step is None:
    return ShardedStep(loss_fn, section)
  if sharded_step.section.to_dict() != section.to_dict():
    raise ValueError('run_training: sharded_step was built for another optimizer section')
  return sharded_step


def _step_flops(sharded: ShardedStep, state, frozen, section, record: dict,
                profile) -> Optional[float]:
  """FLOPs of one train step (`profile.step_flops`) when profile.flops asks for it ('auto':
  accelerators only)."""
  if profile is None or 'x_shape' not in record:
    return None
  if not (profile.flops == 'on' or (profile.flops == 'auto' and jax.default_backend() != 'cpu')):
    return None
  batch = {
      'x': jax.ShapeDtypeStruct((section.batch_size, *record['x_shape']), jax.numpy.float32,
                                sharding=sharded.batch_sharding),
      'label': jax.ShapeDtypeStruct((section.batch_size,), jax.numpy.int32,
                                    sharding=sharded.batch_sharding)
  }
  return profile_lib.step_flops(sharded.step_fn, state, batch, frozen)


def run_training(*, title: str, loss_fn: Callable, params, section, ckpt_dir: str, record: dict,
                 make_batches: Callable[[int], Iterator[dict]], seed: int, frozen=None,
                 logdir: Optional[str] = None, sharded_step: Optional[ShardedStep] = None,
                 profile=None) -> tuple[TrainState, dict]:
  """Trains params on loss_fn for section.num_steps steps, resuming from ckpt_dir if it holds a run.

  Restore -> loop {step, log, checkpoint} -> finish, as flax's examples/imagenet. A killed run
  resumes from its last checkpoint and ends with the uninterrupted run's params.

  Args:
    title: the name in progress lines and errors ('teacher', 'stage2 8->4 steps', ...).
    loss_fn: `loss_fn(params, batch, rng, frozen) -> (loss, aux metrics)` (distill.objectives).
    params: the initial params tree (ignored when ckpt_dir holds a checkpoint).
    section: the config section with batch_size, the optimizer and num_steps, log_every,
      checkpoint_every, keep_checkpoints, max_nonfinite_steps.
    ckpt_dir: the Orbax directory of this run; its record must fit `record` to resume.
    record: what the checkpoints say they hold (train.records.make).
    make_batches: make_batches(start_step) yields this process's batches {'x', 'label'} from that
      step on (a resumed run replays the same data).
    seed: seeds the state's PRNG key.
    frozen: the teacher's params (or None): passed to every step, never optimised or saved.
    logdir: TensorBoard events, metrics.jsonl and traces (None: progress lines only).
    sharded_step: a ShardedStep of this section whose loss computes what loss_fn does, shared by
      several runs (the halving rounds) so they share one compiled program; None builds one.
    profile: config.profile (optional): a trace of some steps into logdir (clu's Profile action)
      and the FLOP count behind the logged model_flops_per_sec and mfu.

  Returns:
    (the final TrainState, unpacked: params trees; the scalars of the last log step: {} when the
    checkpoint was complete).

  Raises:
    Preempted: SIGTERM or Ctrl-C; the step just done was saved.
    NonFiniteError: section.max_nonfinite_steps non-finite updates in a row (nothing non-finite is
      saved).
    OutOfMemoryError, PeerLostError: the step ran out of device memory, another process stopped.
    checkpoint.CheckpointError, checkpoint.SaveError: a checkpoint that cannot be used or written.
  """
  # Restore: refuse a directory whose checkpoints were all set aside as damaged (never restart from
  # step 0 silently), then the newest readable step (its record must fit this run's).
  checkpoint.check_not_all_set_aside(ckpt_dir)
  sharded = _sharded_step(loss_fn, section, sharded_step)
  state = sharded.init_state(params, seed=seed)
  record = dict(record, train_steps=section.num_steps)  # the step at which this stage is complete
  with checkpoint.open_manager(ckpt_dir, keep=section.keep_checkpoints) as manager:
    if manager.latest_step() is not None:
      # shapes and shardings: no unpacked copy of the state
      target = jax.eval_shape(sharded.unpack, state)
      state = sharded.pack(checkpoint.restore_state(manager, target, ckpt_dir,
                                                    check_record=records.checker(record, ckpt_dir)))
      logging.info('[%s] resuming from step %d in %s', title, int(state.step), ckpt_dir)
    start = int(jax.device_get(state.step))
    if start >= section.num_steps:
      logging.info('[%s] already trained (%d steps in %s); skipping', title, start, ckpt_dir)
      return sharded.unpack(state), {}
    # Logs append (the config as hparams on a fresh start only); the data replay from `start`.
    writer = make_writer(logdir, config=record.get('config') if start == 0 else None)
    run = _Run(title, sharded, section, manager, record, writer, start)
    frozen = sharded.put_frozen(frozen)
    flops = _step_flops(sharded, state, frozen, section, record, profile)
    window = _Window(flops, profile_lib.peak_flops(dtype=(record.get('model') or {}).get(
        'dtype', 'float32')))  # MFU is against the peak at the compute dtype
    hooks = _hooks(logdir, profile, start)
    block_each_step = jax.default_backend() == 'cpu' and jax.device_count() > 1
    scalars, failed, previous = {}, True, None
    try:
      with watch_preemption(manager) as preempted, run.errors_as_one_line():
        batches = make_batches(start)
        for hook in hooks:
          hook(start)
        for step in range(start + 1, section.num_steps + 1):
          # Train: one step, queued on the device; the host reads nothing of it yet.
          with jax.profiler.StepTraceAnnotation('train', step_num=step):
            state, metrics = sharded.step_fn(state, sharded.global_batch(next(batches)), frozen)
          if block_each_step:  # XLA:CPU's collectives over several devices
            jax.block_until_ready(state)
          for hook in hooks:
            hook(step)
          # The previous step's count of consecutive skipped updates, read once this step is queued
          # behind it: a run of non-finite steps stops at the limit, before anything is saved.
          run.check_nonfinite(previous)
          previous = (step, metrics['consecutive_skipped'])
          window.add(metrics)
          # Log: the means since the last log line.
          if step % section.log_every == 0 or step == section.num_steps:
            scalars = _log(run, step, window)
          if step == section.num_steps:
            run.check_nonfinite(previous, final=True)
          # Checkpoint: periodically, at the end, and on SIGTERM / Ctrl-C (then stop).
          signum = preempted(step)
          if step % section.checkpoint_every == 0 or step == section.num_steps or signum:
            run.save(state, step)
          if signum:
            logging.info('[%s] preempted: saved step %d in %s', title, step, ckpt_dir)
            raise Preempted(title, step, ckpt_dir, signum)
      failed = False
    finally:
      # Finish: stop a trace still running, wait for the checkpoint writes, flush the scalars.
      _stop_trace(hooks)
      _finish(manager, writer, failed=failed)
  return sharded.unpack(state), scalars


def _hooks(logdir: Optional[str], profile, start: int) -> list:
  """clu periodic actions called after each step: a profiler trace of profile.num_steps steps from
  profile.start_step into logdir (process 0), or none (also when the run starts after that step)."""
  if (logdir is None or profile is None or profile.num_steps <= 0 or jax.process_index() != 0 or
      start >= profile.start_step):
    return []
  from clu import periodic_actions  # pylint: disable=g-import-not-at-top  (imports TensorFlow)
  logging.info('profiling steps %d-%d into %s', profile.start_step,
               profile.start_step + profile.num_steps - 1, logdir)
  # called after step start_step - 1 (or with the step a run starts from): the trace holds steps
  # start_step .. start_step + num_steps - 1
  return [periodic_actions.Profile(logdir=logdir, num_profile_steps=profile.num_steps,
                                   profile_duration_ms=None, first_profile=profile.start_step - 1,
                                   every_secs=None)]


def _stop_trace(hooks: list) -> None:
  """Ends a trace the run stopped inside of (an error, a signal, or fewer steps than traced)."""
  if hooks:
    try:
      jax.profiler.stop_trace()
    except RuntimeError:  # none running: the action had stopped it
      pass


@dataclasses.dataclass
class _Run:
  """What the steps of one run_training share: where it saves and logs, and the step it started
  from."""
  title: str
  sharded: ShardedStep
  section: Any
  manager: Any
  record: dict
  writer: Any
  start: int

  @property
  def ckpt_dir(self) -> str:
    return str(self.manager.directory)

  def diverged(self, what: str, *, all_skipped: bool = False) -> NonFiniteError:
    """The NonFiniteError of a run stopped at non-finite training: which checkpoint is the last
    finite one (every saved one is: `checkpoint.save` writes no other), and how to go on from it or
    restart the stage from scratch.

    all_skipped: no update of this run was finite; when it resumed from that checkpoint, the
    checkpoint itself has diverged and only a restart from scratch helps.
    """
    self.manager.wait_until_finished()
    last, ckpt_dir = self.manager.latest_step(), self.ckpt_dir
    lr = f'--config.{config_section(self.record["stage"])}.lr, now {self.section.lr:g}'
    scratch = f'mv {ckpt_dir} {ckpt_dir}.diverged'
    if last is None:
      return NonFiniteError(
          f'[{self.title}] {what}: stopped, no checkpoint saved; rerun with a lower learning rate '
          f'({lr}) or check the data')
    if all_skipped and 0 < self.start == last:
      return NonFiniteError(
          f'[{self.title}] {what}: stopped; step {last} in {ckpt_dir}, the last finite checkpoint '
          'and the one this run resumed from, has diverged itself (no finite update since): '
          f'restart the stage from scratch: {scratch}, then rerun with a lower learning rate '
          f'({lr})')
    return NonFiniteError(
        f'[{self.title}] {what}: stopped; the last finite checkpoint is step {last} in {ckpt_dir}. '
        f'To go on from it, rerun with a lower learning rate ({lr}); to restart the stage from '
        f'scratch (if that step has diverged too), {scratch} and rerun')

  def check_nonfinite(self, step_and_count, *, final: bool = False) -> None:
    """NonFiniteError when (step, consecutive skipped updates up to it) has reached
    section.max_nonfinite_steps, or, at the final step, when any update before it was skipped: such
    a stage is not complete."""
    if step_and_count is None:
      return
    step, count = step_and_count[0], int(step_and_count[1])
    if count >= self.section.max_nonfinite_steps:
      raise self.diverged(f'{count} non-finite steps in a row at step {step}',
                          all_skipped=count >= step - self.start)
    if final and count > 0:
      raise self.diverged(
          f'the last {count} updates up to the final step {step} were non-finite, so the stage is '
          'not complete', all_skipped=count >= step - self.start)

  @contextlib.contextmanager
  def errors_as_one_line(self):
    """A lost peer process and a step out of device memory become errors of one line (main.py
    prints them): PeerLostError names the step to resume from, OutOfMemoryError the batch to
    lower."""
    with peer_loss_as_error(self.title, self.ckpt_dir, self.manager), out_of_memory_as_error(
        f'[{self.title}] train step', section=config_section(self.record['stage']),
        batch_size=self.section.batch_size):
      yield

  def save(self, state, step: int) -> None:
    """Saves step's state and waits until it is written, so training stops at the first save that
    fails (checkpoint.SaveError); a non-finite state is never saved (NonFiniteError). Then flushes
    the scalars logged so far: a kill loses at most the lines since the last checkpoint (a resume
    writes them again)."""
    try:
      with checkpoint.save_errors_as_error(self.title, self.ckpt_dir, step):
        checkpoint.save(self.manager, self.sharded.unpack(state), self.record)
        self.manager.wait_until_finished()
    except checkpoint.NonFiniteStateError as err:
      raise self.diverged(f'{err} at step {step} (not saved)') from err
    if self.writer is not None:
      self.writer.flush()


class _Window:
  """The metrics of the steps since the last log line, summed on the device, and what turns them
  into scalars: the time since that line, the step's FLOPs and the devices' peak (MFU)."""

  def __init__(self, flops: Optional[float], peak: Optional[float]):
    self.flops, self.peak = flops, peak
    self.summed, self.count, self.last = None, 0, None
    self.t_start = self.t_log = time.time()

  def add(self, metrics) -> None:
    self.summed = metrics if self.summed is None else jax.tree.map(jnp.add, self.summed, metrics)
    self.count, self.last = self.count + 1, metrics

  def scalars(self, batch_size: int) -> dict:
    """Means since the last log (counters: their last value), steps/s, examples/s, FLOP/s and MFU;
    starts the next window."""
    scalars = {k: float(v) / self.count for k, v in jax.device_get(self.summed).items()}
    for key in ('num_skipped', 'consecutive_skipped'):
      scalars[key] = float(jax.device_get(self.last[key]))
    scalars['steps_per_sec'] = self.count / max(time.time() - self.t_log, 1e-9)
    scalars['examples_per_sec'] = scalars['steps_per_sec'] * batch_size
    scalars.update(profile_lib.utilisation(self.flops, scalars['steps_per_sec'], self.peak))
    self.summed, self.count, self.t_log = None, 0, time.time()
    return scalars


def _log(run: _Run, step: int, window: _Window) -> dict:
  """The scalars of the steps since the last log: a progress line, TensorBoard and metrics.jsonl."""
  section = run.section
  scalars = window.scalars(section.batch_size)
  eta = (section.num_steps - step) * (time.time() - window.t_start) / max(step - run.start, 1)
  logging.info('[%s] step %d/%d loss %.4f %.1f steps/s%s ETA %s', run.title, step,
               section.num_steps, scalars['loss'], scalars['steps_per_sec'],
               profile_lib.describe(scalars), format_seconds(eta))
  if run.writer is not None:
    run.writer.write_scalars(step, scalars)
  return scalars
