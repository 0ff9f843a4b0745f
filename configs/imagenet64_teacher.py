"""ImageNet 64x64 guided teacher at paper scale (265.7M params; Meng et al. distill 1024 -> 1); needs a pod.

  python main.py --config=configs/imagenet64_teacher.py --mode=teacher --config.data.tfds_data_dir=DIR --multihost
  python main.py --config=configs/imagenet64_teacher.py --mode=pipeline --dry_run    # one step per stage, ~10 min CPU

Data: tfds 'imagenet_resized/64x64' prepared in DIR (needs the manual ImageNet download). Distillation
follows the published settings: batch 2048, lr 1e-4 annealed linearly to 0 within each 50k-iteration round,
no dropout, 1024 -> 1 steps. The published base model used the "both" (x/eps blend) output; this config
uses v-prediction.

Expected cost (`python benchmarks/paper_scale_budget.py --configs=imagenet64_teacher --per_device_batch=N`:
XLA's compile-time estimates on the CPU, not measured on an accelerator; time at 40% of 156 TFLOP/s per
device): 16 examples per device need about 17 GiB per device, 32 about 28.5 GiB (teacher) and 27 GiB
(stage 1), so the global batch 2048 fits e.g. 64 or 128 accelerators of 32+ GiB. The teacher is 0.57
TFLOP per example-step, about 2,600 device-hours for 500k steps; stage 1 about 430, stage 2 (10 rounds of
50k) about 4,300 device-hours. Multi-host: run the same command on every host/TPU worker with --multihost,
or with --coordinator_address/--num_processes/--process_id (README, "Multi-host").
Not run here beyond --dry_run (no accelerator, no data on the machine this was built on).
"""

from configs import base
from modes.validation import validate_config


def get_config():
  config = base.get_config()
  config.workdir = 'runs/imagenet64'
  config.data.update(name='imagenet64', random_flip=True)
  config.model.update(name='unet', ch=192, ch_mult=(1, 2, 3, 4), num_res_blocks=3, attn_resolutions=(32, 16, 8),
                      dropout=0.1, num_groups=32, dtype='bfloat16')  # bf16 compute, float32 params
  config.train.update(batch_size=2048, num_steps=500_000, lr=1e-4, warmup_steps=1000, weight_decay=0.0,
                      grad_clip=1.0, ema_decay=0.9999, p_uncond=0.1, log_every=500, checkpoint_every=5_000)
  config.distill.dropout = 0.0  # the published distillation uses no dropout
  config.stage1.update(batch_size=2048, num_steps=50_000, lr=1e-4, warmup_steps=0, log_every=500,
                       checkpoint_every=5_000)
  config.stage2.update(batch_size=2048, num_steps=50_000, lr=1e-4, warmup_steps=0, lr_decay='linear',
                       start_steps=1024, final_steps=1, log_every=500, checkpoint_every=5_000)
  config.pipeline.teacher_steps = (4, 8, 256)
  config.eval.clip_x = config.sample.clip_x = True  # as the reference samplers: x predictions clipped to [-1, 1]
  validate_config(config)
  return config
