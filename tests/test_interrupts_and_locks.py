"""Smaller reliability items: Ctrl-C saves like SIGTERM, without a traceback; two runs racing for
run.lock never both hold it; a refused --mode=transfer leaves no transfer/ behind; a checkpoint of
another data set is refused."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_config
from modes import transfer
from train import checkpoint, lock, records
from train.errors import Preempted
from train.loop import run_training

pytestmark = pytest.mark.integration  # the second tier (tests/conftest.py)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_ctrl_c_saves_the_step_just_done_and_restores_the_handler(tmp_path):
  section = tiny_config(tmp_path).train
  section.update(num_steps=20, warmup_steps=0, log_every=100, checkpoint_every=10)

  def make_batches(start):
    for step in range(start, 100):
      if step == 12:
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C while step 13's batch is read
      yield {'x': np.ones((64, 3), np.float32), 'label': np.zeros(64, np.int32)}

  before = signal.getsignal(signal.SIGINT)
  loss = lambda params, batch, rng, frozen: (jnp.mean(jnp.square(params['w'] - batch['x'])), {})
  try:
    with pytest.raises(Preempted, match=r'\[ctrl-c\] SIGINT: saved step 13 in'):
      run_training(title='ctrl-c', loss_fn=loss, params={'w': jnp.zeros(3)}, section=section,
                   ckpt_dir=str(tmp_path / 'ckpt'), record={'stage': 'teacher'},
                   make_batches=make_batches, seed=0)
  except KeyboardInterrupt:
    pytest.fail('Ctrl-C interrupted training instead of saving')
  assert checkpoint.latest_step(str(tmp_path / 'ckpt')) == 13
  assert signal.getsignal(signal.SIGINT) is before


def test_ctrl_c_to_main_is_one_line_exit_130_and_the_rerun_resumes(tmp_path):
  workdir = tmp_path / 'run'
  log_path = tmp_path / 'main.log'
  args = [sys.executable, 'main.py', '--config=configs/tiny.py', '--mode=teacher',
          f'--config.workdir={workdir}', '--config.train.num_steps=100000',
          '--config.train.log_every=5', '--config.train.checkpoint_every=100000']
  with open(log_path, 'w') as log:
    proc = subprocess.Popen(args, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
  try:
    deadline = time.time() + 300
    while not re.search(r'\[teacher\] step \d+/', log_path.read_text()):
      assert proc.poll() is None and time.time() < deadline, log_path.read_text()[-3000:]
      time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=120) == 128 + signal.SIGINT
  finally:
    if proc.poll() is None:
      proc.kill()
  output = log_path.read_text()
  (line,) = [line for line in output.splitlines() if line.startswith('preempted:')]
  saved = int(re.search(r'SIGINT: saved step (\d+) in', line).group(1))
  assert 'Traceback' not in output and 'KeyboardInterrupt' not in output
  assert checkpoint.latest_step(str(workdir / 'teacher')) == saved > 0


def test_two_runs_racing_for_the_lock_never_both_hold_it(tmp_path, monkeypatch):
  """The second run looks at the lock while the first is writing it: with an exclusive create
  followed by a write, it found an empty file, took it over as unreadable, and both ran."""
  path = str(tmp_path / lock.LOCK_NAME)
  first = dict(host='h', pid=os.getpid(), started='first')
  # another live process on the same host
  second = dict(host='h', pid=os.getpid(), started='second')
  refused, real_dump = [], json.dump

  def dump_while_another_run_starts(obj, f, **kwargs):
    if obj is first and not refused:
      refused.append(None)
      try:
        lock._take_or_refuse(path, second)  # pylint: disable=protected-access
        refused[0] = 'first'  # the second took it: the first must be refused
      except lock.WorkdirLocked:
        refused[0] = 'second'
    real_dump(obj, f, **kwargs)

  monkeypatch.setattr(lock.json, 'dump', dump_while_another_run_starts)
  try:
    lock._take_or_refuse(path, first)  # pylint: disable=protected-access
    first_holds = True
  except lock.WorkdirLocked:
    first_holds = False
  second_holds = refused[0] == 'first'
  assert first_holds != second_holds, 'exactly one of two racing runs holds the lock'
  assert json.loads(open(path).read()) == (first if first_holds else second)


def test_a_refused_transfer_leaves_no_transfer_folder(tmp_path):
  config = tiny_config(tmp_path / 'run')
  os.makedirs(config.workdir)
  with pytest.raises(checkpoint.CheckpointError, match='no checkpoint in'):
    transfer.run_transfer(config)  # no encoder trained
  assert os.listdir(config.workdir) == []


def test_a_checkpoint_of_another_data_set_is_refused_naming_the_field(tmp_path):
  config = tiny_config(tmp_path)
  expected = records.make(config, stage='teacher')
  saved = dict(expected, data='toy2d_rings')  # another set of the same shape and classes
  with pytest.raises(checkpoint.CheckpointError,
                     match="made with data='toy2d_rings' but the config gives 'toy2d'"):
    records.check_compatible(saved, expected, 'ckpt')
