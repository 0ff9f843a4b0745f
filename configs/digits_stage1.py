"""Stage 1 on the embedded digits: the w-conditioned student of the digits teacher.

Reproduces the paper's stage 1 (one student for every w in [0, 4]); needs the teacher of
configs/digits_teacher.py. Expected cost: a few minutes on a 2-core CPU (1500 iterations); expected
result: close to the teacher at w = 1, further from it towards w = 0 and w = 4 (docs/results.md, the
fidelity table and the stage-1 ablation).

  python main.py --config=configs/digits_stage1.py --mode=distill
"""

from configs import digits_teacher


def get_config():
  config = digits_teacher.get_config()
  config.distill.stage = 'stage1'
  return config
