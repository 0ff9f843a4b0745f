"""A sweep on the embedded digits: the pipeline for every w_max x stage-2 round length (4 points).

The points share one teacher, trained by the first point and copied to the others, so the first
point costs a default pipeline and each other one less (its stage 1 and stage 2). Results: each
point's results/summary.md and sweep/index.md (docs/running.md, "Notebook and sweeps").

  python main.py --config=configs/digits_sweep.py --mode=sweep  # runs/digits_sweep/sweep/...
  python main.py --config=configs/digits_sweep.py --mode=sweep --print_only  # one command per point
"""

import itertools

from configs import digits_teacher


def get_config():
  config = digits_teacher.get_config()
  config.workdir = 'runs/digits_sweep'
  return config


def get_sweep() -> list[dict]:
  """Override points (flat dotted keys) of --mode=sweep."""
  return [{'distill.w_max': w_max, 'stage2.num_steps': num_steps}
          for w_max, num_steps in itertools.product((2.0, 4.0), (120, 240))]
