"""The embedded default: scikit-learn's 8x8 digits, a small U-Net; the whole pipeline runs on a CPU.

Reproduces the paper's pipeline on data small enough for a CPU: the guided teacher, the
w-conditioned stage-1 student and stage 2 halved 32 -> 1 steps, each stage scored against the guided
teacher on the same noise.

  python main.py --config=configs/digits_teacher.py \
      --mode=pipeline  # every stage, the fidelity table, samples
  python main.py --config=configs/digits_teacher.py --mode=teacher      # the teacher alone
  python main.py --config=configs/digits_teacher.py --mode=fid  # after the pipeline: the FID table

Expected cost: minutes on a 2-core CPU (the pipeline under 10). Expected result: students at 4-8
steps near the teacher's 64-step FID at w = 0, 1 and 4, far ahead of its own DDIM at the same
network calls; at the ends of the w range stage 1 and its students are measurably further from the
teacher than at w = 1 (docs/results.md: the fidelity table, the FID table, their commands and
provenance).

The recipe was chosen by the ablations in docs/results.md ("Choosing the digits recipe"): a
24-channel U-Net (about half the FLOPs of a 32-channel one; the 16-channel one was clearly worse),
batch 64 in every stage (twice the updates of batch 128 for the same examples and time: a better
teacher, a stage 1 closer to it at every w), students without dropout (as published), stage 1 at lr
2e-3 decaying linearly to 0 with 10x that on the fresh w-embedding, for 1500 iterations, with w also
scaling each residual block's activations (distill.guidance_gains; the stage-1 ablation: the most
faithful across w of the recipes tried), stage 2 from 32 steps (every student better at w = 0 than
from 16, for one round more) at lr 5e-4 for 160 iterations a round (as good as 2e-4 for 240) with
student EMA and a quarter of its times off the N-step grid.
"""

from configs import base


def get_config():
  config = base.get_config()
  config.workdir = 'runs/digits'
  config.data.name = 'digits'
  config.model.update(ch=24, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), dropout=0.1)
  # Batch 64 for every stage: twice the updates for the same examples, as fast per example on a
  # small CPU.
  config.train.update(batch_size=64, num_steps=1600, lr=1e-3, warmup_steps=200, ema_decay=0.999,
                      p_uncond=0.1, log_every=200, checkpoint_every=800)
  config.distill.dropout = 0.0  # students: no dropout, as published
  # w also scales each residual block's normalised activations: closer to the teacher at w = 0 and 1
  # (the stage-1 ablation in docs/results.md).
  config.distill.guidance_gains = True
  # A high lr decaying to 0, 10x higher still on the fresh w-embedding: without it the shared
  # backbone learns the average guidance first and the w response stays flat (guidance leaks into w
  # = 0). 1500 iterations: the distance to the teacher at the ends of the w range keeps falling with
  # iterations (docs/results.md).
  config.stage1.update(batch_size=64, num_steps=1500, lr=2e-3, lr_decay='linear', warmup_steps=30,
                       log_every=250, checkpoint_every=500)
  config.stage1.lr_scales.guidance_embed = 10.0
  # Student EMA (each round's EMA is the next round's teacher) and a quarter of the times off the
  # N-step grid.
  config.stage2.update(batch_size=64, num_steps=160, lr=5e-4, start_steps=32, final_steps=1,
                       ema_decay=0.99, off_grid_fraction=0.25, log_every=80, checkpoint_every=160)
  # The direct baseline (--mode=direct, not part of the pipeline): stage 2's rounds, from the
  # teacher itself.
  config.direct.update(batch_size=64, num_steps=160, lr=5e-4, start_steps=32, final_steps=1,
                       ema_decay=0.99, log_every=80, checkpoint_every=160)
  config.encoder.update(batch_size=128, num_steps=150, lr=2e-4, start_steps=16, final_steps=1,
                        log_every=50, checkpoint_every=150)
  # The fidelity table: every model against the teacher's CFG DDIM at stage2.start_steps (stage 1's
  # samples there are also round 1's teacher's), at six w including ones training never singles out;
  # the floor is the teacher's own 8-step sampler. The students' stochastic samplers are left to
  # --mode=fid (a third of the table's network calls).
  config.pipeline.update(teacher_steps=(4, 8, 64), quality_samples=1000, quality_steps=32,
                         quality_ws=(0.0, 0.5, 1.0, 2.0, 3.0, 4.0), floor_steps=8,
                         quality_stochastic=False)
  config.eval.update(extractor='classifier', num_samples=2000, batch_size=250,
                     guidance_ws=(0.0, 1.0, 4.0), teacher_steps=(64, 8, 4, 2),
                     teacher_ddpm_steps=(), stage1_steps=(64,), reference_examples=1500)
  return config
