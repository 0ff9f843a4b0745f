"""Every path under a run's workdir, local or remote (gs://, s3://, ...), through etils.epath as
Orbax's own.

Result files are written atomically: a killed process leaves the old file or the new one, never half
of one. On a local disk that is a temporary file in the same directory renamed over the target
(os.replace is atomic on one filesystem); on an object store (a path with a URL scheme) the object
is written in one go, which is atomic there (an object appears whole or not at all) and which is all
it offers: it has no rename.

Paths stay strings in the rest of the code (dictionary keys, records, messages); these helpers take
str or os.PathLike and turn them into epath.Path where they touch storage.
"""

import csv
import io
import json
import os
import re
import shutil
import zipfile
from typing import Callable, Optional, TypeVar, Union

import numpy as np
from absl import logging
from etils import epath

PathLike = Union[str, os.PathLike]
T = TypeVar('T')
# What reading a damaged cache file raises: cut or garbled JSON, CSV or .npz (ValueError covers
# JSONDecodeError and UnicodeDecodeError), content of another shape (KeyError, TypeError, ...), or a
# file that cannot be opened.
CACHE_READ_ERRORS = (OSError, ValueError, KeyError, TypeError, AttributeError, IndexError, EOFError,
                     zipfile.BadZipFile, csv.Error)

_URL = re.compile(r'^[A-Za-z][A-Za-z0-9+.-]*://')


def is_local(path: PathLike) -> bool:
  """Whether path is on the local filesystem: it has no URL scheme such as gs:// or s3://."""
  return _URL.match(os.fspath(path)) is None


def join(path: PathLike, *parts: str) -> str:
  """path/part/...; a URL keeps its scheme ('gs://b/run' + 'logs' -> 'gs://b/run/logs')."""
  return os.fspath(epath.Path(path).joinpath(*parts))


def relative(path: PathLike, start: PathLike) -> str:
  """path relative to start, a directory above it: ('gs://b/run/stage2/steps_0004', 'gs://b/run') ->
  'stage2/...'."""
  return os.fspath(epath.Path(path).relative_to(epath.Path(start)))


def absolute(path: PathLike) -> str:
  """A local path made absolute (what Orbax's TensorStore needs); a URL is returned unchanged."""
  path = os.fspath(path)
  return os.path.abspath(path) if is_local(path) else path


def exists(path: PathLike) -> bool:
  return epath.Path(path).exists()


def is_dir(path: PathLike) -> bool:
  return epath.Path(path).is_dir()


def listdir(path: PathLike) -> list[str]:
  """The names in a directory, sorted."""
  return sorted(child.name for child in epath.Path(path).iterdir())


def makedirs(path: PathLike) -> None:
  """Creates a directory and its parents; an existing one is fine (a no-op where directories are
  implicit)."""
  epath.Path(path).mkdir(parents=True, exist_ok=True)


def read_text(path: PathLike) -> str:
  return epath.Path(path).read_text(encoding='utf-8')


def read_bytes(path: PathLike) -> bytes:
  return epath.Path(path).read_bytes()


def read_json(path: PathLike):
  return json.loads(read_text(path))


def read_npz(path: PathLike) -> dict[str, np.ndarray]:
  """The arrays of an .npz written by write_npz (or np.savez), read whole."""
  with np.load(io.BytesIO(read_bytes(path))) as archive:
    return {key: archive[key] for key in archive.files}


def read_cache(path: PathLike, read: Callable[[str], T]) -> Optional[T]:
  """read(path) of a result cache; None when there is none or it cannot be read (CACHE_READ_ERRORS),
  then with one warning: the caller computes it again and writes it over the damaged file.

  read should also check what it read has the shape the caller needs (raise KeyError, TypeError, ...
  if not).
  """
  path = os.fspath(path)
  if not exists(path):
    return None
  try:
    return read(path)
  except CACHE_READ_ERRORS as err:
    text = str(err).strip().splitlines()
    logging.warning('cache %s is unreadable (%s): computing it again', path,
                    text[0][:200] if text else type(err).__name__)
    return None


def write_bytes(path: PathLike, data: bytes) -> None:
  """Writes data to path atomically, creating its directory.

  Local disk: PATH_ROOT.tmpPID.EXT is written, flushed to disk and renamed over path (removed if
  anything fails). Elsewhere: one write of the whole object, which object stores commit atomically.
  """
  path = os.fspath(path)
  makedirs(epath.Path(path).parent)
  if not is_local(path):
    epath.Path(path).write_bytes(data)
    return
  root, ext = os.path.splitext(path)
  tmp_path = f'{root}.tmp{os.getpid()}{ext}'  # beside path: the rename stays on one filesystem
  try:
    with open(tmp_path, 'wb') as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp_path, path)
  finally:
    if os.path.exists(tmp_path):
      os.remove(tmp_path)


def write_text(path: PathLike, text: str) -> None:
  write_bytes(path, text.encode('utf-8'))


def write_json(path: PathLike, value) -> None:
  write_text(path, json.dumps(value, indent=2) + '\n')


def write_csv(path: PathLike, rows: list[dict], fieldnames) -> None:
  buffer = io.StringIO()
  writer = csv.DictWriter(buffer, fieldnames=fieldnames, lineterminator='\n')
  writer.writeheader()
  writer.writerows(rows)
  write_text(path, buffer.getvalue())


def write_npz(path: PathLike, **arrays) -> None:
  """np.savez(path, **arrays), atomically."""
  buffer = io.BytesIO()
  np.savez(buffer, **arrays)
  write_bytes(path, buffer.getvalue())


def copy_tree(src: PathLike, dst: PathLike) -> None:
  """Copies the directory src to dst, which must not exist yet.

  Local disk: into a temporary sibling renamed to dst at the end, so a killed copy leaves no partial
  dst. Elsewhere: file by file (an object store has no directory rename).
  """
  if is_local(dst):
    dst = os.fspath(dst)
    tmp = f'{dst}.copy{os.getpid()}'
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(os.fspath(src), tmp)
    os.rename(tmp, dst)
    return
  src, dst = epath.Path(src), epath.Path(dst)
  for path in src.rglob('*'):
    if path.is_file():
      target = dst / path.relative_to(src)
      target.parent.mkdir(parents=True, exist_ok=True)
      path.copy(target)
