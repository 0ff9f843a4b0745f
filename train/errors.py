"""The errors of a training run that main.py prints as one line: pre-emption, non-finite training,
out of device memory, a lost peer process."""

import contextlib
import signal
from typing import Callable

import jax

from train import checkpoint

class Preempted(Exception):
  """Training stopped on SIGTERM or Ctrl-C (SIGINT) after saving a checkpoint; the same command
  resumes from it."""

  def __init__(self, title: str, step: int, ckpt_dir: str, signum: int = signal.SIGTERM):
    super().__init__(
        f'[{title}] {signal.Signals(signum).name}: saved step {step} in {ckpt_dir}; run the same '
        'command to resume')
    self.step, self.ckpt_dir, self.signum = step, ckpt_dir, signum


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
