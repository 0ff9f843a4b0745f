"""How programs run on this host: the data-parallel mesh, CPU devices, and the CPU compiler's
flag."""

import importlib.metadata
import importlib.util
import os
import pkgutil
import platform

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec


def data_mesh() -> Mesh:
  """A 1-D mesh over every device of every process; the batch is split along 'data'."""
  return Mesh(np.asarray(jax.devices()), ('data',))


def shard_rows(*arrays):
  """Puts arrays [B, ...] split along B over every device (replicated where B does not divide).

  For work without collectives (sampling, encoding): each device runs its rows. With several
  processes the arrays are returned as they are: each process works on its own copy.
  """
  if jax.process_count() > 1:
    return arrays
  batch_size = arrays[0].shape[0]
  spec = PartitionSpec('data' if batch_size % jax.device_count() == 0 else None)
  return jax.device_put(arrays, NamedSharding(data_mesh(), spec))


def set_cpu_devices(num_devices: int) -> int:
  """Exposes the host CPU as num_devices XLA devices; call before JAX starts a backend.

  0 picks the largest power of two not above the core count, so power-of-two batches still divide.
  On 2 cores, data parallelism over 2 devices ran the digits train step 1.4x as fast as one device
  whose convolutions use both cores (compare `benchmarks/peer_speed.py --cpu_devices=1`).
  Accelerators are unaffected: the setting only concerns the CPU backend. Returns the number of
  devices set.
  """
  if num_devices <= 0:
    num_devices = 2 ** (len(os.sched_getaffinity(0)).bit_length() - 1)
  jax.config.update('jax_num_cpu_devices', num_devices)
  return num_devices


# XLA:CPU at LLVM optimisation level 1 compiles faster and runs as fast (benchmarks/README.md):
# convolutions and dots are library calls, LLVM only builds the elementwise fusions around them.
CPU_OPT_LEVEL = 1
_LEVEL_FLAG = '--xla_backend_optimization_level'


def configure_cpu_compiler(level: int = CPU_OPT_LEVEL) -> bool:
  """Adds `--xla_backend_optimization_level=level` to XLA_FLAGS when JAX will run on the CPU; call
  before JAX starts a backend.

  XLA reads XLA_FLAGS once, when its first backend starts: set where a process starts (main.py, the
  demo notebook, the benchmarks, tests/conftest.py), every program of the process gets it, the ones
  traced under jax.eval_shape too (where a jit with its own compiler_options is refused). The flag
  is not only the CPU's: an accelerator's code generation would read it as well, so it is left out
  when JAX may pick an accelerator (_cpu_is_default). A level already in XLA_FLAGS is kept.

  Args:
    level: LLVM's optimisation level for the CPU's generated code (main.py: CPU_OPT_LEVEL).

  Returns:
    Whether XLA_FLAGS sets a level now.
  """
  flags = os.environ.get('XLA_FLAGS', '')
  if any(flag.split('=', 1)[0] == _LEVEL_FLAG for flag in flags.split()):
    return True
  if not _cpu_is_default():
    return False
  os.environ['XLA_FLAGS'] = f'{flags} {_LEVEL_FLAG}={level}'.strip()
  return True


def _cpu_is_default() -> bool:
  """Whether JAX's default backend will be the CPU, told without starting one: the first of
  JAX_PLATFORMS (--jax_platforms) when set, else whether no accelerator (a PJRT plugin or libtpu) is
  installed."""
  platforms = jax.config.jax_platforms
  if platforms:
    return platforms.split(',')[0].strip() == 'cpu'
  if (importlib.util.find_spec('libtpu') is not None or
      importlib.metadata.entry_points(group='jax_plugins')):
    return False
  try:
    # (the namespace package of PJRT plugins)
    import jax_plugins  # pylint: disable=g-import-not-at-top
  except ImportError:
    return True
  return not any(pkgutil.iter_modules(jax_plugins.__path__))


def host_description() -> str:
  """What ran a timed job ('<cpu model>, 2 cores, AVX-512; jax <version> cpu, 2 devices'): wall
  times compare only on the same machine (two CPU VMs of one description can differ 2x in speed;
  docs/results.md)."""
  cpu, flags = platform.processor() or platform.machine(), set()
  try:
    with open('/proc/cpuinfo', encoding='utf-8') as f:
      info = f.read()
    cpu = next((line.split(':', 1)[1].strip()
                for line in info.splitlines()
                if line.startswith('model name')), cpu)
    flags = set(
        next((line.split(':', 1)[1].split()
              for line in info.splitlines()
              if line.startswith('flags')), []))
  except OSError:
    pass
  vector = next(
      (name for flag, name in (('avx512f', 'AVX-512'), ('avx2', 'AVX2')) if flag in flags), None)
  cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
  return (
      f'{cpu}, {cores} cores{f", {vector}" if vector else ""}; jax {jax.__version__} '
      f'{jax.default_backend()}, {jax.device_count()} devices')
