"""InceptionV3 as used for FID/IS (pytorch-fid's FIDInception blocks) in Flax, with weight loading
and conversion.

Weights: the published FID network is pytorch-fid's `pt_inception-2015-12-05-6726825d.pth`
(https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth),
a port of TF's `2015-12-05` Inception graph used by the original FID code. It cannot be downloaded
here; on a machine with internet and torch:

  python -m eval.inception --convert pt_inception-2015-12-05-6726825d.pth inception_fid.npz

and pass --config.eval.inception_path=inception_fid.npz. The .npz keys are '/'-joined flax variable
paths. Torch name -> flax path (`convert_torch_state_dict`):
  X.conv.weight [O, I, H, W]   -> params/X/conv/kernel [H, W, I, O]
  X.bn.weight / X.bn.bias      -> params/X/bn/scale / params/X/bn/bias
  X.bn.running_mean / _var     -> batch_stats/X/bn/mean / batch_stats/X/bn/var
  fc.weight [1008, 2048]       -> params/fc/kernel [2048, 1008];  fc.bias -> params/fc/bias
where X is e.g. `Conv2d_1a_3x3` or `Mixed_6b.branch7x7_2` ('.' -> '/'); num_batches_tracked is
dropped.
"""

import argparse
import functools
import os
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

INPUT_SIZE = 299
POOL_DIM = 2048
NUM_LOGITS = 1008
WEIGHTS_FILE = 'pt_inception-2015-12-05-6726825d.pth'


class WeightsError(ValueError):
  """Inception weights are missing or do not fit the architecture; the message names the fix."""


class WeightsNotFoundError(WeightsError, FileNotFoundError):
  """The Inception weights file does not exist."""


def _padding(padding: tuple[int, int]):
  return tuple((p, p) for p in padding) if any(padding) else 'VALID'


class ConvBN(nn.Module):
  """Conv (no bias) -> BatchNorm(eps=1e-3, inference) -> ReLU: torch's BasicConv2d."""

  features: int
  kernel: tuple[int, int] = (1, 1)
  stride: int = 1
  padding: tuple[int, int] = (0, 0)

  @nn.compact
  def __call__(self, x):  # [B, H, W, C] -> [B, H', W', features]
    x = nn.Conv(self.features, self.kernel, strides=self.stride, padding=_padding(self.padding),
                use_bias=False, name='conv')(x)
    x = nn.BatchNorm(use_running_average=True, epsilon=1e-3, name='bn')(x)
    return nn.relu(x)


def _avg_pool_3x3(x):  # [B, H, W, C], zero padding excluded from the average (FID blocks)
  return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3_stride2(x):  # [B, H, W, C] -> [B, (H-3)//2+1, (W-3)//2+1, C]
  return nn.max_pool(x, (3, 3), strides=(2, 2), padding='VALID')


class InceptionA(nn.Module):
  """Mixed_5b/5c/5d (FIDInceptionA): 1x1, 5x5, double 3x3 and avg-pool branches."""

  pool_features: int

  @nn.compact
  def __call__(self, x):
    branch1x1 = ConvBN(64, name='branch1x1')(x)
    branch5x5 = ConvBN(48, name='branch5x5_1')(x)
    branch5x5 = ConvBN(64, (5, 5), padding=(2, 2), name='branch5x5_2')(branch5x5)
    branch3x3dbl = ConvBN(64, name='branch3x3dbl_1')(x)
    branch3x3dbl = ConvBN(96, (3, 3), padding=(1, 1), name='branch3x3dbl_2')(branch3x3dbl)
    branch3x3dbl = ConvBN(96, (3, 3), padding=(1, 1), name='branch3x3dbl_3')(branch3x3dbl)
    branch_pool = ConvBN(self.pool_features, name='branch_pool')(_avg_pool_3x3(x))
    return jnp.concatenate([branch1x1, branch5x5, branch3x3dbl, branch_pool], axis=-1)


class InceptionB(nn.Module):
  """Mixed_6a: stride-2 reduction 35x35 -> 17x17."""

  @nn.compact
  def __call__(self, x):
    branch3x3 = ConvBN(384, (3, 3), stride=2, name='branch3x3')(x)
    branch3x3dbl = ConvBN(64, name='branch3x3dbl_1')(x)
    branch3x3dbl = ConvBN(96, (3, 3), padding=(1, 1), name='branch3x3dbl_2')(branch3x3dbl)
    branch3x3dbl = ConvBN(96, (3, 3), stride=2, name='branch3x3dbl_3')(branch3x3dbl)
    return jnp.concatenate([branch3x3, branch3x3dbl, _max_pool_3x3_stride2(x)], axis=-1)


class InceptionC(nn.Module):
  """Mixed_6b..6e (FIDInceptionC): factorised 7x7 branches."""

  channels_7x7: int

  @nn.compact
  def __call__(self, x):
    c7 = self.channels_7x7
    branch1x1 = ConvBN(192, name='branch1x1')(x)
    branch7x7 = ConvBN(c7, name='branch7x7_1')(x)
    branch7x7 = ConvBN(c7, (1, 7), padding=(0, 3), name='branch7x7_2')(branch7x7)
    branch7x7 = ConvBN(192, (7, 1), padding=(3, 0), name='branch7x7_3')(branch7x7)
    branch7x7dbl = ConvBN(c7, name='branch7x7dbl_1')(x)
    branch7x7dbl = ConvBN(c7, (7, 1), padding=(3, 0), name='branch7x7dbl_2')(branch7x7dbl)
    branch7x7dbl = ConvBN(c7, (1, 7), padding=(0, 3), name='branch7x7dbl_3')(branch7x7dbl)
    branch7x7dbl = ConvBN(c7, (7, 1), padding=(3, 0), name='branch7x7dbl_4')(branch7x7dbl)
    branch7x7dbl = ConvBN(192, (1, 7), padding=(0, 3), name='branch7x7dbl_5')(branch7x7dbl)
    branch_pool = ConvBN(192, name='branch_pool')(_avg_pool_3x3(x))
    return jnp.concatenate([branch1x1, branch7x7, branch7x7dbl, branch_pool], axis=-1)


class InceptionD(nn.Module):
  """Mixed_7a: stride-2 reduction 17x17 -> 8x8."""

  @nn.compact
  def __call__(self, x):
    branch3x3 = ConvBN(192, name='branch3x3_1')(x)
    branch3x3 = ConvBN(320, (3, 3), stride=2, name='branch3x3_2')(branch3x3)
    branch7x7x3 = ConvBN(192, name='branch7x7x3_1')(x)
    branch7x7x3 = ConvBN(192, (1, 7), padding=(0, 3), name='branch7x7x3_2')(branch7x7x3)
    branch7x7x3 = ConvBN(192, (7, 1), padding=(3, 0), name='branch7x7x3_3')(branch7x7x3)
    branch7x7x3 = ConvBN(192, (3, 3), stride=2, name='branch7x7x3_4')(branch7x7x3)
    return jnp.concatenate([branch3x3, branch7x7x3, _max_pool_3x3_stride2(x)], axis=-1)


class InceptionE(nn.Module):
  """Mixed_7b (avg pool, FIDInceptionE_1) and Mixed_7c (max pool, FIDInceptionE_2 as in the TF
  graph)."""

  max_pool: bool

  @nn.compact
  def __call__(self, x):
    branch1x1 = ConvBN(320, name='branch1x1')(x)
    branch3x3 = ConvBN(384, name='branch3x3_1')(x)
    branch3x3 = jnp.concatenate([
        ConvBN(384, (1, 3), padding=(0, 1), name='branch3x3_2a')(branch3x3),
        ConvBN(384, (3, 1), padding=(1, 0), name='branch3x3_2b')(branch3x3)], axis=-1)
    branch3x3dbl = ConvBN(448, name='branch3x3dbl_1')(x)
    branch3x3dbl = ConvBN(384, (3, 3), padding=(1, 1), name='branch3x3dbl_2')(branch3x3dbl)
    branch3x3dbl = jnp.concatenate([
        ConvBN(384, (1, 3), padding=(0, 1), name='branch3x3dbl_3a')(branch3x3dbl),
        ConvBN(384, (3, 1), padding=(1, 0), name='branch3x3dbl_3b')(branch3x3dbl)], axis=-1)
    if self.max_pool:
      pooled = nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))
    else:
      pooled = _avg_pool_3x3(x)
    branch_pool = ConvBN(192, name='branch_pool')(pooled)
    return jnp.concatenate([branch1x1, branch3x3, branch3x3dbl, branch_pool], axis=-1)


class InceptionV3FID(nn.Module):
  """images [B, H, W, 3] in [-1, 1] -> {'pool': [B, 2048], 'logits': [B, 1008]}.

  Inputs are resized to 299x299 with bilinear interpolation without antialiasing, like
  pytorch-fid's F.interpolate(align_corners=False).
  """

  @nn.compact
  def __call__(self, images):
    x = jnp.asarray(images, jnp.float32)
    x = jax.image.resize(x, (x.shape[0], INPUT_SIZE, INPUT_SIZE, x.shape[3]),
                         method='bilinear', antialias=False)  # [B, 299, 299, 3]
    x = ConvBN(32, (3, 3), stride=2, name='Conv2d_1a_3x3')(x)  # [B, 149, 149, 32]
    x = ConvBN(32, (3, 3), name='Conv2d_2a_3x3')(x)  # [B, 147, 147, 32]
    x = ConvBN(64, (3, 3), padding=(1, 1), name='Conv2d_2b_3x3')(x)  # [B, 147, 147, 64]
    x = _max_pool_3x3_stride2(x)  # [B, 73, 73, 64]
    x = ConvBN(80, name='Conv2d_3b_1x1')(x)  # [B, 73, 73, 80]
    x = ConvBN(192, (3, 3), name='Conv2d_4a_3x3')(x)  # [B, 71, 71, 192]
    x = _max_pool_3x3_stride2(x)  # [B, 35, 35, 192]
    x = InceptionA(32, name='Mixed_5b')(x)  # [B, 35, 35, 256]
    x = InceptionA(64, name='Mixed_5c')(x)  # [B, 35, 35, 288]
    x = InceptionA(64, name='Mixed_5d')(x)  # [B, 35, 35, 288]
    x = InceptionB(name='Mixed_6a')(x)  # [B, 17, 17, 768]
    for name, channels in (('Mixed_6b', 128), ('Mixed_6c', 160), ('Mixed_6d', 160),
                           ('Mixed_6e', 192)):
      x = InceptionC(channels, name=name)(x)  # [B, 17, 17, 768]
    x = InceptionD(name='Mixed_7a')(x)  # [B, 8, 8, 1280]
    x = InceptionE(max_pool=False, name='Mixed_7b')(x)  # [B, 8, 8, 2048]
    x = InceptionE(max_pool=True, name='Mixed_7c')(x)  # [B, 8, 8, 2048]
    pool = jnp.mean(x, axis=(1, 2))  # [B, 2048]
    logits = nn.Dense(NUM_LOGITS, name='fc')(pool)  # [B, 1008]
    return {'pool': pool, 'logits': logits}


@functools.lru_cache(maxsize=None)
def expected_shapes() -> dict[str, tuple[int, ...]]:
  """'/'-joined flax variable path -> shape, for every variable of InceptionV3FID."""
  abstract = jax.eval_shape(InceptionV3FID().init, jax.random.key(0),
                            jax.ShapeDtypeStruct((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.float32))
  return {
      key: tuple(leaf.shape) for key, leaf in traverse_util.flatten_dict(abstract, sep='/').items()
  }


def _not_found_message(path: str) -> str:
  return (
      f'Inception weights not found at {path}: download {WEIGHTS_FILE} on a machine with internet, '
      'convert it with `python -m eval.inception --convert SRC.pth DST.npz` and set '
      '--config.eval.inception_path=DST.npz')


def check_weights(flat: dict[str, np.ndarray], source: str) -> None:
  """Raises WeightsError naming the first missing, unexpected or mis-shaped variable."""
  expected = expected_shapes()
  for key, shape in expected.items():
    if key not in flat:
      raise WeightsError(
          f'Inception weights {source} lack {key} {shape}: convert {WEIGHTS_FILE} again')
    if tuple(flat[key].shape) != shape:
      raise WeightsError(f'Inception weights {source}: {key} has shape {tuple(flat[key].shape)}, '
                         f'expected {shape}: convert {WEIGHTS_FILE} again')
  unexpected = sorted(set(flat) - set(expected))
  if unexpected:
    raise WeightsError(f'Inception weights {source} hold unexpected variable {unexpected[0]}: '
                       f'convert {WEIGHTS_FILE} again')


def load_inception_params(path: str) -> dict:
  """Reads an .npz of '/'-joined flax paths -> {'params': ..., 'batch_stats': ...} for
  InceptionV3FID."""
  if not os.path.isfile(path):
    raise WeightsNotFoundError(_not_found_message(path))
  with np.load(path) as archive:
    flat = {key: np.asarray(archive[key], np.float32) for key in archive.files}
  check_weights(flat, path)
  return traverse_util.unflatten_dict({
      tuple(key.split('/')): jnp.asarray(v) for key, v in flat.items()
  })


def _torch_to_flax_key(name: str) -> tuple[str, bool]:
  """torch state_dict name -> ('/'-joined flax path, whether the array is transposed)."""
  *module, leaf = name.split('.')
  prefix = '/'.join(module)
  if module[-1] == 'bn':
    collection, flax_leaf = {'weight': ('params', 'scale'), 'bias': ('params', 'bias'),
                             'running_mean': ('batch_stats', 'mean'),
                             'running_var': ('batch_stats', 'var')}[leaf]
    return f'{collection}/{prefix}/{flax_leaf}', False
  if leaf == 'weight':
    return f'params/{prefix}/kernel', True
  return f'params/{prefix}/bias', False


def convert_torch_state_dict(state_dict: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """pytorch-fid FIDInceptionA/C/E state_dict (numpy arrays) -> {'/'-joined flax path: array}.

  Conv kernels go OIHW -> HWIO, the dense kernel [out, in] -> [in, out]; num_batches_tracked is
  dropped.
  """
  flat = {}
  for name, value in state_dict.items():
    if name.endswith('num_batches_tracked'):
      continue
    key, transposed = _torch_to_flax_key(name)
    value = np.asarray(value, np.float32)
    if transposed:
      value = value.transpose(2, 3, 1, 0) if value.ndim == 4 else value.T
    flat[key] = value
  return flat


def _convert_file(src: str, dst: str) -> None:
  """Converts a torch .pth state_dict into the .npz that load_inception_params reads."""
  import torch  # pylint: disable=g-import-not-at-top  # Only this command needs torch.
  state_dict = torch.load(src, map_location='cpu')
  flat = convert_torch_state_dict({name: tensor.numpy() for name, tensor in state_dict.items()})
  check_weights(flat, src)
  np.savez(dst, **flat)
  print(f'wrote {len(flat)} arrays to {dst}')


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description='Convert pytorch-fid Inception weights to .npz.')
  parser.add_argument('--convert', nargs=2, metavar=('SRC.pth', 'DST.npz'), required=True)
  src, dst = parser.parse_args(argv).convert
  _convert_file(src, dst)


if __name__ == '__main__':
  main()
