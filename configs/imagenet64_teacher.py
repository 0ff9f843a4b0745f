"""ImageNet 64x64 guided teacher at paper scale (Meng et al. distill 1024 -> 1 steps); needs a TPU/GPU pod.

  python main.py --config=configs/imagenet64_teacher.py --mode=teacher --config.data.tfds_data_dir=DIR

Data: tfds 'imagenet_resized/64x64' prepared in DIR (needs the manual ImageNet download). Distillation
follows the published settings: batch 2048, lr 1e-4, 50k iterations per round, 1024 -> 1 steps. The
published base model used the "both" (x/eps blend) output; this config uses v-prediction. Not run here.
"""

from configs import base
from modes.validation import validate_config


def get_config():
  config = base.get_config()
  config.workdir = 'runs/imagenet64'
  config.data.update(name='imagenet64', random_flip=True)
  config.model.update(name='unet', ch=192, ch_mult=(1, 2, 3, 4), num_res_blocks=3, attn_resolutions=(32, 16, 8),
                      dropout=0.1, num_groups=32)
  config.train.update(batch_size=2048, num_steps=500_000, lr=1e-4, warmup_steps=1000, weight_decay=0.0,
                      grad_clip=1.0, ema_decay=0.9999, p_uncond=0.1, log_every=500, checkpoint_every=5_000)
  config.stage1.update(batch_size=2048, num_steps=50_000, lr=1e-4, warmup_steps=0, log_every=500,
                       checkpoint_every=5_000)
  config.stage2.update(batch_size=2048, num_steps=50_000, lr=1e-4, warmup_steps=0, lr_decay='linear',
                       start_steps=1024, final_steps=1, log_every=500, checkpoint_every=5_000)
  config.pipeline.teacher_steps = (4, 8, 256)
  validate_config(config)
  return config
