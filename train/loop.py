"""The one training loop every stage shares: sharded jit step, resume, Orbax saves, progress,
scalars."""

import contextlib
import dataclasses
import signal
import threading
import time
from typing import Any, Callable, Iterator, Optional

import jax
from absl import logging
from jax.sharding import NamedSharding, PartitionSpec

from train import checkpoint, records
from train import profile as profile_lib
from train.mesh import data_mesh
from train.state import (TrainState, create_train_state, learning_rate_schedule, lr_scales,
                         make_optimizer, make_train_step)


class Preempted(Exception):
  """Training stopped on SIGTERM or Ctrl-C (SIGINT) after saving a checkpoint; the same command
  resumes from it."""

  def __init__(self, title: str, step: int, ckpt_dir: str, signum: int = signal.SIGTERM):
    super().__init__(
        f'[{title}] {signal.Signals(signum).name}: saved step {step} in {ckpt_dir}; run the same '
        'command to resume')
    self.step, self.ckpt_dir, self.signum = step, ckpt_dir, signum


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
  from train import writers  # pylint: disable=g-import-not-at-top  (clu imports TensorFlow)
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


class NonFiniteError(ValueError):
  """More than max_nonfinite_steps consecutive updates had a non-finite loss or gradient."""


class OutOfMemoryError(ValueError):
  """A train step needed more device memory than the devices have; the message says which batch to
  lower."""


def is_out_of_memory(err: BaseException) -> bool:
  """Whether err is XLA's out-of-device-memory error: RESOURCE_EXHAUSTED, 'Out of memory', CUDA's
  OUT_OF_MEMORY."""
  text = str(err).lower().replace('_', ' ')
  return isinstance(err, RuntimeError) and ('resource exhausted' in text or 'out of memory' in text)


def config_section(stage: str) -> str:
  """The config section holding a stage's batch_size and optimizer: 'train' for the teacher."""
  return 'train' if stage == 'teacher' else stage


def _devices_text() -> str:
  """'N <device kind> devices; M GiB usable each' (JAX's allocator limit, where the backend has
  one)."""
  count, device = jax.device_count(), jax.local_devices()[0]
  text = f'{count} {device.device_kind} device{"s" if count > 1 else ""}'
  try:
    limit = (device.memory_stats() or {}).get('bytes_limit')
  except Exception:  # pylint: disable=broad-except  (not every backend reports it)
    limit = None
  return f'{text}; {limit / 2**30:.3g} GiB usable each' if limit else text


def out_of_memory_message(where: str, *, section: str, batch_size: int,
                          memory_gib: float = float('nan'), dry_run: bool = False) -> str:
  """One line: where, the global and per-device batch, the devices, XLA's memory estimate, what to
  lower."""
  per_device, count = batch_size // jax.device_count(), jax.device_count()
  line = (f'{where}: out of device memory at global batch {batch_size} ({per_device} per device on '
          f'{_devices_text()}); ')
  if memory_gib == memory_gib:  # not nan
    line += f'XLA estimates {memory_gib:.3g} GiB per device for the step; '
  elif dry_run:
    line += 'XLA gave no memory estimate of the step; '
  else:
    line += ('for XLA\'s memory estimate of the step add --dry_run '
             f'--dry_run_batch_size={batch_size}; ')
  if per_device <= 1:
    return line + ('even 1 example per device does not fit: use devices with more memory or a '
                   'smaller model')
  lower = per_device // 2 * count
  check = f' (--dry_run_batch_size={lower} to check it)' if dry_run else ''
  return line + (f'lower the batch per device: --config.{section}.batch_size={lower}{check}, or '
                 'run on more devices')


@contextlib.contextmanager
def out_of_memory_as_error(where: str, *, section: str, batch_size: int, dry_run: bool = False,
                           memory_gib: Callable[[], float] = lambda: float('nan')):
  """Turns XLA's out-of-memory error inside into an OutOfMemoryError of one line; other errors pass
  unchanged.

  memory_gib() gives XLA's per-device estimate of the step where it is at hand (nan: none).
  """
  try:
    yield
  except RuntimeError as err:
    if not is_out_of_memory(err):
      raise
    raise OutOfMemoryError(out_of_memory_message(where, section=section, batch_size=batch_size,
                                                 memory_gib=memory_gib(), dry_run=dry_run)) from err


class PeerLostError(RuntimeError):
  """Another process of a multi-process run stopped; the message says to restart them all."""


# What a collective or JAX's coordination service raises in the survivors when a process of the run
# is gone.
PEER_LOST_MARKERS = ('connection closed by peer', 'connection reset by peer', 'heartbeat',
                     'task has failed', 'has been disconnected')


def is_peer_lost(err: BaseException) -> bool:
  """Whether err (in a multi-process run) says that another process of the run has gone."""
  text = str(err).lower()
  return jax.process_count() > 1 and isinstance(err, RuntimeError) and any(
      m in text for m in PEER_LOST_MARKERS)


@contextlib.contextmanager
def peer_loss_as_error(title: str, ckpt_dir: str, manager):
  """Turns a lost peer process inside into a PeerLostError of one line naming the step to resume
  from."""
  try:
    yield
  except RuntimeError as err:
    if not is_peer_lost(err):
      raise
    raise PeerLostError(
        f'[{title}] another process of this run stopped ({checkpoint.first_line(err, 160)}): '
        'restart every process with the same command; training resumes from step '
        f'{manager.latest_step()} in {ckpt_dir}') from err


class ShardedStep:
  """The jitted, data-parallel train step of one section: state replicated, batch split along
  'data'."""

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

  def init_state(self, params, *, seed: int) -> TrainState:
    """The state at step 0, replicated."""
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


def _log_scalars(summed, count: int, last_metrics, t_log: float) -> dict:
  """Means of the metrics summed since the last log; counters are their last value, not a mean."""
  scalars = {k: float(v) / count for k, v in jax.device_get(summed).items()}
  for key in ('num_skipped', 'consecutive_skipped'):
    scalars[key] = float(jax.device_get(last_metrics[key]))
  scalars['steps_per_sec'] = count / max(time.time() - t_log, 1e-9)
  return scalars


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
  """Trains `params` on loss_fn for section.num_steps steps, resuming from ckpt_dir if it holds a
  run.

  make_batches(start_step) yields per-host batches {'x', 'label'}; `frozen` (teacher params) is
  passed to every step but never optimised or saved. Returns the final state and the scalars of
  the last log step ({} when the checkpoint was already complete). On SIGTERM it saves the step
  just done and raises Preempted; a step out of device memory raises OutOfMemoryError (one line).
  sharded_step: a ShardedStep of this section whose loss computes what loss_fn does, built by the
  caller for several runs (the halving rounds) so that they share one traced and compiled program;
  None builds one from loss_fn. profile (config.profile, optional) turns on a trace of some steps
  into logdir and the FLOP count behind the logged model_flops_per_sec and mfu.
  """
  # Resuming, in this order:
  # 1. refuse a directory whose checkpoints were all set aside as damaged (never restart from step 0
  #    silently);
  checkpoint.check_not_all_set_aside(ckpt_dir)
  sharded = _sharded_step(loss_fn, section, sharded_step)
  state = sharded.init_state(params, seed=seed)
  record = dict(record, train_steps=section.num_steps)  # the step at which this stage is complete
  with checkpoint.open_manager(ckpt_dir, keep=section.keep_checkpoints) as manager:
    # 2. restore the newest readable step: its record must fit this run's, damaged steps are set
    #    aside;
    if manager.latest_step() is not None:
      state = checkpoint.restore_state(manager, state, ckpt_dir,
                                       check_record=records.checker(record, ckpt_dir))
      logging.info('[%s] resuming from step %d in %s', title, int(state.step), ckpt_dir)
    # 3. a stage already at its final step is done;
    if int(jax.device_get(state.step)) >= section.num_steps:
      logging.info('[%s] already trained (%d steps in %s); skipping', title, int(state.step),
                   ckpt_dir)
      return state, {}
    # 4. logs append (a line cut by a kill is dropped; the config as hparams on a fresh start only),
    #    and the data replay from the restored step (make_batches(start) in _train_steps); 5. train,
    #    saving as it goes.
    starting = int(jax.device_get(state.step)) == 0
    writer = make_writer(logdir, config=record.get('config') if starting else None)
    frozen = sharded.put_frozen(frozen)
    tracer = profile_lib.StepTracer(logdir if profile is not None else None,
                                    start_step=profile.start_step if profile else 0,
                                    num_steps=profile.num_steps if profile else 0)
    # MFU is against the peak at the compute dtype
    dtype = (record.get('model') or {}).get('dtype', 'float32')
    monitor = _Monitor(_step_flops(sharded, state, frozen, section, record, profile),
                       profile_lib.peak_flops(dtype=dtype), tracer)
    failed = True
    try:
      lost_peer = peer_loss_as_error(title, ckpt_dir, manager)
      out_of_memory = out_of_memory_as_error(f'[{title}] train step',
                                             section=config_section(record['stage']),
                                             batch_size=section.batch_size)
      with watch_preemption(manager) as preempted, lost_peer, out_of_memory:
        state, scalars = _train_steps(title, sharded, state, section, manager, record, make_batches,
                                      frozen, writer, preempted, monitor)
        failed = False
        return state, scalars
    finally:
      monitor.tracer.close()
      _finish(manager, writer, failed=failed)


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

  def save(self, state, step: int) -> None:
    """Saves step's state and waits until it is written, so training stops at the first save that
    fails (checkpoint.SaveError); a non-finite state is never saved (NonFiniteError). Then flushes
    the scalars logged so far: a kill loses at most the lines since the last checkpoint (a resume
    writes them again)."""
    try:
      with checkpoint.save_errors_as_error(self.title, self.ckpt_dir, step):
        checkpoint.save(self.manager, state, self.record)
        self.manager.wait_until_finished()
    except checkpoint.NonFiniteStateError as err:
      raise self.diverged(f'{err} at step {step} (not saved)') from err
    if self.writer is not None:
      self.writer.flush()


@dataclasses.dataclass
class _Monitor:
  """What a training run measures besides its metrics: FLOPs per step, the devices' peak, a step
  tracer."""
  flops: Optional[float]
  peak: Optional[float]
  tracer: profile_lib.StepTracer


def _log(run: _Run, done: int, summed, count: int, metrics, t_log: float, t_start: float,
         monitor: _Monitor) -> dict:
  """The scalars of the steps since the last log: a progress line, TensorBoard and metrics.jsonl."""
  section = run.section
  scalars = _log_scalars(summed, count, metrics, t_log)
  scalars['examples_per_sec'] = scalars['steps_per_sec'] * section.batch_size
  scalars.update(profile_lib.utilisation(monitor.flops, scalars['steps_per_sec'], monitor.peak))
  eta = (section.num_steps - done) * (time.time() - t_start) / max(done - run.start, 1)
  logging.info('[%s] step %d/%d loss %.4f %.1f steps/s%s ETA %s', run.title, done,
               section.num_steps, scalars['loss'], scalars['steps_per_sec'],
               profile_lib.describe(scalars), format_seconds(eta))
  if run.writer is not None:
    run.writer.write_scalars(done, scalars)
  return scalars


def _train_steps(title, sharded: ShardedStep, state, section, manager, record, make_batches, frozen,
                 writer, preempted, monitor: _Monitor) -> tuple[TrainState, dict]:
  """The steps from state.step to section.num_steps: log, check non-finite runs, save, honour
  SIGTERM / Ctrl-C."""
  block_each_step = jax.default_backend() == 'cpu' and jax.device_count() > 1  # CPU collectives
  run = _Run(title, sharded, section, manager, record, writer,
             start=int(jax.device_get(state.step)))
  batches = make_batches(run.start)
  summed, count, scalars, t_log = None, 0, {}, time.time()
  t_start, previous = t_log, None
  for done in range(run.start + 1, section.num_steps + 1):
    monitor.tracer.before_step(done)
    with monitor.tracer.annotate(done):
      state, metrics = sharded.step_fn(state, sharded.global_batch(next(batches)), frozen)
    if block_each_step:
      jax.block_until_ready(state)
    monitor.tracer.after_step(done, state)
    # The previous step's count of consecutive skipped updates, read once this step is queued behind
    # it (the device never waits for the host): a run of non-finite steps stops at the limit, before
    # anything is saved.
    run.check_nonfinite(previous)
    previous = (done, metrics['consecutive_skipped'])
    summed = metrics if summed is None else jax.tree.map(lambda a, b: a + b, summed, metrics)
    count += 1
    if done % section.log_every == 0 or done == section.num_steps:
      scalars = _log(run, done, summed, count, metrics, t_log, t_start, monitor)
      summed, count, t_log = None, 0, time.time()
    if done == section.num_steps:
      run.check_nonfinite(previous, final=True)
    signum = preempted(done)
    if done % section.checkpoint_every == 0 or done == section.num_steps or signum:
      run.save(state, done)
    if signum:
      logging.info('[%s] preempted: saved step %d in %s', title, done, run.ckpt_dir)
      raise Preempted(title, done, run.ckpt_dir, signum)
  return state, scalars
