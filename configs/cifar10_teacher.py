"""CIFAR-10 guided teacher at paper scale (progressive-distillation U-Net); needs an accelerator.

  python main.py --config=configs/cifar10_teacher.py --mode=teacher --config.data.tfds_data_dir=DIR

Data: `tfds build cifar10 --data_dir=DIR` on a machine with internet, then copy DIR.
Model and optimizer follow the official progressive-distillation CIFAR-10 base config (batch 128, Adam
2e-4 with 1k warmup, weight decay 1e-3, EMA 0.9999, dropout 0.2, grad clip 1, truncated-SNR loss), with
v-prediction (the distillation default) and label dropout 0.1 for guidance. Not run here (no GPU, no data).
"""

from configs import base
from modes.validation import validate_config


def get_config():
  config = base.get_config()
  config.workdir = 'runs/cifar10'
  config.data.update(name='cifar10', random_flip=True)
  config.model.update(name='unet', ch=256, ch_mult=(1, 1, 1), num_res_blocks=3, attn_resolutions=(16,),
                      dropout=0.2, num_groups=32)
  config.train.update(batch_size=128, num_steps=400_000, lr=2e-4, warmup_steps=1000, weight_decay=1e-3,
                      grad_clip=1.0, ema_decay=0.9999, p_uncond=0.1, log_every=500, checkpoint_every=10_000)
  # Stage 1 and 2: no EMA, lr 5e-5 (stage 2 annealed linearly to 0 within each of the 50k-step rounds).
  config.stage1.update(batch_size=128, num_steps=50_000, lr=5e-5, warmup_steps=0, log_every=500,
                       checkpoint_every=10_000)
  config.stage2.update(batch_size=128, num_steps=50_000, lr=5e-5, warmup_steps=0, lr_decay='linear',
                       start_steps=1024, final_steps=1, log_every=500, checkpoint_every=10_000)
  config.pipeline.teacher_steps = (4, 8, 256)
  validate_config(config)
  return config
