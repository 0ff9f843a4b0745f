"""The w range stage 1 is trained on, on the embedded digits: w ~ U[0, w_max] for w_max in {1, 2, 4,
8}.

  python main.py --config=configs/digits_w_range.py \
      --mode=sweep  # runs/digits_w_range/sweep/<w_max point>/...

The paper reports that the range matters little. Each point is the default pipeline with another
distill.w_max (w_max = 4 is the default itself); the points differ only in distillation fields, so
the sweep trains one teacher and copies it. Every point's fidelity table scores its students at w =
0, 1 and 4 (w = 4 lies outside the range of the w_max = 1 and 2 points: there the student
extrapolates). Expected cost: about four default pipelines less three teachers; the result:
docs/results.md ("The w range of stage 1").
"""

from configs import digits_teacher

W_MAX = (1.0, 2.0, 4.0, 8.0)


def get_config():
  config = digits_teacher.get_config()
  config.workdir = 'runs/digits_w_range'
  return config


def get_sweep() -> list[dict]:
  """One point per w_max."""
  return [{'distill.w_max': w_max} for w_max in W_MAX]
