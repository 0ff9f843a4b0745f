"""MODES: one function per `main.py --mode`; main.py only parses flags and dispatches through it."""

from distill import stages
from modes.fid import run_fid
from modes.pipeline import run_pipeline
from modes.sampling import run_sample
from modes.sweep import run_sweep
from modes.transfer import run_transfer


def run_distill(config):
  """--mode=distill runs the stage the config names (config.distill.stage)."""
  return {'stage1': stages.train_stage1,
          'stage2': stages.train_stage2}[config.distill.stage](config)


MODES = {
    'teacher': stages.train_teacher,
    'stage1': stages.train_stage1,
    'stage2': stages.train_stage2,
    'distill': run_distill,
    'sample': run_sample,
    'pipeline': run_pipeline,
    'fid': run_fid,
    'encoder': stages.train_encoder,
    'direct': stages.train_direct,
    'transfer': run_transfer,
    'sweep': run_sweep,
}
