"""Metric writers of every mode: TensorBoard event files plus a plain metrics.jsonl, written by
process 0 only.

Both have the methods of clu's MetricWriter interface that the modes call (write_scalars,
write_images, write_texts, write_hparams, flush, close) and both go through epath, so they take
remote log directories (gs://, ...). They do not subclass clu's interface: importing anything of
clu.metric_writers imports TensorFlow (its SummaryWriter is tf.summary), several seconds at the
start of every command. The event files are written with the tensorboard package's own protos and
record format instead, as the same TF2 tensor summaries tf.summary writes.
"""

import io
import itertools
import json
import math
import os
import socket
import time
from typing import Any, Mapping, Optional

import jax
import numpy as np
from etils import epath
from flax import traverse_util
from PIL import Image
from tensorboard.compat.proto import event_pb2, summary_pb2, tensor_pb2, tensor_shape_pb2
from tensorboard.plugins.hparams import summary_v2 as hparams_summary
from tensorboard.summary.writer.record_writer import RecordWriter

from train import files

JSONL_NAME = 'metrics.jsonl'


class JsonlWriter:
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

  def write_images(self, step, images) -> None:
    del step, images

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


class TensorBoardWriter:
  """Scalars, uint8 (or [0, 1] float) images [N, H, W, C], texts and hparams as TensorBoard event
  records in one events.out.tfevents.* file of logdir, as tf.summary writes them (tensors tagged
  with the scalars, images, text and hparams plugins). Records are buffered until flush() or
  close(); a killed process loses the unflushed ones, as with tf.summary."""

  _count = itertools.count()

  def __init__(self, logdir: str):
    files.makedirs(logdir)
    name = (f'events.out.tfevents.{time.time():.0f}.{socket.gethostname()}.{os.getpid()}.'
            f'{next(self._count)}.v2')
    self._records = RecordWriter(epath.Path(logdir, name).open('wb'))
    self._write(summary_pb2.Summary(), step=0, file_version='brain.Event:2')

  def _write(self, summary, *, step: int, **event) -> None:
    event = event_pb2.Event(wall_time=time.time(), step=int(step), **event)
    if summary.value:
      event.summary.CopyFrom(summary)
    self._records.write(event.SerializeToString())

  def _tensors(self, step: int, plugin: str, tensors: Mapping[str, Any]) -> None:
    summary = summary_pb2.Summary()
    for tag, tensor in tensors.items():
      summary.value.add(tag=tag, tensor=tensor).metadata.plugin_data.plugin_name = plugin
    self._write(summary, step=step)

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    self._tensors(step, 'scalars', {tag: _tensor(np.float32(value), 'DT_FLOAT', 'float_val')
                                    for tag, value in scalars.items()})

  def write_images(self, step: int, images: Mapping[str, Any]) -> None:
    """Each value [N, H, W, C] (or [H, W, C]), C in 1, 3, 4."""
    tensors = {}
    for tag, value in images.items():
      value = np.asarray(value)
      value = value[None] if value.ndim == 3 else value
      if value.dtype != np.uint8:  # as tf.image.convert_image_dtype(saturate=True)
        value = (np.clip(value, 0, 1) * 255 + 0.5).astype(np.uint8)
      height, width = value.shape[1:3]
      tensors[tag] = _tensor([str(width).encode(), str(height).encode(),
                              *(_png(image) for image in value)], 'DT_STRING', 'string_val')
    self._tensors(step, 'images', tensors)

  def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
    self._tensors(step, 'text', {tag: _tensor(text.encode(), 'DT_STRING', 'string_val')
                                 for tag, text in texts.items()})

  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    self._write(hparams_summary.hparams_pb(dict(hparams)), step=0)

  def flush(self) -> None:
    self._records.flush()

  def close(self) -> None:
    self._records.close()


def _tensor(value, dtype: str, field: str) -> tensor_pb2.TensorProto:
  """A TensorProto of one value (shape []) or of a list of them (shape [len])."""
  values = value if isinstance(value, list) else [value]
  shape = tensor_shape_pb2.TensorShapeProto(
      dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=len(values))] if isinstance(value, list)
      else [])
  return tensor_pb2.TensorProto(dtype=dtype, tensor_shape=shape, **{field: values})


def _png(image) -> bytes:
  """uint8 [H, W, C] -> PNG bytes."""
  buffer = io.BytesIO()
  Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buffer, format='PNG')
  return buffer.getvalue()


class MetricWriters:
  """Writes to each of writers (as clu's MultiWriter, without its import of TensorFlow)."""

  def __init__(self, writers):
    self.writers = list(writers)

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    for writer in self.writers:
      writer.write_scalars(step, scalars)

  def write_images(self, step: int, images: Mapping[str, Any]) -> None:
    for writer in self.writers:
      writer.write_images(step, images)

  def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
    for writer in self.writers:
      writer.write_texts(step, texts)

  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    for writer in self.writers:
      writer.write_hparams(hparams)

  def flush(self) -> None:
    for writer in self.writers:
      writer.flush()

  def close(self) -> None:
    for writer in self.writers:
      writer.close()


def create_writer(logdir: str) -> MetricWriters:
  """TensorBoard event files and metrics.jsonl in logdir on process 0; a writer that writes nothing
  elsewhere."""
  if jax.process_index() > 0:
    return MetricWriters([])
  return MetricWriters([TensorBoardWriter(logdir), JsonlWriter(files.join(logdir, JSONL_NAME))])


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
