"""Pre-emption: SIGTERM saves the step just done and exits with one line; SIGKILL keeps the last
periodic checkpoint. Either way the same command resumes to the params of an uninterrupted run."""

import logging
import os
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from conftest import tiny_config
from distill import stages
from main import PREEMPTED_EXIT_CODE
from train import checkpoint
from train.errors import Preempted

pytestmark = pytest.mark.integration  # the second tier (tests/conftest.py)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 120
_PROGRESS = re.compile(r'\[teacher\] step (\d+)/')


@pytest.fixture
def start_main(tmp_path):
  """Starts `main.py --mode=teacher` on configs/tiny.py; returns (process, log path). Kills
  leftovers."""
  procs = []

  def start(workdir, *overrides):
    log_path = tmp_path / f'main{len(procs)}.log'
    with open(log_path, 'w') as log:
      procs.append(
          subprocess.Popen(
              [
                  sys.executable, 'main.py', '--config=configs/tiny.py', '--mode=teacher',
                  f'--config.workdir={workdir}', '--cpu_devices=1', *overrides
              ],  # one device, as the in-process runs it is compared with
              cwd=REPO,
              env=dict(os.environ, JAX_PLATFORMS='cpu'),
              stdout=log,
              stderr=subprocess.STDOUT))
    return procs[-1], log_path

  yield start
  for proc in procs:
    if proc.poll() is None:
      proc.kill()
      proc.wait()


def _wait_for(condition, proc, log_path):
  """Polls condition() until it holds; fails if the process exits or time runs out."""
  deadline = time.time() + TIMEOUT_S
  while not condition():
    assert proc.poll() is None, f'exited {proc.returncode}:\n{log_path.read_text()[-3000:]}'
    assert time.time() < deadline, f'timed out:\n{log_path.read_text()[-3000:]}'
    time.sleep(0.05)


def _finalized_steps(ckpt_dir):
  """Steps of the complete checkpoints (Orbax renames a step's temporary folder to its number when
  done)."""
  return ([int(name) for name in os.listdir(ckpt_dir) if name.isdigit()]
          if os.path.isdir(ckpt_dir) else [])


def _teacher_params(config):
  return jax.tree.leaves(stages.load_stage_params(config, 'teacher')[1])


def _assert_same_as_uninterrupted(config, tmp_path):
  full = tiny_config(tmp_path / 'uninterrupted', train=config.train.num_steps)
  full.train.update(checkpoint_every=config.train.num_steps, log_every=config.train.num_steps)
  stages.train_teacher(full)
  for a, b in zip(_teacher_params(full), _teacher_params(config), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def _sigterm_after(monkeypatch, num_batches):
  """Makes the data iterator send this process SIGTERM while handing out batch num_batches."""
  real = stages.data.make_train_iterator

  def iterator(*args, **kwargs):
    for count, batch in enumerate(real(*args, **kwargs), start=1):
      if count == num_batches:
        os.kill(os.getpid(), signal.SIGTERM)
      yield batch

  monkeypatch.setattr(stages.data, 'make_train_iterator', iterator)


def test_sigterm_saves_that_step_restores_the_handler_and_resumes_exactly(tmp_path, monkeypatch):
  config = tiny_config(tmp_path / 'run', train=30)  # periodic checkpoints at 10, 20, 30
  sentinel = lambda signum, frame: None
  previous = signal.signal(signal.SIGTERM, sentinel)
  try:
    with monkeypatch.context() as patch:
      _sigterm_after(patch, 13)
      with pytest.raises(Preempted, match='saved step 13 in'):
        stages.train_teacher(config)
    assert signal.getsignal(signal.SIGTERM) is sentinel
  finally:
    signal.signal(signal.SIGTERM, previous)
  assert checkpoint.latest_step(str(tmp_path / 'run' / 'teacher')) == 13
  stages.train_teacher(config)
  _assert_same_as_uninterrupted(config, tmp_path)


def test_sigterm_to_main_saves_exits_with_one_line_and_the_rerun_resumes(
    tmp_path, start_main, caplog):
  workdir = tmp_path / 'run'
  proc, log_path = start_main(workdir, '--config.train.num_steps=1000000',
                              '--config.train.checkpoint_every=100000',
                              '--config.train.log_every=10')
  _wait_for(lambda: _PROGRESS.search(log_path.read_text()), proc, log_path)
  proc.send_signal(signal.SIGTERM)
  assert proc.wait(timeout=TIMEOUT_S) == PREEMPTED_EXIT_CODE, log_path.read_text()[-3000:]
  output = log_path.read_text()
  lines = [line for line in output.splitlines() if line.startswith('preempted:')]
  assert len(lines) == 1 and 'Traceback' not in output, output[-3000:]
  step = int(re.search(r'saved step (\d+) in (\S+);', lines[0]).group(1))
  assert step % 100000 != 0
  assert checkpoint.latest_step(str(workdir / 'teacher')) == step

  config = tiny_config(workdir, train=step + 5)
  with caplog.at_level(logging.INFO):
    stages.train_teacher(config)
  assert f'[teacher] resuming from step {step} in' in caplog.text
  assert checkpoint.latest_step(str(workdir / 'teacher')) == step + 5


def test_sigkill_resumes_from_the_last_periodic_checkpoint_exactly(tmp_path, start_main, caplog):
  workdir = tmp_path / 'run'
  proc, log_path = start_main(workdir, '--config.train.num_steps=1000000',
                              '--config.train.checkpoint_every=100', '--config.train.log_every=100')
  _wait_for(lambda: _finalized_steps(workdir / 'teacher'), proc, log_path)
  proc.kill()
  proc.wait(timeout=TIMEOUT_S)
  step = checkpoint.latest_step(str(workdir / 'teacher'))
  assert step is not None and step % 100 == 0

  config = tiny_config(workdir, train=step + 10)
  config.train.update(checkpoint_every=100, log_every=100)
  with caplog.at_level(logging.INFO):
    stages.train_teacher(config)
  assert f'[teacher] resuming from step {step} in' in caplog.text
  _assert_same_as_uninterrupted(config, tmp_path)
