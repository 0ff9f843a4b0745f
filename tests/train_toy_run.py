"""Trains the toy_run fixture (tests/conftest.py): a toy-2D run trained well enough to measure.

Stage 1 as a 16-step teacher, halved to 8 and 4 steps for sampling (stage 2) and for encoding
(encoder); the teacher itself halved alike (the direct baseline). The fixture runs it as a process
of its own, `python tests/train_toy_run.py WORKDIR`, at main.py's CPU compiler level: its 5,700
steps of a small MLP are run-time bound, where the tests' level 0 (compile-time bound programs)
would run them slower.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import tiny  # pylint: disable=wrong-import-position


def toy_run_config(workdir: str):
  """configs/tiny.py with the toy run's network, step counts and optimizers, in workdir."""
  config = tiny.get_config()
  config.workdir = str(workdir)
  config.model.update(hidden=64, num_layers=3)
  config.train.update(num_steps=1500, batch_size=256, lr=2e-3, warmup_steps=50,
                      checkpoint_every=1500)
  config.stage1.update(num_steps=600, batch_size=256, lr=1e-3, warmup_steps=20,
                       checkpoint_every=600)
  for section in (config.stage2, config.encoder, config.direct):
    section.update(num_steps=600, batch_size=256, lr=5e-4, start_steps=16, final_steps=4,
                   checkpoint_every=600)
  config.transfer.update(steps=(4, 8), eval_images=256)
  return config


def train(config) -> None:
  """Every stage the toy run's tests read: teacher, stage 1, stage 2, encoder, direct."""
  from distill import stages  # pylint: disable=g-import-not-at-top
  stages.train_teacher(config)
  stages.train_stage1(config)
  stages.train_stage2(config)
  stages.train_encoder(config)
  stages.train_direct(config)


if __name__ == '__main__':
  from train.mesh import configure_cpu_compiler  # pylint: disable=g-import-not-at-top
  configure_cpu_compiler()  # main.py's level (XLA_FLAGS without one)
  train(toy_run_config(sys.argv[1]))
