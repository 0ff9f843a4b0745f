"""Operating-system errors are one `error:` line naming the path and the cause: a workdir that is a
file, a path under it, one nobody may create, a save that fails (training stops at that save, and an
error of the cleanup after it does not hide it)."""

import errno
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

import main
from conftest import tiny_config
from train import checkpoint, writers
from train.lock import workdir_lock
from train.loop import run_training

pytestmark = pytest.mark.integration  # the second tier (tests/conftest.py)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _main(workdir, *args, max_file_bytes=None):
  """main.py --mode=teacher on configs/tiny.py; with max_file_bytes, no file may grow past it
  (writes past it fail with EFBIG, as on a full disk): set by a small launcher that then execs
  main.py, since a preexec_fn in this multithreaded process could deadlock the fork."""
  command = [sys.executable, 'main.py', '--config=configs/tiny.py', '--mode=teacher',
             f'--config.workdir={workdir}', *args]
  if max_file_bytes is not None:
    command = [sys.executable, '-c', _LIMITED.format(limit=max_file_bytes), *command]
  return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)


_LIMITED = """
import os, resource, signal, sys

signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))
os.execv(sys.argv[1], sys.argv[1:])
"""


def _error_lines(result) -> list[str]:
  return [line for line in result.stderr.splitlines() if line.startswith('error:')]


_READ_ONLY = """
import errno, os, runpy, sys

root, real_open, real_mkdir = os.path.abspath(sys.argv[1]), os.open, os.mkdir
WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


def _refuse(path):
  if os.path.abspath(os.fsdecode(path)).startswith(root):
    raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fsdecode(path))


def read_only_open(path, flags, *args, **kwargs):
  if flags & WRITE:
    _refuse(path)
  return real_open(path, flags, *args, **kwargs)


def read_only_mkdir(path, *args, **kwargs):
  _refuse(path)
  return real_mkdir(path, *args, **kwargs)


os.open, os.mkdir = read_only_open, read_only_mkdir  # what open(), tempfile and os.makedirs go \
through
sys.argv = sys.argv[2:]
runpy.run_path(sys.argv[0], run_name='__main__')
"""


def test_a_read_only_workdir_is_one_error_line_and_nothing_changes(tmp_path):
  """A workdir on a read-only file system (every create or write under it fails with EROFS, as on a
  read-only mount; simulated in the process, since root may write anywhere): one line naming it, no
  traceback."""
  workdir = tmp_path / 'run'
  workdir.mkdir()
  (workdir / 'notes.txt').write_text('kept')
  command = [sys.executable, '-c', _READ_ONLY, str(workdir), 'main.py', '--config=configs/tiny.py',
             '--mode=teacher', f'--config.workdir={workdir}']
  result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
  assert result.returncode == 1, result.stderr[-2000:]
  lines = _error_lines(result)
  assert (len(lines) == 1 and lines[0].startswith(f'error: {workdir}/') and
          ': Read-only file system: check the path' in lines[0]), result.stderr[-2000:]
  assert 'Traceback' not in result.stderr
  assert (sorted(os.listdir(workdir)) == ['notes.txt'] and
          (workdir / 'notes.txt').read_text() == 'kept')


def test_a_workdir_that_is_a_file_is_one_error_line(tmp_path):
  workdir = tmp_path / 'run'
  workdir.write_text('not a directory')
  result = _main(workdir)
  assert result.returncode == 1
  assert _error_lines(result) == [f'error: {workdir}: exists and is not a directory: '
                                  'check the path (--config.workdir and the other paths), its '
                                  'permissions and free space, then run the '
                                  'same command again'], result.stderr[-2000:]
  assert 'Traceback' not in result.stderr and workdir.read_text() == 'not a directory'


@pytest.mark.parametrize('workdir, named, cause', [
    ('{tmp}/file/run', '{tmp}/file/run', 'Not a directory'),  # a path through a file
    # not even for root
    ('/proc/reliability-test/run', '/proc/reliability-test', 'No such file or directory'),
])
def test_a_workdir_that_cannot_be_made_names_the_path_and_the_cause(
    tmp_path, workdir, named, cause):
  (tmp_path / 'file').write_text('')
  workdir, named = workdir.format(tmp=tmp_path), named.format(tmp=tmp_path)
  with pytest.raises(OSError) as err:
    with workdir_lock(workdir):
      pass
  line = main._os_error_line(err.value)  # pylint: disable=protected-access
  assert line.startswith(f'{named}: {cause}: check the path')


def test_a_failing_save_stops_training_there_with_one_error_line(tmp_path):
  workdir = tmp_path / 'run'
  # saves at 10, 20, ...
  result = _main(workdir, '--config.train.num_steps=40', max_file_bytes=100_000)
  teacher_dir = workdir / 'teacher'
  assert result.returncode == 1
  assert _error_lines(result) == [f'error: [teacher] could not save step 10 in {teacher_dir}: File '
                                  'too large; fix that (free space, permissions) and run the same '
                                  'command to resume from the last saved '
                                  'step'], result.stderr[-3000:]
  # stopped at that save
  assert '[teacher] step 10/40' in result.stderr and 'step 20/40' not in result.stderr
  assert checkpoint.latest_step(str(teacher_dir)) is None


def test_the_first_error_is_reported_not_one_of_the_cleanup_after_it(tmp_path, monkeypatch):
  def full_disk(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / 'ckpt'))

  monkeypatch.setattr(checkpoint, 'save', full_disk)
  monkeypatch.setattr(writers.JsonlWriter, 'flush', full_disk)  # the logs cannot be flushed either
  section = tiny_config(tmp_path).train
  section.update(num_steps=6, warmup_steps=0, log_every=1, checkpoint_every=2)
  requested = []

  def make_batches(start):
    for step in range(start, 100):
      requested.append(step)
      yield {'x': np.ones((64, 3), np.float32), 'label': np.zeros(64, np.int32)}

  loss = lambda params, batch, rng, frozen: (jnp.mean(jnp.square(params['w'] - batch['x'])), {})
  with pytest.raises(checkpoint.CheckpointError,
                     match=r'\[disk\] could not save step 2 in .*ckpt: No space left on '
                     'device; fix that'):
    run_training(title='disk', loss_fn=loss, params={'w': jnp.zeros(3)}, section=section,
                 ckpt_dir=str(tmp_path / 'ckpt'), record={'stage': 'teacher'},
                 make_batches=make_batches, seed=0, logdir=str(tmp_path / 'logs'))
  assert max(requested) == 1, 'no step after the failed save'
