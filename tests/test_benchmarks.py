"""The benchmark scripts whose figures the docs quote: they run, and they compute what they say."""

import gzip
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, 'benchmarks'))

import trace_summary  # pylint: disable=g-import-not-at-top,wrong-import-position

pytestmark = pytest.mark.integration  # the second tier (tests/conftest.py)


def _trace(path, events):
  meta = [{'ph': 'M', 'name': 'process_name', 'pid': 1, 'args': {'name': '/device:GPU:0'}},
          {'ph': 'M', 'name': 'process_name', 'pid': 2, 'args': {'name': '/host:CPU'}}]
  with gzip.open(path, 'wt') as f:
    json.dump({'traceEvents': meta + [dict(ph='X', **e) for e in events]}, f)


def test_busy_time_is_the_union_of_kernel_intervals():
  kernels = [{'ts': 0, 'dur': 10}, {'ts': 5, 'dur': 10}, {'ts': 30, 'dur': 5}, {'ts': 31, 'dur': 1}]
  assert trace_summary.busy_time(kernels) == 15 + 5


def test_kernel_groups_drop_instance_numbers_only():
  assert trace_summary.kernel_group('input_reduce_fusion.12') == 'input_reduce_fusion'
  assert trace_summary.kernel_group('loop_add_fusion_3') == 'loop_add_fusion'
  assert (trace_summary.kernel_group('sm90_xmma_fprop_implicit_gemm') ==
          'sm90_xmma_fprop_implicit_gemm')


def test_trace_summary_reports_per_step_device_and_host_time(tmp_path, capsys):
  events = []
  # a step every 100 us: a 30 us conv, two 10 us fusions (busy 100 of 150 us); 40 us launching
  for step in range(2):
    t0 = 100 * step
    events += [{'pid': 2, 'tid': 1, 'ts': t0, 'dur': 50, 'name': 'train'},
               {'pid': 2, 'tid': 1, 'ts': t0, 'dur': 40, 'name': 'jit_train_step:XLA GPU module'},
               {'pid': 1, 'tid': 7, 'ts': t0 + 10, 'dur': 30,
                'name': 'sm90_xmma_fprop_implicit_gemm'},
               {'pid': 1, 'tid': 7, 'ts': t0 + 40, 'dur': 10, 'name': f'loop_add_fusion.{step}'},
               {'pid': 1, 'tid': 7, 'ts': t0 + 50, 'dur': 10, 'name': 'input_reduce_fusion'}]
  path = str(tmp_path / 'vm.trace.json.gz')
  _trace(path, events)
  trace_summary.summarise(path, top=5)
  out = capsys.readouterr().out
  assert 'wall time between step starts: 0.1 ms' in out
  assert ('device: 3 kernels and 0.05 ms of kernel time a step; busy 66.7% of the '
          'traced span (0.1 ms)') in out
  assert 'host: 0.04 ms a step inside jit_train_step:XLA GPU module' in out
  assert 'convolutions and matmuls: 0.03 ms a step; everything else: 0.02 ms' in out
  assert '| loop_add_fusion | 1 | 0.01 |' in out


@pytest.mark.xdist_group('subprocess')
def test_state_form_times_every_form_and_prints_a_row_each():
  result = subprocess.run(
      [sys.executable, 'benchmarks/state_form.py', '--config=configs/tiny.py', '--steps=2',
       '--rounds=2', '--warmup=1'],
      cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
  assert result.returncode == 0, result.stderr[-2000:]
  rows = {line.split(' | ')[0][2:]: line.split(' | ')[1:] for line in result.stdout.splitlines()
          if line.startswith('| ') and not line.startswith('| form')}
  assert sorted(rows) == ['flatten', 'packed', 'tree']
  assert rows['packed'][1].startswith('1.000')  # the ratio's own row
  assert all(float(cells[0].split()[0]) > 0 and int(cells[2].replace(',', '')) > 0
             for cells in rows.values())  # steps/s, HLO instructions


@pytest.mark.xdist_group('subprocess')
def test_train_speed_runs_the_training_loop_of_each_stage_and_prints_a_row_each():
  result = subprocess.run(
      [sys.executable, 'benchmarks/train_speed.py', '--config=configs/tiny.py',
       '--stages=teacher,stage2', '--steps=6', '--log_every=3', '--input=synthetic'],
      cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
  assert result.returncode == 0, result.stderr[-2000:]
  rows = [
      line for line in result.stdout.splitlines() if line.startswith('| ') and 'stage |' not in line
  ]
  assert [row.split(' | ')[0] for row in rows] == ['| teacher', '| stage2 4->2 steps']
  for row in rows:
    steps_per_sec = float(row.split(' | ')[3])
    assert steps_per_sec > 0
  assert '| n/a |' in rows[0]  # no MFU on a CPU


def test_stage1_fidelity_prints_a_row_per_workdir_scored_against_the_shared_teacher(tmp_path):
  """Two workdirs with the same stage 1: the same row twice, the teacher's own floor printed
  once."""
  workdir = str(tmp_path / 'a')
  flags = ['--config=configs/tiny.py', f'--config.workdir={workdir}']
  for mode in ('teacher', 'stage1'):
    subprocess.run([sys.executable, 'main.py', *flags, f'--mode={mode}'], cwd=REPO,
                   capture_output=True, timeout=300, check=True)
  result = subprocess.run(
      [sys.executable, 'benchmarks/stage1_fidelity.py', '--config=configs/tiny.py',
       '--config.pipeline.quality_ws=(0.0,1.0,2.0)', f'--workdirs={workdir},{workdir}',
       '--raw_teacher'],
      cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
  assert result.returncode == 0, result.stderr[-2000:]
  rows = [line for line in result.stdout.splitlines() if line.startswith('| a | stage 1 |')]
  assert len(rows) == 2
  cells = [row.split(' | ') for row in rows]
  assert cells[0][2:6] == cells[1][2:6]  # same model, same noise: the same fidelity at every w
  assert all(float(value) >= 0 for value in cells[0][2:5])
  assert float(cells[0][5]) == pytest.approx(
      max(map(float, cells[0][2:5])) / float(cells[0][3]), rel=1e-2)
  assert result.stdout.count('floor (teacher CFG ddim 2)') == 1
  lines = [
      line for line in result.stdout.splitlines()
      if line.startswith('| a | ') and 'stage 1' not in line
  ]
  # w = 0, 1, 2: RMS, then two guidance responses; then the errors
  responses, errors = lines[:2], lines[2:]
  assert len(responses) == 2 and responses[0] == responses[1]
  assert float(responses[0].split(' | ')[1]) >= 0 and 0 < float(responses[0].split(' | ')[2]) < 2
  assert (len(errors) == 2 and errors[0] == errors[1] and
          all(float(v) >= 0 for v in errors[0][len('| a | '):-2].split(' | ')))
  raw = [line for line in result.stdout.splitlines() if line.startswith('| teacher raw params | ')]
  # fidelity, response, error
  assert len(raw) == 3 and raw[0].startswith('| teacher raw params | CFG ddim ')
  assert all(float(v) > 0 for v in raw[0].split(' | ')[2:5])  # not the EMA: another set of samples
  assert all(0 < float(v) < 10 for v in raw[2][len('| teacher raw params | '):-2].split(' | '))


def test_cpu_operations_are_grouped_by_what_their_hlo_computes():
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  def loss(x, kernel, w):
    y = jax.lax.conv_general_dilated(x, kernel, (1, 1), 'SAME',
                                     dimension_numbers=('NHWC', 'HWIO', 'NHWC'))  # [B, H, W, C]
    spread = jnp.sum(jnp.var(y, axis=(1, 2)) * jnp.arange(5.0))  # a reduction, as GroupNorm's
    return jnp.mean(jnp.tanh(y).reshape(x.shape[0], -1) @ w) + spread

  x, kernel, w = jnp.ones((4, 8, 8, 3)), jnp.ones((3, 3, 3, 5)), jnp.ones((8 * 8 * 5, 2))
  text = jax.jit(jax.grad(loss, argnums=(1, 2))).lower(x, kernel, w).compile().as_text()
  instructions, computations = trace_summary.parse_hlo(text)
  groups = {name: trace_summary.category(name, instructions, computations) for name in instructions}
  found = set(groups.values())
  # the forward convolution, its weight gradient, the dense layer's products, the variance
  assert {'convolution', 'conv weight grad', 'dot', 'reduce'} <= found, groups


def test_cpu_self_time_counts_a_loop_body_once(tmp_path):
  path = str(tmp_path / 't.trace.json.gz')
  events = [dict(ph='X', pid=1, tid=1, name='ThunkExecutor::Execute', ts=0, dur=200),
            dict(ph='X', pid=1, tid=1, name='while.1', ts=0, dur=100),
            dict(ph='X', pid=1, tid=1, name='fusion.2', ts=10, dur=30),
            dict(ph='X', pid=1, tid=1, name='dot.3', ts=50, dur=20),
            dict(ph='X', pid=1, tid=2, name='fusion.2', ts=0, dur=10)]
  with gzip.open(path, 'wt') as f:
    json.dump({'traceEvents': events}, f)
  assert trace_summary.self_times(path) == {'while.1': 50, 'fusion.2': 40, 'dot.3': 20}


@pytest.mark.xdist_group('subprocess')
def test_conv_grad_rewrites_equal_xlas_weight_gradient_and_print_a_row_each():
  result = subprocess.run(
      [sys.executable, 'benchmarks/conv_grad.py', '--shape=4,16,16,16', '--repeats=1'],
      cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
  assert result.returncode == 0, result.stderr[-2000:]
  rows = {line.split(' | ')[0][2:]: line.split(' | ')[1:] for line in result.stdout.splitlines()
          if line.startswith('| ') and not line.startswith('| row')}
  rewrites = ('nine shifted dots', 'channel-major im2col', 'flat shifted taps')
  for name in ('xla forward', 'xla weight grad', *rewrites):
    assert float(rows[name][1]) > 0, rows  # GFLOP/s
  for name in rewrites:
    assert float(rows[name][2].rstrip(' |')) < 1e-5, rows  # the same gradient
