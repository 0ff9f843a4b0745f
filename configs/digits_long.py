"""The digits pipeline with larger budgets, to see how the distillation gap closes with training.

Same data, model and recipe as configs/digits_teacher.py; 6000 teacher iterations (3.75x), 1500 for
stage 1 (3x), stage 2 from 32 steps with 800 iterations per round (batch 64 as the default).
Expected cost: several times the default pipeline's; the run with the earlier batch of 128 (the same
examples) and what it showed are in docs/results.md ("The long run").

  python main.py --config=configs/digits_long.py --mode=pipeline    # runs/digits_long
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
