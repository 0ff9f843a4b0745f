"""Your own images: a folder with one sub-folder of PNG/JPEG images per class (docs/data.md), guided
teacher.

  python main.py --config=configs/folder_teacher.py --mode=teacher --config.data.path=DIR
  python main.py --config=configs/folder_teacher.py --mode=pipeline \
      --config.data.path=DIR  # every stage
  python main.py --config=configs/folder_stage1.py --mode=distill \
      --config.data.path=DIR  # stage 1 only
  python main.py --config=configs/folder_stage2.py --mode=distill \
      --config.data.path=DIR  # then stage 2
  python main.py --config=configs/folder_teacher.py --mode=fid --config.data.path=DIR \
      --config.eval.inception_path=inception_fid.npz  # FID / IS table

Data: DIR/CLASS_NAME/*.{png,jpg,jpeg}; class names are the sub-folder names, sorted, and go into
every checkpoint's record. Every image is made RGB, resized so that its shorter side is
data.resolution (32 here; e.g. --config.data.resolution=64) and centre-cropped to a square; an image
smaller than that is refused, as are an empty folder or class folder and an unreadable image, each
with one `error:` line before anything is written. A workdir whose teacher was trained on other
classes (count or names) or another resolution is refused the same way. Model and recipe: a
64-channel U-Net with three levels at 32x32, batch 64 in every stage, 20k teacher steps, 5k stage-1
steps, stage-2 rounds of 2k steps from 64 -> 1 steps with student EMA: a starting point, not a tuned
recipe; nothing here was trained on a real folder (tests/test_folder_pipeline.py runs a tiny version
end to end). FID: Inception features (eval.inception_path) against statistics computed from the
folder itself (all of it, up to eval.reference_examples), or a standard statistics file
(--config.eval.reference_stats=PATH, docs/fid_protocol.md).
"""

from configs import base


def get_config():
  config = base.get_config()
  config.workdir = 'runs/folder'
  config.data.update(name='folder', path='', resolution=32, random_flip=True)
  config.model.update(ch=64, ch_mult=(1, 2, 2), num_res_blocks=2, attn_resolutions=(8,),
                      dropout=0.1, num_groups=16)
  config.train.update(batch_size=64, num_steps=20_000, lr=2e-4, warmup_steps=500, ema_decay=0.999,
                      p_uncond=0.1, log_every=500, checkpoint_every=2_000)
  config.distill.dropout = 0.0  # students: no dropout, as published
  config.stage1.update(batch_size=64, num_steps=5_000, lr=2e-4, lr_decay='linear', warmup_steps=100,
                       log_every=500, checkpoint_every=1_000)
  config.stage2.update(batch_size=64, num_steps=2_000, lr=1e-4, start_steps=64, final_steps=1,
                       ema_decay=0.99, off_grid_fraction=0.25, log_every=500,
                       checkpoint_every=1_000)
  config.pipeline.update(teacher_steps=(4, 8, 64), quality_steps=64)
  config.eval.update(extractor='inception', num_samples=10_000, batch_size=250,
                     guidance_ws=(0.0, 1.0, 4.0), teacher_steps=(64, 8, 4), teacher_ddpm_steps=(),
                     stage1_steps=(64,), reference_split='train', reference_examples=50_000,
                     quantize_uint8=True)
  return config
