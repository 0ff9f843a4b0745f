"""Profiling: a trace of chosen train steps, XLA's FLOP count of the step, model FLOP/s and MFU in
the logs."""

import glob
import types

import pytest

from conftest import tiny_config
from distill import stages
from train import profile, writers

pytestmark = pytest.mark.integration  # the second tier (tests/conftest.py)


def test_a_teacher_run_writes_a_trace_and_logs_model_flops(tmp_path):
  config = tiny_config(tmp_path, train=20)
  config.profile.update(start_step=5, num_steps=3, flops='on')
  stages.train_teacher(config)
  logdir = tmp_path / 'logs' / 'teacher'
  (trace,) = glob.glob(str(logdir / 'plugins' / 'profile' / '*' / '*.xplane.pb'))
  with open(trace, 'rb') as f:
    assert b'step_num' in f.read()  # the traced steps carry step annotations
  rows = [r for r in writers.read_jsonl(str(logdir / writers.JSONL_NAME)) if 'loss' in r]
  assert rows and all(r['model_flops_per_sec'] > 0 for r in rows)
  assert all(r['examples_per_sec'] == pytest.approx(r['steps_per_sec'] * config.train.batch_size)
             for r in rows)
  # a CPU has no published peak: "MFU n/a" in the progress line
  assert all('mfu' not in r for r in rows)


def test_flops_are_off_on_a_cpu_by_default(tmp_path):
  config = tiny_config(tmp_path, train=10)
  stages.train_teacher(config)
  rows = [
      r for r in writers.read_jsonl(str(tmp_path / 'logs' / 'teacher' / writers.JSONL_NAME))
      if 'loss' in r
  ]
  assert rows and all('model_flops_per_sec' not in r for r in rows)
  assert not (tmp_path / 'logs' / 'teacher' / 'plugins').exists()


def test_mfu_is_achieved_over_peak_flops_of_every_device():
  devices = [types.SimpleNamespace(device_kind='TPU v4')] * 4
  peak = profile.peak_flops(devices)
  assert peak == 4 * 275e12
  assert profile.peak_flops(devices, dtype='float32') is None  # TPUs publish bf16 peaks only
  assert profile.peak_flops([types.SimpleNamespace(device_kind='NVIDIA H100 80GB HBM3')],
                            dtype='float32') == 494e12
  scalars = profile.utilisation(2e12, 110.0, peak)
  assert scalars['model_flops_per_sec'] == pytest.approx(2.2e14)
  assert scalars['mfu'] == pytest.approx(2.2e14 / 1.1e15)
  assert profile.peak_flops([types.SimpleNamespace(device_kind='cpu')]) is None
  assert profile.utilisation(None, 110.0, peak) == {}
  assert profile.describe({'examples_per_sec': 1280.0}) == ' 1280 ex/s MFU n/a'
  assert (profile.describe({'examples_per_sec': 1.0, **scalars}) ==
          ' 1 ex/s 220.00 TFLOP/s MFU 20.0%')


def test_step_flops_count_matmuls_and_convolutions_forward_and_backward():
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  a, b = jnp.ones((8, 16)), jnp.ones((16, 4))
  assert profile.step_flops(jax.jit(lambda a, b: a @ b), a, b) == 2 * 8 * 16 * 4
  x, kernel = jnp.ones((2, 8, 8, 3)), jnp.ones((3, 3, 3, 5))  # [B, H, W, C], [kh, kw, C_in, C_out]
  conv = lambda x, kernel: jax.lax.conv_general_dilated(x, kernel, (1, 1), 'SAME',
                                                        dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  forward = 2 * (2 * 8 * 8 * 5) * (3 * 3 * 3)  # 2 x outputs x taps x input channels
  assert profile.step_flops(jax.jit(conv), x, kernel) == forward
  grads = jax.jit(jax.grad(lambda x, kernel: conv(x, kernel).sum(), argnums=(0, 1)))
  # forward, input gradient, kernel gradient
  assert profile.step_flops(grads, x, kernel) == 3 * forward
  scanned = jax.jit(lambda a, b: jax.lax.scan(lambda c, _: (c, c @ b), a, None, length=5)[1])
  assert profile.step_flops(scanned, a, b) == 5 * 2 * 8 * 16 * 4
  broken = types.SimpleNamespace(
      trace=lambda *args: (_ for _ in ()).throw(RuntimeError('no backend')))
  assert profile.step_flops(broken, a, b) is None  # a missing figure never stops training
