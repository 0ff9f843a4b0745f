"""A workdir on a remote filesystem (--config.workdir=gs://bucket/run): every file of a run goes
through epath or Orbax, never through os.path, open or os.rename.

The run's workdir is a ram:// URL and works offline: epath (train/files.py, the metric writers,
Orbax's directories and JSON files) and Orbax's TensorStore array store reach it in a directory of
this test, a stand-in bucket that only those two know the way to (_Bucket). No offline scheme
serves both as it is: epath knows gs://, s3://, az:// and hf:// only (the test registers ram:// with
it); Orbax hands TensorStore gs:// URLs (its gcs driver, which needs the network) or absolute local
paths, nothing else ('Checkpoint path should be absolute').

While the run goes on, builtins.open, os.makedirs, os.rename, os.replace, os.path.exists, ... refuse
a ram:// path from anyone, and os.path.join and friends refuse one from the repository's modules:
the second test fails on any of them, with the caller.
"""

import builtins
import dataclasses
import io
import os
import sys
import uuid

import numpy as np
import pytest
from etils.epath import backend, gpath, register
from orbax.checkpoint._src.serialization import tensorstore_utils
from tensorboard.backend.event_processing import event_accumulator

from conftest import tiny_config
from distill import stages
from train import records
from modes import fid
from modes.pipeline import run_pipeline
from modes.sampling import run_sample
from train import checkpoint, files, lock, writers

# one worker runs the module's single pipeline; the second tier (tests/conftest.py)
pytestmark = [pytest.mark.xdist_group('remote_workdir'), pytest.mark.integration]

SCHEME = 'ram'
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(REPO, 'tests')


class _Bucket(backend.Backend):
  """An epath backend storing ram://PATH in ROOT/PATH: the test's stand-in for a bucket."""

  def __init__(self, root: str):
    self.root = root

  def local(self, path) -> str:
    path = os.fspath(path)
    for prefix in (f'{SCHEME}://', f'{SCHEME}:/'):  # os.path.normpath (Orbax) leaves one slash
      if path.startswith(prefix):
        return os.path.join(self.root, path[len(prefix):])
    raise ValueError(f'not a {SCHEME}:// path: {path}')

  def url(self, local: str) -> str:
    return f'{SCHEME}://{os.path.relpath(local, self.root)}'

  def open(self, path, mode):
    return backend.os_backend.open(self.local(path), mode)

  def exists(self, path) -> bool:
    return backend.os_backend.exists(self.local(path))

  def isdir(self, path) -> bool:
    return backend.os_backend.isdir(self.local(path))

  def listdir(self, path) -> list[str]:
    return backend.os_backend.listdir(self.local(path))

  def glob(self, path) -> list[str]:
    return [self.url(p) for p in backend.os_backend.glob(self.local(path))]

  def walk(self, top, *, top_down=True, on_error=None):
    for root, dirs, names in backend.os_backend.walk(self.local(top), top_down=top_down,
                                                     on_error=on_error):
      yield self.url(root), dirs, names

  def makedirs(self, path, *, exist_ok=False, mode=None):
    backend.os_backend.makedirs(self.local(path), exist_ok=exist_ok, mode=mode)

  def mkdir(self, path, *, exist_ok=False, mode=None):
    backend.os_backend.mkdir(self.local(path), exist_ok=exist_ok, mode=mode)

  def rmtree(self, path) -> None:
    backend.os_backend.rmtree(self.local(path))

  def remove(self, path) -> None:
    backend.os_backend.remove(self.local(path))

  def rename(self, path, dst) -> None:
    backend.os_backend.rename(self.local(path), self.local(dst))

  def replace(self, path, dst) -> None:
    backend.os_backend.replace(self.local(path), self.local(dst))

  def copy(self, path, dst, overwrite: bool) -> None:
    backend.os_backend.copy(self.local(path), self.local(dst), overwrite=overwrite)

  def stat(self, path):
    return backend.os_backend.stat(self.local(path))


def _as_root_parts(parts):
  """('ram://b/x',) -> ('/ram/b/x',): the form epath keeps gs:// URLs in."""
  full = '/'.join(os.fspath(p) for p in parts)
  return (f'/{SCHEME}/{full[len(SCHEME) + 3:]}',) if full.startswith(f'{SCHEME}://') else parts


class _BucketPath(gpath.PosixGPath):
  """epath.Path of a ram:// URL, served by the class's bucket."""

  bucket: _Bucket = None

  if sys.version_info < (3, 12):
    def __new__(cls, *parts):
      return super().__new__(cls, *_as_root_parts(parts))
  else:
    def __init__(self, *parts):
      super().__init__(*_as_root_parts(parts))

  @property
  def _uri_scheme(self):
    return SCHEME if self.parts[:2] == ('/', SCHEME) else super()._uri_scheme

  @property
  def _backend(self):
    return self.bucket if self._uri_scheme == SCHEME else super()._backend


def _serve_bucket(patch: pytest.MonkeyPatch, root: str) -> None:
  """epath.Path('ram://...') and Orbax's TensorStore specs of ram:// directories use the bucket in
  root."""
  bucket = _Bucket(root)
  patch.setattr(_BucketPath, 'bucket', bucket)
  patch.setitem(register._URI_PREFIXES_TO_CLS,  # pylint: disable=protected-access
                f'{SCHEME}://', _BucketPath)
  build_kvstore_tspec = tensorstore_utils.build_kvstore_tspec

  def bucket_kvstore_tspec(directory, *args, **kwargs):
    if os.fspath(directory).startswith(f'{SCHEME}:/'):
      directory = bucket.local(directory)
    return build_kvstore_tspec(directory, *args, **kwargs)

  patch.setattr(tensorstore_utils, 'build_kvstore_tspec', bucket_kvstore_tspec)


IO_FUNCTIONS = {  # touch the local disk: a ram:// path here is a bug, whoever calls
    builtins: ('open',),
    io: ('open',),  # zipfile's (np.savez)
    os: ('open', 'makedirs', 'mkdir', 'rename', 'replace', 'remove', 'unlink', 'rmdir', 'listdir',
         'scandir', 'stat'),
    os.path: ('exists', 'isdir', 'isfile', 'getsize', 'abspath', 'realpath', 'relpath'),
}
# a bug only in the repository's code
STRING_FUNCTIONS = {os.path: ('join', 'dirname', 'basename', 'splitext')}


def _is_remote(value) -> bool:
  return isinstance(value, (str, os.PathLike)) and os.fspath(value).startswith(f'{SCHEME}:/')


def _from_repository(frame) -> bool:
  name = frame.f_code.co_filename
  return name.startswith(REPO + os.sep) and not name.startswith(TESTS + os.sep)


def _guard_local_io(patch: pytest.MonkeyPatch) -> list[str]:
  """Makes the functions above raise on a ram:// path; returns the list every refusal is also added
  to (an exception raised in a background thread of Orbax may be logged rather than seen)."""
  refused = []

  def guarded(module, name, fn, only_repository):
    def call(*args, **kwargs):
      caller = sys._getframe(1)  # pylint: disable=protected-access
      if any(_is_remote(a) for a in args) and (not only_repository or _from_repository(caller)):
        where = f'{caller.f_code.co_filename}:{caller.f_lineno}'
        refused.append(f'{module.__name__}.{name}{args!r} from {where}')
        raise AssertionError(f'local I/O on a remote path: {refused[-1]}')
      return fn(*args, **kwargs)
    return call

  for functions, only_repository in ((IO_FUNCTIONS, False), (STRING_FUNCTIONS, True)):
    for module, names in functions.items():
      for name in names:
        patch.setattr(module, name, guarded(module, name, getattr(module, name), only_repository))
  return refused


@dataclasses.dataclass
class RemoteRun:
  config: object
  bucket_root: str
  cwd: str
  refused: list


@pytest.fixture(scope='module')
def remote_run(tmp_path_factory):
  """teacher -> stage 1 -> one stage-2 round (4 -> 2 steps) -> samples, --mode=sample and
  --mode=fid, under the workdir lock, with the workdir on ram:// and local I/O on it refused."""
  workdir = f'{SCHEME}://bucket-{uuid.uuid4().hex[:8]}/run'
  config = tiny_config(workdir)
  config.stage2.final_steps = 2
  config.pipeline.update(teacher_steps=(4,), guidance_ws=(2.0,))
  config.eval.update(guidance_ws=(2.0,), teacher_steps=(4,), teacher_ddpm_steps=(),
                     student_steps=(2,), num_samples=256)
  bucket_root, cwd = str(tmp_path_factory.mktemp('bucket')), str(tmp_path_factory.mktemp('cwd'))
  with pytest.MonkeyPatch.context() as patch:
    _serve_bucket(patch, bucket_root)
    patch.chdir(cwd)  # where a write that slipped past the guard would land: checked empty below
    refused = _guard_local_io(patch)
    with lock.workdir_lock(config.workdir):
      run_pipeline(config)
      run_sample(config)
      fid.run_fid(config)
    yield RemoteRun(config, bucket_root, cwd, refused)


def test_the_pipeline_runs_with_its_workdir_on_a_remote_filesystem(remote_run):
  workdir = remote_run.config.workdir
  for stage, steps in (('teacher', None), ('stage1', None), ('stage2', 2)):
    assert checkpoint.latest_step(stages.stage_dir(workdir, stage, steps)) == 20, stage
  assert files.listdir(f'{workdir}/stage2') == ['steps_0002']  # one round
  assert records.read(f'{workdir}/stage2/steps_0002')['teacher']['dir'] == 'stage1'
  results = f'{workdir}/results'
  assert '## Fidelity to the teacher, stage by stage' in files.read_text(f'{results}/summary.md')
  assert 'sampling' in files.read_json(f'{results}/timings.json')
  # the teacher's reference and floor, stage 1, round 4 -> 2; each at w = 0 and 2
  assert len(files.read_json(f'{results}/stage_quality.json')['rows']) == 3 * 2
  assert files.read_bytes(f'{results}/student_ddim_2steps_w2.png').startswith(b'\x89PNG')
  samples = files.read_npz(f'{workdir}/samples/teacher_CFG_ddim_64steps_w1.npz')
  assert (samples['samples'].shape == (len(samples['labels']), 2) and
          np.all(np.isfinite(samples['samples'])))
  # the statistics and the precision / recall pool
  assert len(files.listdir(f'{workdir}/reference_stats')) == 2
  assert ({'results.csv', 'results.md', 'fid_vs_steps.png', 'fid_vs_is.png'}
          <= set(files.listdir(f'{workdir}/eval')))
  assert writers.read_jsonl(f'{workdir}/logs/teacher/{writers.JSONL_NAME}')[-1]['step'] == 20
  # the event files went to the bucket too
  events = event_accumulator.EventAccumulator(
      _Bucket(remote_run.bucket_root).local(f'{workdir}/logs/teacher'))
  events.Reload()
  assert 'loss' in events.Tags()['tensors']
  assert not files.exists(f'{workdir}/{lock.LOCK_NAME}'), 'the lock is released'
  assert os.listdir(remote_run.cwd) == [], 'nothing written to a local path named after the URL'
  assert os.listdir(remote_run.bucket_root), 'the files went through epath to the bucket'


def test_no_local_file_call_sees_a_workdir_path(remote_run):
  assert remote_run.refused == []


def test_the_guard_refuses_local_io_on_a_remote_path(tmp_path):
  with pytest.MonkeyPatch.context() as patch:
    patch.chdir(tmp_path)
    refused = _guard_local_io(patch)
    for call in (lambda: open(f'{SCHEME}://b/x', 'w', encoding='utf-8'),
                 lambda: os.makedirs(f'{SCHEME}://b/d'),
                 lambda: os.replace(f'{SCHEME}://b/x', f'{SCHEME}://b/y'),
                 lambda: os.path.exists(f'{SCHEME}://b'),
                 lambda: np.savez(f'{SCHEME}://b/x.npz', x=np.zeros(1)),
                 lambda: os.path.abspath(f'{SCHEME}://b')):
      with pytest.raises(AssertionError, match='local I/O on a remote path'):
        call()
    assert len(refused) == 6
    # pure string function, called from a test
    assert os.path.join(f'{SCHEME}://b', 'x') == f'{SCHEME}://b/x'
  assert os.listdir(tmp_path) == []


def test_a_second_run_in_a_remote_workdir_is_refused_and_an_empty_one_removed(
    tmp_path, monkeypatch):
  _serve_bucket(monkeypatch, str(tmp_path))
  workdir = f'{SCHEME}://bucket/run'
  with lock.workdir_lock(workdir):
    assert files.read_json(f'{workdir}/{lock.LOCK_NAME}')['pid'] == os.getpid()
    with pytest.raises(lock.WorkdirLocked, match='in use by process'):
      with lock.workdir_lock(workdir):
        pass
  assert not files.exists(workdir), 'created by the lock and left empty: removed'


def test_a_local_write_that_fails_leaves_the_old_file_and_no_temporary_one(tmp_path, monkeypatch):
  path = tmp_path / 'results' / 'summary.md'
  files.write_text(path, 'old\n')

  def fail(*args):
    raise OSError(f'disk full: {args}')

  monkeypatch.setattr(os, 'replace', fail)
  with pytest.raises(OSError, match='disk full'):
    files.write_text(path, 'new\n')
  assert path.read_text() == 'old\n' and os.listdir(path.parent) == ['summary.md']
