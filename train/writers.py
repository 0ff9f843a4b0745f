"""Metric writers of every mode: TensorBoard (clu) plus a plain metrics.jsonl, written by process 0 only."""

import json
import os
import time
from typing import Any, Mapping, Optional

import jax
import numpy as np
from clu import metric_writers

JSONL_NAME = 'metrics.jsonl'


class JsonlWriter(metric_writers.MetricWriter):
  """Scalars, texts and hparams as one JSON object per line: {"step": 100, "time": ..., "loss": 0.12, ...}.

  Lines are appended (a resumed run adds to its file; after a kill a step may appear twice, the later line
  wins). A last line cut short by a killed process is removed before appending, so the file stays one JSON
  object per line. Images, videos, audio and histograms go to TensorBoard only: this writer leaves them out.
  """

  def __init__(self, path: str):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    _drop_cut_last_line(path)
    self._file = open(path, 'a', encoding='utf-8')  # pylint: disable=consider-using-with

  def _write(self, step: Optional[int], values: Mapping[str, Any]) -> None:
    line = {'step': None if step is None else int(step), 'time': round(time.time(), 3)}
    line.update({key: _plain(value) for key, value in values.items()})
    self._file.write(json.dumps(line) + '\n')

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
  """Truncates path after its last newline: removes a line a killed writer left without one."""
  if not os.path.exists(path):
    return
  with open(path, 'rb+') as f:
    content = f.read()
    if content and not content.endswith(b'\n'):
      f.truncate(content.rfind(b'\n') + 1)


def _plain(value):
  """A JSON-safe form of a metric: numpy/jax scalars to Python numbers, anything else unchanged."""
  if isinstance(value, (np.ndarray, np.generic, jax.Array)):
    array = np.asarray(value)
    return array.item() if array.ndim == 0 else array.tolist()
  return value


def create_writer(logdir: str) -> metric_writers.MetricWriter:
  """TensorBoard event files and metrics.jsonl in logdir on process 0; a writer that writes nothing elsewhere."""
  if jax.process_index() > 0:
    return metric_writers.MultiWriter([])
  tensorboard = metric_writers.create_default_writer(logdir, asynchronous=False)
  return metric_writers.MultiWriter([tensorboard, JsonlWriter(os.path.join(logdir, JSONL_NAME))])


def read_jsonl(path: str) -> list[dict]:
  """The lines of a metrics.jsonl; a line cut short by a killed process is skipped."""
  rows = []
  with open(path, encoding='utf-8') as f:
    for line in f:
      try:
        rows.append(json.loads(line))
      except json.JSONDecodeError:
        continue
  return rows
