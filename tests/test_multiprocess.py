"""Two JAX processes on loopback (main.py --coordinator_address ...) train exactly like one
process."""

import os
import re
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from conftest import main_level_env, tiny_config
from distill import stages
from main import PREEMPTED_EXIT_CODE
from modes.sampling import LoadedCheckpoint

pytestmark = pytest.mark.integration  # the second tier (tests/conftest.py)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 300
STEPS = 4  # per stage; checkpoints every 2 steps, so each stage saves twice

# One process of the run: main.py with a 'chain' mode (teacher, stage 1, one stage-2 round).
_PROCESS_SCRIPT = """
import sys
sys.path[:0] = [{repo!r}, {tests!r}]
import main, modes
from test_multiprocess import train_chain

modes.MODES['chain'] = train_chain
main.flags.FLAGS['mode'].parser.enum_values.append('chain')  # a test-only mode for the --mode enum
sys.argv = ['main.py', '--config=configs/tiny.py', '--mode=chain', '--config.workdir={workdir}',
            '--coordinator_address={coordinator}', '--num_processes={num_processes}', \
'--process_id={process_id}',
            '--config.train.num_steps={steps}', '--config.stage1.num_steps={steps}',
            '--config.stage2.num_steps={steps}', '--config.stage2.final_steps=2', \
'--config.train.checkpoint_every=2',
            '--config.stage1.checkpoint_every=2', '--config.stage2.checkpoint_every=2']
main.run()
"""


def train_chain(config):
  """Teacher (twice: the second run restores collectively and skips), stage 1, then the 4 -> 2
  stage-2 round, on the production data path: each process keeps its rows of the global batch
  (data._in_memory_batches)."""
  stages.train_teacher(config)
  stages.train_teacher(config)
  stages.train_stage1(config)
  stages.train_stage2(config)


def _free_port() -> int:
  with socket.socket() as sock:
    sock.bind(('127.0.0.1', 0))
    return sock.getsockname()[1]


@pytest.fixture
def launch(tmp_path):
  """launch(argv, num_processes) starts the processes of one run on a fresh loopback coordinator and
  returns [(process, log path)]; argv(process_id, coordinator) is each one's command. Leftovers are
  killed."""
  runs = []

  def start(argv, num_processes):
    coordinator = f'127.0.0.1:{_free_port()}'
    env = main_level_env()  # one CPU device per process
    started = []
    for process_id in range(num_processes):
      log_path = tmp_path / f'run{len(runs)}_process{process_id}.log'
      with open(log_path, 'w') as log:
        proc = subprocess.Popen(argv(process_id, coordinator), cwd=REPO, env=env, stdout=log,
                                stderr=subprocess.STDOUT)
      started.append((proc, log_path))
    runs.extend(started)
    return started

  yield start
  for proc, _ in runs:
    if proc.poll() is None:
      proc.kill()
      proc.wait()


def _wait_all(started, expected_code: int = 0) -> list[str]:
  """Waits until every process exits with expected_code and returns their outputs. Fails as soon as
  one exits with another code or prints a traceback (a failed process waits minutes for the others
  at shutdown, the others for it in a collective), or when TIMEOUT_S runs out."""
  deadline = time.time() + TIMEOUT_S
  while any(proc.poll() is None for proc, _ in started):
    for proc, log_path in started:
      output = log_path.read_text()
      if proc.poll() not in (None, expected_code) or 'Traceback (most recent call last)' in output:
        pytest.fail(f'a process failed (exit {proc.returncode}):\n{output[-3000:]}')
    if time.time() > deadline:
      pytest.fail(f'timed out:\n{started[0][1].read_text()[-3000:]}')
    time.sleep(0.1)
  for proc, log_path in started:
    assert proc.returncode == expected_code, log_path.read_text()[-3000:]
  return [log_path.read_text() for _, log_path in started]


def _chain_argv(workdir):
  def argv(process_id, coordinator):
    return [sys.executable, '-c', _PROCESS_SCRIPT.format(
        repo=REPO, tests=os.path.join(REPO, 'tests'), workdir=workdir, coordinator=coordinator,
        num_processes=2, process_id=process_id, steps=STEPS)]
  return argv


def _params(config, stage, steps=None):
  """A checkpoint's EMA params, read as sampling reads them: configs here need not give its step
  counts."""
  return jax.tree.leaves(LoadedCheckpoint(stages.stage_dir(config.workdir, stage, steps)).params)


def test_two_processes_train_like_one(tmp_path, launch):
  one = tiny_config(tmp_path / 'one', train=STEPS, stage1=STEPS, stage2=STEPS)
  one.stage2.final_steps = 2
  for section in (one.train, one.stage1, one.stage2):
    section.checkpoint_every = 2
  stages.train_teacher(one)
  stages.train_stage1(one)
  stages.train_stage2(one)

  two = tiny_config(tmp_path / 'two')
  started = launch(_chain_argv(two.workdir), 2)
  outputs = _wait_all(started)
  for process_id, output in enumerate(outputs):
    assert f'devices=2 (cpu) process {process_id}/2' in output, output[-3000:]
  assert '[teacher] resuming from step 4' in outputs[0], outputs[0][-3000:]

  for stage, steps in (('teacher', None), ('stage1', None), ('stage2', 2)):
    assert stages.checkpoint.latest_step(stages.stage_dir(two.workdir, stage, steps)) == STEPS
    for a, b in zip(_params(one, stage, steps), _params(two, stage, steps), strict=True):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=stage)


def test_sigterm_to_one_process_stops_both_at_the_same_saved_step(tmp_path, launch):
  workdir = tmp_path / 'run'

  def argv(process_id, coordinator):
    return [sys.executable, 'main.py', '--config=configs/tiny.py', '--mode=teacher',
            f'--config.workdir={workdir}', '--config.train.num_steps=1000000',
            '--config.train.checkpoint_every=100000', '--config.train.log_every=10',
            f'--coordinator_address={coordinator}', '--num_processes=2',
            f'--process_id={process_id}']

  started = launch(argv, 2)
  (_, log0), (proc1, log1) = started
  deadline = time.time() + TIMEOUT_S
  while '[teacher] step' not in log0.read_text():
    assert all(proc.poll() is None
               for proc, _ in started), log0.read_text()[-3000:] + log1.read_text()[-3000:]
    assert time.time() < deadline, log0.read_text()[-3000:]
    time.sleep(0.1)
  # one host told it is pre-empted: JAX's preemption service tells the other
  proc1.send_signal(signal.SIGTERM)
  outputs = _wait_all(started, PREEMPTED_EXIT_CODE)
  saved = []
  for output in outputs:
    saved += re.findall(r'^preempted: .* saved step (\d+) in', output, re.MULTILINE)
  assert len(saved) == 2 and saved[0] == saved[1], outputs
  assert stages.checkpoint.latest_step(str(workdir / 'teacher')) == int(saved[0])


def test_kill_9_of_one_process_then_restarting_both_resumes_from_the_last_checkpoint(
    tmp_path, launch):
  steps, every = 300, 100
  one = tiny_config(tmp_path / 'one', train=steps)
  one.train.checkpoint_every = every
  stages.train_teacher(one)
  workdir = tmp_path / 'two'

  def argv(process_id, coordinator):
    return [sys.executable, 'main.py', '--config=configs/tiny.py', '--mode=teacher',
            f'--config.workdir={workdir}', f'--config.train.num_steps={steps}',
            f'--config.train.checkpoint_every={every}', '--config.train.log_every=50',
            f'--coordinator_address={coordinator}', '--num_processes=2',
            f'--process_id={process_id}']

  started = launch(argv, 2)
  (proc0, log0), (proc1, _) = started
  deadline = time.time() + TIMEOUT_S
  while not [int(k) for k in re.findall(r'\[teacher\] step (\d+)/',
                                        log0.read_text()) if every < int(k) < steps]:
    assert proc0.poll() is None and proc1.poll() is None, log0.read_text()[-3000:]
    assert time.time() < deadline, log0.read_text()[-3000:]
    time.sleep(0.01)
  proc1.send_signal(signal.SIGKILL)  # a host lost without warning
  assert proc0.wait(timeout=60) == 1  # the survivor's next collective fails: one line, exit 1
  saved = stages.checkpoint.latest_step(str(workdir / 'teacher'))
  assert saved is not None and every <= saved < steps
  errors = [line for line in log0.read_text().splitlines() if line.startswith('error: ')]
  assert len(errors) == 1 and 'Traceback' not in log0.read_text(), log0.read_text()[-3000:]
  assert (
      errors[0].startswith('error: [teacher] another process of this run stopped (') and
      errors[0].endswith(
          f'restart every process with the same command; training resumes from step {saved} in '
          f'{workdir}/teacher'))

  # both restarted: the stale workdir lock is taken over, training resumes
  outputs = _wait_all(launch(argv, 2))
  assert f'[teacher] resuming from step {saved}' in outputs[0], outputs[0][-3000:]
  assert stages.checkpoint.latest_step(str(workdir / 'teacher')) == steps
  two = tiny_config(workdir)
  for a, b in zip(_params(one, 'teacher'), _params(two, 'teacher'), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
