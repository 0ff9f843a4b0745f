"""Result files written atomically: a killed process leaves the old file or the new one, never half of one."""

import csv
import io
import json
import os
from typing import Callable


def atomic_write(path: str, write: Callable[[str], None]) -> None:
  """Calls write(tmp_path), then renames tmp_path over path (os.replace is atomic on one filesystem)."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  root, ext = os.path.splitext(path)
  tmp_path = f'{root}.tmp{os.getpid()}{ext}'  # same extension: np.savez and PIL pick the format from it
  try:
    write(tmp_path)
    os.replace(tmp_path, path)
  finally:
    if os.path.exists(tmp_path):
      os.remove(tmp_path)


def write_text(path: str, text: str) -> None:
  def write(tmp_path):
    with open(tmp_path, 'w', encoding='utf-8') as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
  atomic_write(path, write)


def write_json(path: str, value) -> None:
  write_text(path, json.dumps(value, indent=2) + '\n')


def write_csv(path: str, rows: list[dict], fieldnames) -> None:
  buffer = io.StringIO()
  writer = csv.DictWriter(buffer, fieldnames=fieldnames, lineterminator='\n')
  writer.writeheader()
  writer.writerows(rows)
  write_text(path, buffer.getvalue())
