"""Defaults shared by every config; dataset configs import this and override a few fields."""

import ml_collections


def _optimizer(**overrides) -> ml_collections.ConfigDict:
  section = dict(batch_size=128, num_steps=1000, lr=2e-4, warmup_steps=100, lr_decay='constant',
                 weight_decay=0.0, grad_clip=1.0, ema_decay=0.0, log_every=100,
                 checkpoint_every=1000, keep_checkpoints=2, max_nonfinite_steps=100)
  section.update(overrides)
  return ml_collections.ConfigDict(section)


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.workdir = 'runs/default'
  # A finished stage whose checkpoint was trained from other values of the fields it depends on
  # (train/records.py, stage_inputs) than this config gives is refused; retrain_stale=True sets it
  # aside (<dir>.stale) and trains it again (a student whose teacher changed too, as
  # distill.redistill does).
  config.retrain_stale = False

  # name: digits, toy2d, cifar10, imagenet64, 'tfds:NAME' (any tfds data set with image and label
  # features) or 'folder' (path: one sub-folder of PNG/JPEG images per class). resolution: the side
  # the images of a folder or a tfds:NAME data set are resized (shorter side) and centre-cropped to;
  # 0: a tfds data set's own square size.
  config.data = ml_collections.ConfigDict(
      dict(name='digits', random_flip=False, tfds_data_dir='', path='', resolution=0))
  # unet fields: ch, ch_mult, num_res_blocks, attn_resolutions, dropout, num_groups; mlp: hidden,
  # num_layers. dtype: compute dtype of convolutions, dense layers and attention (float32 |
  # bfloat16); params stay float32. num_heads: attention heads; ref_unet also: head_dim (> 0: heads
  # of head_dim channels), resblock_resample.
  config.model = ml_collections.ConfigDict(
      dict(name='unet', ch=32, ch_mult=(1, 2), num_res_blocks=2, attn_resolutions=(4,), dropout=0.1,
           num_groups=8, hidden=128, num_layers=3, dtype='float32', num_heads=1, head_dim=0,
           resblock_resample=True))
  config.diffusion = ml_collections.ConfigDict(dict(
      schedule='cosine', logsnr_min=-20.0, logsnr_max=20.0, parametrization='v',
      loss_weighting='truncated_snr'))

  # Teacher: class-conditional, label dropout (p_uncond) makes it unconditional too.
  config.train = _optimizer(ema_decay=0.9999, p_uncond=0.1)
  # Guidance weights w in [w_min, w_max] for stage 1 and stage 2, drawn from w_distribution
  # ('uniform', or 'arcsine': more mass near both ends); w_zero_fraction of each batch at w = 0
  # exactly (the teacher's conditional model, where stage 1 starts).
  # dropout: the students' (stage 1, stage 2, encoder) U-Net dropout; -1 keeps the teacher's
  # model.dropout. allow_incomplete_teacher: distill from a teacher whose training stopped early
  # (refused otherwise). redistill: a student whose teacher changed since it was distilled is set
  # aside (*.stale) and distilled again (refused otherwise).
  # guidance_gains: w also scales each residual block's activations channel by channel (UNet
  # students only; models.embeddings.GuidanceEmbedding.gains), besides the embedding added to the
  # conditioning vector; guidance_output: the output gains a term w * b, b a zero-initialised
  # convolution of the last features (UNet students only): the guided teacher's prediction is linear
  # in w; guidance_w_scale: the w-embedding's sinusoids are of guidance_w_scale * w (UNet students);
  # guidance_context: the w-embedding and gains also see the noise level and label (UNet students).
  config.distill = ml_collections.ConfigDict(dict(
      stage='stage2', w_min=0.0, w_max=4.0, w_zero_fraction=0.0, dropout=-1.0,
      allow_incomplete_teacher=False, redistill=False, guidance_gains=False, guidance_output=False,
      guidance_context=False, guidance_w_scale=250.0, w_distribution='uniform'))
  # lr_scales: lr factors of top-level parameter keys ('guidance_embed': the fresh w-embedding).
  # loss_weighting: stage 1's omega(logsnr) ('' = diffusion.loss_weighting).
  config.stage1 = _optimizer(lr_scales=ml_collections.ConfigDict({'guidance_embed': 1.0}),
                             loss_weighting='')
  # Stage 2: the stage-1 model is a start_steps teacher; rounds halve down to final_steps.
  # num_steps is the iterations of each round; the lr decays linearly to 0 within a round.
  # fine_grid: also train at the odd multiples of 1/(2N) (off_grid_fraction of each batch), the
  # times the stochastic 2N-step sampler needs; off_grid_fraction 0.5 is the uniform draw on the
  # 1/(2N) grid.
  config.stage2 = _optimizer(lr=5e-5, warmup_steps=0, lr_decay='linear', start_steps=1024,
                             final_steps=1, fine_grid=True, off_grid_fraction=0.5)

  # Encoder distillation (--mode=encoder): halving of the guided DDIM encoder, t -> t + 1/N.
  config.encoder = _optimizer(
      lr=5e-5, warmup_steps=0, lr_decay='linear', start_steps=1024, final_steps=1)
  # The paper's direct baseline (--mode=direct): the teacher itself halved from start_steps,
  # conditional and unconditional (label dropout train.p_uncond), sampled with guidance at 2 network
  # calls a step.
  config.direct = _optimizer(
      lr=5e-5, warmup_steps=0, lr_decay='linear', start_steps=1024, final_steps=1)
  # --mode=transfer: encode class source_class, decode as target_class (distilled pair vs DDIM).
  config.transfer = ml_collections.ConfigDict(dict(
      source_class=3, target_class=8, num_images=8, steps=(1, 2, 4, 8), w_encode=0.0, w_decode=1.0,
      eval_ws=(0.0, 1.0, 4.0), eval_images=100, out_dir=''))

  # Every training stage: a profiler trace of num_steps steps from start_step into its log folder (0
  # = none; TensorBoard's profile plugin or Perfetto read it); flops: log the step's FLOPs (matmuls,
  # convolutions) as model_flops_per_sec and, on known accelerators, mfu ('auto': on accelerators
  # only, 'on', 'off').
  config.profile = ml_collections.ConfigDict(dict(start_step=10, num_steps=0, flops='auto'))

  # clip_x: clip each sampling step's x prediction to [-1, 1] (the reference samplers' default).
  # ddpm_variance: the DDPM sampler's step variance, 'small' (the posterior's) or 'large'
  # (sigma_{t|s}^2). guidance_scale: diffusers' convention s = 1 + w; when given it replaces
  # guidance_w (w = s - 1). export_samples: also write the samples as guided-diffusion's evaluator
  # and EDM's fid.py read them (eval/export.py: NAME_NxHxWx3.npz with arr_0 uint8 images and arr_1
  # labels, NAME_NxHxWx3.zip of PNGs).
  config.sample = ml_collections.ConfigDict(
      dict(checkpoint='', sampler='ddim', num_steps=0, guidance_w=1.0, per_class=8, seed=1,
           out_dir='', clip_x=False, ddpm_variance='small',
           guidance_scale=ml_collections.config_dict.placeholder(float), export_samples=False))
  # quality_samples: samples per guidance weight in quality_ws of the per-stage fidelity table (0 =
  # off): every model the pipeline trains against the guided teacher's CFG DDIM at quality_steps
  # (the reference; stage 1 samples at quality_steps too), judged against the floor, the same
  # teacher's CFG DDIM at floor_steps (modes/stage_quality.py, docs/evaluation.md);
  # quality_stochastic: also each N-step student's stochastic sampler at 2N steps (a column of its
  # own; --mode=fid scores it either way).
  config.pipeline = ml_collections.ConfigDict(dict(
      guidance_ws=(0.0, 1.0, 4.0), teacher_steps=(4, 8, 256), per_class=8, seed=1, quality_steps=64,
      quality_samples=0, quality_ws=(0.0, 1.0, 4.0), floor_steps=8, quality_stochastic=True))
  # --mode=fid: features from 'inception' (weights file at inception_path) or the embedded
  # 'classifier'. Protocol options (docs/evaluation.md). clip_x: sample with x predictions clipped
  # to [-1, 1] for --mode=fid, the pipeline's grids and its table; quantize_uint8: round samples and
  # real images to the 256 uint8 levels before the feature extractor (--mode=fid, the pipeline's
  # table); ddpm_variance: as sample.ddpm_variance, for the DDPM rows of --mode=fid. num_seeds:
  # every cell is scored on eval.num_seeds independent noise draws (seeds eval.seed, eval.seed + 1,
  # ...); the table gives their mean and spread. fixed_w_dir: the workdir of a fixed-w sweep
  # (configs/digits_fixed_w.py): its students become 'student fixed-w' rows, each scored at its own
  # w only. teacher_clipped_steps: teacher CFG DDIM rows sampled with clip_x on whatever eval.clip_x
  # is ('teacher CFG clipped'), so clipped and unclipped teachers share one table. reference_stats:
  # a standard statistics file (pytorch-fid or EDM mu/sigma .npz, guided-diffusion reference batch)
  # instead of statistics computed from reference_split (docs/fid_protocol.md); its provenance keys
  # the cells. export_samples: also write every scored cell's samples for the standard evaluators
  # (as sample.export_samples).
  config.eval = ml_collections.ConfigDict(dict(
      extractor='inception', inception_path='', classifier_dir='', classifier_steps=1500,
      num_samples=50_000, batch_size=250, guidance_ws=(0.0, 0.3, 1.0, 2.0, 4.0),
      teacher_steps=(256, 8, 4), teacher_ddpm_steps=(256,), stage1_steps=(),
      student_steps=(1, 2, 4, 8, 16), seed=2, num_seeds=1, reference_split='train',
      reference_examples=50_000, out_dir='', clip_x=False, quantize_uint8=False,
      ddpm_variance='small', fixed_w_dir='', teacher_clipped_steps=(), reference_stats='',
      export_samples=False))
  return config
