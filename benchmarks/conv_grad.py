"""One 3x3 convolution's forward and weight gradient on this CPU: XLA's kernels, three rewrites as
matrix products, and PyTorch's oneDNN when installed.

  python benchmarks/conv_grad.py [--shape=32,32,128,64 --repeats=5]

--shape is batch, height (= width), input and output channels; the default is one device's share
of the CIFAR-10-shaped size's largest weight gradient (benchmarks/sizes.py 'cifar': the 64-channel
level with 128-channel skip inputs, batch 64 over 2 devices), the operation that
benchmarks/cpu_profile.py finds largest. Rows, each a median of --repeats after a warm-up, GFLOP/s
of 2 * B * H * W * Cin * Cout * 9:

- xla forward / xla weight grad: `lax.conv_general_dilated` (NHWC, HWIO) and its vjp in the kernel;
- nine shifted dots: the weight gradient as 9 products of shifted inputs with the output's gradient;
- channel-major im2col: the inputs transposed to [Cin, B, H, W], the 9 shifts stacked into
  [9 Cin, B H W] and one product with the gradient as [B H W, Cout] (a plain row-major GEMM);
- flat shifted taps: the padded inputs flattened to rows [B (H+2) (W+2), Cin], the gradient padded
  alike with zeros; each of the 9 taps is then a contiguous slice of the rows (offset dy (W+2) + dx;
  a row past an image's edge meets a zero gradient), and its product with the gradient contracts
  the rows of both: no im2col copy, and no strided slice;
- gemm: that product alone on ready-made operands (what XLA's matrix product reaches here);
- torch forward / weight grad (NCHW and channels_last), when torch is installed
  (benchmarks/requirements-peer.txt), on one thread per core.
The rewrites are checked against XLA's weight gradient (largest relative difference printed).
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position
from absl import app, flags  # pylint: disable=wrong-import-position

from train.mesh import configure_cpu_compiler  # pylint: disable=wrong-import-position

_SHAPE = flags.DEFINE_list('shape', ['32', '32', '128', '64'], 'batch, height, Cin, Cout.')
_REPEATS = flags.DEFINE_integer('repeats', 5, 'Timed calls per row (median).')
_DIMS = ('NHWC', 'HWIO', 'NHWC')


def _conv(x, kernel):
  return jax.lax.conv_general_dilated(x, kernel, (1, 1), 'SAME', dimension_numbers=_DIMS)


def xla_weight_grad(x, kernel, grad):
  return jax.vjp(lambda k: _conv(x, k), kernel)[1](grad)[0]  # [3, 3, Cin, Cout]


def shifted_dots(x, kernel, grad):
  del kernel
  h, w = x.shape[1:3]
  padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  taps = [jnp.einsum('bhwi,bhwo->io', padded[:, dy:dy + h, dx:dx + w], grad)
          for dy in range(3) for dx in range(3)]
  return jnp.stack(taps).reshape(3, 3, x.shape[-1], grad.shape[-1])


def channel_major_im2col(x, kernel, grad):
  del kernel
  h, w, cin, cout = *x.shape[1:3], x.shape[-1], grad.shape[-1]
  padded = jnp.pad(jnp.transpose(x, (3, 0, 1, 2)), ((0, 0), (0, 0), (1, 1), (1, 1)))
  patches = jnp.stack([padded[:, :, dy:dy + h, dx:dx + w] for dy in range(3) for dx in range(3)])
  return jnp.dot(patches.reshape(9 * cin, -1), grad.reshape(-1, cout)).reshape(3, 3, cin, cout)


def flat_shifted_taps(x, kernel, grad):
  del kernel
  batch, h, w, cin = x.shape
  rows = batch * (h + 2) * (w + 2)
  padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0))).reshape(rows, cin)
  padded = jnp.pad(padded, ((0, 2 * (w + 2) + 2), (0, 0)))  # the last taps' slices stay inside
  grad_rows = jnp.pad(grad, ((0, 0), (0, 2), (0, 2), (0, 0))).reshape(rows, -1)  # [rows, Cout]
  taps = [jax.lax.dot_general(grad_rows, padded[dy * (w + 2) + dx:][:rows],
                              (((0,), (0,)), ((), ())))  # [Cout, Cin]
          for dy in range(3) for dx in range(3)]
  return jnp.stack(taps).transpose(0, 2, 1).reshape(3, 3, cin, grad.shape[-1])


def _median_ms(fn) -> float:
  fn()  # warm-up (compiles)
  times = []
  for _ in range(_REPEATS.value):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return 1e3 * float(np.median(times))


def _row(name: str, ms: float, flops: float, note: str = '') -> None:
  print(f'| {name} | {ms:.1f} | {flops / ms / 1e6:.1f} | {note} |', flush=True)


def _torch_rows(x, grad, kernel_shape, flops):
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    print('(torch not installed: python -m pip install -r benchmarks/requirements-peer.txt)')
    return
  torch.set_num_threads(os.cpu_count() or 1)
  x_t = torch.from_numpy(np.array(x)).permute(0, 3, 1, 2).contiguous()  # [B, Cin, H, W]
  grad_t = torch.from_numpy(np.array(grad)).permute(0, 3, 1, 2).contiguous()
  kernel_t = torch.zeros(kernel_shape[3], kernel_shape[2], 3, 3)  # [Cout, Cin, 3, 3]
  for form, memory_format in (('NCHW', torch.contiguous_format),
                              ('channels_last', torch.channels_last)):
    xf, gf = x_t.to(memory_format=memory_format), grad_t.to(memory_format=memory_format)
    _row(f'torch forward, {form}',
         _median_ms(lambda: torch.nn.functional.conv2d(xf, kernel_t, padding=1)), flops)
    _row(f'torch weight grad, {form}',
         _median_ms(lambda: torch.nn.grad.conv2d_weight(xf, kernel_t.shape, gf, padding=1)), flops)


def main(_):
  configure_cpu_compiler()  # as main.py: before a backend starts
  batch, height, cin, cout = map(int, _SHAPE.value)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((batch, height, height, cin)), jnp.float32)  # [B, H, W, Cin]
  grad = jnp.asarray(rng.standard_normal((batch, height, height, cout)), jnp.float32)
  kernel = jnp.asarray(rng.standard_normal((3, 3, cin, cout)), jnp.float32)
  flops = 2.0 * batch * height * height * cin * cout * 9
  print(f'x {x.shape}, kernel {kernel.shape}, {flops / 1e9:.2f} GFLOP a call; '
        f'{jax.device_count()} XLA device, {os.cpu_count()} cores')
  print('| row | ms | GFLOP/s | largest relative difference to xla weight grad |')
  print('|---|---|---|---|')
  forward = jax.jit(_conv)
  _row('xla forward', _median_ms(lambda: forward(x, kernel).block_until_ready()), flops)
  reference = jax.jit(xla_weight_grad)(x, kernel, grad)
  scale = float(jnp.max(jnp.abs(reference)))
  for name, fn in (('xla weight grad', xla_weight_grad), ('nine shifted dots', shifted_dots),
                   ('channel-major im2col', channel_major_im2col),
                   ('flat shifted taps', flat_shifted_taps)):
    jitted = jax.jit(fn)
    difference = float(jnp.max(jnp.abs(jitted(x, kernel, grad) - reference))) / scale
    _row(name, _median_ms(lambda f=jitted: f(x, kernel, grad).block_until_ready()), flops,
         f'{difference:.1e}')
  patches = jnp.asarray(rng.standard_normal((9 * cin, batch * height * height)), jnp.float32)
  gemm = jax.jit(lambda a, b: jnp.dot(a, b.reshape(-1, cout)))
  _row('gemm [9 Cin, B H W] x [B H W, Cout]',
       _median_ms(lambda: gemm(patches, grad).block_until_ready()), flops)
  _torch_rows(x, grad, kernel.shape, flops)


if __name__ == '__main__':
  app.run(main)
