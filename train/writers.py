"""Metric writers of every mode: TensorBoard (clu) plus a plain metrics.jsonl, written by process 0
only.

Both take remote log directories (gs://, ...): TensorBoard's through tf.io.gfile, metrics.jsonl
through epath.
"""

import json
import math
import os
import time
from typing import Any, Mapping, Optional

import jax
import numpy as np
from clu import metric_writers
from etils import epath
from flax import traverse_util

from train import files

JSONL_NAME = 'metrics.jsonl'


class JsonlWriter(metric_writers.MetricWriter):
  """Scalars, texts and hparams as one strict JSON object per line: {"step": 100, "time": ...,
  "loss": 0.12, ...}; a NaN or infinite value is written as null.

  Lines are appended (a resumed run adds to its file; after a kill a step may appear twice, the
  later line wins). A last line cut short by a killed process is removed before appending, so the
  file stays one JSON object per line. Images, videos, audio and histograms go to TensorBoard only:
  this writer leaves them out. An object store has no appends: on one, every flush uploads the whole
  file again.
  """

  def __init__(self, path: str):
    files.makedirs(epath.Path(path).parent)
    _drop_cut_last_line(path)
    self._file = epath.Path(path).open('a', encoding='utf-8')

  def _write(self, step: Optional[int], values: Mapping[str, Any]) -> None:
    line = {'step': None if step is None else int(step), 'time': round(time.time(), 3)}
    line.update({key: _plain(value) for key, value in values.items()})
    self._file.write(json.dumps(line, allow_nan=False) + '\n')

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    self._write(step, scalars)

  def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
    self._write(step, texts)

  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    self._write(None, {'hparams': dict(hparams)})

  def write_summaries(self, step, values, metadata=None) -> None:
    del step, values, metadata

  def write_images(self, step, images) -> None:
    del step, images

  def write_videos(self, step, videos) -> None:
    del step, videos

  def write_audios(self, step, audios, *, sample_rate) -> None:
    del step, audios, sample_rate

  def write_histograms(self, step, arrays, num_buckets=None) -> None:
    del step, arrays, num_buckets

  def flush(self) -> None:
    self._file.flush()

  def close(self) -> None:
    self._file.close()


def _drop_cut_last_line(path: str) -> None:
  """Cuts path after its last newline (atomically): removes a line a killed writer left without
  one."""
  if not files.exists(path):
    return
  content = files.read_bytes(path)
  if content and not content.endswith(b'\n'):
    files.write_bytes(path, content[:content.rfind(b'\n') + 1])


def _plain(value):
  """A strict-JSON form of a metric: numpy/jax scalars and arrays to Python numbers and lists, NaN
  and infinities to null (JSON has no such numbers), dicts and lists element by element, anything
  else unchanged."""
  if isinstance(value, (np.ndarray, np.generic, jax.Array)):
    array = np.asarray(value)
    value = array.item() if array.ndim == 0 else array.tolist()
  if isinstance(value, float):
    return value if math.isfinite(value) else None
  if isinstance(value, dict):
    return {key: _plain(item) for key, item in value.items()}
  if isinstance(value, (list, tuple)):
    return [_plain(item) for item in value]
  return value


def config_hparams(config: Mapping[str, Any]) -> dict:
  """A nested config dict as flat hparams {'train.lr': 0.0002, 'model.ch_mult': '[1, 2]', ...}:
  TensorBoard's HParams take numbers, strings and booleans; tuples, lists and None are written as
  text."""
  flat = traverse_util.flatten_dict(dict(config), sep='.')
  return {
      key: value if isinstance(value, (bool, int, float, str)) else str(value)
      for key, value in flat.items()
  }


def create_writer(logdir: str) -> metric_writers.MetricWriter:
  """TensorBoard event files and metrics.jsonl in logdir on process 0; a writer that writes nothing
  elsewhere."""
  if jax.process_index() > 0:
    return metric_writers.MultiWriter([])
  # a str, as clu's SummaryWriter (tf.summary, tf.io.gfile) takes it: 'gs://...' too
  logdir = os.fspath(logdir)
  tensorboard = metric_writers.create_default_writer(logdir, asynchronous=False)
  return metric_writers.MultiWriter([tensorboard, JsonlWriter(files.join(logdir, JSONL_NAME))])


def read_jsonl(path: str) -> list[dict]:
  """The lines of a metrics.jsonl; a line cut short by a killed process is skipped."""
  rows = []
  with epath.Path(path).open('r', encoding='utf-8') as f:
    for line in f:
      try:
        rows.append(json.loads(line))
      except json.JSONDecodeError:
        continue
  return rows
