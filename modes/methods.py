"""The methods the results compare: (checkpoint, sampler, steps) rows shared by the pipeline and FID."""

import dataclasses

from distill import stages
from train import files


@dataclasses.dataclass(frozen=True)
class Method:
  name: str  # e.g. 'teacher CFG', 'student'
  sampler: str  # 'ddim' | 'stochastic' | 'ddpm'
  steps: int
  nfe: int  # network calls per sample
  ckpt_dir: str

  @property
  def label(self) -> str:
    return f'{self.name} {self.sampler} {self.steps}'

  @property
  def file_stem(self) -> str:
    return f'{self.name.replace(" ", "_")}_{self.sampler}_{self.steps:04d}'


def list_methods(config, *, teacher_steps, teacher_ddpm_steps=(), stage1_steps=(), student_steps=None) -> list[Method]:
  """Teacher CFG DDIM (and DDPM) and the stage-1 student's DDIM at the given steps; every stage-2 round; every
  round of the direct baseline that --mode=direct trained.

  An N-step round gives 'student ddim N' and 'student stochastic 2N' (docs/math.md#stochastic-n-step-sampler), a
  direct round 'direct PD CFG ddim N' (2N calls); student_steps, if given, keeps only rows whose step count is in it.
  """
  teacher_dir = stages.stage_dir(config.workdir, 'teacher')
  methods = [Method('teacher CFG', 'ddim', n, 2 * n, teacher_dir) for n in sorted(teacher_steps, reverse=True)]
  methods += [Method('teacher CFG', 'ddpm', n, 2 * n, teacher_dir) for n in sorted(teacher_ddpm_steps, reverse=True)]
  stage1_dir = stages.stage_dir(config.workdir, 'stage1')
  methods += [Method('stage 1', 'ddim', n, n, stage1_dir) for n in sorted(stage1_steps, reverse=True)]
  samplers = ('ddim', 'stochastic') if config.stage2.fine_grid else ('ddim',)  # stochastic needs the 1/(2N) grid
  for n in stages.stage2_rounds(config):
    round_dir = stages.stage_dir(config.workdir, 'stage2', n)
    for sampler, steps in ((s, n if s == 'ddim' else 2 * n) for s in samplers):
      if student_steps is None or steps in student_steps:
        methods.append(Method('student', sampler, steps, steps, round_dir))
  for n in stages.halving_rounds(config, 'direct'):  # the direct baseline, where --mode=direct trained it
    direct_dir = stages.stage_dir(config.workdir, 'direct', n)
    if files.is_dir(direct_dir) and (student_steps is None or n in student_steps):
      methods.append(Method('direct PD CFG', 'ddim', n, 2 * n, direct_dir))
  return methods


def existing(methods: list[Method]) -> list[Method]:
  """The methods whose checkpoint directory exists (a partly distilled run evaluates what it has)."""
  return [m for m in methods if files.is_dir(m.ckpt_dir)]
