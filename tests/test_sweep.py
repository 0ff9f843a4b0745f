"""--mode=sweep on two tiny points: separate workdirs, an index, printed commands, unknown keys
refused."""

import json
import os
import shlex
import sys

import pytest
from absl import flags
from ml_collections import config_flags

from conftest import tiny_config
from distill import stages
from modes import sweep
from train import checkpoint, records

pytestmark = pytest.mark.integration  # the second tier (tests/conftest.py)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_PATH = os.path.join(REPO, 'configs', 'tiny.py')
POINTS = [{'distill.w_max': 2.0, 'stage2.num_steps': 10},
          {'distill.w_max': 3.0, 'stage2.num_steps': 10}]


def _must_not_run(config):
  raise AssertionError(f'the pipeline ran for {config.workdir}')


def _parse_command(line: str, monkeypatch):
  """The config main.py would build from a printed command (config_flags reads overrides from
  sys.argv)."""
  args = shlex.split(line)
  assert args[:2] == ['python', 'main.py'] and '--mode=pipeline' in args, line
  argv = ['main.py', *(a for a in args[2:] if a.startswith('--config'))]
  monkeypatch.setattr(sys, 'argv', argv)
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file('config', None, 'config file', flag_values=flag_values,
                                  lock_config=True)
  flag_values(argv)
  return flag_values.config


def test_sweep_runs_each_point_in_its_own_workdir(tmp_path):
  config = tiny_config(tmp_path)
  workdirs = sweep.run_sweep(config, config_path=TINY_PATH, points=POINTS)
  names = ['distill.w_max=2,stage2.num_steps=10', 'distill.w_max=3,stage2.num_steps=10']
  assert workdirs == [str(tmp_path / 'sweep' / name) for name in names]
  for workdir, point in zip(workdirs, POINTS):
    assert os.path.getsize(os.path.join(workdir, 'results', 'summary.md')) > 0
    assert os.path.isdir(os.path.join(workdir, 'teacher'))
    with open(os.path.join(workdir, 'stage1', 'config.json')) as f:
      assert json.load(f)['distill']['w_max'] == point['distill.w_max']
  index = (tmp_path / 'sweep' / 'index.md').read_text()
  assert all(f'`{name}`' in index and workdir in index for name, workdir in zip(names, workdirs))
  # Only distillation fields differ: the second point gets a copy of the first point's teacher, not
  # a new one.
  assert f'| teacher (`{names[0]}`) |' in index
  teachers = [checkpoint.params_digest(checkpoint.load_params(
      stages.stage_dir(w, 'teacher'), abstract,
      check_record=records.checker(record, stages.stage_dir(w, 'teacher'))))
              for w in workdirs for abstract, record in [_teacher_shapes(config, w)]]
  assert teachers[0] == teachers[1]
  assert not os.path.isdir(
      os.path.join(workdirs[1], 'logs', 'teacher')), 'the second point trained a teacher'


def _teacher_shapes(config, workdir):
  record = records.make(config, stage='teacher')
  return records.build(record)[1], record


def test_stage_inputs_share_the_teacher_for_distillation_fields_and_stage_1_for_stage_2_fields(
    tmp_path):
  config = tiny_config(tmp_path)
  points = {name: sweep.point_config(config, overrides,
                                     str(tmp_path / name)) for name, overrides in (
      ('base', {}), ('w_max', {'distill.w_max': 3.0}), ('rounds', {'stage2.num_steps': 7}),
      ('teacher_lr', {'train.lr': 1e-4}), ('eval', {'eval.num_samples': 1024}))}
  same = lambda stage, a, b: sweep.stage_inputs(points[a], stage) == sweep.stage_inputs(
      points[b], stage)
  assert same('teacher', 'base', 'w_max') and not same('stage1', 'base', 'w_max')
  assert same('teacher', 'base', 'rounds') and same('stage1', 'base', 'rounds')
  assert not same('teacher', 'base', 'teacher_lr')
  assert same('teacher', 'base', 'eval') and same('stage1', 'base', 'eval')


# ml_collections loading tiny.py
@pytest.mark.filterwarnings('ignore:the load_module:DeprecationWarning')
def test_print_only_prints_one_command_per_point_and_runs_nothing(tmp_path, capsys, monkeypatch):
  monkeypatch.setattr(sweep, 'run_pipeline', _must_not_run)
  config = tiny_config(tmp_path, train=7)
  workdirs = sweep.run_sweep(config, config_path=TINY_PATH, print_only=True, points=POINTS)
  lines = capsys.readouterr().out.strip().splitlines()
  assert len(lines) == 2
  for line, workdir, point in zip(lines, workdirs, POINTS):
    parsed = _parse_command(line, monkeypatch)
    assert parsed.workdir == workdir
    assert parsed.distill.w_max == point['distill.w_max'] and parsed.stage2.num_steps == 10
    assert parsed.train.num_steps == 7  # a field changed outside the sweep travels with the command
  assert not (tmp_path / 'sweep').exists()


def test_unknown_key_is_refused_before_any_point_runs(tmp_path, monkeypatch):
  monkeypatch.setattr(sweep, 'run_pipeline', _must_not_run)
  points = [POINTS[0], {'distill.w_maximum': 1.0}]
  with pytest.raises(ValueError, match="unknown sweep key 'distill.w_maximum'"):
    sweep.run_sweep(tiny_config(tmp_path), config_path=TINY_PATH, points=points)
  assert not (tmp_path / 'sweep').exists()


def test_digits_sweep_lists_four_valid_points(tmp_path):
  config_path = os.path.join(REPO, 'configs', 'digits_sweep.py')
  points = sweep.load_sweep(config_path)
  assert len(points) == 4 and len({sweep.point_name(p) for p in points}) == 4
  base = sweep.load_config_module(config_path).get_config()
  for point in points:
    config = sweep.point_config(base, point, str(tmp_path / sweep.point_name(point)))
    assert ((config.distill.w_max, config.stage2.num_steps) ==
            (point['distill.w_max'], point['stage2.num_steps']))


def test_fixed_w_sweep_has_one_valid_point_per_w_sharing_one_teacher(tmp_path):
  path = os.path.join(REPO, 'configs', 'digits_fixed_w.py')
  module = sweep.load_config_module(path)
  config = module.get_config()
  points = sweep.load_sweep(path)
  names = [sweep.point_name(p) for p in points]
  assert names[1] == 'distill.w_min=1,distill.w_max=1,pipeline.guidance_ws=1,eval.guidance_ws=1'
  configs = [sweep.point_config(config, p, str(tmp_path / n)) for p, n in zip(points, names)]
  assert [(c.distill.w_min, c.distill.w_max, tuple(c.pipeline.guidance_ws)) for c in configs] == \
      [(w, w, (w,)) for w in module.GUIDANCE_WS]
  assert len({sweep.stage_inputs(c, 'teacher') for c in configs}) == 1
  assert len({sweep.stage_inputs(c, 'stage1') for c in configs}) == 3
  default = sweep.point_config(config, {}, str(tmp_path / 'default'))
  # the default's teacher
  assert sweep.stage_inputs(default, 'teacher') == sweep.stage_inputs(configs[0], 'teacher')


def test_w_range_sweep_varies_only_w_max_and_shares_the_default_teacher(tmp_path):
  path = os.path.join(REPO, 'configs', 'digits_w_range.py')
  module = sweep.load_config_module(path)
  config = module.get_config()
  points = sweep.load_sweep(path)
  configs = [sweep.point_config(config, p, str(tmp_path / sweep.point_name(p))) for p in points]
  assert [c.distill.w_max for c in configs] == [1.0, 2.0, 4.0, 8.0]
  default = sweep.point_config(config, {}, str(tmp_path / 'default'))
  assert {sweep.stage_inputs(c, 'teacher') for c in configs
         } == {sweep.stage_inputs(default, 'teacher')}
  # w_max = 4: the default
  assert sweep.stage_inputs(configs[2], 'stage1') == sweep.stage_inputs(default, 'stage1')
  assert len({sweep.stage_inputs(c, 'stage1') for c in configs}) == 4
