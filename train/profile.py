"""How much of the chip a train step uses: the FLOPs of the step, model FLOP/s, MFU, and traces.

MFU = (FLOPs of one train step: the matmuls and convolutions of its traced program) x (steps per
second) / (peak dense FLOP/s of one device at the model's compute dtype x number of devices). Peaks
are the vendors' published figures for the device kinds below; on any other device (e.g. a CPU) MFU
is "n/a" and only the achieved FLOP/s is reported (when the FLOP count is on).
"""

import math
from typing import Optional

import jax
import jax.extend.core as jax_core
from absl import logging

# Peak dense FLOP/s per device: jax.Device.device_kind -> {compute dtype: FLOP/s}, from the vendors'
# data sheets (GPU float32: the TF32 tensor-core rate XLA uses for float32 matmuls by default; TPUs
# publish bf16 only).
PEAK_FLOPS = {
    'TPU v4': {'bfloat16': 275e12},
    'TPU v5 lite': {'bfloat16': 197e12},  # v5e
    'TPU v5': {'bfloat16': 459e12},  # v5p
    'TPU v6 lite': {'bfloat16': 918e12},  # v6e (Trillium)
    'NVIDIA A100-SXM4-40GB': {'bfloat16': 312e12, 'float32': 156e12},
    'NVIDIA A100-SXM4-80GB': {'bfloat16': 312e12, 'float32': 156e12},
    'NVIDIA H100 80GB HBM3': {'bfloat16': 989e12, 'float32': 494e12},  # SXM
    'NVIDIA H100 PCIe': {'bfloat16': 756e12, 'float32': 378e12},
    'NVIDIA H200': {'bfloat16': 989e12, 'float32': 494e12},
}


def peak_flops(devices=None, *, dtype: str = 'bfloat16') -> Optional[float]:
  """Peak FLOP/s of all devices together at a compute dtype, or None when a device kind or dtype is
  not listed."""
  devices = jax.devices() if devices is None else devices
  peaks = [PEAK_FLOPS.get(device.device_kind, {}).get(dtype) for device in devices]
  return None if any(p is None for p in peaks) else float(sum(peaks))


def step_flops(jitted_step, *args) -> Optional[float]:
  """FLOPs of one call of a jitted function on args (whole computation, all devices): its matmuls
  and convolutions.

  Counted on the traced program (`jaxpr_flops`), the same on every backend: XLA's own cost analysis
  counts nothing on a GPU before compiling, and after compiling misses the convolutions it hands to
  cuDNN. None when the step cannot be traced.
  """
  try:
    flops = jaxpr_flops(jitted_step.trace(*args).jaxpr.jaxpr)
  except Exception as err:  # pylint: disable=broad-except
    # (a missing figure must not stop training)
    logging.warning('no FLOP count for the train step: %s', err)
    return None
  return flops or None


def jaxpr_flops(jaxpr) -> float:
  """2 x multiply-adds of every dot_general and conv_general_dilated in a jaxpr and the jaxprs
  inside it.

  The model-FLOPs convention of MFU: elementwise work, normalisation and softmax are not counted. A
  scan's body counts `length` times, a cond its costliest branch, a while loop's body once (its trip
  count is data).
  """
  total = 0.0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == 'dot_general':
      (contracting, _), _ = eqn.params['dimension_numbers']
      lhs_shape = eqn.invars[0].aval.shape
      total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(
          lhs_shape[d] for d in contracting)
    elif name == 'conv_general_dilated':
      rhs_shape, rhs_spec = eqn.invars[1].aval.shape, eqn.params['dimension_numbers'].rhs_spec
      # in-features x taps
      per_output = rhs_shape[rhs_spec[1]] * math.prod(rhs_shape[d] for d in rhs_spec[2:])
      total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * per_output
    inner = [jaxpr_flops(sub) for sub in jax_core.jaxprs_in_params(eqn.params)]
    if name == 'cond':
      total += max(inner, default=0.0)
    else:
      total += sum(inner) * (eqn.params['length'] if name == 'scan' else 1)
  return total


def utilisation(flops_per_step: Optional[float], steps_per_sec: float,
                peak: Optional[float]) -> dict:
  """Scalars for the logs: model_flops_per_sec and, when the peak is known, mfu (a fraction of
  1)."""
  if not flops_per_step:
    return {}
  scalars = {'model_flops_per_sec': flops_per_step * steps_per_sec}
  if peak:
    scalars['mfu'] = scalars['model_flops_per_sec'] / peak
  return scalars


def describe(scalars: dict) -> str:
  """The progress line's part: ' 123 ex/s 4.56 TFLOP/s MFU 41.0%', or 'MFU n/a' without a known
  peak."""
  text = f' {scalars["examples_per_sec"]:.0f} ex/s' if 'examples_per_sec' in scalars else ''
  if 'model_flops_per_sec' in scalars:
    text += f' {scalars["model_flops_per_sec"] / 1e12:.2f} TFLOP/s'
  return text + (f' MFU {100 * scalars["mfu"]:.1f}%' if 'mfu' in scalars else ' MFU n/a')
