"""The paper's fixed-w baseline on the embedded digits: one student chain per guidance weight.

  python main.py --config=configs/digits_fixed_w.py \
      --mode=sweep  # runs/digits_fixed_w/sweep/<w point>/...

Each point distills stage 1 with w fixed (distill.w_min = distill.w_max = w) and halves it from
stage2.start_steps (32) to 1, as the default does for the w-conditioned student; its fidelity table
and grids are drawn at that w only. The points differ only in distillation fields, so the sweep
trains one teacher (the default's: same fields) and copies it. Expected cost: about three default
pipelines less two teachers. Expected result, the paper's claim: the one w-conditioned student
within a fraction of an FID of the three fixed-w ones (docs/results.md, "Fixed-w students"; compare
each point's results/summary.md with the default run's).
"""

from configs import digits_teacher

GUIDANCE_WS = (0.0, 1.0, 4.0)


def get_config():
  config = digits_teacher.get_config()
  config.workdir = 'runs/digits_fixed_w'
  return config


def get_sweep() -> list[dict]:
  """One point per w: the student sees only that w, and is scored only there."""
  return [{'distill.w_min': w, 'distill.w_max': w, 'pipeline.guidance_ws': (w,),
           'eval.guidance_ws': (w,)} for w in GUIDANCE_WS]
