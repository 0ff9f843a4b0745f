"""Fault injection: `kill -9` the tiny pipeline and FID run at seeded random points of every phase
(teacher, stage 1, mid stage-2 round, sampling, FID; every training kill after the phase's first
checkpoint) and once inside an Orbax save, rerun the same command each time, and compare the final
checkpoints and results with an uninterrupted run of the same commands."""

import csv
import os
import random
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from conftest import main_level_env, tiny_config
from distill import stages
from modes.sampling import LoadedCheckpoint

pytestmark = pytest.mark.integration  # the second tier (tests/conftest.py)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 240
# Long enough phases that a kill right after a progress line lands inside the phase, on a loaded CPU
# too: a kill follows a progress line at least 300 steps before the phase ends (100-150 tiny steps/s
# on 2 loaded cores) and at least 100 steps after its first checkpoint (step 200), so the rerun
# resumes instead of starting over; no longer, since every step is run twice or more.
CHECKPOINT_EVERY = 200
PHASE_STEPS = {'teacher': 700, 'stage1': 700, 'stage2': 700}
# each phase's config section
SECTIONS = {'teacher': 'train', 'stage1': 'stage1', 'stage2': 'stage2'}
OVERRIDES = (*(f'--config.{SECTIONS[phase]}.{key}={value}' for phase, steps in PHASE_STEPS.items()
               for key, value in (('num_steps', steps), ('checkpoint_every', CHECKPOINT_EVERY),
                                  ('log_every', 100))),
             # the reference-statistics kill needs them uncached ...
             '--config.pipeline.quality_samples=0',
             # ... and a computation long enough to land in (~0.2 s)
             '--config.eval.reference_examples=8192')
FID_METHODS = 7  # tiny: teacher DDIM 64 and 4, DDPM 64, student DDIM 2 and 1, stochastic 4 and 2
FID_CELLS = 2 * FID_METHODS  # x 2 values of w


class InSave:
  """A kill trigger: the Orbax temporary directory of a save at `step` in a stage's checkpoint
  directory exists."""

  def __init__(self, stage: str, steps, step: int):
    self.stage, self.steps, self.step = stage, steps, step
    self.pattern = f'{stage} {steps or ""} {step}.orbax-checkpoint-tmp'  # as printed

  def paths(self, workdir):
    """(the save's temporary directory, the finished checkpoint's directory)."""
    ckpt_dir = stages.stage_dir(str(workdir), self.stage, self.steps)
    return os.path.join(ckpt_dir,
                        f'{self.step}.orbax-checkpoint-tmp'), os.path.join(ckpt_dir, str(self.step))


def _kill_plan(seed: int) -> list[tuple[str, object, float, re.Pattern]]:
  """(mode, trigger: a log line or an InSave, extra delay in s, the phase the last log line must
  show at the kill): a seeded random point in each phase after its first checkpoint, and a kill
  inside the second save of a seeded random training phase (placed before that phase's other kill,
  while the save is still to come)."""
  rng = random.Random(seed)
  pick = lambda steps: rng.randrange(CHECKPOINT_EVERY + 100, steps - 300 + 1, 100)
  progress = lambda title, steps: re.compile(rf'\[{re.escape(title)}\] step {pick(steps)}/')
  in_phase = lambda title: re.compile(rf'\[{re.escape(title)}\] (step|resuming)')
  training = [('teacher', None, 'teacher'), ('stage1', None, 'stage1'),
              ('stage2', 2, 'stage2 4->2 steps'), ('stage2', 1, 'stage2 2->1 steps')]
  in_save = rng.randrange(3)  # the teacher, stage 1 or the first stage-2 round
  plan = []
  for i, (stage, steps, title) in enumerate(training):
    if i == in_save:
      plan.append(('pipeline', InSave(stage, steps, 2 * CHECKPOINT_EVERY), 0.0, in_phase(title)))
    plan.append(
        ('pipeline', progress(title, PHASE_STEPS[stage]), rng.uniform(0, 0.1), in_phase(title)))
  return plan + [
      ('pipeline', re.compile(r'\[pipeline\] stage2 round -> 1 step took'), rng.uniform(0.1, 1.0),
       # sampling: the next line would be 'sampling took'
       re.compile(r'stage2 round -> 1 step took')),
      ('fid', re.compile(r'\[fid\] reference statistics: computing'), rng.uniform(0, 0.03),
       # inside their computation, before the save
       re.compile(r'\[fid\] reference statistics: computing')),
      ('fid', re.compile(rf'\[fid\] {rng.randrange(2, FID_CELLS)}/{FID_CELLS} '),
       rng.uniform(0, 0.3), re.compile(r'\[fid\] \d+/')),
  ]


class Runner:
  """Runs main.py modes on configs/tiny.py in one workdir; each output goes to its own log file."""

  def __init__(self, workdir, log_dir):
    self.workdir, self.log_dir, self.count = workdir, log_dir, 0

  def start(self, mode: str):
    self.count += 1
    log_path = self.log_dir / f'{os.path.basename(self.workdir)}_{self.count}_{mode}.log'
    log = open(log_path, 'w')  # pylint: disable=consider-using-with
    proc = subprocess.Popen([
        sys.executable, 'main.py', '--config=configs/tiny.py', f'--mode={mode}',
        f'--config.workdir={self.workdir}', *OVERRIDES
    ],
                            cwd=REPO,
                            stdout=log,
                            stderr=subprocess.STDOUT,
                            env=main_level_env())  # as a user's run, not the tests'
    proc.log_file = log
    return proc, log_path

  def run(self, mode: str) -> None:
    proc, log_path = self.start(mode)
    code = proc.wait(timeout=TIMEOUT_S)
    proc.log_file.close()
    assert code == 0, f'{mode} exited {code}:\n{log_path.read_text()[-3000:]}'

  def kill_after(self, mode: str, trigger, delay: float) -> str:
    """Starts mode, SIGKILLs it `delay` s after the trigger (a pattern in its log, or an InSave)
    shows; returns the log up to the kill."""
    proc, log_path = self.start(mode)
    if isinstance(trigger, InSave):
      tmp_dir, done_dir = trigger.paths(self.workdir)
      triggered, poll_s = lambda: os.path.exists(tmp_dir), 0.001
    else:
      triggered, poll_s = lambda: trigger.search(log_path.read_text()), 0.005
    try:
      deadline = time.time() + TIMEOUT_S
      while not triggered():
        assert proc.poll() is None, (f'{mode} exited {proc.returncode} before '
                                     f'{trigger.pattern!r}:\n') + \
            log_path.read_text()[-3000:]
        assert time.time() < deadline, f'timed out waiting for {trigger.pattern!r}'
        time.sleep(poll_s)
      time.sleep(delay)
      assert proc.poll() is None, f'{mode} finished before the kill after {trigger.pattern!r}'
      proc.send_signal(signal.SIGKILL)
      assert proc.wait(timeout=TIMEOUT_S) == -signal.SIGKILL
    finally:
      if proc.poll() is None:
        proc.kill()
      proc.log_file.close()
    # the kill landed inside the save: its temporary directory was never finished
    if isinstance(trigger, InSave):
      assert (os.path.exists(tmp_dir) and
              not os.path.exists(done_dir)), f'the kill missed the save {trigger.pattern}'
    return log_path.read_text()


def _params(workdir):
  """Every trained checkpoint's EMA params: teacher, stage 1 and each stage-2 round."""
  config = tiny_config(workdir)
  named = (
      [('teacher', None), ('stage1', None)] + [('stage2', n) for n in stages.stage2_rounds(config)])
  # Read as sampling reads them (no config): the runs' configs differ from this one in their step
  # counts.
  return {(stage, n): jax.tree.leaves(LoadedCheckpoint(stages.stage_dir(workdir, stage, n)).params)
          for stage, n in named}


def _sample_rows(workdir) -> list[str]:
  """The per-method sample statistics of the pipeline summary (the timing table differs between
  runs)."""
  lines = (workdir / 'results' / 'summary.md').read_text().splitlines()
  return [
      line for line in lines
      if line.startswith('| ') and ('student' in line or 'teacher CFG' in line)
  ]


def _fid_rows(workdir) -> dict:
  with open(workdir / 'eval' / 'results.csv') as f:
    rows = list(csv.DictReader(f))
  return {(r['method'], r['sampler'], r['steps'],
           r['w']): (r['fid'], r['is_mean'], r['is_std'], r['accuracy'])
          for r in rows}


def fault_seed() -> int:
  """A new kill plan every run; FAULT_INJECTION_SEED=<seed> replays one (the seed is printed and in
  every failure)."""
  return int(os.environ.get('FAULT_INJECTION_SEED') or random.SystemRandom().randrange(1 << 30))


def test_killed_at_random_points_the_reruns_end_with_the_uninterrupted_results(tmp_path, capsys,
                                                                               record_property):
  seed = fault_seed()
  record_property('fault_injection_seed', seed)
  with capsys.disabled():
    print(f'\nfault injection seed {seed} (replay: FAULT_INJECTION_SEED={seed} python -m pytest '
          'tests/test_fault_injection.py)')
  reference = Runner(tmp_path / 'uninterrupted', tmp_path)
  reference.run('pipeline')
  reference.run('fid')

  killed = Runner(tmp_path / 'killed', tmp_path)
  plan = _kill_plan(seed=seed)
  for i, (mode, pattern, delay, phase) in enumerate(plan):
    log = killed.kill_after(mode, pattern, delay)
    last = [line.split('] ', 1)[-1] for line in log.splitlines() if re.search(r'\] \[', line)][-1]
    with capsys.disabled():
      print(f'\nkill {i + 1}: --mode={mode} {delay:.2f} s after {pattern.pattern!r}; last '
            f'line: {last[:100]}')
    record_property(
        f'fault_injection_kill_{i + 1}', f'--mode={mode} {delay:.2f} s after {pattern.pattern!r}; '
        f'last line: {last[:80]}')
    assert phase.search(last), (f'seed {seed}: kill {i + 1} did not land in its phase '
                                f'{phase.pattern!r}: {last}')
    if mode == 'pipeline' and i + 1 < len(plan) and plan[i + 1][0] != 'pipeline':
      killed.run('pipeline')  # the pipeline completes before FID starts
  killed.run('fid')

  want, got = _params(reference.workdir), _params(killed.workdir)
  assert want.keys() == got.keys()
  for key in want:
    for a, b in zip(want[key], got[key], strict=True):
      np.testing.assert_array_equal(
          a, b, err_msg=f'seed {seed}: {key} differs from the uninterrupted run')
  assert _sample_rows(killed.workdir) == _sample_rows(reference.workdir), f'seed {seed}'
  for name in sorted(os.listdir(reference.workdir / 'results')):
    if name.endswith('.png'):
      assert (killed.workdir / 'results' /
              name).read_bytes() == (reference.workdir / 'results' / name).read_bytes()
  want_fid = _fid_rows(reference.workdir)
  assert len(want_fid) == FID_CELLS and _fid_rows(killed.workdir) == want_fid
  assert len(plan) == 8 and sum(isinstance(kill[1], InSave) for kill in plan) == 1
