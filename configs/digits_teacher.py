"""The embedded default: scikit-learn's 8x8 digits, a small U-Net; the whole pipeline runs on a CPU.

  python main.py --config=configs/digits_teacher.py --mode=teacher      # ~4 min on 2 CPU cores
  python main.py --config=configs/digits_teacher.py --mode=pipeline     # ~10 min: every stage + samples
"""

from configs import base
from modes.validation import validate_config


def get_config():
  config = base.get_config()
  config.workdir = 'runs/digits'
  config.data.name = 'digits'
  config.model.update(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), dropout=0.1)
  config.train.update(batch_size=128, num_steps=1000, lr=1e-3, warmup_steps=100, ema_decay=0.999,
                      p_uncond=0.1, log_every=100, checkpoint_every=400)
  config.stage1.update(batch_size=128, num_steps=250, lr=3e-4, warmup_steps=30, log_every=50,
                       checkpoint_every=250)
  config.stage2.update(batch_size=128, num_steps=150, lr=2e-4, start_steps=32, final_steps=1,
                       log_every=50, checkpoint_every=150)
  config.encoder.update(batch_size=128, num_steps=150, lr=2e-4, start_steps=16, final_steps=1, log_every=50,
                        checkpoint_every=150)
  config.pipeline.teacher_steps = (4, 8, 64)
  config.eval.update(extractor='classifier', num_samples=500, batch_size=250, guidance_ws=(0.0, 1.0, 4.0),
                     teacher_steps=(256, 8, 4), teacher_ddpm_steps=(64,), reference_examples=1500)
  validate_config(config)
  return config
