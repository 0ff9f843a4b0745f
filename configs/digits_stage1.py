"""Stage 1 on the embedded digits: the w-conditioned student of the digits teacher.

Reproduces the paper's stage 1 (one student for every w in [0, 4]); needs the teacher of
configs/digits_teacher.py. Expected cost: about a minute on a 2-core CPU; expected result: its FID within a few
percent of the teacher's at every w (docs/results.md, the quality-lost-per-stage table).

  python main.py --config=configs/digits_stage1.py --mode=distill
"""

from configs import digits_teacher


def get_config():
  config = digits_teacher.get_config()
  config.distill.stage = 'stage1'
  return config
