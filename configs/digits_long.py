"""The digits pipeline with larger budgets, to see how the distillation gap closes with training.

  python main.py --config=configs/digits_long.py --mode=pipeline    # runs/digits_long

Same data, model and recipe as configs/digits_teacher.py; 6000 teacher iterations (3.75x), 1500 for stage 1
(3x), stage 2 from 32 steps with 800 iterations per round (batch 64 as the default). Measured with the earlier
batch of 128 (3000 / 750 / 400 iterations, the same examples): 39 min on 2 CPU cores with other work sharing
them (README, "The long run").
"""

from configs import digits_teacher


def get_config():
  config = digits_teacher.get_config()
  config.workdir = 'runs/digits_long'
  config.train.update(num_steps=6000, checkpoint_every=1000)
  config.stage1.update(num_steps=1500, checkpoint_every=500)
  config.stage2.update(num_steps=800, start_steps=32, checkpoint_every=400)
  config.pipeline.quality_steps = 32
  return config
