"""One run per workdir: a lock file naming the host, process and start time of the run that holds
it."""

import contextlib
import json
import os
import socket
import tempfile
import time

import jax
from absl import logging
from etils import epath

from train import files

LOCK_NAME = 'run.lock'


class WorkdirLocked(RuntimeError):
  """Another live process runs in this workdir; the message names it and the fix."""


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True  # exists, owned by another user
  return True


def _read(path: str) -> dict:
  try:
    return files.read_json(path)
  except (OSError, ValueError):
    return {}  # unreadable: a holder killed while writing it


def _create(path: str, me: dict) -> bool:
  """Writes me to path unless path exists; False when it does.

  Local: me is written to a temporary file first, then hard-linked to path, which fails if path
  exists: of two runs starting at once exactly one creates it, and the lock appears with its content
  (never empty, as an exclusive create then a write would leave it for a moment). Elsewhere (an
  object store has no exclusive create through epath): checked, then written, so two runs started
  within the same moment can both pass; one started while another runs is refused as on a local
  disk.
  """
  if not files.is_local(path):
    if files.exists(path):
      return False
    files.write_json(path, me)
    return True
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=f'.{LOCK_NAME}.')
  try:
    with os.fdopen(fd, 'w', encoding='utf-8') as f:
      json.dump(me, f)
    os.link(tmp, path)
  except FileExistsError:
    return False
  finally:
    os.remove(tmp)
  return True


def _take_or_refuse(path: str, me: dict) -> None:
  """Creates the lock; takes over one left by a dead process on this host; refuses a live
  holder's."""
  if _create(path, me):
    return
  holder = _read(path)
  same_host = holder.get('host') == me['host']
  if holder and not (same_host and not _alive(int(holder.get('pid', -1)))):
    where = 'this host' if same_host else f'host {holder.get("host")}'
    raise WorkdirLocked(
        f'{epath.Path(path).parent} is in use by process {holder.get("pid")} on {where} since '
        f'{holder.get("started")}: wait for it, use another --config.workdir, or delete {path} if '
        'that run is gone')
  logging.warning('taking over %s from a process that is gone: %s', path,
                  holder or 'unreadable lock')
  files.write_json(path, me)


@contextlib.contextmanager
def workdir_lock(workdir: str):
  """Holds WORKDIR/run.lock while the body runs (process 0; the other processes of a run share it).

  A second run in the same workdir stops with WorkdirLocked before writing anything. A lock left by
  a killed process on this host is detected (its pid is gone) and taken over with a warning. A
  workdir this call created and that stays empty is removed again.

  A remote workdir (gs://, s3://, ...) gets the same lock file through epath, but without an
  exclusive create: a run started while another holds the lock is refused, two started at the same
  moment may both run (see _create).
  """
  if jax.process_index() != 0:
    yield
    return
  created = not files.is_dir(workdir)
  files.makedirs(workdir)
  path = files.join(workdir, LOCK_NAME)
  me = dict(host=socket.gethostname(), pid=os.getpid(),
            started=time.strftime('%Y-%m-%d %H:%M:%S %Z'))
  _take_or_refuse(path, me)
  try:
    yield
  finally:
    if _read(path) == me:
      epath.Path(path).unlink()
    if created and not files.listdir(workdir):
      epath.Path(workdir).rmdir()
