"""A teacher trained with diffusers and PyTorch, then distilled by this repo: the import, end to
end, on the digits.

  python -m pip install -r benchmarks/requirements-peer.txt
      # optional extras: torch (CPU) + diffusers
  python benchmarks/diffusers_digits.py --out=runs/diffusers_digits
      # trains the teacher, then runs the pipeline

Part 1 (PyTorch, this script): a class-conditional diffusers UNet2DModel trained on the embedded
digits the way diffusers' training examples train one (DDPMScheduler: 1000 timesteps, beta_schedule
'squaredcos_cap_v2', prediction_type 'v_prediction'; integer timesteps drawn uniformly; the MSE of
the v prediction), with label dropout (the label replaced by the null class 10 with probability
--p_uncond) for classifier-free guidance, and settings close to configs/digits_teacher.py's U-Net
and optimizer: block_out_channels (24, 48), one resnet per block, attention at 4x4 (one head), 8
groups, dropout 0.1; batch 64, AdamW lr 1e-3 (200 warmup steps), grad-norm clip 1, EMA 0.999. The
EMA weights are saved as a diffusers pipeline folder: OUT/teacher/unet (config.json,
diffusion_pytorch_model.safetensors) and OUT/teacher/scheduler (scheduler_config.json). Part 2 (this
repo, no PyTorch), the command it prints and runs (--distill=false skips it):
  python main.py --config=configs/diffusers_teacher.py --config.model.folder=OUT/teacher \
      --config.workdir=OUT/distill --mode=pipeline
which imports the folder, runs stage 1 and the stage-2 rounds of the digits recipe, and writes the
fidelity table into OUT/distill/results/summary.md (docs/import.md shows it).
"""

import copy
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # pylint: disable=wrong-import-position
from absl import app, flags  # pylint: disable=wrong-import-position

from data.digits import load_digits_arrays  # pylint: disable=wrong-import-position

try:
  import torch  # pylint: disable=wrong-import-position
  from diffusers import DDPMScheduler, UNet2DModel  # pylint: disable=wrong-import-position
except ImportError as e:
  raise SystemExit(f'{e}: python -m pip install -r benchmarks/requirements-peer.txt') from e

_OUT = flags.DEFINE_string('out', 'runs/diffusers_digits',
                           'Output folder: teacher/ (diffusers) and distill/ (ours).')
_STEPS = flags.DEFINE_integer('steps', 1600,
                              'Teacher training steps (configs/digits_teacher.py: 1600).')
_BATCH = flags.DEFINE_integer('batch_size', 64, 'Teacher batch size.')
_P_UNCOND = flags.DEFINE_float('p_uncond', 0.1, 'Label dropout: probability of the null class.')
_SEED = flags.DEFINE_integer('seed', 0, 'Seed of the teacher training.')
_DISTILL = flags.DEFINE_bool('distill', True, 'Then run the repo pipeline on the saved teacher.')
# One thread by default: on a busy shared CPU, intra-op threads spin while they wait for a core.
_THREADS = flags.DEFINE_integer('threads', 1, 'PyTorch intra-op threads.')
NUM_CLASSES = 10


def make_teacher() -> UNet2DModel:
  return UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1,
                     block_out_channels=(24, 48),
                     down_block_types=('DownBlock2D', 'AttnDownBlock2D'),
                     up_block_types=('AttnUpBlock2D', 'UpBlock2D'), norm_num_groups=8,
                     attention_head_dim=None, num_class_embeds=NUM_CLASSES + 1, dropout=0.1)


def train_teacher(folder: str) -> float:
  """Trains the teacher and saves its EMA weights and scheduler as a diffusers pipeline folder;
  returns seconds."""
  torch.manual_seed(_SEED.value)
  x, label = load_digits_arrays('train')  # [N, 8, 8, 1] in [-1, 1], [N]
  x = torch.from_numpy(np.array(x.transpose(0, 3, 1, 2)))  # NCHW, a writable copy
  label = torch.from_numpy(label.astype(np.int64))
  scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule='squaredcos_cap_v2',
                            prediction_type='v_prediction')
  model = make_teacher().train()
  ema = copy.deepcopy(model).eval().requires_grad_(False)
  opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.999), weight_decay=0.0)
  warmup = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / 200))
  gen = torch.Generator().manual_seed(_SEED.value)
  start = time.time()
  for step in range(_STEPS.value):
    rows = torch.randint(0, len(label), (_BATCH.value,), generator=gen)
    x0, y = x[rows], label[rows]
    # label dropout
    y = torch.where(torch.rand(y.shape, generator=gen) < _P_UNCOND.value, NUM_CLASSES, y)
    noise = torch.randn(x0.shape, generator=gen)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (x0.shape[0],), generator=gen)
    pred = model(scheduler.add_noise(x0, noise, t), t, class_labels=y).sample
    loss = torch.nn.functional.mse_loss(pred, scheduler.get_velocity(x0, noise, t))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    warmup.step()
    decay = min(0.999, (1 + step) / (10 + step))  # the repo's EMA warm-up
    with torch.no_grad():
      for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p, 1.0 - decay)
    if (step + 1) % 200 == 0:
      print(f'[teacher] step {step + 1}/{_STEPS.value} loss {loss.item():.4f} '
            f'{(step + 1) / (time.time() - start):.1f} steps/s', flush=True)
  ema.save_pretrained(os.path.join(folder, 'unet'), safe_serialization=True)
  scheduler.save_pretrained(os.path.join(folder, 'scheduler'))
  return time.time() - start


def main(_):
  torch.set_num_threads(_THREADS.value)
  teacher = os.path.join(_OUT.value, 'teacher')
  seconds = train_teacher(teacher)
  print(
      f'wrote {teacher} (diffusers UNet2DModel, '
      f'{sum(p.numel() for p in make_teacher().parameters()):,} params) in {seconds:.0f} s; torch '
      f'{torch.__version__}, {torch.get_num_threads()} threads')
  command = [sys.executable, 'main.py', '--config=configs/diffusers_teacher.py',
             f'--config.model.folder={teacher}',
             f'--config.workdir={os.path.join(_OUT.value, "distill")}', '--mode=pipeline']
  print('distill it:', ' '.join(command[1:]), flush=True)
  if _DISTILL.value:
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    subprocess.run(command, cwd=repo, check=True)
    print(f'fidelity table: {os.path.join(_OUT.value, "distill", "results", "summary.md")}')


if __name__ == '__main__':
  app.run(main)
