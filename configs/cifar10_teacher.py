"""CIFAR-10 guided teacher at paper scale (the reference PD U-Net, 60.0M params); needs
accelerators.

Reproduces the CIFAR-10 setting of Meng et al. (2023) on the published progressive-distillation
settings.

  python main.py --config=configs/cifar10_teacher.py --mode=teacher --config.data.tfds_data_dir=DIR
  python main.py --config=configs/cifar10_teacher.py --mode=pipeline \
      --config.data.tfds_data_dir=DIR  # all stages
  python main.py --config=configs/cifar10_teacher.py --mode=pipeline \
      --dry_run  # one step of each stage

Data: `tfds build cifar10 --data_dir=DIR` on a machine with internet, then copy DIR.
Model: model.name 'ref_unet' (models/ref_unet.py) with the architecture of the official
progressive-distillation CIFAR-10 config (config/cifar_base.py): ch 256, ch_mult (1, 1, 1), 3 res
blocks, attention at 8x8 and 16x16 with 1 head, dropout 0.2, residual-block resampling, FiLM
conditioning, zero-initialised output layers. 60,015,363 params (the stage-1 student adds 1,312,768
in 'guidance_embed'). Differences from the published model: it is class-conditional (an 11-row label
embedding, the 11th the null label of classifier-free guidance, 11,264 params the unconditional
published model lacks), v-prediction instead of its x-prediction (mean_type 'x'), this repo's logsnr
embedding (sinusoid frequencies spaced ln(1e4)/(ch/2), the reference's ln(1e4)/(ch/2 - 1); the same
shapes), bf16 compute (params float32), and label dropout 0.1 for guidance. Optimizer as the
published base config (batch 128, Adam 2e-4 with 1k warmup, weight decay 1e-3, EMA 0.9999, grad clip
1, truncated-SNR loss). Distillation: batch 128, lr 5e-5 annealed linearly to 0 within each
50k-iteration round, no EMA, no dropout, 8192 -> 1 steps.

Expected cost (`python benchmarks/paper_scale_budget.py --peak_tflops=989 --utilization=0.35`: XLA's
compile-time estimates, time at 35% of a 989 TFLOP/s bf16 peak): about 3.8 GiB per device at 16
examples per device; the teacher is 0.103 TFLOP per example-step, about 4 device-hours for 400k
steps; stage 1 about 1, stage 2 (13 rounds of 50k) about 11 device-hours (docs/results.md; the
measured step rate: benchmarks/README.md). Expected result: the paper's CIFAR-10 FIDs (docs/math.md,
"Published settings"); what was verified so far is in docs/results.md. Multi-host: the same command
on every host with `--multihost` (TPU pods, SLURM) or `--coordinator_address=HOST0:PORT
--num_processes=N --process_id=I` (docs/running.md).
"""

from configs import base


def get_config():
  config = base.get_config()
  config.workdir = 'runs/cifar10'
  config.data.update(name='cifar10', random_flip=True)
  config.model.update(name='ref_unet', ch=256, ch_mult=(1, 1, 1), num_res_blocks=3,
                      attn_resolutions=(8, 16), num_heads=1, head_dim=0, resblock_resample=True,
                      dropout=0.2, num_groups=32, dtype='bfloat16')  # bf16 compute, float32 params
  config.train.update(batch_size=128, num_steps=400_000, lr=2e-4, warmup_steps=1000,
                      weight_decay=1e-3, grad_clip=1.0, ema_decay=0.9999, p_uncond=0.1,
                      log_every=500, checkpoint_every=10_000)
  # Stage 1 and 2: no EMA, no dropout, lr 5e-5 (stage 2 annealed linearly to 0 within each 50k-step
  # round), 8192 -> 1 steps as in the published CIFAR-10 distillation.
  config.distill.dropout = 0.0
  # The w-embedding keeps the backbone's lr (stage1.lr_scales.guidance_embed = 1, as published). On
  # the digits a 10x lr on it brought stage 1 closer to the teacher at the ends of the w range in
  # 1500 iterations of a decaying lr (docs/results.md, the stage-1 ablation); 50k iterations at a
  # constant lr give the embedding far more updates, and nothing was measured at this scale: compare
  # with benchmarks/stage1_fidelity.py first. distill.guidance_gains (w scaling each residual block,
  # the digits default) exists for model.name 'unet' only: the published network keeps the published
  # w input, the embedding added to the time embedding.
  config.stage1.update(batch_size=128, num_steps=50_000, lr=5e-5, warmup_steps=0, log_every=500,
                       checkpoint_every=10_000)
  config.stage2.update(batch_size=128, num_steps=50_000, lr=5e-5, warmup_steps=0, lr_decay='linear',
                       start_steps=8192, final_steps=1, log_every=500, checkpoint_every=10_000)
  config.pipeline.teacher_steps = (4, 8, 256)
  # as the reference samplers: x predictions clipped to [-1, 1]
  config.eval.clip_x = config.sample.clip_x = True
  # FID of 8-bit images, as from saved samples (docs/evaluation.md)
  config.eval.quantize_uint8 = True
  # the reference's logvar_type 'fixed_large'
  config.eval.ddpm_variance = config.sample.ddpm_variance = 'large'
  return config
