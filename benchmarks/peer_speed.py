"""This repo's teacher vs a diffusers UNet2DModel peer of about the same size: train steps/s,
guided-DDIM images/s.

  python -m pip install -r benchmarks/requirements-peer.txt
      # optional extras: torch (CPU) + diffusers
  python benchmarks/peer_speed.py --config=configs/digits_teacher.py [--steps=20 --sample_steps=64 \
      --repeats=1]

Defaults: about 5 minutes on 2 busy CPU cores (fewer when idle), most of it the peer's 64-step
sampling; each extra --repeats adds one timed sampling call per side, ~2.5 min busy (--repeats=3 for
a median).

Same work on both sides, one after the other in this process on the same device (ours first):
- train step: noisy input at random t, label dropout p_uncond, forward + v-prediction loss +
  backward, grad-norm clip, AdamW, EMA update; at config.train.batch_size;
- guided DDIM, --sample_steps steps: each step is ONE network call on [label; null] (2x the batch),
  then (1 + w) cond - w uncond; --sample_batch images per call.
The peer mirrors the config's U-Net (ch_mult levels, attention at attn_resolutions, num_groups,
single-head attention, dropout); its base width and layers_per_block are searched so that its
parameter count is closest to ours. Timing: warm-up first (ours: compile, then one step; peer: a
train step or two, one DDIM step), then --repeats timed runs (--steps train steps each, or one
--sample_steps sampling call), median reported.
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position
from absl import app, flags  # pylint: disable=wrong-import-position
from ml_collections import config_flags  # pylint: disable=wrong-import-position

from distill import stages  # pylint: disable=wrong-import-position
from models import count_params  # pylint: disable=wrong-import-position
from models.denoiser import make_denoise_fn  # pylint: disable=wrong-import-position
from samplers import make_sampler  # pylint: disable=wrong-import-position
from train import records  # pylint: disable=wrong-import-position
from train.loop import ShardedStep  # pylint: disable=wrong-import-position
from train.mesh import (  # pylint: disable=wrong-import-position
    configure_cpu_compiler, set_cpu_devices, shard_rows)

try:
  import torch  # pylint: disable=wrong-import-position
  from diffusers import UNet2DModel  # pylint: disable=wrong-import-position
except ImportError as e:
  raise SystemExit(f'{e}: python -m pip install -r benchmarks/requirements-peer.txt') from e

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/digits_teacher.py', 'Config file.')
_STEPS = flags.DEFINE_integer('steps', 20, 'Timed train steps per repeat.')
_SAMPLE_STEPS = flags.DEFINE_integer('sample_steps', 64, 'DDIM steps of guided sampling.')
_SAMPLE_BATCH = flags.DEFINE_integer('sample_batch', 256, 'Images per sampling call.')
_CPU_DEVICES = flags.DEFINE_integer('cpu_devices', 0,
                                    'As main.py: XLA devices of the CPU (0: one per core).')
_REPEATS = flags.DEFINE_integer('repeats', 1, 'Timed repeats of each figure (median reported).')


def _median_seconds(fn, repeats, warmup):
  warmup()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def build_ours(config, record, *, sample_steps: int, sample_batch: int):
  """(parameter count, train(steps), sample()) of this repo: the teacher's train step as the train
  loop runs it (ShardedStep: jitted, donated state, batch split over every device) and the guided
  DDIM sampler as --mode=sample runs it (batch split over every device). train(1) and the first
  sample() compile."""
  job = stages.teacher_job(config)
  model, params, logsnr_fn = (records.build(job.record)[0], job.params,
                              stages.logsnr_schedule(config))
  sharded = ShardedStep(job.loss_fn, config.train)
  state = sharded.init_state(params, seed=0)
  b = config.train.batch_size
  local = {'x': np.random.default_rng(0).uniform(-1, 1, (b, *record['x_shape'])).astype(np.float32),
           'label': np.arange(b, dtype=np.int32) % record['num_classes']}
  block_each_step = jax.device_count() > 1  # as the train loop does on CPU devices

  def train(steps):
    nonlocal state
    for _ in range(steps):
      state, _ = sharded.step_fn(state, sharded.global_batch(local), None)
      if block_each_step:
        jax.block_until_ready(state)
    jax.block_until_ready(state)

  denoise_fn = make_denoise_fn(model, parametrization=config.diffusion.parametrization,
                               kind='guided', num_classes=record['num_classes'])
  sampler = make_sampler('ddim', denoise_fn, num_steps=sample_steps, logsnr_fn=logsnr_fn)
  n = sample_batch
  z, label, w = shard_rows(jax.random.normal(jax.random.key(1), (n, *record['x_shape'])),
                           jnp.arange(n, dtype=jnp.int32) % record['num_classes'], jnp.ones((n,)))
  key = jax.random.key(0)
  sample = lambda: jax.block_until_ready(sampler(sharded.unpack(state).ema_params, z, label, w,
                                                  key))
  return count_params(params), train, sample


def run_ours(config, record):
  """(parameter count, train steps/s, images/s) of build_ours, medians of --repeats."""
  num_params, train, sample = build_ours(config, record, sample_steps=_SAMPLE_STEPS.value,
                                         sample_batch=_SAMPLE_BATCH.value)
  train_s = _median_seconds(lambda: train(_STEPS.value), _REPEATS.value,
                            warmup=lambda: train(1))  # the warm-up compiles
  sample_s = _median_seconds(sample, _REPEATS.value, warmup=sample)
  return num_params, _STEPS.value / train_s, _SAMPLE_BATCH.value / sample_s


def make_peer(model_config, *, x_shape, num_classes, ch, layers):
  """UNet2DModel with the config's levels, attention resolutions and groups; base width ch,
  layers_per_block."""
  res, channels = x_shape[0], x_shape[-1]
  attn = [
      res // 2**level in tuple(model_config.attn_resolutions)
      for level in range(len(model_config.ch_mult))
  ]
  return UNet2DModel(
      sample_size=res, in_channels=channels, out_channels=channels, layers_per_block=layers,
      block_out_channels=tuple(ch * m for m in model_config.ch_mult),
      down_block_types=tuple('AttnDownBlock2D' if a else 'DownBlock2D' for a in attn),
      up_block_types=tuple('AttnUpBlock2D' if a else 'UpBlock2D' for a in reversed(attn)),
      norm_num_groups=model_config.num_groups, num_class_embeds=num_classes + 1,  # + the null label
      attention_head_dim=None, dropout=model_config.dropout)  # None: one head, as ours


def closest_peer(model_config, target, **kwargs):
  """(ch, layers) in a small grid whose parameter count is closest to target (built on the meta
  device)."""
  groups = model_config.num_groups
  grid = [(c, l) for c in range(groups, 4 * model_config.ch + 1, groups) for l in (1, 2)]
  with torch.device('meta'):
    counts = {
        key: sum(p.numel()
                 for p in make_peer(model_config, ch=key[0], layers=key[1], **kwargs).parameters())
        for key in grid}
  return min(grid,
             key=lambda key: (abs(counts[key] - target), key[1] != model_config.num_res_blocks))


def build_peer(config, record, ch, layers, *, sample_steps: int, sample_batch: int,
               compile_model: bool = False):
  """(parameter count, train(steps), sample()) of the same train step and guided DDIM in PyTorch; t
  indexes a 1001-point table of our logsnr schedule. compile_model: the network under
  torch.compile (the optimizer and the sampler's loop stay eager); the first calls compile."""
  torch.manual_seed(0)
  x_shape, k = tuple(record['x_shape']), record['num_classes']
  model = make_peer(config.model, x_shape=x_shape, num_classes=k, ch=ch, layers=layers)
  params = list(model.parameters())
  net = torch.compile(model) if compile_model else model
  logsnr = torch.tensor(np.asarray(stages.logsnr_schedule(config)(jnp.linspace(0.0, 1.0, 1001))),
                        dtype=torch.float32)
  alpha, sigma = torch.sigmoid(logsnr).sqrt(), torch.sigmoid(-logsnr).sqrt()  # [1001]
  tr = config.train
  opt = torch.optim.AdamW(params, lr=tr.lr, betas=(0.9, 0.999), weight_decay=tr.weight_decay)
  ema = [p.detach().clone() for p in params]
  b = tr.batch_size
  x = torch.from_numpy(np.random.default_rng(0).uniform(-1, 1, (b, *x_shape)).astype(np.float32))
  x = x.permute(0, 3, 1, 2).contiguous()  # NHWC -> NCHW
  label = torch.arange(b) % k

  def train_step():
    t = torch.randint(0, 1001, (b,))
    a, s = alpha[t].view(-1, 1, 1, 1), sigma[t].view(-1, 1, 1, 1)
    eps = torch.randn_like(x)
    lab = torch.where(torch.rand(b) < tr.p_uncond, k, label)
    loss = torch.nn.functional.mse_loss(
        net(a * x + s * eps, t, class_labels=lab).sample, a * eps - s * x)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, tr.grad_clip)
    opt.step()
    with torch.no_grad():
      torch._foreach_lerp_(ema, params, 1.0 - tr.ema_decay)  # pylint: disable=protected-access

  def train(steps):
    model.train()
    for _ in range(steps):
      train_step()

  n = sample_batch
  z_init = torch.randn(n, *x_shape).permute(0, 3, 1, 2).contiguous()
  labels = torch.cat([torch.arange(n) % k, torch.full((n,), k)])  # [label; null]
  w = torch.ones(n).view(-1, 1, 1, 1)

  @torch.inference_mode()
  def sample(num_steps=sample_steps):
    model.eval()
    z = z_init
    for i in range(num_steps):
      t, s = (round(1000 * (num_steps - i) / num_steps),
              round(1000 * (num_steps - i - 1) / num_steps))
      cond, uncond = (
          net(torch.cat([z, z]), torch.full((2 * n,), t), class_labels=labels).sample.chunk(2))
      v = (1 + w) * cond - w * uncond
      x_pred, eps_pred = alpha[t] * z - sigma[t] * v, sigma[t] * z + alpha[t] * v
      z = x_pred if i == num_steps - 1 else alpha[s] * x_pred + sigma[s] * eps_pred
    return z

  return sum(p.numel() for p in params), train, sample


def run_peer(config, record, ch, layers):
  """(parameter count, train steps/s, images/s) of build_peer, medians of --repeats."""
  num_params, train, sample = build_peer(config, record, ch, layers,
                                         sample_steps=_SAMPLE_STEPS.value,
                                         sample_batch=_SAMPLE_BATCH.value)
  train_s = _median_seconds(lambda: train(_STEPS.value), _REPEATS.value, warmup=lambda: train(2))
  sample_s = _median_seconds(sample, _REPEATS.value, warmup=lambda: sample(1))
  return num_params, _STEPS.value / train_s, _SAMPLE_BATCH.value / sample_s


def main(_):
  configure_cpu_compiler()  # as main.py: before a backend starts
  set_cpu_devices(_CPU_DEVICES.value)
  config = _CONFIG.value
  record = records.make(config, stage='teacher')
  ours_params, ours_train, ours_sample = run_ours(config, record)
  ch, layers = closest_peer(config.model, ours_params, x_shape=tuple(record['x_shape']),
                            num_classes=record['num_classes'])
  peer_params, peer_train, peer_sample = run_peer(config, record, ch, layers)

  print(f'device: {jax.devices()[0].device_kind} x{jax.device_count()} ({jax.default_backend()}); '
        f'torch {torch.__version__} on cpu, {torch.get_num_threads()} threads')
  print(
      f'ours: {config.model.name} ch={config.model.ch} ch_mult={tuple(config.model.ch_mult)} '
      f'num_res_blocks={config.model.num_res_blocks}, {ours_params:,} params, data '
      f'{config.data.name} {tuple(record["x_shape"])}')
  print(
      'peer: diffusers UNet2DModel '
      f'block_out_channels={tuple(ch * m for m in config.model.ch_mult)} '
      f'layers_per_block={layers}, {peer_params:,} params ({peer_params / ours_params - 1:+.1%})')
  rows = [(f'train steps/s (batch {config.train.batch_size})', ours_train, peer_train),
          (f'guided DDIM {_SAMPLE_STEPS.value} steps, images/s (batch {_SAMPLE_BATCH.value})',
           ours_sample, peer_sample)]
  width = max(len(r[0]) for r in rows)
  print(f'{"":{width}}  {"ours":>9}  {"peer":>9}  {"ours/peer":>9}')
  for name, ours, peer in rows:
    print(f'{name:{width}}  {ours:9.2f}  {peer:9.2f}  {ours / peer:9.2f}')


if __name__ == '__main__':
  app.run(main)
