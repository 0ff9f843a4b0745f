"""The chain of stages: no student is distilled from an incomplete or changed teacher without being
asked to, and one run at a time per workdir."""

import json
import os
import socket
import subprocess
import sys

import pytest

from conftest import Killed, kill_after, tiny_config
from distill import stages
from train import records
from train import checkpoint, lock

pytestmark = pytest.mark.integration  # the second tier (tests/conftest.py)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_an_incomplete_teacher_is_refused_unless_allowed(tmp_path, monkeypatch):
  config = tiny_config(tmp_path, train=20, stage1=10)
  with monkeypatch.context() as patch:
    kill_after(patch, 15)  # the teacher's checkpoint at 10 is kept, its final step 20 never comes
    with pytest.raises(Killed):
      stages.train_teacher(config)
  with pytest.raises(checkpoint.CheckpointError,
                     match=r'teacher is incomplete \(step 10 of 20\): finish it'):
    stages.train_stage1(config)
  assert not os.path.exists(tmp_path / 'stage1'), 'nothing may be written before the refusal'
  config.distill.allow_incomplete_teacher = True
  stages.train_stage1(config)
  assert records.read(str(tmp_path / 'stage1'))['teacher']['step'] == 10


def test_a_student_of_a_changed_teacher_is_refused_then_redistilled_on_request(tmp_path):
  config = tiny_config(tmp_path, train=10, stage1=10)
  stages.train_teacher(config)
  stages.train_stage1(config)
  first = records.read(str(tmp_path / 'stage1'))['teacher']
  assert first['dir'] == 'teacher' and first['step'] == 10 and len(first['params_sha1']) == 40
  stages.train_stage1(config)  # same teacher: the finished student is kept
  config.train.num_steps = 20
  stages.train_teacher(config)  # the teacher trains on: every student of it is now stale
  with pytest.raises(checkpoint.CheckpointError,
                     match='distilled from another teacher .*redistill=True'):
    stages.train_stage1(config)
  config.distill.redistill = True
  stages.train_stage1(config)
  assert records.read(str(tmp_path / 'stage1'))['teacher']['step'] == 20
  assert records.read(str(tmp_path / 'stage1.stale'))['teacher'] == first, 'the old student is kept'


def test_the_same_teacher_gives_the_same_digest_and_any_change_another(tmp_path):
  config = tiny_config(tmp_path, train=10)
  stages.train_teacher(config)
  _, params, record = stages.load_stage_params(config, 'teacher')
  assert checkpoint.params_digest(params) == record['provenance']['params_sha1']
  assert stages.load_stage_params(config, 'teacher')[2]['provenance'] == record['provenance']
  changed = {**params, 'dense_out': {**params['dense_out'],
                                     'bias': params['dense_out']['bias'].at[0].add(1e-6)}}
  assert checkpoint.params_digest(changed) != record['provenance']['params_sha1']


def test_set_aside_never_overwrites_an_earlier_one(tmp_path):
  for n in range(3):
    (tmp_path / '10').mkdir()
    (tmp_path / '10' / 'mark').write_text(str(n))
    checkpoint.set_aside(tmp_path / '10', tmp_path / 'corrupted.10')
  marks = {p.name: (p / 'mark').read_text() for p in tmp_path.iterdir()}
  assert marks == {'corrupted.10': '0', 'corrupted.10.1': '1', 'corrupted.10.2': '2'}


def _lock_file(workdir, pid, host=None):
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / lock.LOCK_NAME).write_text(
      json.dumps(dict(host=host or socket.gethostname(), pid=pid, started='t0')))


def test_a_second_run_in_a_workdir_is_refused_with_one_line(tmp_path):
  _lock_file(tmp_path / 'run', os.getpid())  # this test process: alive
  result = subprocess.run([sys.executable, os.path.join(REPO, 'main.py'),
                           f'--config={REPO}/configs/tiny.py', '--mode=teacher',
                           f'--config.workdir={tmp_path / "run"}'],
                          capture_output=True, text=True, timeout=120, cwd=REPO)
  assert result.returncode == 1
  errors = [line for line in result.stderr.splitlines() if line.startswith('error:')]
  assert (len(errors) == 1 and
          f'is in use by process {os.getpid()} on this host' in errors[0]), result.stderr[-1500:]
  assert sorted(os.listdir(tmp_path / 'run')) == [lock.LOCK_NAME], 'nothing may be written'


def test_a_lock_of_a_dead_process_is_taken_over_and_released(tmp_path):
  gone = subprocess.Popen([sys.executable, '-c', 'pass'])
  gone.wait()
  _lock_file(tmp_path / 'run', gone.pid)
  with lock.workdir_lock(str(tmp_path / 'run')):
    assert json.loads((tmp_path / 'run' / lock.LOCK_NAME).read_text())['pid'] == os.getpid()
    with pytest.raises(lock.WorkdirLocked, match='in use by process'):
      with lock.workdir_lock(str(tmp_path / 'run')):
        pass
  assert os.listdir(tmp_path / 'run') == []
  # another host: its liveness is unknown, so refused
  _lock_file(tmp_path / 'other', 1, host='another-host')
  with pytest.raises(lock.WorkdirLocked, match='on host another-host'):
    with lock.workdir_lock(str(tmp_path / 'other')):
      pass


def test_a_workdir_the_lock_created_and_nothing_filled_is_removed(tmp_path):
  with lock.workdir_lock(str(tmp_path / 'new')):
    assert (tmp_path / 'new' / lock.LOCK_NAME).exists()
  assert not (tmp_path / 'new').exists()


def test_a_model_field_added_after_a_checkpoint_or_another_compute_dtype_keeps_it_usable():
  saved = {'stage': 'teacher', 'model': {'name': 'unet', 'ch': 24}}
  records.check_compatible(saved, {
      'stage': 'teacher',
      'model': {'name': 'unet', 'ch': 24, 'num_heads': 1, 'dtype': 'bfloat16'}}, 'teacher')
  with pytest.raises(checkpoint.CheckpointError, match="was made with model="):
    records.check_compatible(
        saved, {'stage': 'teacher', 'model': {'name': 'unet', 'ch': 32}}, 'teacher')
