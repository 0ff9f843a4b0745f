"""Stage 1 on the embedded digits: the w-conditioned student of the digits teacher (~1 min on CPU).

  python main.py --config=configs/digits_stage1.py --mode=distill
"""

from configs import digits_teacher


def get_config():
  config = digits_teacher.get_config()
  config.distill.stage = 'stage1'
  return config
