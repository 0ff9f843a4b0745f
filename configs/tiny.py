"""A tiny config for tests and smoke runs: the 2-D toy set, a small MLP, a few steps per stage
(seconds).

  python main.py --config=configs/tiny.py --mode=pipeline --config.workdir=/tmp/tiny
"""

from configs import base


def get_config():
  config = base.get_config()
  config.workdir = 'runs/tiny'
  config.data.name = 'toy2d'
  config.model.update(name='mlp', hidden=64, num_layers=2, dropout=0.0)
  for section in (config.train, config.stage1, config.stage2, config.encoder, config.direct):
    section.update(batch_size=64, num_steps=20, warmup_steps=2, log_every=10, checkpoint_every=10)
  config.train.lr = 1e-3
  config.stage2.update(start_steps=4, final_steps=1)
  config.encoder.update(start_steps=4, final_steps=1)
  config.direct.update(start_steps=4, final_steps=1)
  config.transfer.update(source_class=0, target_class=1, num_images=4, steps=(1, 2),
                         eval_ws=(0.0, 2.0), eval_images=64)
  config.pipeline.update(teacher_steps=(2, 8), guidance_ws=(0.0, 2.0), per_class=4, quality_steps=8,
                         quality_samples=256, quality_ws=(0.0, 2.0), floor_steps=2)
  config.eval.update(extractor='toy2d', num_samples=512, batch_size=256, guidance_ws=(0.0, 2.0),
                     teacher_steps=(64, 4), teacher_ddpm_steps=(64,), reference_examples=2048)
  return config
