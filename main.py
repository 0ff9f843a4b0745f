"""Entry point: flags -> config -> the function of one --mode (see modes.MODES)."""

import logging as pylogging
import os
import signal
import sys
from typing import Optional

# TensorFlow (imported by tfds, for tfds data sets only) prints start-up banners (oneDNN, CPU
# features) at INFO level on its C++ logger; they must be silenced before it loads. Warnings and
# errors still show; a value set by the user wins.
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
# On CPUs where TensorFlow turns its oneDNN kernels on it announces so before absl's logging starts,
# which TF_CPP_MIN_LOG_LEVEL does not silence; TensorFlow only reads data here, so its oneDNN
# kernels gain nothing.
os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '0')

from absl import app, flags, logging  # pylint: disable=g-import-not-at-top,wrong-import-position
import ml_collections  # pylint: disable=g-import-not-at-top,wrong-import-position
from ml_collections import config_flags  # pylint: disable=g-import-not-at-top,wrong-import-position

# (no JAX: fast)
from modes.command_line import (  # pylint: disable=g-import-not-at-top,wrong-import-position
    config_file_error, flag_values, is_library_noise, mode_error)

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Path to a config file (configs/*.py).',
                                          lock_config=True)
# The keys of modes.MODES (tests/test_cli.py checks they agree); listed here so --help needs no JAX
# import.
MODE_NAMES = ('teacher', 'stage1', 'stage2', 'distill', 'encoder', 'direct', 'sample', 'pipeline',
              'fid', 'transfer', 'sweep')
_MODE = flags.DEFINE_enum('mode', 'pipeline', MODE_NAMES,
                          'What to run (modes.MODES; docs/running.md).')
_MULTIHOST = flags.DEFINE_bool('multihost', False,
                               'Call jax.distributed.initialize() first (multi-host).')
_PRINT_ONLY = flags.DEFINE_bool('print_only', False,
                                '--mode=sweep: print one main.py command per point, run nothing.')
_COORDINATOR = flags.DEFINE_string(
    'coordinator_address', '',
    'host:port of process 0 (implies --multihost); empty: from the environment.')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', -1,
                                      'Number of processes (implies --multihost); -1: auto.')
_PROCESS_ID = flags.DEFINE_integer('process_id', -1,
                                   'This process, 0..n-1 (implies --multihost); -1: auto.')
_CPU_DEVICES = flags.DEFINE_integer(
    'cpu_devices', 0, 'XLA devices the host CPU is split into for data parallelism '
    '(0: one per core, rounded down to a power of two; 1: one device using every core). '
    'Single-process runs only.')
_DRY_RUN = flags.DEFINE_bool(
    'dry_run', False, 'Build the models, shard one batch of (mock) data and run one train '
    'step of each stage the mode trains; write nothing.')
_DRY_RUN_BATCH_SIZE = flags.DEFINE_integer(
    'dry_run_batch_size', 0, '--dry_run global batch; 0: one example per '
    'device (give the config batch on the target hardware to check memory).')

# Modes that read no data set; every other one checks, before it writes anything, that its data set
# can be read.
MODES_WITHOUT_DATA = ('sample',)

# Exit status of a run stopped by SIGTERM after saving a checkpoint (128 + SIGTERM, as the shell
# reports).
PREEMPTED_EXIT_CODE = 143


_REPO_ROOT = os.path.dirname(os.path.abspath(__file__))


def initialize_distributed(coordinator_address: str = '', num_processes: int = -1,
                           process_id: int = -1):
  """jax.distributed.initialize; empty/-1 arguments are left to autodetection (TPU pods, SLURM,
  env)."""
  import jax  # pylint: disable=g-import-not-at-top
  # CPU processes need it for collectives
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(coordinator_address=coordinator_address or None,
                             num_processes=None if num_processes < 0 else num_processes,
                             process_id=None if process_id < 0 else process_id)


class _OwnInfoOnly(pylogging.Filter):
  """Keeps INFO lines of this repo (progress) and warnings of everyone; drops libraries' INFO
  chatter and the warnings of modes.command_line.NOISE (a library's message about its own
  internals)."""

  def filter(self, record):
    if is_library_noise(record):
      return False
    return record.levelno >= pylogging.WARNING or record.pathname.startswith(_REPO_ROOT)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  logging.get_absl_handler().addFilter(_OwnInfoOnly())
  from modes import MODES  # pylint: disable=g-import-not-at-top  (after flags: keeps --help fast)
  from modes.validation import (  # pylint: disable=g-import-not-at-top
      prepare_config, validate_for_devices)
  import jax  # pylint: disable=g-import-not-at-top
  from train.mesh import (  # pylint: disable=g-import-not-at-top
      configure_cpu_compiler, set_cpu_devices)
  configure_cpu_compiler()  # before any backend starts: XLA reads its flags once
  if _MULTIHOST.value or _COORDINATOR.value or _NUM_PROCESSES.value >= 0 or _PROCESS_ID.value >= 0:
    initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  else:
    set_cpu_devices(_CPU_DEVICES.value)
  # after the command-line overrides (a config file's get_config() does not validate)
  prepare_config(_CONFIG.value)
  validate_for_devices(_CONFIG.value, _MODE.value, jax.device_count())  # before anything is written
  if not _DRY_RUN.value and _MODE.value not in MODES_WITHOUT_DATA:
    import data  # pylint: disable=g-import-not-at-top
    data.check_available(_CONFIG.value.data)  # a missing tfds data set: one line, nothing written
  if _DRY_RUN.value:
    from modes.dry_run import run_dry_run  # pylint: disable=g-import-not-at-top
    run_dry_run(_CONFIG.value, _MODE.value, batch_size=_DRY_RUN_BATCH_SIZE.value)
    return
  # Compiled programs are cached on disk: stage-2 rounds share one program, reruns start faster. A
  # cache set by the user (JAX_COMPILATION_CACHE_DIR, shared by several workdirs) wins.
  from train import files  # pylint: disable=g-import-not-at-top
  if not jax.config.jax_compilation_cache_dir:
    jax.config.update('jax_compilation_cache_dir', files.join(_CONFIG.value.workdir, 'jax_cache'))
  logging.info('mode=%s workdir=%s devices=%d (%s) process %d/%d',
               _MODE.value, _CONFIG.value.workdir, jax.device_count(), jax.default_backend(),
               jax.process_index(), jax.process_count())
  from train.lock import workdir_lock  # pylint: disable=g-import-not-at-top
  with workdir_lock(_CONFIG.value.workdir):  # one run per workdir
    if _MODE.value == 'sweep':
      MODES['sweep'](_CONFIG.value,
                     config_path=config_flags.get_config_filename(flags.FLAGS['config']),
                     print_only=_PRINT_ONLY.value)
    else:
      MODES[_MODE.value](_CONFIG.value)


def _parse_error(err: Exception) -> str:
  """The error line of a command line that does not parse (the config file itself loads)."""
  if isinstance(err, (AttributeError, KeyError)):
    while (isinstance(err, (AttributeError, KeyError)) and err.args and
           isinstance(err.args[0], BaseException)):
      err = err.args[0]  # ml_collections wraps the KeyError in an AttributeError
    # not str(KeyError): that is a repr
    field, *hint = str(err.args[0] if err.args else err).splitlines()
    hint = f' {" ".join(hint)}' if hint else ' Check the spelling against the config file.'
    return f'--config override names no field of the config: {field}.{hint}'
  if isinstance(err, flags.Error):
    return str(err)
  raise err


def _parse_command_line(argv: list[str]) -> tuple[list[str], Optional[str]]:
  """(the arguments left after the flags, the error line of a command that cannot start or None).

  Flags are parsed here, once; an unknown --mode, a --config that gives no config and a bad override
  each get one line. Needs no JAX, so such a command ends at once.
  """
  problem = mode_error(argv, flags.FLAGS['mode'].parser.enum_values)
  if problem:
    return argv, problem
  try:
    argv = flags.FLAGS(argv)
  except Exception as err:  # pylint: disable=broad-except
    # (a config file that does not load fails the parse)
    return argv, config_file_error((flag_values(argv, 'config') or [None])[-1]) or _parse_error(err)
  if not isinstance(_CONFIG.value, ml_collections.ConfigDict):
    return argv, config_file_error(
        config_flags.get_config_filename(flags.FLAGS['config']) if flags.FLAGS['config'].
        present else None) or '--config gives no config'
  return argv, None


def _os_error_line(err: OSError) -> str:
  """'PATH: No space left on device: check ...': the path and the operating system's words."""
  path = err.filename or '(no path given)'
  if err.filename2:
    path = f'{path} -> {err.filename2}'
  cause = ('exists and is not a directory'
           if isinstance(err, FileExistsError) else err.strerror or err)
  return (
      f'{path}: {cause}: check the path (--config.workdir and the other paths), its '
      'permissions and free space, then run the same command again')


def run():
  """Runs main; expected errors (bad config, data, checkpoint, out of memory) exit 1 with one line,
  no traceback.

  A run stopped by SIGTERM (pre-emption) or Ctrl-C saves a checkpoint and exits 128 + the signal
  number (PREEMPTED_EXIT_CODE for SIGTERM) with one line; an operating-system error (a workdir that
  is a file, read-only or full) is one `error:` line naming the path.
  """
  app.define_help_flags()
  argv, problem = _parse_command_line(sys.argv)
  if problem:
    print(f'error: {problem}', file=sys.stderr)
    sys.exit(1)
  from data import DataError  # pylint: disable=g-import-not-at-top
  from eval.inception import WeightsError  # pylint: disable=g-import-not-at-top
  from modes.sampling import SamplingError  # pylint: disable=g-import-not-at-top
  from modes.validation import ConfigError  # pylint: disable=g-import-not-at-top
  from train.checkpoint import CheckpointError, SaveError  # pylint: disable=g-import-not-at-top
  from train.lock import WorkdirLocked  # pylint: disable=g-import-not-at-top
  from train.errors import (  # pylint: disable=g-import-not-at-top
      NonFiniteError, OutOfMemoryError, PeerLostError, Preempted)
  try:
    app.run(main, argv=argv, flags_parser=lambda parsed: parsed)
  except (ConfigError, DataError, CheckpointError, SamplingError, NonFiniteError, OutOfMemoryError,
          WeightsError, WorkdirLocked) as err:
    # One write: a library thread's output cannot split the line. After a failed save Orbax's writer
    # threads may still be printing their tracebacks: a newline first, so the line starts a line
    # whatever they left.
    sys.stderr.write(f'{chr(10) if isinstance(err, SaveError) else ""}error: {err}\n')
    sys.exit(1)
  except PeerLostError as err:
    print(f'error: {err}', file=sys.stderr, flush=True)
    sys.stdout.flush()
    # (jax.distributed's exit handler would wait for the lost peer)
    os._exit(1)  # pylint: disable=protected-access
  except Preempted as err:
    print(f'preempted: {err}', file=sys.stderr)
    sys.exit(128 + err.signum)  # PREEMPTED_EXIT_CODE for SIGTERM, 130 for Ctrl-C
  except KeyboardInterrupt:
    print('interrupted: Ctrl-C outside a training step, nothing saved; run the same '
          'command to go on',
          file=sys.stderr)
    sys.exit(128 + signal.SIGINT)
  except OSError as err:  # the workdir is a file, read-only, full, ...
    sys.stderr.write(f'error: {_os_error_line(err)}\n')
    sys.exit(1)


if __name__ == '__main__':
  run()
