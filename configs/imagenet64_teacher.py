"""ImageNet 64x64 guided teacher at paper scale (reference PD U-Net, 295.9M params; 1024 -> 1
steps); needs a pod.

Reproduces the ImageNet 64 setting of Meng et al. (2023) on the published progressive-distillation
settings.

  python main.py --config=configs/imagenet64_teacher.py --mode=teacher \
      --config.data.tfds_data_dir=DIR --multihost
  python main.py --config=configs/imagenet64_teacher.py --mode=pipeline \
      --dry_run  # one step per stage

Data: tfds 'imagenet_resized/64x64' prepared in DIR (needs the manual ImageNet download).
Model: model.name 'ref_unet' (models/ref_unet.py) with the architecture of the official
progressive-distillation ImageNet 64 config (config/imagenet64_base.py): ch 192, ch_mult (1, 2, 3,
4), 3 res blocks, attention at 8x8, 16x16 and 32x32 in heads of 64 channels, dropout 0.1,
residual-block resampling, FiLM conditioning, zero-initialised output layers. 295,900,035 params
(the stage-1 student adds 738,816 in 'guidance_embed'). Differences from the published model:
v-prediction with one 3-channel output instead of its "both" output (x and eps, 6 channels: 5,187
more params in conv_out), a 1001-row label embedding (the last row the null label of classifier-free
guidance; the same count as its Dense on one-hot labels), this repo's logsnr embedding (sinusoid
frequencies spaced ln(1e4)/(ch/2), the reference's ln(1e4)/(ch/2 - 1); the same shapes), bf16
compute (params float32), label dropout 0.1 for guidance, and teacher lr 1e-4 (the published base:
3e-4). Distillation follows the published settings: batch 2048, lr 1e-4 annealed linearly to 0
within each 50k-iteration round, no dropout, 1024 -> 1 steps.

Expected cost (`python benchmarks/paper_scale_budget.py --peak_tflops=989 --utilization=0.35`: XLA's
compile-time estimates, time at 35% of a 989 TFLOP/s bf16 peak): 16 examples per device need about
26 GiB per device (teacher and stage 1) and 27 GiB (stage 2); the teacher is 0.64 TFLOP per
example-step, about 520 device-hours for 500k steps; stage 1 about 90, stage 2 (10 rounds of 50k)
about 870 device-hours (docs/results.md). Expected result: the paper's ImageNet 64 FID and IS
(docs/math.md, "Published settings"); what was verified so far is in docs/results.md. Multi-host:
run the same command on every host/TPU worker with --multihost, or with
--coordinator_address/--num_processes/--process_id (docs/running.md).
"""

from configs import base


def get_config():
  config = base.get_config()
  config.workdir = 'runs/imagenet64'
  config.data.update(name='imagenet64', random_flip=True)
  config.model.update(name='ref_unet', ch=192, ch_mult=(1, 2, 3, 4), num_res_blocks=3,
                      attn_resolutions=(8, 16, 32), head_dim=64, resblock_resample=True,
                      dropout=0.1, num_groups=32,
                      dtype='bfloat16')  # bf16 compute, float32 params; heads of 64 channels
  config.train.update(batch_size=2048, num_steps=500_000, lr=1e-4, warmup_steps=1000,
                      weight_decay=0.0, grad_clip=1.0, ema_decay=0.9999, p_uncond=0.1,
                      log_every=500, checkpoint_every=5_000)
  config.distill.dropout = 0.0  # the published distillation uses no dropout
  # The w-embedding keeps the backbone's lr (stage1.lr_scales.guidance_embed = 1, as published). On
  # the digits a 10x lr on it brought stage 1 closer to the teacher at the ends of the w range in
  # 1500 iterations of a decaying lr (docs/results.md, the stage-1 ablation); 50k iterations at a
  # constant lr give the embedding far more updates, and nothing was measured at this scale: compare
  # with benchmarks/stage1_fidelity.py first. distill.guidance_gains (the digits default) exists for
  # model.name 'unet' only (see cifar10_teacher.py).
  config.stage1.update(batch_size=2048, num_steps=50_000, lr=1e-4, warmup_steps=0, log_every=500,
                       checkpoint_every=5_000)
  config.stage2.update(batch_size=2048, num_steps=50_000, lr=1e-4, warmup_steps=0,
                       lr_decay='linear', start_steps=1024, final_steps=1, log_every=500,
                       checkpoint_every=5_000)
  config.pipeline.teacher_steps = (4, 8, 256)
  # as the reference samplers: x predictions clipped to [-1, 1]
  config.eval.clip_x = config.sample.clip_x = True
  # FID of 8-bit images, as from saved samples (docs/evaluation.md)
  config.eval.quantize_uint8 = True
  # the reference's logvar_type 'fixed_large'
  config.eval.ddpm_variance = config.sample.ddpm_variance = 'large'
  # 1024: the paper's reference teacher (DDIM, 1024 steps)
  config.eval.teacher_steps = (1024, 256, 8, 4)
  return config
