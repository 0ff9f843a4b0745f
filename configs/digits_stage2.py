"""Stage 2 on the embedded digits: progressive halving 32 -> 1 steps of the stage-1 model (~1.5 min on 2 cores).

  python main.py --config=configs/digits_stage2.py --mode=distill
"""

from configs import digits_teacher


def get_config():
  config = digits_teacher.get_config()
  config.distill.stage = 'stage2'
  return config
