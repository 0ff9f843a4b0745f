"""CIFAR-10 guided teacher at paper scale (progressive-distillation U-Net, 47.7M params); needs accelerators.

  python main.py --config=configs/cifar10_teacher.py --mode=teacher --config.data.tfds_data_dir=DIR
  python main.py --config=configs/cifar10_teacher.py --mode=pipeline --config.data.tfds_data_dir=DIR  # all stages
  python main.py --config=configs/cifar10_teacher.py --mode=pipeline --dry_run    # one step of each stage, ~3 min CPU

Data: `tfds build cifar10 --data_dir=DIR` on a machine with internet, then copy DIR.
Model and optimizer follow the official progressive-distillation CIFAR-10 base config (batch 128, Adam
2e-4 with 1k warmup, weight decay 1e-3, EMA 0.9999, dropout 0.2, grad clip 1, truncated-SNR loss), with
v-prediction (the distillation default) and label dropout 0.1 for guidance. Distillation: batch 128, lr
5e-5 annealed linearly to 0 within each 50k-iteration round, no EMA, no dropout, 8192 -> 1 steps.

Expected cost (`python benchmarks/paper_scale_budget.py`: XLA's compile-time estimates on the CPU, not
measured on an accelerator; time at 40% of 156 TFLOP/s, an A100's TF32 peak): 16 examples per device need
about 3.3 GiB per device for every stage; the teacher is 0.096 TFLOP per example-step, about 22
device-hours for 400k steps; stage 1 about 5, stage 2 (13 rounds of 50k) about 59 device-hours.
Multi-host: the same command on every host with `--multihost` (TPU pods, SLURM) or
`--coordinator_address=HOST0:PORT --num_processes=N --process_id=I` (README, "Multi-host").
Not run here beyond --dry_run (no accelerator, no data on the machine this was built on).
"""

from configs import base
from modes.validation import validate_config


def get_config():
  config = base.get_config()
  config.workdir = 'runs/cifar10'
  config.data.update(name='cifar10', random_flip=True)
  config.model.update(name='unet', ch=256, ch_mult=(1, 1, 1), num_res_blocks=3, attn_resolutions=(16,),
                      dropout=0.2, num_groups=32, dtype='bfloat16')  # bf16 compute, float32 params
  config.train.update(batch_size=128, num_steps=400_000, lr=2e-4, warmup_steps=1000, weight_decay=1e-3,
                      grad_clip=1.0, ema_decay=0.9999, p_uncond=0.1, log_every=500, checkpoint_every=10_000)
  # Stage 1 and 2: no EMA, no dropout, lr 5e-5 (stage 2 annealed linearly to 0 within each 50k-step round),
  # 8192 -> 1 steps as in the published CIFAR-10 distillation.
  config.distill.dropout = 0.0
  config.stage1.update(batch_size=128, num_steps=50_000, lr=5e-5, warmup_steps=0, log_every=500,
                       checkpoint_every=10_000)
  config.stage2.update(batch_size=128, num_steps=50_000, lr=5e-5, warmup_steps=0, lr_decay='linear',
                       start_steps=8192, final_steps=1, log_every=500, checkpoint_every=10_000)
  config.pipeline.teacher_steps = (4, 8, 256)
  config.eval.clip_x = config.sample.clip_x = True  # as the reference samplers: x predictions clipped to [-1, 1]
  validate_config(config)
  return config
