"""A tiny folder config for tests and smoke runs: 8x8 images, an 8-channel one-level U-Net, 4 steps
per stage.

  python main.py --config=configs/folder_tiny.py --mode=pipeline --config.data.path=DIR \
      --config.workdir=/tmp/ft
"""

from configs import folder_teacher


def get_config():
  config = folder_teacher.get_config()
  config.workdir = 'runs/folder_tiny'
  config.data.resolution = 8
  # One level, no attention: the fewest U-Net ops to compile (a test trains every stage of this
  # config).
  config.model.update(
      ch=8, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(), num_groups=4, dropout=0.0)
  for section in (config.train, config.stage1, config.stage2, config.encoder, config.direct):
    section.update(batch_size=8, num_steps=4, warmup_steps=1, log_every=2, checkpoint_every=4)
  config.stage2.update(start_steps=4, final_steps=2)
  config.encoder.update(start_steps=4, final_steps=2)
  config.direct.update(start_steps=4, final_steps=2)
  config.pipeline.update(teacher_steps=(2,), guidance_ws=(0.0, 1.0), per_class=2, quality_steps=4,
                         quality_samples=0, floor_steps=2)
  config.eval.update(num_samples=16, batch_size=8, guidance_ws=(0.0, 1.0), teacher_steps=(2,),
                     stage1_steps=(), student_steps=(2,), reference_examples=64)
  return config
