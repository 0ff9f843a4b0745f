"""Stage 2 on the embedded digits: progressive halving 32 -> 1 steps of the stage-1 model.

Reproduces the paper's stage 2 (progressive distillation of the w-conditioned student); needs the
stage-1 model of configs/digits_stage1.py. Expected cost: a minute or two on a 2-core CPU; expected
result: rounds down to 4 steps within a few percent of their teachers' FID (docs/results.md, the
fidelity table).

  python main.py --config=configs/digits_stage2.py --mode=distill
"""

from configs import digits_teacher


def get_config():
  config = digits_teacher.get_config()
  config.distill.stage = 'stage2'
  return config
