"""How much of the chip a train step uses: XLA's FLOP count of the step, model FLOP/s, MFU, and traces.

MFU = (FLOPs of one train step, from XLA's cost analysis of the lowered step) x (steps per second) /
(peak dense bf16 FLOP/s of one device x number of devices). Peaks are the vendors' published figures for the
device kinds below; on any other device (e.g. a CPU) only the achieved FLOP/s is reported.
"""

from typing import Optional

import jax
from absl import logging

# Peak dense bf16 FLOP/s per device (jax.Device.device_kind -> FLOP/s), from the vendors' data sheets.
PEAK_BF16_FLOPS = {
    'TPU v4': 275e12,
    'TPU v5 lite': 197e12,  # v5e
    'TPU v5': 459e12,  # v5p
    'TPU v6 lite': 918e12,  # v6e (Trillium)
    'NVIDIA A100-SXM4-40GB': 312e12,
    'NVIDIA A100-SXM4-80GB': 312e12,
    'NVIDIA H100 80GB HBM3': 989e12,  # SXM
    'NVIDIA H100 PCIe': 756e12,
    'NVIDIA H200': 989e12,
}


def peak_flops(devices=None) -> Optional[float]:
  """Peak bf16 FLOP/s of all devices together, or None when a device kind is not in PEAK_BF16_FLOPS."""
  devices = jax.devices() if devices is None else devices
  peaks = [PEAK_BF16_FLOPS.get(device.device_kind) for device in devices]
  return None if any(p is None for p in peaks) else float(sum(peaks))


def step_flops(jitted_step, *args) -> Optional[float]:
  """FLOPs of one call of a jitted function on args (whole computation, all devices), from XLA's cost analysis.

  Lowers the step again (tracing, no compile); None when the backend reports no count.
  """
  try:
    cost = jitted_step.lower(*args).cost_analysis()
  except Exception as err:  # pylint: disable=broad-except  (a missing figure must not stop training)
    logging.warning('no FLOP count for the train step: %s', err)
    return None
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = (cost or {}).get('flops')
  return float(flops) if flops and flops > 0 else None


def utilisation(flops_per_step: Optional[float], steps_per_sec: float, peak: Optional[float]) -> dict:
  """Scalars for the logs: model_flops_per_sec and, when the peak is known, mfu (a fraction of 1)."""
  if not flops_per_step:
    return {}
  scalars = {'model_flops_per_sec': flops_per_step * steps_per_sec}
  if peak:
    scalars['mfu'] = scalars['model_flops_per_sec'] / peak
  return scalars


class StepTracer:
  """Writes a profiler trace (TensorBoard's profile plugin, Perfetto) of steps [start, start + num_steps)."""

  def __init__(self, logdir: Optional[str], *, start_step: int, num_steps: int):
    self.logdir, self.start, self.stop = logdir, start_step, start_step + num_steps
    self.active = False

  def before_step(self, step: int) -> None:
    """step: the 1-based number of the step about to run."""
    if self.logdir and self.stop > self.start and step == self.start and jax.process_index() == 0:
      jax.profiler.start_trace(self.logdir)
      self.active = True
      logging.info('profiling steps %d-%d into %s', self.start, self.stop - 1, self.logdir)

  def after_step(self, step: int, state) -> None:
    if self.active and step == self.stop - 1:
      jax.block_until_ready(state)
      self.close()

  def close(self) -> None:
    if self.active:
      jax.profiler.stop_trace()
      self.active = False
