"""Two JAX processes on loopback (main.py --coordinator_address ...) train exactly like one process."""

import os
import shutil
import socket
import subprocess
import sys

import jax
import numpy as np

import data
from conftest import tiny_config
from distill import stages

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 300
STEPS = 4  # per stage; checkpoints every 2 steps, so each stage saves twice

# One process of the run: main.py with a 'chain' mode (teacher, one stage-2 round) and global batches.
_PROCESS_SCRIPT = """
import sys
sys.path[:0] = [{repo!r}, {tests!r}]
import data, main, modes
from test_multiprocess import global_batches, train_chain
data._in_memory_batches = global_batches
modes.MODES['chain'] = train_chain
sys.argv = ['main.py', '--config=configs/tiny.py', '--mode=chain', '--config.workdir={workdir}',
            '--coordinator_address={coordinator}', '--num_processes={num_processes}', '--process_id={process_id}',
            '--config.train.num_steps={steps}', '--config.stage2.num_steps={steps}',
            '--config.stage2.final_steps=2', '--config.train.checkpoint_every=2',
            '--config.stage2.checkpoint_every=2']
main.run()
"""


def global_batches(name, *, batch_size, seed, random_flip, start_step):
  """Like data._in_memory_batches, but every host draws the global batch from (seed, k) and keeps its slice,
  so any number of processes sees the batches of one process."""
  del random_flip  # toy2d only
  x, label = data.load_arrays(name, 'train')
  first = jax.process_index() * batch_size
  step = start_step
  while True:
    rng = np.random.default_rng([seed, step])
    indices = rng.integers(0, len(label), size=batch_size * jax.process_count())[first:first + batch_size]
    yield {'x': x[indices], 'label': label[indices]}
    step += 1


def train_chain(config):
  """Teacher (twice: the second run restores collectively and skips), then the 4 -> 2 stage-2 round of
  the stage-1 model found in the workdir."""
  stages.train_teacher(config)
  stages.train_teacher(config)
  stages.train_stage2(config)


def _free_port() -> int:
  with socket.socket() as sock:
    sock.bind(('127.0.0.1', 0))
    return sock.getsockname()[1]


def _run_processes(workdir, num_processes):
  """Starts every process of the run and waits for all; kills the rest if one fails or time runs out."""
  coordinator = f'127.0.0.1:{_free_port()}'
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS='')
  procs, logs = [], []
  try:
    for process_id in range(num_processes):
      script = _PROCESS_SCRIPT.format(repo=REPO, tests=os.path.join(REPO, 'tests'), workdir=workdir,
                                      coordinator=coordinator, num_processes=num_processes,
                                      process_id=process_id, steps=STEPS)
      logs.append(open(os.path.join(workdir, f'process{process_id}.log'), 'w+'))
      procs.append(subprocess.Popen([sys.executable, '-c', script], cwd=REPO, env=env, stdout=logs[-1],
                                    stderr=subprocess.STDOUT))
    for proc in procs:
      proc.wait(timeout=TIMEOUT_S)
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
        proc.wait()
    outputs = []
    for log in logs:
      log.seek(0)
      outputs.append(log.read())
      log.close()
  for proc, output in zip(procs, outputs):
    assert proc.returncode == 0, output[-3000:]
  return outputs


def _params(config, stage, steps=None):
  return jax.tree.leaves(stages.load_stage_params(config, stage, steps)[1])


def test_two_processes_train_like_one(tmp_path, monkeypatch):
  one = tiny_config(tmp_path / 'one', train=STEPS, stage1=STEPS, stage2=STEPS)
  one.stage2.final_steps = 2
  for section in (one.train, one.stage1, one.stage2):
    section.checkpoint_every = 2
  monkeypatch.setattr(data, '_in_memory_batches', global_batches)
  stages.train_teacher(one)
  stages.train_stage1(one)
  stages.train_stage2(one)

  two = tiny_config(tmp_path / 'two')
  shutil.copytree(stages.stage_dir(one.workdir, 'stage1'), stages.stage_dir(two.workdir, 'stage1'))
  outputs = _run_processes(two.workdir, 2)
  for process_id, output in enumerate(outputs):
    assert f'devices=2 (cpu) process {process_id}/2' in output, output[-3000:]
  assert '[teacher] resuming from step 4' in outputs[0], outputs[0][-3000:]

  for stage, steps in (('teacher', None), ('stage2', 2)):
    assert stages.checkpoint.latest_step(stages.stage_dir(two.workdir, stage, steps)) == STEPS
    for a, b in zip(_params(one, stage, steps), _params(two, stage, steps), strict=True):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=stage)
