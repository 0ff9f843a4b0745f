"""The methods the results compare: (checkpoint, sampler, steps) rows shared by the pipeline and
FID."""

import dataclasses
from typing import Optional

import ml_collections

from distill import stages
from eval.report import steps_text
from train import checkpoint, files, records


# The name of each checkpoint stage's rows in tables, titles and sample file names.
STAGE_METHOD_NAMES = {'teacher': 'teacher CFG', 'stage1': 'stage 1', 'stage2': 'student',
                      'direct': 'direct PD CFG', 'encoder': 'encoder'}


def sample_file_stem(name: str, sampler: str, steps: int, guidance_w: float) -> str:
  """The one name of a sample file (PNG, npz) of --mode=sample and the pipeline:
  <method>_<sampler>_<N>steps_w<w>.

  E.g. 'student_stochastic_4steps_w2' (the 2-step student's stochastic sampler),
  'teacher_CFG_ddim_64steps_w0'.
  """
  return f'{name.replace(" ", "_")}_{sampler}_{steps}steps_w{guidance_w:g}'


@dataclasses.dataclass(frozen=True)
class Method:
  name: str  # e.g. 'teacher CFG', 'student'
  sampler: str  # 'ddim' | 'stochastic' | 'ddpm'
  steps: int
  nfe: int  # network calls per sample
  ckpt_dir: str
  guidance_w: Optional[float] = None  # a fixed-w student's only w; None: every w of the table
  clip_x: Optional[bool] = None  # per-step x clipping of this row; None: the run's eval.clip_x
  round_steps: Optional[int] = None  # a halving round's student: the N of its N-step checkpoint

  @property
  def label(self) -> str:
    return f'{self.name} {self.sampler} {self.steps}'

  @property
  def model(self) -> str:
    """Which network: 'teacher CFG', 'stage 1', 'student 2-step' (the student of the halving round
    to 2 steps)."""
    return f'{self.name} {self.round_steps}-step' if self.round_steps else self.name

  @property
  def model_and_sampler(self) -> str:
    """The model, its sampler and steps, e.g. 'student 2-step, stochastic 4 steps'."""
    return f'{self.model}, {self.sampler} {steps_text(self.steps)}'

  @property
  def description(self) -> str:
    """model_and_sampler and the network calls per sample, e.g. 'student 2-step, stochastic 4 steps
    (NFE 4)'."""
    return f'{self.model_and_sampler} (NFE {self.nfe})'

  def title(self, guidance_w: float) -> str:
    """A sample picture's title: the description and w."""
    return f'{self.description}, w = {guidance_w:g}'

  def file_stem(self, guidance_w: float) -> str:
    return sample_file_stem(self.name, self.sampler, self.steps, guidance_w)


def checkpoint_method(record: dict, ckpt_dir: str, *, sampler: str, steps: int) -> Method:
  """The Method of sampling a checkpoint (its record) with sampler at steps, named as list_methods
  names it."""
  # guided (teacher, direct baseline): 2 calls a step
  nfe_per_step = 1 if record['guidance_input'] else 2
  return Method(STAGE_METHOD_NAMES.get(record['stage'], record['stage']), sampler, steps,
                steps * nfe_per_step, ckpt_dir, round_steps=record.get('sampling_steps'))


def list_methods(config, *, teacher_steps, teacher_ddpm_steps=(), stage1_steps=(),
                 student_steps=None, fixed_w_dir: str = '',
                 teacher_clipped_steps=()) -> list[Method]:
  """Teacher CFG DDIM (and DDPM) and the stage-1 student's DDIM at the given steps; every stage-2
  round; every round of the direct baseline that --mode=direct trained; with fixed_w_dir, the
  fixed-w students of that sweep.

  An N-step round gives 'student ddim N' and 'student stochastic 2N'
  (docs/math.md#stochastic-n-step-sampler), a direct round 'direct PD CFG ddim N' (2N calls);
  student_steps, if given, keeps only rows whose step count is in it.
  """
  teacher_dir = stages.stage_dir(config.workdir, 'teacher')
  methods = [Method('teacher CFG', 'ddim', n, 2 * n,
                    teacher_dir) for n in sorted(teacher_steps, reverse=True)]
  # x_pred clipped every step
  methods += [Method('teacher CFG clipped', 'ddim', n, 2 * n, teacher_dir, clip_x=True)
              for n in sorted(teacher_clipped_steps, reverse=True)]
  methods += [Method('teacher CFG', 'ddpm', n, 2 * n,
                     teacher_dir) for n in sorted(teacher_ddpm_steps, reverse=True)]
  stage1_dir = stages.stage_dir(config.workdir, 'stage1')
  methods += [
      Method('stage 1', 'ddim', n, n, stage1_dir) for n in sorted(stage1_steps, reverse=True)
  ]
  methods += _student_methods('student', config, config.workdir, student_steps)
  # the direct baseline, where --mode=direct trained it
  for n in stages.halving_rounds(config, 'direct'):
    direct_dir = stages.stage_dir(config.workdir, 'direct', n)
    if files.is_dir(direct_dir) and (student_steps is None or n in student_steps):
      methods.append(Method('direct PD CFG', 'ddim', n, 2 * n, direct_dir, round_steps=n))
  return methods + fixed_w_students(fixed_w_dir, student_steps) if fixed_w_dir else methods


def _student_methods(name: str, config, workdir: str, student_steps,
                     guidance_w=None) -> list[Method]:
  """The stage-2 rounds config describes, under workdir: 'ddim N' and, trained on the 1/(2N) grid,
  'stochastic 2N'."""
  # stochastic needs the 1/(2N) grid
  samplers = ('ddim', 'stochastic') if config.stage2.fine_grid else ('ddim',)
  methods = []
  for n in stages.stage2_rounds(config):
    round_dir = stages.stage_dir(workdir, 'stage2', n)
    for sampler, steps in ((s, n if s == 'ddim' else 2 * n) for s in samplers):
      if student_steps is None or steps in student_steps:
        methods.append(
            Method(name, sampler, steps, steps, round_dir, guidance_w=guidance_w, round_steps=n))
  return methods


def fixed_w_of(point_dir: str) -> Optional[float]:
  """The w a sweep point's stage 1 was distilled at (distill.w_min == distill.w_max), else None."""
  stage1_dir = stages.stage_dir(point_dir, 'stage1')
  if not files.is_dir(stage1_dir):
    return None
  distill = records.read(stage1_dir)['config']['distill']
  return float(distill['w_min']) if distill['w_min'] == distill['w_max'] else None


def fixed_w_students(fixed_w_dir: str, student_steps=None) -> list[Method]:
  """'student fixed-w' rows of a fixed-w sweep (configs/digits_fixed_w.py: WORKDIR/sweep/<point>/),
  each scored at its own w only: every stage-2 round of every point whose stage 1 saw one w (run_fid
  keeps those that exist)."""
  sweep_dir = files.join(fixed_w_dir, 'sweep')
  if not files.is_dir(sweep_dir):
    raise checkpoint.CheckpointError(
        f'eval.fixed_w_dir={fixed_w_dir!r} holds no sweep/: run `--mode=sweep '
        '--config=configs/digits_fixed_w.py` first, or leave it empty')
  methods = []
  for point in files.listdir(sweep_dir):
    point_dir = files.join(sweep_dir, point)
    w = fixed_w_of(point_dir)
    if w is None:
      continue
    record_config = ml_collections.ConfigDict(
        records.read(stages.stage_dir(point_dir, 'stage1'))['config'])
    methods += _student_methods(
        'student fixed-w', record_config, point_dir, student_steps, guidance_w=w)
  return methods


def existing(methods: list[Method]) -> list[Method]:
  """The methods whose checkpoint directory exists (a partly distilled run evaluates what it
  has)."""
  return [m for m in methods if files.is_dir(m.ckpt_dir)]
